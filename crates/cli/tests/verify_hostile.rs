//! Hostile images against `storedisk verify` under its *default* limits and a memory cap (the
//! process may use at most 1.5 GiB of address space): a directory that contains itself (an erofs
//! dirent pointing back at its own directory), nesting deeper than the depth limit (a real tree
//! packed by mksquashfs and mkfs.erofs), and superblocks of real images whose counts and sizes
//! are set to their maximum or to invalid values. Each must end with exit code 2 and a message
//! saying what is wrong (or, for the one field that does not matter to a reader, an intact
//! report): never a panic, an abort, a hang or an allocation that the cap kills.

#![allow(clippy::unwrap_used)] // Tests: a failed setup should panic loudly.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use storedisk_testkit::{newest_erofs_utils, text, tool};

/// Address-space cap for the verifier, in KiB (`ulimit -v`): far above what verifying these
/// images needs, far below what trusting a hostile count would allocate.
const MEMORY_CAP_KIB: u64 = 1536 * 1024;

/// `storedisk verify IMAGE` under the memory cap and a 120 s hang guard (not a timing assert).
fn verify_capped(image: &Path) -> Output {
    let script = format!("ulimit -v {MEMORY_CAP_KIB} && exec timeout 120 \"$0\" verify \"$1\"",);
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_storedisk"))
        .arg(image)
        .output()
        .unwrap()
}

/// Exit 2 with a message naming the problem; `why` lists acceptable words.
fn assert_refused(what: &str, out: &Output, why: &[&str]) {
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{what}: panicked: {stderr}");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: want exit 2 (a killed or aborted process has none):\n{stderr}{}",
        text(&out.stdout)
    );
    assert!(stderr.starts_with("storedisk: error: "), "{what}: {stderr}");
    assert!(
        why.iter().any(|w| stderr.contains(w)),
        "{what}: the message should say one of {why:?}: {stderr}"
    );
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `root/store-path/x/y/...`: a store-path-shaped directory with `depth` nested directories.
fn nested_tree(scratch: &Path, depth: usize) -> PathBuf {
    let root = scratch.join(format!("tree-{depth}"));
    let mut dir = root.join("0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-deep");
    for _ in 0..depth {
        dir.push("d");
    }
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("leaf"), b"bottom\n").unwrap();
    root
}

fn mksquashfs(tree: &Path, image: &Path) {
    run(Command::new(tool("mksquashfs")).arg(tree).arg(image).args([
        "-noappend",
        "-all-root",
        "-quiet",
    ]));
}

/// Uncompressed erofs (directories and inodes in plain bytes, so they can be edited).
fn mkfs_erofs(tree: &Path, image: &Path) {
    run(Command::new(newest_erofs_utils().mkfs)
        .args(["--all-root", "-T0"])
        .arg(image)
        .arg(tree));
}

#[test]
fn a_directory_that_contains_itself_is_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let tree = scratch.path().join("tree");
    let x = tree.join("0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-cycle/x");
    fs::create_dir_all(x.join("y")).unwrap();
    fs::write(x.join("y/file"), b"in y\n").unwrap();
    let image = scratch.path().join("cycle.erofs");
    mkfs_erofs(&tree, &image);
    let mut bytes = fs::read(&image).unwrap();

    // x's directory block: dirents for ".", "..", "y" (12 bytes each: nid u64, nameoff u16,
    // file type u8, reserved u8), then the names back to back: "...y".
    let names = bytes
        .windows(4)
        .position(|w| w == b"...y")
        .expect("x's directory block");
    let dirents = names - 3 * 12;
    assert_eq!(
        u16::from_le_bytes([bytes[dirents + 8], bytes[dirents + 9]]) as usize,
        36,
        "the first dirent's name offset: the layout this test edits"
    );
    let x_nid = bytes[dirents..dirents + 8].to_vec();
    let y_entry = dirents + 2 * 12;
    assert_ne!(bytes[y_entry..y_entry + 8], x_nid[..], "y is not x yet");
    // y now names x itself: x/y/y/y/... without end.
    bytes[y_entry..y_entry + 8].copy_from_slice(&x_nid);
    let hostile = scratch.path().join("cycle-hostile.erofs");
    fs::write(&hostile, &bytes).unwrap();

    // The unedited image verifies; the edited one is refused.
    let ok = verify_capped(&image);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    assert_refused(
        "erofs directory cycle",
        &verify_capped(&hostile),
        &["cycle", "loop", "safety limit", "corrupt image", "depth"],
    );
}

