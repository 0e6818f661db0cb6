//! `cargo xtask setup`: installs what the harness needs on a Debian machine, idempotently, and
//! checks that each tool works. apt packages for the peers' tools, busybox, QEMU (x86_64 and
//! aarch64) and a kernel (from bookworm-backports on bookworm); Nix 2.26 and erofs-utils 1.8.6
//! from Debian trixie packages unpacked into a private prefix under `target/tools/` (no system
//! libc upgrade, /etc/nix untouched); the aarch64 guest's busybox and kernel, Debian arm64
//! packages unpacked (never installed) under `target/tools/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use xshell::{cmd, Shell};

use crate::cmd::Cmd;
use crate::tools::{self, Toolchain, NIX_CONFIG};

/// `cargo xtask setup`
#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// Only check what is installed; install nothing.
    #[arg(long)]
    pub check: bool,
}

/// apt packages from the release's own suites.
const BASE_PACKAGES: &[&str] = &[
    "squashfs-tools",
    "squashfs-tools-ng",
    "erofs-utils",
    "busybox-static",
    "patchelf",
    "xz-utils",
    "zstd",
    "cpio",
    "time",
    "socat",
    // depmod, run on the unpacked arm64 kernel (its package ships no modules.dep).
    "kmod",
];
/// apt packages that come from bookworm-backports on bookworm (qemu 10 matches the preinstalled
/// qemu-utils there; bookworm's own 7.2 conflicts with it). qemu-system-arm provides
/// qemu-system-aarch64, the aarch64 guest's hypervisor.
const BACKPORTS_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-arm",
    "linux-image-cloud-amd64",
];
/// The arm64 kernel's metapackage (from bookworm-backports on bookworm, like the amd64 one); the
/// versioned package it depends on is downloaded and unpacked, never installed.
const ARM64_KERNEL_META: &str = "linux-image-cloud-arm64";
/// Packages unpacked into the private prefix from trixie.
const PREFIX_PACKAGES: &[&str] = &["nix-bin", "erofs-utils"];
/// Programs from the prefix, patched to run with the prefix's own loader and libraries.
const PREFIX_PROGRAMS: &[&str] = &["nix", "mkfs.erofs", "fsck.erofs"];
/// Nix's other names for the same binary.
const NIX_ALIASES: &[&str] = &[
    "nix-store",
    "nix-build",
    "nix-instantiate",
    "nix-hash",
    "nix-env",
];

const SOURCES_FILE: &str = "/etc/apt/sources.list.d/storedisk-xtask.sources";
const PIN_FILE: &str = "/etc/apt/preferences.d/storedisk-xtask-trixie";
/// Files the lead wrote by hand before this command existed; ours replace them.
const HAND_MADE_FILES: &[&str] = &[
    "/etc/apt/sources.list.d/storedisk-extra.sources",
    "/etc/apt/preferences.d/storedisk-trixie",
];

pub fn run(args: SetupArgs) -> Result<()> {
    if args.check {
        let toolchain = Toolchain::locate()?;
        report(&toolchain)?;
        return Ok(());
    }
    let toolchain = ensure()?;
    report(&toolchain)
}

/// Returns the toolchain, installing whatever is missing first.
pub fn ensure() -> Result<Toolchain> {
    if let Ok(toolchain) = Toolchain::locate() {
        if peers_present() {
            return Ok(toolchain);
        }
    }
    install()?;
    Toolchain::locate().context("tools are still missing after `cargo xtask setup`")
}

/// The peers' tools and helpers the tests use as oracles are installed.
fn peers_present() -> bool {
    [
        "mksquashfs",
        "unsquashfs",
        "gensquashfs",
        "mkfs.erofs",
        "fsck.erofs",
        "patchelf",
        "xz",
        "zstd",
        "cpio",
    ]
    .iter()
    .all(|p| tools::which(p).is_some())
        && tools::mkfs_erofs_with_fragments().is_some()
        && tools::arm64_busybox().is_some()
        && tools::locate_arm64_kernel().is_ok()
}

fn tools_dir_program(name: &str) -> Option<PathBuf> {
    let p = tools::tools_dir().join("bin").join(name);
    p.exists().then_some(p)
}

