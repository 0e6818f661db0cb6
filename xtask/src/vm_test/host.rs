//! The host-provided inputs of the fixtures, gathered into `target/vm-test/host/` for
//! vm-tests/default.nix to import: static busybox with its applet links, the `storedisk` binary
//! just built, the kernel, and the guest's modules decompressed (busybox insmod reads plain .ko).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cmd::Cmd;
use crate::setup::write_atomically;
use crate::tools::Toolchain;

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
    copy_if_changed(storedisk_bin, &storedisk_dir.join("storedisk"), 0o555)?;

    let kernel_dir = dir.join("kernel");
    std::fs::create_dir_all(&kernel_dir)?;
    copy_if_changed(
        &toolchain.kernel.vmlinuz,
        &kernel_dir.join("bzImage"),
        0o444,
    )?;

    let modules_dir = dir.join("modules");
    std::fs::create_dir_all(&modules_dir)?;
    let mut order = String::new();
    for module in &toolchain.kernel.modules {
        let name = module_file_name(module)?;
        let bytes = decompress(module)?;
        write_if_changed(&modules_dir.join(&name), &bytes, 0o444)?;
        order.push_str(&name);
        order.push('\n');
    }
    write_if_changed(&modules_dir.join("load-order"), order.as_bytes(), 0o444)?;
    Ok(dir.to_owned())
}

/// "erofs.ko.xz" -> "erofs.ko".
fn module_file_name(path: &Path) -> Result<String> {
    let file = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("module path has no file name")?;
    let stem = file.split(".ko").next().unwrap_or(file);
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
        Some(tool) => {
            let out = std::process::Command::new(tool)
                .args(["-d", "-c"])
                .arg(module)
                .output()
                .with_context(|| format!("running {tool} (apt packages xz-utils, zstd, gzip)"))?;
            anyhow::ensure!(
                out.status.success(),
                "{tool} -d {} failed: {}",
                module.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(out.stdout)
        }
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
