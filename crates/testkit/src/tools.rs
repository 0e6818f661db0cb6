//! Finding the external tools tests use as oracles (unsquashfs, fsck.erofs, nix, ...), and the
//! settings Nix runs with.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Nix settings of every test and of the harness (`cargo xtask vm-test`, `nix.env`), given
/// through the environment only: /etc/nix is never read or changed. Builds run as root without
/// a build users group or sandbox, nothing is substituted (no network), and paths added or built
/// here carry no signatures.
pub const NIX_CONFIG: &str = "experimental-features = nix-command\n\
build-users-group =\n\
sandbox = false\n\
substituters =\n\
require-sigs = false\n\
max-jobs = auto\n\
warn-dirty = false";

/// A command running Nix's `program` (`nix`, `nix-build`, `nix-store`, `nix-instantiate`; the
/// provisioned one, see [`tool`]) with [`NIX_CONFIG`].
pub fn nix_command(program: &str) -> Command {
    let mut command = Command::new(tool(program));
    command.env("NIX_CONFIG", NIX_CONFIG);
    command
}

/// Directories searched after `PATH`: the private prefix `cargo xtask setup` provisions, then
/// the system's (so a tool shadowed on `PATH` by the private prefix is still found).
fn extra_dirs() -> Vec<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    vec![
        workspace.join("target/tools/bin"),
        PathBuf::from("/usr/sbin"),
        PathBuf::from("/usr/bin"),
    ]
}

/// A pair of erofs-utils tools from one installation, with mkfs.erofs's `(major, minor)`.
#[derive(Debug, Clone)]
pub struct ErofsUtils {
    pub mkfs: PathBuf,
    pub fsck: PathBuf,
    pub version: (u32, u32),
}

/// Every erofs-utils installation with a distinct version, in search order: `PATH`, the private
/// prefix (1.8.6 from `cargo xtask setup`), the system's (Debian 12: 1.5). Tests pick the
/// versions they need from it and fail, naming the version, when it is absent.
pub fn erofs_utils() -> Vec<ErofsUtils> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut seen = std::collections::BTreeSet::new();
    let mut found = Vec::new();
    for dir in path_dirs.into_iter().chain(extra_dirs()) {
        let mkfs = dir.join("mkfs.erofs");
        let fsck = dir.join("fsck.erofs");
        if !mkfs.is_file() || !fsck.is_file() {
            continue;
        }
        let version = erofs_version(&mkfs);
        if seen.insert(version) {
            found.push(ErofsUtils {
                mkfs,
                fsck,
                version,
            });
        }
    }
    found
}

/// The installation of erofs-utils `major.minor`; panics with an install hint without it.
pub fn erofs_utils_version(major: u32, minor: u32) -> ErofsUtils {
    let all = erofs_utils();
    all.iter()
        .find(|u| u.version == (major, minor))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "this test needs erofs-utils {major}.{minor} (found {all:?}): `cargo xtask setup` \
                 installs Debian 12's 1.5 and unpacks 1.8.6 under target/tools"
            )
        })
}

/// The newest erofs-utils, which must have `-Efragments` (1.6+, microvm.nix's flags).
pub fn newest_erofs_utils() -> ErofsUtils {
    let all = erofs_utils();
    all.iter()
        .max_by_key(|u| u.version)
        .filter(|u| u.version >= (1, 6))
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "this test needs erofs-utils >= 1.6 for microvm.nix's -Efragments (found \
                 {all:?}): run `cargo xtask setup`"
            )
        })
}

/// mkfs.erofs's `(major, minor)`, as the builder probes it (`-V`, or for 1.5, which has no
/// `-V`, the banner of a build).
fn erofs_version(mkfs: &Path) -> (u32, u32) {
    let probed = storedisk_builder::erofs::MkfsErofs::probe(mkfs)
        .unwrap_or_else(|e| panic!("cannot tell the version of {}: {e}", mkfs.display()));
    let (major, minor, _) = probed.version_parts();
    (major, minor)
}

/// The path of the external tool `name`, from `$STOREDISK_TOOL_<NAME>` (upper case, `-` and `.`
/// as `_`), then `PATH`, then the private tool prefix. Panics with an install hint when the tool
/// is missing: a test that needs a tool must fail, not pass silently, without it.
pub fn tool(name: &str) -> PathBuf {
    let var = format!(
        "STOREDISK_TOOL_{}",
        name.to_uppercase().replace(['-', '.'], "_")
    );
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let prefer_private = matches!(
        name,
        "nix" | "nix-store" | "nix-build" | "nix-instantiate" | "nix-hash"
    );
    let mut dirs = path_dirs;
    if prefer_private {
        // Debian 12's own Nix (2.8) is too old for unsafeDiscardReferences: take the
        // provisioned one first.
        let mut private = extra_dirs();
        private.extend(dirs);
        dirs = private;
    } else {
        dirs.extend(extra_dirs());
    }
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "this test needs the external tool `{name}`, which is not installed: run `cargo xtask setup` \
         (it installs squashfs-tools, squashfs-tools-ng, erofs-utils, Nix, QEMU...) or set {var}"
    );
}
