//! Where the harness's external tools are: Nix (system or the private prefix under
//! `target/tools/`), QEMU, a kernel with the modules a store disk guest needs, busybox, and the
//! aarch64 guest's hypervisor (`qemu-system-aarch64`) and arm64 kernel. Locating never installs
//! anything; `setup` does that.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::Cmd;

/// Oldest Nix with `unsafeDiscardReferences` and the JSON formats we read.
pub const MIN_NIX: (u32, u32) = (2, 18);

/// Kernel modules the stage-1 initrd loads (with their dependencies) to mount a store disk
/// (overlay: to stack the layers of a layered one).
pub const GUEST_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "squashfs", "erofs", "overlay"];

/// The checkout's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// The private tool prefix `cargo xtask setup` fills.
pub fn tools_dir() -> PathBuf {
    target_dir().join("tools")
}

/// Nix settings passed through the environment only: /etc/nix is never touched. The tests'
/// own, so that the harness, `nix.env` and every test run Nix alike.
pub use storedisk_testkit::NIX_CONFIG;

/// A Nix installation the harness can drive.
#[derive(Debug, Clone)]
pub struct Nix {
    /// Directory holding `nix`, `nix-build`, `nix-store`, `nix-instantiate`.
    pub bin_dir: PathBuf,
    pub version: String,
}

impl Nix {
    /// A command running one of Nix's programs with the harness's configuration.
    pub fn cmd(&self, program: &str) -> Cmd {
        Cmd::new(self.bin_dir.join(program))
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("PATH", path_with(&self.bin_dir))
            .timeout(Duration::from_secs(1800))
    }
}

/// `dir` in front of the current PATH.
pub fn path_with(dir: &Path) -> String {
    let current =
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".to_owned());
    format!("{}:{current}", dir.display())
}

/// A kernel image plus the module files (dependencies first) that stage 1 must load.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub release: String,
    pub vmlinuz: PathBuf,
    /// The release's modules directory (`/lib/modules/<release>`): `modules` lie below it.
    pub moddir: PathBuf,
    /// Module files in load order; `.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz`.
    pub modules: Vec<PathBuf>,
}

/// Every tool `vm-test` needs, located.
#[derive(Debug, Clone)]
pub struct Toolchain {
    pub nix: Nix,
    pub qemu: PathBuf,
    /// socat, which microvm-shutdown (like microvm.nix's) speaks QMP with.
    pub socat: PathBuf,
    pub kernel: Kernel,
    pub busybox: PathBuf,
    /// The aarch64 guest's hypervisor.
    pub qemu_aarch64: PathBuf,
    /// The aarch64 guest's kernel (Debian's arm64 cloud kernel, unpacked by `setup`).
    pub kernel_aarch64: Kernel,
}