fn install() -> Result<()> {
    if tools::which("apt-get").is_none() {
        if tools::which("nix").is_some() {
            bail!(
                "this machine has Nix but no apt: use the flake's dev shell, which provides every tool \
                 the harness needs: `nix develop` (then run `cargo xtask vm-test` inside it)"
            );
        }
        bail!(
            "cannot provision: no apt-get and no Nix >= {}.{}; install Nix, or run on Debian 12+",
            tools::MIN_NIX.0,
            tools::MIN_NIX.1
        );
    }
    if !is_root() {
        bail!("`cargo xtask setup` installs apt packages and must run as root (e.g. `sudo -E cargo xtask setup`)");
    }
    let codename = os_codename()?;
    eprintln!("setup: Debian {codename}");
    let on_bookworm = codename == "bookworm";
    let sources_changed = if on_bookworm {
        write_apt_sources()?
    } else {
        false
    };

    let missing_base: Vec<&str> = BASE_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    let need_backports = BACKPORTS_PACKAGES.iter().any(|p| !dpkg_installed(p))
        || tools::locate_qemu().is_err()
        || tools::locate_qemu_aarch64().is_err()
        || tools::locate_kernel().is_err();
    let system_nix_ok = tools::which("nix")
        .and_then(|p| p.parent().and_then(tools::probe_nix))
        .is_some();
    let need_prefix = !(tools::probe_nix(&tools::tools_dir().join("bin")).is_some()
        || system_nix_ok)
        || tools_dir_program("mkfs.erofs").is_none();

    if sources_changed || !missing_base.is_empty() || need_backports || need_prefix {
        apt(&["update"])?;
    }
    if missing_base.is_empty() {
        eprintln!("setup: found apt packages {}", BASE_PACKAGES.join(" "));
    } else {
        eprintln!("setup: installing {}", missing_base.join(" "));
        apt(&[
            &["install", "-y", "--no-install-recommends"][..],
            &missing_base,
        ]
        .concat())?;
    }
    if need_backports {
        let suite_flag: &[&str] = if on_bookworm {
            &["-t", "bookworm-backports"]
        } else {
            &[]
        };
        eprintln!(
            "setup: installing {} {}",
            BACKPORTS_PACKAGES.join(" "),
            if on_bookworm {
                "from bookworm-backports"
            } else {
                ""
            }
        );
        apt(&[
            &["install", "-y", "--no-install-recommends"][..],
            suite_flag,
            BACKPORTS_PACKAGES,
        ]
        .concat())?;
    } else {
        eprintln!("setup: found qemu-system-x86 (with the microvm machine), qemu-system-arm and a kernel with the guest modules");
    }
    if need_prefix {
        if on_bookworm {
            build_prefix()?;
        } else {
            // Newer releases ship Nix >= 2.18 and erofs-utils >= 1.8 themselves.
            eprintln!("setup: installing nix-bin from {codename}");
            apt(&["install", "-y", "--no-install-recommends", "nix-bin"])?;
            link_system_erofs()?;
        }
    } else {
        eprintln!(
            "setup: found Nix and erofs-utils 1.8 in {}",
            tools::tools_dir().join("bin").display()
        );
    }
    if tools::arm64_busybox().is_none() {
        install_arm64_busybox()?;
    } else {
        eprintln!("setup: found the aarch64 guest's busybox");
    }
    match tools::locate_arm64_kernel() {
        Ok(kernel) => eprintln!("setup: found the aarch64 guest's kernel {}", kernel.release),
        Err(why) => {
            eprintln!("setup: no usable arm64 kernel yet ({why:#})");
            install_arm64_kernel(on_bookworm)?;
        }
    }
    write_env_file()?;
    if sources_changed {
        remove_hand_made_apt_files();
    }
    Ok(())
}

