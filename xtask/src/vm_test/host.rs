//! The host-provided inputs of the fixtures, gathered into `target/vm-test/host/` for
//! vm-tests/default.nix to import: static busybox with its applet links, the `storedisk` binary
//! just built, and the kernel package shaped like nixpkgs' `kernel.out`: `bzImage` and
//! `lib/modules/<release>/` with the modules a store-disk guest loads, decompressed (busybox
//! insmod reads plain .ko), at their paths from modules.dep, and their `load-order`. The aarch64
//! guest gets the same two: `busybox-arm64/` and `kernel-aarch64/` (an arm64 `Image`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cmd::Cmd;
use crate::setup::write_atomically;
use crate::tools::{Kernel, Toolchain};

/// Fills `dir` (idempotently: unchanged files are not rewritten) and returns it.
pub fn prepare(toolchain: &Toolchain, storedisk_bin: &Path, dir: &Path) -> Result<PathBuf> {
    // The aarch64 guest's busybox cannot run here to list its applets: it gets this one's list
    // (the same Debian release, the same configuration).
    let applets = Cmd::new(&toolchain.busybox).arg("--list").quiet().read()?;
    busybox_dir(&toolchain.busybox, &applets, &dir.join("busybox/bin"))?;
    let arm64 = crate::tools::arm64_busybox()
        .context("the aarch64 guest's busybox is missing: run `cargo xtask setup`")?;
    busybox_dir(&arm64, &applets, &dir.join("busybox-arm64/bin"))?;

    let storedisk_dir = dir.join("storedisk/bin");
    std::fs::create_dir_all(&storedisk_dir)?;
    let stripped = dir.join("storedisk.stripped");
    strip_reproducibly(storedisk_bin, &stripped)?;
    copy_if_changed(&stripped, &storedisk_dir.join("storedisk"), 0o555)?;

    kernel_package(&toolchain.kernel, "bzImage", &dir.join("kernel"))?;
    // The aarch64 guest's: an arm64 Image (aarch64 Linux's `kernelTarget`, what QEMU's `-M virt`
    // boots with -kernel) and its modules.
    kernel_package(
        &toolchain.kernel_aarch64,
        "Image",
        &dir.join("kernel-aarch64"),
    )?;
    Ok(dir.to_owned())
}

/// Writes a kernel package to `kernel_dir`: the kernel as `image_name`, and
/// `lib/modules/<release>/` with the modules stage 1 loads (decompressed) and their `load-order`.
fn kernel_package(kernel: &Kernel, image_name: &str, kernel_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(kernel_dir)?;
    copy_if_changed(&kernel.vmlinuz, &kernel_dir.join(image_name), 0o444)?;
    let modules_dir = kernel_dir.join("lib/modules").join(&kernel.release);
    // A kernel package from an earlier run with another release would hold two module trees.
    for entry in std::fs::read_dir(kernel_dir.join("lib/modules"))
        .into_iter()
        .flatten()
    {
        let path = entry?.path();
        if path != modules_dir {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing the stale {}", path.display()))?;
        }
    }
    let mut order = String::new();
    for module in &kernel.modules {
        let relative = module_relative_path(&kernel.moddir, module)?;
        let target = modules_dir.join(&relative);
        std::fs::create_dir_all(target.parent().context("module path has no parent")?)?;
        write_if_changed(&target, &decompress(module)?, 0o444)?;
        order.push_str(&relative);
        order.push('\n');
    }
    write_if_changed(&modules_dir.join("load-order"), order.as_bytes(), 0o444)?;
    Ok(())
}

/// "/lib/modules/R/kernel/fs/erofs/erofs.ko.xz" -> "kernel/fs/erofs/erofs.ko".
fn module_relative_path(moddir: &Path, module: &Path) -> Result<String> {
    let relative = module
        .strip_prefix(moddir)
        .ok()
        .and_then(|p| p.to_str())
        .with_context(|| {
            format!(
                "module {} is not a UTF-8 path below {}",
                module.display(),
                moddir.display()
            )
        })?;
    let stem = relative.split(".ko").next().unwrap_or(relative);
    Ok(format!("{stem}.ko"))
}

fn decompress(module: &Path) -> Result<Vec<u8>> {
    let name = module.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::read(module).with_context(|| format!("reading {}", module.display())),
        Some(tool) => Cmd::new(tool)
            .args(["-d", "-c"])
            .arg(module)
            .read_bytes()
            .with_context(|| {
                format!(
                    "decompressing {} (apt packages xz-utils, zstd, gzip)",
                    module.display()
                )
            }),
    }
}

/// `bin_dir` with `busybox` and a symlink to it for every applet.
fn busybox_dir(busybox: &Path, applets: &str, bin_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(bin_dir)?;
    copy_if_changed(busybox, &bin_dir.join("busybox"), 0o555)?;
    for applet in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        let link = bin_dir.join(applet);
        if std::fs::read_link(&link).is_ok_and(|t| t == Path::new("busybox")) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("busybox", &link)?;
    }
    Ok(())
}

/// Writes `bin` without its symbols, debug information and build id to `to`. The debug
/// information names the checkout's directory and its source lines (and the build id hashes
/// them), so without them the same code gives the same bytes in any checkout: the same
/// `storedisk` store path, so the store disks (built by it) are not rebuilt for a moved line or
/// another checkout. Nothing a guest packs depends on it (the closure info is written by
/// busybox awk), so the snapshots would not change either way.
fn strip_reproducibly(bin: &Path, to: &Path) -> Result<()> {
    Cmd::new("strip")
        .args(["--strip-all", "--remove-section=.note.gnu.build-id", "-o"])
        .arg(to)
        .arg(bin)
        .quiet()
        .run()
        .context("stripping the storedisk binary for the fixtures (strip is binutils')")?;
    Ok(())
}

fn copy_if_changed(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write_if_changed(to, &bytes, mode)
}

fn write_if_changed(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    write_atomically(path, bytes)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}
