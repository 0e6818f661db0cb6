//! `storedisk build` under faults: killed with SIGKILL in the middle, out of space on a small
//! tmpfs, and two builds racing to one output. Whatever happens, an existing output stays byte
//! for byte what it was until a complete image replaces it, and nothing else is left beside it
//! (a killed layered build's staging directory is removed by the next build).
//!
//! The out-of-space tests mount a tmpfs and so need root (CI runs them as root); without it
//! they fail, saying so.

#![allow(clippy::unwrap_used)] // Tests: a failed setup step should panic with its message.

mod common;

use std::fs::{self, File};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::build_cmd;
use sha2::{Digest, Sha256};
use storedisk_testkit::{
    assert_success, erofs_utils_version, listing, newest_erofs_utils, pseudo_random_bytes, text,
    tool, StorePathSpec, SyntheticStore, SyntheticStoreBuilder, XorShift64,
};

fn sha256_of(path: &Path) -> String {
    let digest = Sha256::digest(fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file under `dir` (relative path) with its SHA-256.
fn tree_digest(dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = listing(dir)
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            (name, sha256_of(&path))
        })
        .collect();
    out.sort();
    out
}

/// `len` bytes no compressor can shrink (xorshift64), so images are as big as their data.
fn incompressible(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = XorShift64::from_seed(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `paths` store paths of `mib_each` MiB of incompressible data each (half of it in a file
/// of mixed data, `pseudo_random_bytes`, for the compressors to work on), and a root
/// referring to them all. `seed` makes different stores.
fn bulky_store(paths: usize, mib_each: usize, seed: u64) -> SyntheticStore {
    let mut builder = SyntheticStoreBuilder::new();
    let mut refs = String::new();
    for i in 0..paths {
        let p = builder.path(&format!("bulk-{seed}-{i}"), StorePathSpec::Directory);
        let half = mib_each << 19;
        let data = incompressible(seed * 1000 + i as u64, half);
        builder.file(&p, "share/data", &data, false);
        let mixed = pseudo_random_bytes(seed * 1000 + i as u64, half);
        builder.file(&p, "share/mixed", &mixed, false);
        refs.push_str(&builder.logical(&p));
        refs.push('\n');
    }
    let root = builder.path(&format!("bulk-root-{seed}"), StorePathSpec::Directory);
    builder.file(&root, "refs", refs.as_bytes(), false);
    builder.finish(&[root])
}

/// A store whose image is a few KiB.
fn tiny_store() -> SyntheticStore {
    let mut builder = SyntheticStoreBuilder::new();
    let root = builder.path("tiny-1.0", StorePathSpec::Directory);
    builder.file(&root, "bin/tiny", b"#!/bin/sh\necho tiny\n", true);
    builder.finish(&[root])
}

fn build(store: &SyntheticStore, format: &str, output: &Path, extra: &[&str]) {
    assert_success(&build_cmd(store, format, output, extra).output().unwrap());
}

/// Starts `cmd`, SIGKILLs it after `delay` (it must still be running then), waits for it, and
/// checks that no mkfs.erofs it started outlives it for long.
fn kill_after(mut cmd: Command, delay: Duration) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    sleep(delay);
    if let Some(status) = child.try_wait().unwrap() {
        panic!(
            "the build ended ({status}) within {:?}, before the kill at {delay:?}: make the store bigger",
            started.elapsed()
        );
    }
    let pid = child.id();
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let survivors = writers_of(pid);
        if survivors.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            // Not left spinning on the test machine.
            for survivor in &survivors {
                let pid = survivor.split(':').next().unwrap_or_default();
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
            panic!("killed after {delay:?}, the build's mkfs.erofs still runs 5 s later: {survivors:?}");
        }
        sleep(Duration::from_millis(50));
    }
}

/// The live processes writing an image through `/proc/<pid>/fd/`: mkfs.erofs started by the
/// build `pid` (its command line names the build's unnamed image that way).
fn writers_of(pid: u32) -> Vec<String> {
    let needle = format!("/proc/{pid}/fd/");
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = text(&cmdline).replace('\0', " ");
        let name = entry.file_name().to_string_lossy().into_owned();
        if cmdline.contains(&needle) && name.parse::<u32>().is_ok() {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

const KILL_POINTS: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(300),
    Duration::from_millis(1000),
];

#[test]
fn sigkill_in_the_middle_of_a_build_keeps_the_old_image_and_leaves_nothing() {
    let big = bulky_store(32, 4, 1);
    let tiny = tiny_store();
    for (format, mkfs) in writers() {
        let what = format!("{format} {mkfs:?}");
        let extra = mkfs_args(&mkfs);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out_dir = tempfile::tempdir().unwrap();
        let output = out_dir.path().join("store.img");
        build(&tiny, format, &output, &extra);
        let before = sha256_of(&output);

        let mut staging_seen = false;
        for delay in KILL_POINTS {
            kill_after(build_cmd(&big, format, &output, &extra), delay);
            assert_eq!(
                sha256_of(&output),
                before,
                "{what}: killed after {delay:?}, the old image changed"
            );
            let mut left = listing(out_dir.path());
            if stages(&mkfs) {
                // mkfs.erofs 1.5 packs a staged copy, a directory that cannot be unnamed: the
                // next build removes it (below).
                let before_retain = left.len();
                left.retain(|n| !(n.starts_with(".storedisk-staging-") && n.ends_with(".tmp")));
                staging_seen |= left.len() < before_retain;
            }
            assert_eq!(
                left,
                ["store.img"],
                "{what}: killed after {delay:?}, left behind"
            );
        }
        assert_eq!(
            staging_seen,
            stages(&mkfs),
            "{what}: a kill must leave mkfs.erofs 1.5's staged copy (and only then one), or the \
             sweep below tests nothing"
        );
        build(&tiny, format, &output, &extra);
        assert_eq!(sha256_of(&output), before, "{what}");
        assert_eq!(
            listing(out_dir.path()),
            ["store.img"],
            "{what}: the next build"
        );
    }
}

#[test]
fn a_killed_layered_build_keeps_the_old_layers_and_the_next_build_removes_its_staging() {
    let big = bulky_store(32, 4, 2);
    let small = bulky_store(4, 1, 3);
    let parent = tempfile::tempdir().unwrap();
    let output = parent.path().join("layers");
    let layered = ["--layers", "3"];
    build(&small, "squashfs", &output, &layered);
    let before = tree_digest(&output);

    // A directory of the same pattern that storedisk did not make, and one a live build holds.
    let foreign = parent.path().join(".layers.mine.tmp");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("keep"), b"not storedisk's").unwrap();
    let live = parent.path().join(".layers.live.tmp");
    fs::create_dir(&live).unwrap();
    let live_marker = File::create(live.join(".storedisk-staging")).unwrap();
    live_marker.lock().unwrap();

    let mut stale_seen = false;
    for delay in KILL_POINTS {
        kill_after(build_cmd(&big, "squashfs", &output, &layered), delay);
        assert_eq!(tree_digest(&output), before, "killed after {delay:?}");
        let left: Vec<String> = listing(parent.path())
            .into_iter()
            .filter(|n| n.starts_with(".layers.") && n.ends_with(".tmp"))
            .filter(|n| n != ".layers.mine.tmp" && n != ".layers.live.tmp")
            .collect();
        // Each build sweeps the previous kill's staging directory: at most one is left.
        assert!(left.len() <= 1, "killed after {delay:?}: {left:?}");
        stale_seen |= !left.is_empty();
    }
    assert!(
        stale_seen,
        "no kill left a staging directory: the sweep below would test nothing"
    );

    build(&small, "squashfs", &output, &layered);
    assert_eq!(tree_digest(&output), before);
    assert_eq!(
        listing(parent.path()),
        [".layers.live.tmp", ".layers.mine.tmp", "layers"],
        "the sweep must remove the killed builds' staging and nothing else"
    );
    assert_eq!(fs::read(foreign.join("keep")).unwrap(), b"not storedisk's");
    drop(live_marker);
}

/// A tmpfs mounted on a temp directory for the life of the value; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "this test needs to mount a {size} tmpfs (it must run as root, as on CI): mount {} failed: {}",
            dir.path().display(),
            text(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        common::unmount(self.dir.path());
    }
}