/// Debian's static arm64 busybox, unpacked (never installed: it cannot run here) under
/// target/tools/arm64: the userland of the harness's aarch64 guest, whose store disk is built and
/// verified on this machine. Needs the arm64 architecture in dpkg to download it.
fn install_arm64_busybox() -> Result<()> {
    let sh = shell()?;
    ensure_arm64_architecture()?;
    let debs = tools::tools_dir().join("debs-arm64");
    let prefix = tools::tools_dir().join("arm64-prefix");
    for dir in [&debs, &prefix] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
    }
    eprintln!("setup: downloading busybox-static:arm64");
    Cmd::from(cmd!(sh, "apt-get download busybox-static:arm64"))
        .current_dir(&debs)
        .timeout(Duration::from_secs(600))
        .run()?;
    let deb = std::fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    Cmd::from(cmd!(sh, "dpkg-deb -x {deb} {prefix}")).run()?;
    let target = tools::arm64_busybox_path();
    std::fs::create_dir_all(target.parent().context("no parent")?)?;
    std::fs::copy(prefix.join("bin/busybox"), &target)
        .context("the busybox-static:arm64 package has no bin/busybox")?;
    anyhow::ensure!(
        tools::elf_machine(&target)? == tools::ELF_MACHINE_AARCH64,
        "{} is not an aarch64 ELF",
        target.display()
    );
    Ok(())
}

/// Adds arm64 to dpkg's foreign architectures (so apt can download arm64 packages; nothing of
/// that architecture is installed).
fn ensure_arm64_architecture() -> Result<()> {
    let sh = shell()?;
    let foreign = Cmd::from(cmd!(sh, "dpkg --print-foreign-architectures"))
        .quiet()
        .read()?;
    if !foreign.lines().any(|a| a.trim() == "arm64") {
        eprintln!("setup: adding the arm64 architecture to dpkg (to download arm64 packages)");
        Cmd::from(cmd!(sh, "dpkg --add-architecture arm64")).run()?;
        apt(&["update"])?;
    }
    Ok(())
}

/// Debian's arm64 cloud kernel, unpacked (never installed: an arm64 kernel package cannot be
/// installed on amd64) into target/tools/arm64-kernel: `boot/vmlinuz-<release>` (a raw arm64
/// Image) and `lib/modules/<release>/`, whose modules.dep `depmod -b` writes (the package ships
/// none; depmod reads foreign-architecture modules). The metapackage names the versioned
/// package in its Depends; that one is downloaded and unpacked into a staging directory, which
/// replaces the old one only when complete.
fn install_arm64_kernel(on_bookworm: bool) -> Result<()> {
    ensure_arm64_architecture()?;
    let sh = shell()?;
    let tools = tools::tools_dir();
    let debs = tools.join("debs-arm64-kernel");
    let staging = tools.join("arm64-kernel.new");
    for dir in [&debs, &staging] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
    }
    let suite: &[&str] = if on_bookworm {
        &["-t", "bookworm-backports"]
    } else {
        &[]
    };
    let download = |package: &str| -> Result<PathBuf> {
        eprintln!("setup: downloading {package}");
        let before: Vec<PathBuf> = deb_files(&debs)?;
        Cmd::from(cmd!(sh, "apt-get download {suite...} {package}"))
            .current_dir(&debs)
            .timeout(Duration::from_secs(1200))
            .run()?;
        deb_files(&debs)?
            .into_iter()
            .find(|p| !before.contains(p))
            .with_context(|| format!("apt-get download {package} left no new .deb"))
    };
    let meta = download(&format!("{ARM64_KERNEL_META}:arm64"))?;
    let depends = Cmd::from(cmd!(sh, "dpkg-deb -f {meta} Depends"))
        .quiet()
        .read()?;
    let image_package = kernel_image_dependency(&depends).with_context(|| {
        format!("{ARM64_KERNEL_META} depends on no linux-image package: {depends:?}")
    })?;
    let deb = download(&format!("{image_package}:arm64"))?;
    Cmd::from(cmd!(sh, "dpkg-deb -x {deb} {staging}")).run()?;
    let release = image_package
        .strip_prefix("linux-image-")
        .context("not a linux-image package")?
        .to_owned();
    // The package puts its modules in lib/modules (bookworm) or usr/lib/modules (trixie's
    // merged /usr); depmod -b and the locator want lib/modules.
    let moddir = staging.join("lib/modules").join(&release);
    let usr_moddir = staging.join("usr/lib/modules").join(&release);
    if !moddir.is_dir() && usr_moddir.is_dir() {
        std::fs::create_dir_all(staging.join("lib/modules"))?;
        std::fs::rename(&usr_moddir, &moddir)?;
    }
    anyhow::ensure!(
        moddir.is_dir(),
        "{image_package} has no modules directory for {release}"
    );
    Cmd::from(cmd!(sh, "depmod -b {staging} {release}")).run()?;
    let target = tools::arm64_kernel_dir();
    if target.exists() {
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&staging, &target)?;
    let _ = std::fs::remove_dir_all(&debs);
    let kernel = tools::locate_arm64_kernel()?;
    eprintln!(
        "setup: unpacked the arm64 kernel {} into {}",
        kernel.release,
        target.display()
    );
    Ok(())
}