/// Parses "nix (Nix) 2.26.3" into (2, 26).
pub fn parse_nix_version(text: &str) -> Option<(u32, u32)> {
    let version = text.split_whitespace().last()?;
    let mut parts = version.split(['.', 'p', 'r', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Finds a program on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A Nix at `bin_dir` if it runs and is new enough.
pub fn probe_nix(bin_dir: &Path) -> Option<Nix> {
    let nix = bin_dir.join("nix");
    if !is_executable(&nix) {
        return None;
    }
    let out = Cmd::new(&nix)
        .arg("--version")
        .timeout(Duration::from_secs(20))
        .quiet()
        .run()
        .ok()?;
    let version = out.stdout.trim().to_owned();
    (parse_nix_version(&version)? >= MIN_NIX).then(|| Nix {
        bin_dir: bin_dir.to_owned(),
        version,
    })
}

/// The Nix to use: the system's if new enough, else the private prefix's.
pub fn locate_nix() -> Option<Nix> {
    let system = which("nix").and_then(|p| p.parent().and_then(probe_nix));
    system.or_else(|| probe_nix(&tools_dir().join("bin")))
}

/// `qemu-system-x86_64` if it has the `microvm` machine.
pub fn locate_qemu() -> Result<PathBuf> {
    locate_qemu_with_machine("qemu-system-x86_64", "microvm", "qemu-system-x86")
}

/// `qemu-system-aarch64` (the aarch64 guest's hypervisor, TCG here) if it has the `virt` machine.
pub fn locate_qemu_aarch64() -> Result<PathBuf> {
    locate_qemu_with_machine("qemu-system-aarch64", "virt", "qemu-system-arm")
}

fn locate_qemu_with_machine(program: &str, machine: &str, package: &str) -> Result<PathBuf> {
    let qemu = which(program)
        .with_context(|| format!("{program} is not installed (apt package {package})"))?;
    let machines = Cmd::new(&qemu)
        .args(["-machine", "help"])
        .timeout(Duration::from_secs(30))
        .quiet()
        .read()?;
    if !machines
        .lines()
        .any(|l| l.split_whitespace().next() == Some(machine))
    {
        bail!("{} has no `{machine}` machine type", qemu.display());
    }
    Ok(qemu)
}

/// A static busybox (the fixtures' builder and the guest's userland).
pub fn locate_busybox() -> Result<PathBuf> {
    for candidate in ["/bin/busybox", "/usr/bin/busybox"] {
        let path = PathBuf::from(candidate);
        if is_executable(&path) {
            return Ok(path);
        }
    }
    which("busybox").context("busybox is not installed (apt package busybox-static)")
}

/// The newest kernel under /boot whose modules directory has every module in [`GUEST_MODULES`].
pub fn locate_kernel() -> Result<Kernel> {
    if let Some(kernel) = kernel_from_env() {
        return kernel;
    }
    let mut releases: Vec<String> = std::fs::read_dir("/boot")
        .context("reading /boot")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_owned)
        })
        .collect();
    releases.sort_by(|a, b| compare_versions(b, a));
    let mut why = Vec::new();
    for release in releases {
        match kernel_for_release(&release) {
            Ok(kernel) => return Ok(kernel),
            Err(err) => why.push(format!("{release}: {err:#}")),
        }
    }
    bail!(
        "no usable kernel in /boot ({})",
        if why.is_empty() {
            "no vmlinuz-*".to_owned()
        } else {
            why.join("; ")
        }
    )
}

/// Orders "6.12.9+x" before "6.12.10+x".
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    key(a).cmp(&key(b))
}

/// ELF `e_machine` of AArch64.
pub const ELF_MACHINE_AARCH64: u16 = 183;

/// Where `setup` puts the aarch64 guest's static busybox.
pub fn arm64_busybox_path() -> PathBuf {
    tools_dir().join("arm64/busybox")
}

/// The aarch64 guest's busybox, once `setup` has unpacked it.
pub fn arm64_busybox() -> Option<PathBuf> {
    let path = arm64_busybox_path();
    path.is_file().then_some(path)
}

/// Where `setup` unpacks Debian's arm64 kernel package (`boot/vmlinuz-<release>`, a raw arm64
/// `Image`, and `lib/modules/<release>/` with the modules.dep that `depmod -b` wrote).
pub fn arm64_kernel_dir() -> PathBuf {
    tools_dir().join("arm64-kernel")
}

/// The aarch64 guest's kernel and the modules its stage 1 loads, once `setup` has unpacked it.
pub fn locate_arm64_kernel() -> Result<Kernel> {
    let dir = arm64_kernel_dir();
    let boot = dir.join("boot");
    let release = std::fs::read_dir(&boot)
        .with_context(|| format!("reading {} (run `cargo xtask setup`)", boot.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_owned)
        })
        .max_by(|a, b| compare_versions(a, b))
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let vmlinuz = boot.join(format!("vmlinuz-{release}"));
    let kernel = kernel_with_modules(
        release.clone(),
        vmlinuz,
        dir.join("lib/modules").join(&release),
    )?;
    anyhow::ensure!(
        is_arm64_image(&kernel.vmlinuz)?,
        "{} is not an arm64 Linux Image",
        kernel.vmlinuz.display()
    );
    Ok(kernel)
}

/// An uncompressed arm64 Linux `Image`: the magic "ARM\x64" at offset 56 of its header
/// (Documentation/arch/arm64/booting.rst), what QEMU's `-kernel` boots on `-M virt`.
pub fn is_arm64_image(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut header = [0u8; 64];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .with_context(|| format!("reading the header of {}", path.display()))?;
    Ok(header[56..60] == *b"ARM\x64")
}