/// The ways to write an image: the format, and the mkfs.erofs to use (`None`: the format's
/// own writer, for erofs the native one): 1.8 streams a tar, 1.5 packs a staged copy.
fn writers() -> Vec<(&'static str, Option<PathBuf>)> {
    vec![
        ("squashfs", None),
        ("erofs", None),
        ("erofs", Some(newest_erofs_utils().mkfs)),
        ("erofs", Some(erofs_utils_version(1, 5).mkfs)),
    ]
}

fn mkfs_args(mkfs: &Option<PathBuf>) -> Vec<String> {
    match mkfs {
        Some(path) => vec![
            "--erofs-writer".to_owned(),
            "mkfs".to_owned(),
            "--mkfs-erofs".to_owned(),
            path.display().to_string(),
        ],
        None => Vec::new(),
    }
}

/// Whether `mkfs` packs a staged copy (mkfs.erofs 1.5 has no tar input).
fn stages(mkfs: &Option<PathBuf>) -> bool {
    mkfs.as_ref() == Some(&erofs_utils_version(1, 5).mkfs)
}

#[test]
fn out_of_space_fails_naming_the_output_and_keeps_the_old_image() {
    let big = bulky_store(2, 2, 4);
    let tiny = tiny_store();
    for (format, mkfs) in writers() {
        let tmpfs = Tmpfs::mount("2m");
        let output = tmpfs.path().join("store.img");
        let extra = mkfs_args(&mkfs);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        build(&tiny, format, &output, &extra);
        let before = sha256_of(&output);

        let out = build_cmd(&big, format, &output, &extra).output().unwrap();
        let stderr = text(&out.stderr);
        let what = format!("{format} {mkfs:?}");
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(
            stderr.contains(&output.display().to_string()),
            "{what}: the error must name the output: {stderr}"
        );
        assert!(
            stderr.to_lowercase().contains("no space"),
            "{what}: the error must say there is no space: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert_eq!(sha256_of(&output), before, "{what}: the old image changed");
        assert_eq!(listing(tmpfs.path()), ["store.img"], "{what}: left behind");
    }
}

#[test]
fn out_of_space_in_a_layered_build_keeps_the_old_layers() {
    let big = bulky_store(4, 1, 5);
    let small = tiny_store();
    let tmpfs = Tmpfs::mount("2m");
    let output = tmpfs.path().join("layers");
    build(&small, "squashfs", &output, &["--layers", "3"]);
    let before = tree_digest(&output);
    let out = build_cmd(&big, "squashfs", &output, &["--layers", "3"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.to_lowercase().contains("no space"), "{stderr}");
    assert!(stderr.contains(&output.display().to_string()), "{stderr}");
    assert_eq!(tree_digest(&output), before);
    assert_eq!(listing(tmpfs.path()), ["layers"]);
}

#[test]
fn two_concurrent_builds_to_one_output_leave_one_complete_image() {
    let store = bulky_store(4, 2, 6);
    for (format, mkfs) in writers() {
        let what = format!("{format} {mkfs:?}");
        let extra = mkfs_args(&mkfs);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let sequential_dir = tempfile::tempdir().unwrap();
        let sequential = sequential_dir.path().join("store.img");
        build(&store, format, &sequential, &extra);

        let out_dir = tempfile::tempdir().unwrap();
        let output = out_dir.path().join("store.img");
        let children: Vec<_> = (0..2)
            .map(|_| {
                build_cmd(&store, format, &output, &extra)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            assert_success(&child.wait_with_output().unwrap());
        }
        assert_eq!(
            sha256_of(&output),
            sha256_of(&sequential),
            "{what}: the raced image differs from a sequential build"
        );
        assert_eq!(
            listing(out_dir.path()),
            ["store.img"],
            "{what}: left behind"
        );
    }
}

#[test]
fn two_concurrent_layered_builds_to_one_output_leave_one_complete_build() {
    let store = bulky_store(4, 1, 7);
    let layered = ["--layers", "3"];
    let sequential_dir = tempfile::tempdir().unwrap();
    let sequential = sequential_dir.path().join("layers");
    build(&store, "squashfs", &sequential, &layered);

    let parent = tempfile::tempdir().unwrap();
    let output = parent.path().join("layers");
    let children: Vec<_> = (0..2)
        .map(|_| {
            build_cmd(&store, "squashfs", &output, &layered)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        assert_success(&child.wait_with_output().unwrap());
    }
    assert_eq!(tree_digest(&output), tree_digest(&sequential));
    assert_eq!(listing(parent.path()), ["layers"]);
    // The raced image is a valid squashfs to its peer's own reader.
    for (name, _) in tree_digest(&output) {
        if name.ends_with(".squashfs") {
            let out = Command::new(tool("unsquashfs"))
                .arg("-l")
                .arg(output.join(&name))
                .output()
                .unwrap();
            assert_success(&out);
        }
    }
}