fn deb_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect())
}

/// The versioned kernel package a linux-image metapackage's `Depends` names
/// (`linux-image-6.12.95+deb12-cloud-arm64 (= 6.12.95-1~bpo12+1)` -> its name).
fn kernel_image_dependency(depends: &str) -> Option<String> {
    depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .map(|d| d.split(':').next().unwrap_or(d))
        .find(|d| d.starts_with("linux-image-") && d.chars().any(|c| c.is_ascii_digit()))
        .map(str::to_owned)
}

fn is_root() -> bool {
    shell()
        .and_then(|sh| Cmd::from(cmd!(sh, "id -u")).quiet().read())
        .is_ok_and(|uid| uid == "0")
}

fn shell() -> Result<Shell> {
    Shell::new().context("starting xshell")
}

fn os_codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .context("/etc/os-release has no VERSION_CODENAME")
}

fn dpkg_installed(package: &str) -> bool {
    shell()
        .and_then(|sh| {
            let format = "-f=${Status}";
            Cmd::from(cmd!(sh, "dpkg-query -W {format} {package}"))
                .quiet()
                .read()
        })
        .is_ok_and(|s| s == "install ok installed")
}

fn apt(args: &[&str]) -> Result<()> {
    let sh = shell()?;
    Cmd::from(cmd!(sh, "apt-get {args...}"))
        .env("DEBIAN_FRONTEND", "noninteractive")
        .timeout(Duration::from_secs(1800))
        .run()?;
    Ok(())
}

/// The URI of the release's main Debian mirror, as the machine's own sources name it.
fn debian_mirror() -> String {
    let mut texts = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        texts.extend(
            paths
                .iter()
                .filter(|p| !p.ends_with("storedisk-xtask.sources"))
                .filter_map(|p| std::fs::read_to_string(p).ok()),
        );
    }
    texts.extend(std::fs::read_to_string("/etc/apt/sources.list").ok());
    mirror_from_sources(&texts).unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// Finds the first Debian archive URI (not -security, not a third party) in sources texts
/// (deb822 `URIs:` lines or one-line `deb URI suite ...`).
fn mirror_from_sources(texts: &[String]) -> Option<String> {
    let candidates = texts.iter().flat_map(|t| t.lines()).filter_map(|line| {
        let line = line.trim();
        if let Some(uris) = line.strip_prefix("URIs:") {
            uris.split_whitespace().next().map(str::to_owned)
        } else if let Some(rest) = line.strip_prefix("deb ") {
            rest.split_whitespace()
                .find(|w| w.contains("://"))
                .map(str::to_owned)
        } else {
            None
        }
    });
    candidates
        .into_iter()
        .find(|uri| uri.trim_end_matches('/').ends_with("/debian"))
}

/// Writes our apt source (bookworm-backports and trixie) and the low trixie pin; returns whether
/// anything changed.
fn write_apt_sources() -> Result<bool> {
    let mirror = debian_mirror();
    let sources = format!(
        "# Written by `cargo xtask setup` (storedisk): qemu and the kernel from bookworm-backports,\n\
         # Nix 2.26 and erofs-utils 1.8 from trixie (unpacked into target/tools, never installed).\n\
         Types: deb\nURIs: {mirror}\nSuites: bookworm-backports trixie\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    );
    let pin =
        "# Written by `cargo xtask setup` (storedisk): nothing installs from trixie by accident.\n\
               Package: *\nPin: release n=trixie\nPin-Priority: 50\n";
    let mut changed = write_if_different(Path::new(SOURCES_FILE), &sources)?;
    changed |= write_if_different(Path::new(PIN_FILE), pin)?;
    if changed {
        eprintln!(
            "setup: wrote {SOURCES_FILE} (mirror {mirror}) and {PIN_FILE} (trixie pinned at 50)"
        );
    } else {
        eprintln!("setup: found {SOURCES_FILE} and {PIN_FILE}");
    }
    Ok(changed)
}

/// Once our own files are in place, the hand-made ones would only make apt warn about duplicates.
fn remove_hand_made_apt_files() {
    for file in HAND_MADE_FILES {
        if Path::new(file).exists() && std::fs::remove_file(file).is_ok() {
            eprintln!("setup: removed {file} (replaced by storedisk-xtask's files)");
        }
    }
}

fn write_if_different(path: &Path, content: &str) -> Result<bool> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    write_atomically(path, content.as_bytes())?;
    Ok(true)
}

