//! What several test files share: `storedisk build` of a synthetic store's roots,
//! `storedisk verify` run with no Nix on PATH (so the answers cannot depend on the machine)
//! with what it printed, the store inputs of the tests that build with real Nix, the check that
//! an extracted image has the store's canonical metadata, and unmounting what a test mounted.

#![allow(dead_code)] // Each test file uses its own part.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use assert_cmd::Command as Cmd;
use serde_json::Value;
use storedisk_testkit::{tool, SyntheticStore};

/// How the tests that run Nix configure it (through the environment only), and a Nix command
/// so configured: the testkit's, which the harness uses too.
#[allow(unused_imports)] // Each test file uses its own part.
pub use storedisk_testkit::{nix_command as nix, NIX_CONFIG};

fn add_to_store(path: &Path) -> String {
    let out = nix("nix-store")
        .arg("--add")
        .arg(path)
        .output()
        .expect("running nix-store --add");
    assert!(
        out.status.success(),
        "nix-store --add {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// busybox with a link per applet (a builder: argv[0] picks the applet), and the storedisk
/// binary under test, each as a store directory: the two inputs of nix/lib.nix.
pub fn store_inputs(scratch: &Path) -> (String, String) {
    let bb_dir = scratch.join("busybox/bin");
    fs::create_dir_all(&bb_dir).expect("a scratch directory");
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| tool("busybox"));
    fs::copy(&busybox, bb_dir.join("busybox")).expect("copying busybox");
    let applets = Command::new(&busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        if !applet.is_empty() && applet != "busybox" {
            symlink("busybox", bb_dir.join(applet)).expect("an applet link");
        }
    }
    let sd_dir = scratch.join("storedisk/bin");
    fs::create_dir_all(&sd_dir).expect("a scratch directory");
    fs::copy(env!("CARGO_BIN_EXE_storedisk"), sd_dir.join("storedisk")).expect("copying storedisk");
    (
        add_to_store(&scratch.join("busybox")),
        add_to_store(&scratch.join("storedisk")),
    )
}

/// `storedisk build --format FORMAT --closure ... --store-dir ... --output OUTPUT EXTRA ROOTS`
/// of `store`'s roots, not yet run.
pub fn build_cmd(store: &SyntheticStore, format: &str, output: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_storedisk"));
    cmd.args(["build", "--format", format, "--closure"])
        .arg(store.closure_json())
        .arg("--store-dir")
        .arg(store.store_dir())
        .arg("--output")
        .arg(output)
        .args(extra)
        .args(store.roots().iter().map(|r| store.logical(r)))
        .stdin(Stdio::null());
    cmd
}

/// What one `storedisk verify` run printed, and its exit code.
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// The `--json` report; panics with both streams when there is none.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("no JSON report ({e}): {}{}", self.stdout, self.stderr))
    }

    pub fn first_line(&self) -> &str {
        self.stdout.lines().next().unwrap_or_default()
    }
}

/// Runs `storedisk verify ARGS` with an empty PATH and a 120 s hang guard (not a timing
/// assert); a panic is a test failure whatever the exit code.
pub fn verify(args: &[&str]) -> Outcome {
    let out = Cmd::cargo_bin("storedisk")
        .expect("the storedisk binary")
        .arg("verify")
        .args(args)
        .env("PATH", "")
        .timeout(Duration::from_secs(120))
        .output()
        .expect("running storedisk verify");
    let outcome = Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !outcome.stderr.contains("panicked"),
        "verify panicked: {}",
        outcome.stderr
    );
    outcome
}

/// Modes as the store has them, root ownership (when the extractor could keep it) and `mtime`
/// on every entry below the root; the root itself 0555.
pub fn assert_canonical_metadata(extracted: &Path, mtime: i64) {
    let as_root = fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let root = fs::symlink_metadata(extracted).unwrap();
    assert_eq!(root.mode() & 0o7777, 0o555, "image root mode");
    let mut stack = vec![extracted.to_owned()];
    let mut checked = 0;
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.mode() & 0o7777;
            if meta.is_dir() {
                assert_eq!(mode, 0o555, "{}", path.display());
                stack.push(path.clone());
            } else if meta.is_file() {
                assert!(
                    mode == 0o444 || mode == 0o555,
                    "{}: mode {mode:o}",
                    path.display()
                );
            } else {
                assert!(meta.file_type().is_symlink(), "{}", path.display());
            }
            if !meta.file_type().is_symlink() {
                assert_eq!(meta.mtime(), mtime, "mtime of {}", path.display());
            }
            if as_root {
                assert_eq!(
                    (meta.uid(), meta.gid()),
                    (0, 0),
                    "owner of {}",
                    path.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} entries extracted");
}

/// Unmounts `dir` (lazily when it is busy), for a test's `Drop`: never panics.
pub fn unmount(dir: &Path) {
    let unmounted = Command::new("umount")
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !unmounted {
        let _ = Command::new("umount").arg("-l").arg(dir).status();
    }
}

/// The hard links of [`SyntheticStore::tricky`] (within a store path and across two), extracted
/// from an image under `extracted`, are links: one inode each.
pub fn assert_tricky_hard_links(extracted: &Path, store: &SyntheticStore) {
    let doc = extracted
        .join(store.path("hello-2.12.1").base_name())
        .join("share/doc");
    let ino = |p: PathBuf| fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(doc.join("hello/COPYING")),
        ino(doc.join("hello/LICENSE"))
    );
    let busybox_license = extracted
        .join(store.path("busybox-1.36.1").base_name())
        .join("share/doc/LICENSE");
    assert_eq!(ino(doc.join("busybox-LICENSE")), ino(busybox_license));
}

/// The extraction holds exactly the closure's paths, each with the closure's NAR hash.
pub fn assert_holds_closure(extracted: &Path, closure: &storedisk_nix::Closure) {
    let names: std::collections::BTreeSet<String> = fs::read_dir(extracted)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let want: std::collections::BTreeSet<String> = closure
        .iter()
        .map(|i| i.path.base_name().to_owned())
        .collect();
    assert_eq!(
        names, want,
        "the image root must hold exactly the closure's store paths"
    );
    for info in closure.iter() {
        let (hash, size) =
            storedisk_nix::nar::hash_path(&extracted.join(info.path.base_name())).unwrap();
        assert_eq!(
            Some(hash),
            info.nar_hash,
            "NAR hash of {} in the image",
            info.path
        );
        assert_eq!(
            Some(size),
            info.nar_size,
            "NAR size of {} in the image",
            info.path
        );
    }
}
