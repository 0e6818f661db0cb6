//! The Nix side of the repository: every `.nix` file parses (`nix-instantiate --parse`), and
//! nix/lib.nix's `checkRunner`, which the NixOS module (nix/module.nix) exposes as
//! `config.microvm.storeDiskCheck`, passes a runner with every fix and fails, with the leaked
//! paths and their sizes in the build log, on each leak — built by real Nix with busybox as the
//! builder (tests/nix_files/check_runner.nix). Needs Nix >= 2.14 and mkfs.erofs
//! (`cargo xtask setup` provisions both).

#![allow(clippy::unwrap_used)] // Tests: a failed setup should panic loudly.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use storedisk_testkit::tool;

mod common;
use common::{nix, store_inputs};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `.nix` file under `dir`, skipping build output and VCS directories.
fn nix_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                nix_files(&path, found);
            }
        } else if name.ends_with(".nix") {
            found.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let root = repo_root();
    let mut files = Vec::new();
    nix_files(&root, &mut files);
    let relative: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    for expected in [
        "flake.nix",
        "nix/module.nix",
        "nix/lib.nix",
        "nix/package.nix",
        "vm-tests/lib.nix",
        "vm-tests/default.nix",
    ] {
        assert!(
            relative.iter().any(|r| r == expected),
            "{expected} not found among {relative:?}"
        );
    }
    let failures: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let out = nix("nix-instantiate")
                .arg("--parse")
                .arg(file)
                .output()
                .unwrap();
            (!out.status.success()).then(|| {
                format!(
                    "{}: {}",
                    file.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })
        })
        .collect();
    assert!(failures.is_empty(), "unparsable:\n{}", failures.join("\n"));
}

struct Fixture {
    busybox: String,
    storedisk: String,
    mkfs_erofs: PathBuf,
    salt: String,
}

impl Fixture {
    fn build(&self, attr: &str) -> Output {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nix_files/check_runner.nix");
        nix("nix-build")
            .arg(file)
            .args(["--no-out-link", "-A", attr])
            .arg("--arg")
            .arg("busybox")
            .arg(format!("builtins.storePath \"{}\"", self.busybox))
            .arg("--arg")
            .arg("storedisk")
            .arg(format!("builtins.storePath \"{}\"", self.storedisk))
            .arg("--argstr")
            .arg("mkfsErofs")
            .arg(&self.mkfs_erofs)
            .args(["--argstr", "salt", &self.salt])
            .output()
            .unwrap()
    }

    /// Builds a check that must pass; returns its report.txt.
    fn passes(&self, attr: &str) -> String {
        let out = self.build(attr);
        assert!(
            out.status.success(),
            "check {attr} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        fs::read_to_string(Path::new(&path).join("report.txt")).unwrap()
    }

    /// Builds a check that must fail; returns its build log.
    fn fails(&self, attr: &str) -> String {
        let out = self.build(attr);
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "check {attr} passed:\n{log}");
        assert!(
            log.contains("storedisk check failed (storedisk verify exit 1"),
            "check {attr} failed for another reason than findings:\n{log}"
        );
        log
    }
}

/// The report line of a leaked path: "  /nix/store/<hash>-<name> (<size>)".
fn leaks(text: &str, name: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim_start_matches(['>', ' ']);
        l.starts_with("/nix/store/")
            && l.contains(&format!("-{name} ("))
            && (l.ends_with(" B)") || l.ends_with("KiB)") || l.ends_with("MiB)"))
    })
}

#[test]
fn check_runner_passes_the_fixed_runner_and_fails_on_each_leak() {
    let scratch = tempfile::tempdir().unwrap();
    let (busybox, storedisk) = store_inputs(scratch.path());
    let salt = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let fixture = Fixture {
        busybox,
        storedisk,
        mkfs_erofs: tool("mkfs.erofs"),
        salt,
    };

    let report = fixture.passes("fixed");
    assert_eq!(report.lines().next(), Some("OK"), "{report}");

    // Leak 2, the share/microvm/system symlink: the toplevel and what only it references.
    let log = fixture.fails("systemSymlink");
    assert!(log.contains("runner_overlap: 2 path(s) leak"), "{log}");
    assert!(leaks(&log, "nixos-system-check-test"), "{log}");
    assert!(leaks(&log, "payload"), "{log}");
    // (Once the symlink makes the toplevel an input, Nix also finds its hash in init=, whose
    // context was discarded: the verifier names the first place, the script.)
    assert!(
        log.contains("-microvm-qemu-check-test -> /nix/store/"),
        "{log}"
    );

    // Backward compatibility: allowLeaks keeps the finding in the report, the build passes.
    let report = fixture.passes("systemSymlinkAllowed");
    assert!(report.starts_with("2 findings\n"), "{report}");
    assert!(leaks(&report, "nixos-system-check-test"), "{report}");

    // Leak 4, regInfo= with its context: the closure-info drags in the whole closure.
    let log = fixture.fails("regInfoContext");
    assert!(leaks(&log, "closure-info"), "{log}");
    assert!(leaks(&log, "nixos-system-check-test"), "{log}");

    // A layered store disk: all its layers checked together, disjoint required; a leak
    // through the runner is found the same way.
    let report = fixture.passes("layered");
    assert_eq!(report.lines().next(), Some("OK"), "{report}");
    assert!(report.contains("store disk of 3 layers"), "{report}");
    assert!(report.contains("  disjoint: ok\n"), "{report}");
    let log = fixture.fails("layeredSystemSymlink");
    assert!(leaks(&log, "nixos-system-check-test"), "{log}");

    // Leak 1, an image that keeps its references: found without a Nix database, because the
    // runner's closure then reaches the guest through the image.
    let log = fixture.fails("imageReferences");
    assert!(leaks(&log, "nixos-system-check-test"), "{log}");
    assert!(leaks(&log, "payload"), "{log}");
}