/// Writes `path` through a temp file and a rename.
pub fn write_atomically(path: &Path, content: &[u8]) -> Result<()> {
    let dir = path.parent().context("path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Downloads the trixie .debs of [`PREFIX_PACKAGES`] (with their dependencies) without installing
/// them, unpacks them into `target/tools/prefix`, and patches the programs to use that prefix's
/// loader and libraries (RPATH, not RUNPATH, so libraries find their own dependencies there too).
fn build_prefix() -> Result<()> {
    let tools = tools::tools_dir();
    let debs = tools.join("debs");
    let prefix = tools.join("prefix");
    let bin = tools.join("bin");
    eprintln!(
        "setup: unpacking {} from trixie into {}",
        PREFIX_PACKAGES.join(" "),
        tools.display()
    );
    std::fs::create_dir_all(debs.join("partial"))?;
    let archives = format!("Dir::Cache::archives={}", debs.display());
    apt(&[
        &[
            "install",
            "-y",
            "--download-only",
            "--no-install-recommends",
            "-t",
            "trixie",
            "-o",
            &archives,
        ][..],
        PREFIX_PACKAGES,
    ]
    .concat())?;
    let mut deb_files: Vec<PathBuf> = std::fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    deb_files.sort();
    if deb_files.is_empty() {
        bail!("apt downloaded no .deb into {}", debs.display());
    }
    // Unpack into a fresh directory, then swap it in: a half-unpacked prefix is never used.
    let staging = tools.join("prefix.new");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    for deb in &deb_files {
        Cmd::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(&staging)
            .quiet()
            .run()?;
    }
    eprintln!("setup: unpacked {} .debs", deb_files.len());
    if prefix.exists() {
        std::fs::remove_dir_all(&prefix)?;
    }
    std::fs::rename(&staging, &prefix)?;
    std::fs::create_dir_all(&bin)?;
    let loader = [
        "usr/lib64/ld-linux-x86-64.so.2",
        "lib64/ld-linux-x86-64.so.2",
    ]
    .iter()
    .map(|p| prefix.join(p))
    .find(|p| p.exists())
    .context("the unpacked libc6 has no ld-linux-x86-64.so.2")?;
    let rpath = format!(
        "{0}/usr/lib/x86_64-linux-gnu:{0}/lib/x86_64-linux-gnu",
        prefix.display()
    );
    for program in PREFIX_PROGRAMS {
        let source = prefix.join("usr/bin").join(program);
        let dest = bin.join(program);
        let tmp = bin.join(format!(".{program}.tmp"));
        std::fs::copy(&source, &tmp).with_context(|| format!("copying {}", source.display()))?;
        Cmd::new("patchelf")
            .arg("--set-interpreter")
            .arg(&loader)
            .args(["--force-rpath", "--set-rpath", &rpath])
            .arg(&tmp)
            .run()?;
        std::fs::rename(&tmp, &dest)?;
    }
    for alias in NIX_ALIASES {
        let link = bin.join(alias);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("nix", &link)?;
    }
    Ok(())
}

/// On releases whose erofs-utils is new enough, the prefix's bin just points at the system's.
fn link_system_erofs() -> Result<()> {
    let bin = tools::tools_dir().join("bin");
    std::fs::create_dir_all(&bin)?;
    for program in ["mkfs.erofs", "fsck.erofs"] {
        let target = tools::which(program)
            .with_context(|| format!("{program} not found after installing erofs-utils"))?;
        let link = bin.join(program);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link)?;
    }
    Ok(())
}

/// `target/tools/nix.env`: source it to use the same Nix and settings as the harness by hand.
fn write_env_file() -> Result<()> {
    let bin = tools::tools_dir().join("bin");
    let text = format!(
        "# Generated by `cargo xtask setup`: `. target/tools/nix.env` to run Nix as the harness does.\n\
         # Settings go through NIX_CONFIG only; /etc/nix is never used or changed.\n\
         export PATH={}:\"$PATH\"\nexport NIX_CONFIG='{}'\n",
        bin.display(),
        NIX_CONFIG
    );
    write_if_different(&tools::tools_dir().join("nix.env"), &text)?;
    Ok(())
}

/// Runs each tool once and prints what was found.
fn report(toolchain: &Toolchain) -> Result<()> {
    let nix = &toolchain.nix;
    let eval = nix
        .cmd("nix-instantiate")
        .args(["--eval", "--expr", "builtins.nixVersion"])
        .quiet()
        .read()?;
    eprintln!(
        "found: {} in {} (evaluates: {eval})",
        nix.version,
        nix.bin_dir.display()
    );
    eprintln!(
        "found: {} (has the microvm machine)",
        toolchain.qemu.display()
    );
    print_kernel("kernel", &toolchain.kernel);
    eprintln!("found: busybox {}", toolchain.busybox.display());
    eprintln!(
        "found: {} (the aarch64 guest's hypervisor)",
        toolchain.qemu_aarch64.display()
    );
    print_kernel("arm64 kernel", &toolchain.kernel_aarch64);
    eprintln!("found: socat {}", toolchain.socat.display());
    for program in [
        "mksquashfs",
        "unsquashfs",
        "gensquashfs",
        "mkfs.erofs",
        "fsck.erofs",
    ] {
        let path = tools::which(program).with_context(|| format!("{program} is missing (apt packages squashfs-tools, squashfs-tools-ng, erofs-utils)"))?;
        eprintln!("found: {}", path.display());
    }
    if let Some(erofs) = tools_dir_program("mkfs.erofs") {
        let version = Cmd::new(&erofs).arg("-V").quiet().run_unchecked()?;
        eprintln!(
            "found: {} ({})",
            erofs.display(),
            version.stdout.lines().next().unwrap_or("?").trim()
        );
    }
    eprintln!(
        "setup: everything the harness needs is here; `. {}` gives a shell the same Nix",
        tools::tools_dir().join("nix.env").display()
    );
    Ok(())
}

/// Prints a located kernel and the modules stage 1 loads.
fn print_kernel(what: &str, kernel: &crate::tools::Kernel) {
    eprintln!(
        "found: {what} {} at {}",
        kernel.release,
        kernel.vmlinuz.display()
    );
    for module in &kernel.modules {
        eprintln!("found:   module {}", module.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_is_the_debian_archive() {
        let texts = vec![
            "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n".to_owned(),
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n\nURIs: http://mirror.example/debian-security\n".to_owned(),
        ];
        assert_eq!(
            mirror_from_sources(&texts).as_deref(),
            Some("http://mirror.example/debian")
        );
        let one_line =
            vec!["deb [arch=amd64] http://ftp.de.debian.org/debian/ bookworm main\n".to_owned()];
        assert_eq!(
            mirror_from_sources(&one_line).as_deref(),
            Some("http://ftp.de.debian.org/debian/")
        );
        assert_eq!(mirror_from_sources(&[]), None);
    }

    #[test]
    fn the_kernel_metapackage_names_its_image_package() {
        assert_eq!(
            kernel_image_dependency("linux-image-6.12.95+deb12-cloud-arm64 (= 6.12.95-1~bpo12+1)")
                .as_deref(),
            Some("linux-image-6.12.95+deb12-cloud-arm64")
        );
        assert_eq!(
            kernel_image_dependency("linux-base, linux-image-6.1.0-42-cloud-arm64:arm64 (= 6.1.1)")
                .as_deref(),
            Some("linux-image-6.1.0-42-cloud-arm64")
        );
        assert_eq!(kernel_image_dependency("linux-base (>= 4.3~)"), None);
    }
}
