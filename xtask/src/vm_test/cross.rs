//! The aarch64 guest: its store disks (squashfs and erofs) built on this x86_64 machine and
//! verified like the others (complete, intact, self-contained), and its userland checked to be
//! aarch64 ELF. A store disk is architecture-independent; booting the guest would need
//! qemu-system-aarch64 (`-M virt`) and an arm64 kernel, which this harness does not provision.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::verify::Verdict;
use crate::tools::{self, Toolchain, ELF_MACHINE_AARCH64};

/// One store disk of the aarch64 guest, and what the harness found.
#[derive(Debug, Serialize)]
pub struct CrossRun {
    pub arch: &'static str,
    pub disk: String,
    /// Paths packed in the image (the guest's closure plus its closure-info).
    pub packed_paths: usize,
    /// `e_machine` of the guest's busybox, as packed (the verifier proved the bytes equal).
    pub elf_machine: u16,
    pub verify: Verdict,
}

impl CrossRun {
    /// What the hard assertions require: the verifier found nothing and the userland is
    /// aarch64.
    pub fn ok(&self) -> bool {
        self.verify.ok == Some(true) && self.elf_machine == ELF_MACHINE_AARCH64
    }
}

/// Builds the aarch64 guest's disks with `nix_build` (a `nix-build` of vm-tests/default.nix
/// with the harness's arguments) and verifies each.
pub fn check(
    toolchain: &Toolchain,
    nix_build: impl Fn(&[&str]) -> Result<Vec<String>>,
    storedisk: &Path,
    work: &Path,
) -> Result<Vec<CrossRun>> {
    let formats = ["squashfs", "erofs"];
    let mut attrs = vec!["aarch64.toplevel".to_owned(), "aarch64.regInfo".to_owned()];
    attrs.extend(formats.iter().map(|f| format!("aarch64.disks.{f}")));
    let attr_refs: Vec<&str> = attrs.iter().map(String::as_str).collect();
    let outs = nix_build(&attr_refs)?;
    let [toplevel, reg_info, disks @ ..] = outs.as_slice() else {
        anyhow::bail!(
            "nix-build printed {} paths for {} attributes",
            outs.len(),
            attrs.len()
        );
    };

    let closure_json = toolchain
        .nix
        .cmd("nix")
        .args(["path-info", "--json", "--recursive", toplevel, reg_info])
        .quiet()
        .read()?;
    let closure_file = work.join("closures/aarch64.json");
    std::fs::create_dir_all(closure_file.parent().context("no parent")?)?;
    crate::setup::write_atomically(&closure_file, closure_json.as_bytes())?;
    // The guest's `sw/bin/busybox` links to the packed arm64 busybox.
    let elf_machine = tools::elf_machine(&Path::new(toplevel).join("sw/bin/busybox"))?;

    let mut runs = Vec::new();
    for (format, disk) in formats.iter().zip(disks) {
        eprintln!("[verify aarch64] {format}");
        let verdict = super::verify::verify(&super::verify::VerifyInputs {
            storedisk,
            nix: &toolchain.nix,
            image: disk,
            closure_file: &closure_file,
            runner: None,
        })?;
        runs.push(CrossRun {
            arch: "aarch64",
            disk: (*format).to_owned(),
            packed_paths: verdict.packed.len(),
            elf_machine,
            verify: verdict,
        });
    }
    Ok(runs)
}