#[test]
fn nesting_deeper_than_the_limit_is_refused_and_within_it_accepted() {
    // Limits::default().max_depth is 1024.
    let scratch = tempfile::tempdir().unwrap();
    for (depth, refused) in [(1000, false), (1100, true)] {
        let tree = nested_tree(scratch.path(), depth);
        for (format, build) in [
            ("squashfs", mksquashfs as fn(&Path, &Path)),
            ("erofs", mkfs_erofs),
        ] {
            let image = scratch.path().join(format!("deep-{depth}.{format}"));
            build(&tree, &image);
            let out = verify_capped(&image);
            let what = format!("{format} nested {depth} deep");
            if refused {
                assert_refused(&what, &out, &["deeper", "depth", "safety limit"]);
            } else {
                assert_eq!(out.status.code(), Some(0), "{what}: {}", text(&out.stderr));
            }
        }
    }
}

/// Writes `value` (little-endian, `width` bytes) at `offset` of a copy of `valid`.
fn patched(valid: &[u8], offset: usize, width: usize, value: u64) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    bytes[offset..offset + width].copy_from_slice(&value.to_le_bytes()[..width]);
    bytes
}

#[test]
fn superblocks_with_counts_and_sizes_at_their_maximum_are_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let tree = nested_tree(scratch.path(), 3);
    let squashfs = scratch.path().join("ok.squashfs");
    mksquashfs(&tree, &squashfs);
    let erofs = scratch.path().join("ok.erofs");
    mkfs_erofs(&tree, &erofs);
    let reasons = [
        "corrupt image",
        "safety limit",
        "not a squashfs or erofs image",
    ];

    // squashfs superblock (squashfs_fs.h): inode count at 4, block size at 12, block log at
    // 22, bytes used at 40, inode table at 64, directory table at 72.
    let valid = fs::read(&squashfs).unwrap();
    for (what, offset, width, value) in [
        ("inode count u32::MAX", 4, 4, u64::from(u32::MAX)),
        ("block size 1 GiB", 12, 4, 1 << 30),
        ("block log 31", 22, 2, 31),
        ("bytes used u64::MAX", 40, 8, u64::MAX),
        ("inode table beyond the image", 64, 8, u64::MAX - 1),
        ("directory table beyond the image", 72, 8, 1 << 40),
    ] {
        let file = scratch.path().join("hostile.squashfs");
        fs::write(&file, patched(&valid, offset, width, value)).unwrap();
        assert_refused(&format!("squashfs {what}"), &verify_capped(&file), &reasons);
    }

    // erofs superblock at 1024 (erofs_fs.h): block size bits at +12, root nid at +14, inode
    // count at +16, block count at +36, metadata block address at +40.
    let valid = fs::read(&erofs).unwrap();
    let sb = 1024;
    for (what, offset, width, value) in [
        ("block size bits 31", sb + 12, 1, 31),
        ("root nid u16::MAX", sb + 14, 2, u64::from(u16::MAX)),
        ("metadata beyond the image", sb + 40, 4, u64::from(u32::MAX)),
    ] {
        let file = scratch.path().join("hostile.erofs");
        fs::write(&file, patched(&valid, offset, width, value)).unwrap();
        assert_refused(&format!("erofs {what}"), &verify_capped(&file), &reasons);
    }
    // The block count only feeds statfs: the kernel mounts such an image and reads every file,
    // so the verifier must read it too, and find it intact.
    let file = scratch.path().join("harmless.erofs");
    fs::write(&file, patched(&valid, sb + 36, 4, u64::from(u32::MAX))).unwrap();
    let out = verify_capped(&file);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("1 store paths"),
        "{}",
        text(&out.stdout)
    );
}