/// The `e_machine` field of an ELF file (little-endian ELF only, as Debian's are).
pub fn elf_machine(path: &Path) -> Result<u16> {
    use std::io::Read;
    let mut header = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .with_context(|| format!("reading the ELF header of {}", path.display()))?;
    anyhow::ensure!(
        header[..4] == *b"\x7fELF" && header[5] == 1,
        "{} is not a little-endian ELF file",
        path.display()
    );
    Ok(u16::from_le_bytes([header[18], header[19]]))
}

/// An mkfs.erofs new enough for microvm.nix's `-Efragments` (erofs-utils 1.6+): the private
/// prefix's (Debian 12 ships 1.5), else one on `PATH` (a Nix dev shell's).
pub fn mkfs_erofs_with_fragments() -> Option<PathBuf> {
    let private = tools_dir().join("bin/mkfs.erofs");
    if private.exists() {
        return Some(private);
    }
    let on_path = which("mkfs.erofs")?;
    let probed = storedisk_builder::erofs::MkfsErofs::probe(&on_path).ok()?;
    probed.supports_fragments().then_some(on_path)
}

/// `STOREDISK_VM_KERNEL` (a bzImage) and `STOREDISK_VM_MODULES` (its `lib/modules/<release>`
/// directory) name the guest kernel explicitly; the flake's dev shell sets them from nixpkgs, as
/// NixOS has no /boot/vmlinuz-* and no /lib/modules.
const KERNEL_ENV: &str = "STOREDISK_VM_KERNEL";
const MODULES_ENV: &str = "STOREDISK_VM_MODULES";

fn kernel_from_env() -> Option<Result<Kernel>> {
    let vmlinuz = PathBuf::from(std::env::var_os(KERNEL_ENV)?);
    Some((|| {
        let moddir = PathBuf::from(
            std::env::var_os(MODULES_ENV)
                .with_context(|| format!("{KERNEL_ENV} is set but {MODULES_ENV} is not"))?,
        );
        let release = moddir
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{MODULES_ENV}={} has no release name", moddir.display()))?
            .to_owned();
        kernel_with_modules(release, vmlinuz, moddir)
    })())
}

fn kernel_for_release(release: &str) -> Result<Kernel> {
    let vmlinuz = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    kernel_with_modules(
        release.to_owned(),
        vmlinuz,
        PathBuf::from(format!("/lib/modules/{release}")),
    )
}

fn kernel_with_modules(release: String, vmlinuz: PathBuf, moddir: PathBuf) -> Result<Kernel> {
    std::fs::File::open(&vmlinuz).with_context(|| {
        format!(
            "cannot read {} (it is readable by root only)",
            vmlinuz.display()
        )
    })?;
    let deps_text = std::fs::read_to_string(moddir.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", moddir.display()))?;
    let builtin = std::fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let modules = module_load_order(&deps_text, &builtin, GUEST_MODULES)?;
    Ok(Kernel {
        release,
        vmlinuz,
        modules: modules.into_iter().map(|m| moddir.join(m)).collect(),
        moddir,
    })
}

/// The module name of a path in modules.dep ("kernel/fs/erofs/erofs.ko.xz" -> "erofs").
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// Relative module paths to load, dependencies first, for `wanted` modules; built-in ones are
/// skipped, missing ones are an error.
pub fn module_load_order(
    modules_dep: &str,
    modules_builtin: &str,
    wanted: &[&str],
) -> Result<Vec<String>> {
    let mut deps: std::collections::BTreeMap<String, (String, Vec<String>)> = Default::default();
    for line in modules_dep.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        deps.insert(
            module_name(module),
            (
                module.to_owned(),
                rest.split_whitespace().map(str::to_owned).collect(),
            ),
        );
    }
    let builtin: std::collections::BTreeSet<String> =
        modules_builtin.lines().map(module_name).collect();
    let mut order = Vec::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if builtin.contains(&name) {
            continue;
        }
        let (path, its_deps) = deps.get(&name).with_context(|| {
            format!("kernel module {name} is neither built in nor in modules.dep")
        })?;
        // modules.dep lists the full dependency closure, deepest last: load it in reverse.
        for dep in its_deps.iter().rev().chain(std::iter::once(path)) {
            if !order.contains(dep) {
                order.push(dep.clone());
            }
        }
    }
    Ok(order)
}

