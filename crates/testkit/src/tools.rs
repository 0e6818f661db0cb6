//! Finding the external tools tests use as oracles (unsquashfs, fsck.erofs, nix, ...).

use std::path::{Path, PathBuf};

/// Directories searched after `PATH`: the private prefix `cargo xtask setup` provisions, then
/// the hand-made one the first session used.
fn extra_dirs() -> Vec<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    vec![
        workspace.join("target/tools/bin"),
        PathBuf::from("/tmp/prov/bin"),
    ]
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