impl Toolchain {
    /// Finds every tool, or says which are missing.
    pub fn locate() -> Result<Toolchain> {
        let mut missing = Vec::new();
        let nix = locate_nix();
        if nix.is_none() {
            missing.push(format!(
                "Nix >= {}.{} (neither on PATH nor in {})",
                MIN_NIX.0,
                MIN_NIX.1,
                tools_dir().join("bin").display()
            ));
        }
        let qemu = locate_qemu()
            .map_err(|e| missing.push(format!("{e:#}")))
            .ok();
        let socat = which("socat");
        if socat.is_none() {
            missing.push("socat is not installed (apt package socat)".to_owned());
        }
        let kernel = locate_kernel()
            .map_err(|e| missing.push(format!("{e:#}")))
            .ok();
        let busybox = locate_busybox()
            .map_err(|e| missing.push(format!("{e:#}")))
            .ok();
        let qemu_aarch64 = locate_qemu_aarch64()
            .map_err(|e| missing.push(format!("{e:#}")))
            .ok();
        let kernel_aarch64 = locate_arm64_kernel()
            .map_err(|e| missing.push(format!("the arm64 kernel: {e:#}")))
            .ok();
        match (
            nix,
            qemu,
            socat,
            kernel,
            busybox,
            qemu_aarch64,
            kernel_aarch64,
        ) {
            (
                Some(nix),
                Some(qemu),
                Some(socat),
                Some(kernel),
                Some(busybox),
                Some(qemu_aarch64),
                Some(kernel_aarch64),
            ) => Ok(Toolchain {
                nix,
                qemu,
                socat,
                kernel,
                busybox,
                qemu_aarch64,
                kernel_aarch64,
            }),
            _ => bail!(
                "missing tools:\n  - {}\nrun `cargo xtask setup` to install them",
                missing.join("\n  - ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_versions() {
        assert_eq!(parse_nix_version("nix (Nix) 2.26.3"), Some((2, 26)));
        assert_eq!(parse_nix_version("nix (Nix) 2.8.0"), Some((2, 8)));
        assert_eq!(
            parse_nix_version("nix (Nix) 2.31pre20250101_abc"),
            Some((2, 31))
        );
        assert!(parse_nix_version("nix (Nix) 2.8.0").unwrap() < MIN_NIX);
    }

    #[test]
    fn module_order_puts_dependencies_first() {
        let dep = "kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz\n\
                   kernel/lib/libcrc32c.ko.xz:\n\
                   kernel/drivers/block/virtio_blk.ko.xz:\n";
        let order = module_load_order(
            dep,
            "kernel/fs/squashfs/squashfs.ko\n",
            &["virtio_blk", "squashfs", "erofs"],
        )
        .unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/block/virtio_blk.ko.xz",
                "kernel/lib/libcrc32c.ko.xz",
                "kernel/fs/erofs/erofs.ko.xz"
            ]
        );
        let err = module_load_order(dep, "", &["overlay"]).unwrap_err();
        assert!(format!("{err}").contains("overlay"));
    }

    #[test]
    fn arm64_images_are_told_from_other_kernels() {
        let dir = tempfile::tempdir().unwrap();
        let mut header = vec![0u8; 64];
        header[56..60].copy_from_slice(b"ARM\x64");
        let image = dir.path().join("Image");
        std::fs::write(&image, &header).unwrap();
        assert!(is_arm64_image(&image).unwrap());
        // A bzImage (x86_64) or a gzip'ed Image has no magic at offset 56.
        let other = dir.path().join("bzImage");
        std::fs::write(&other, [0x1f, 0x8b].repeat(40)).unwrap();
        assert!(!is_arm64_image(&other).unwrap());
        std::fs::write(&other, b"short").unwrap();
        assert!(is_arm64_image(&other).is_err());
    }

    #[test]
    fn version_order() {
        assert_eq!(
            compare_versions("6.12.10+x", "6.12.9+x"),
            std::cmp::Ordering::Greater
        );
    }
}
