//! `storedisk build --format erofs --erofs-writer native`, checked by readers that are not
//! ours: every image is extracted by erofs-utils' `fsck.erofs --extract` (which checks the
//! image as it goes) and compared with the store path by path by NAR hash, and read by
//! `storedisk verify` (erofs-rs). The stores hit the writer's edges: sizes around the block
//! size, tails of many lengths, incompressible and all-zero data, long names, wide and deep
//! directories, long symlinks, hard links and many identical files.

#![allow(clippy::unwrap_used)] // Tests: a failed setup step should panic with its message.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use assert_cmd::Command as Cmd;
use common::build_cmd;
use serde_json::Value;
use storedisk_testkit::{
    assert_success, listing, newest_erofs_utils, pseudo_random_bytes, text, StorePathSpec,
    SyntheticStore, SyntheticStoreBuilder, XorShift64,
};

const ZTAILPACKING: u32 = 0x10; // EROFS_FEATURE_INCOMPAT_ZTAILPACKING
const FRAGMENTS: u32 = 0x20; // EROFS_FEATURE_INCOMPAT_FRAGMENTS

/// Runs `storedisk build --format erofs --erofs-writer native EXTRA` of `store`'s roots.
fn build_native(store: &SyntheticStore, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--erofs-writer", "native"];
    args.extend_from_slice(extra);
    build_cmd(store, "erofs", output, &args).output().unwrap()
}

/// fsck.erofs 1.8 (from `cargo xtask setup`; the test fails without it), which checks the
/// image while it extracts it into `into`.
fn extract(image: &Path, into: &Path) {
    let fsck = newest_erofs_utils().fsck;
    let out = Command::new(&fsck)
        .arg(format!("--extract={}", into.display()))
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} --extract {}: {}{}",
        fsck.display(),
        image.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `storedisk verify IMAGE --closure CLOSURE --json` passes complete and integrity.
fn assert_verifies(store: &SyntheticStore, image: &Path) {
    let out = Cmd::cargo_bin("storedisk")
        .unwrap()
        .arg("verify")
        .arg(image)
        .arg("--closure")
        .arg(store.closure_json())
        .arg("--json")
        .timeout(std::time::Duration::from_secs(300))
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify {}: {stderr}",
        image.display()
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    for name in ["complete", "integrity"] {
        let check = &report["checks"][name];
        assert_eq!(check["ok"], true, "{name}: {check}");
    }
    assert_eq!(
        report["checks"]["integrity"]["checked"],
        store.closure().len(),
        "every packed path compared"
    );
}

fn incompat_features(image: &Path) -> u32 {
    let bytes = fs::read(image).unwrap();
    u32::from_le_bytes(bytes[1024 + 0x50..1024 + 0x54].try_into().unwrap())
}

/// The superblock's `packed_nid` (0: no packed inode).
fn packed_nid(image: &Path) -> u64 {
    let bytes = fs::read(image).unwrap();
    u64::from_le_bytes(bytes[1024 + 96..1024 + 104].try_into().unwrap())
}

fn label(image: &Path) -> Vec<u8> {
    let bytes = fs::read(image).unwrap();
    let name = &bytes[1024 + 64..1024 + 80];
    name[..name.iter().position(|&b| b == 0).unwrap_or(16)].to_vec()
}

fn uuid(image: &Path) -> Vec<u8> {
    fs::read(image).unwrap()[1024 + 48..1024 + 64].to_vec()
}

#[test]
fn the_tricky_store_reads_back_byte_for_byte_through_fsck_erofs_and_verify() {
    let store = SyntheticStore::tricky();
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("store.erofs");
    let out = build_native(&store, &image, &["--json"]);
    assert_success(&out);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["store_paths"], 6, "{report}");
    assert_eq!(report["compression"], "lz4hc", "{report}");
    assert_eq!(report["compression_level"], 9, "{report}");
    assert_eq!(report["tool"], Value::Null, "no external tool: {report}");
    assert_eq!(
        report["image_bytes"].as_u64().unwrap(),
        fs::metadata(&image).unwrap().len()
    );
    assert_eq!(fs::metadata(&image).unwrap().len() % 4096, 0);

    let extracted = work.path().join("x");
    extract(&image, &extracted);
    common::assert_holds_closure(&extracted, store.closure());
    common::assert_canonical_metadata(&extracted, 0);
    // Hard links are one inode in the image, which fsck.erofs 1.8 extracts as links.
    common::assert_tricky_hard_links(&extracted, &store);
    assert_verifies(&store, &image);

    assert_eq!(label(&image), b"nix-store");
    assert_eq!(
        incompat_features(&image) & ZTAILPACKING,
        ZTAILPACKING,
        "tails are packed by default"
    );
    // The UUID is the closure's, as with mkfs.erofs.
    let mkfs_image = work.path().join("mkfs.erofs");
    let mkfs = newest_erofs_utils().mkfs;
    assert_success(
        &build_cmd(
            &store,
            "erofs",
            &mkfs_image,
            &[
                "--erofs-writer",
                "mkfs",
                "--mkfs-erofs",
                mkfs.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap(),
    );
    assert_eq!(uuid(&image), uuid(&mkfs_image));
    assert_ne!(uuid(&image), vec![0; 16]);
}

/// Text: compresses well.
fn prose(len: usize) -> Vec<u8> {
    b"GNU GENERAL PUBLIC LICENSE /nix/store lorem ipsum dolor\n"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

/// Noise: does not compress.
fn noise(rng: &mut XorShift64, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// Runs of text and noise: clusters that compress and clusters stored as they are, ending
/// anywhere in a logical cluster.
fn runs(rng: &mut XorShift64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let run = 10 + (rng.next_u64() % 3000) as usize;
        if rng.next_u64().is_multiple_of(2) {
            out.extend(prose(run));
        } else {
            out.extend(noise(rng, run));
        }
    }
    out.truncate(len);
    out
}

/// One store path per kind of edge the writer must get right.
fn edge_store() -> SyntheticStore {
    let mut b = SyntheticStoreBuilder::new();
    let mut rng = XorShift64::new(0x9e37_79b9_7f4a_7c15);

    let sizes = b.path("sizes", StorePathSpec::Directory);
    for len in [0usize, 1, 4095, 4096, 4097, 8191, 8192, 8193, (5 << 20) + 3] {
        b.file(&sizes, &format!("text-{len}"), &prose(len), false);
        b.file(
            &sizes,
            &format!("noise-{len}"),
            &noise(&mut rng, len),
            len % 2 == 1,
        );
        b.file(
            &sizes,
            &format!("mixed-{len}"),
            &pseudo_random_bytes(len as u64, len),
            false,
        );
        b.file(&sizes, &format!("zeros-{len}"), &vec![0u8; len], false);
    }
    // A large file of noise with a compressible middle and a zero end.
    let mut patchy = noise(&mut rng, 3 << 20);
    patchy.extend(prose(1 << 20));
    patchy.extend(vec![0u8; (1 << 20) + 17]);
    b.file(&sizes, "patchy", &patchy, true);

    let mixed = b.path("mixed", StorePathSpec::Directory);
    for i in 0..300u64 {
        let len = match i % 3 {
            0 => (i * 37) as usize % 100,
            1 => (i * 7919) as usize % 20_000,
            _ => (i * 104_729) as usize % 300_000,
        };
        b.file(
            &mixed,
            &format!("f{i:03}"),
            &runs(&mut rng, len),
            i % 2 == 0,
        );
    }

    let tails = b.path("tails", StorePathSpec::Directory);
    let mut lens: Vec<usize> = (1..4096).step_by(127).collect();
    lens.extend([
        2, 31, 32, 33, 4031, 4032, 4033, 4063, 4064, 4065, 4071, 4072, 4073, 4094, 4095,
    ]);
    for t in lens {
        b.file(&tails, &format!("t{t}-text"), &prose(3 * 4096 + t), false);
        b.file(
            &tails,
            &format!("t{t}-noise"),
            &noise(&mut rng, 4096 + t),
            false,
        );
        b.file(&tails, &format!("t{t}-small"), &noise(&mut rng, t), false);
        // Compressible, then noise at the end: the tail follows compressed clusters.
        let mut mixed = prose(20_000);
        mixed.extend(noise(&mut rng, t));
        b.file(&tails, &format!("t{t}-mixed"), &mixed, false);
        b.file(
            &tails,
            &format!("t{t}-runs"),
            &runs(&mut rng, 50_000 + t),
            false,
        );
    }

    let names = b.path("names", StorePathSpec::Directory);
    for c in ["a", "b", "Z", "-", "+", "~"] {
        b.file(&names, &c.repeat(255), c.as_bytes(), false);
    }
    for i in 0..600 {
        b.file(
            &names,
            &format!("wide/entry-{i:04}-{}", "x".repeat(i % 200)),
            &prose(i),
            false,
        );
    }
    let deep: Vec<String> = (0..40).map(|i| format!("d{i}")).collect();
    b.file(
        &names,
        &format!("{}/bottom", deep.join("/")),
        b"deep",
        false,
    );
    b.dir(&names, "empty-dir");

    let links = b.path("links", StorePathSpec::Directory);
    for len in [1usize, 2, 100, 2000, 4000, 4064, 4065, 4095] {
        let target: String = "t/".repeat(len / 2) + &"x".repeat(len % 2);
        b.symlink(&links, &format!("link-{len}"), &target);
    }
    b.file(&links, "first", &prose(10_000), false);
    b.hard_link(&links, "second", &links, "first");
    b.hard_link(&links, "third", &links, "first");

    let copies = b.path("copies", StorePathSpec::Directory);
    let shared = noise(&mut rng, 300_000);
    let small = prose(5000);
    let zero = vec![0u8; 70_000];
    for i in 0..20 {
        b.file(&copies, &format!("big-{i:02}"), &shared, false);
        b.file(&copies, &format!("small-{i:02}"), &small, false);
        b.file(&copies, &format!("zero-{i:02}"), &zero, false);
    }

    // Files sharing whole blocks at block-aligned offsets but not all their content: with
    // fragments, identical clusters are stored once, so a file of plain blocks may end up with
    // blocks that are not consecutive (stored compressed, of plain clusters) or that start
    // inside another file's (flat).
    let shared_blocks = b.path("shared-blocks", StorePathSpec::Directory);
    let x = noise(&mut rng, 3 * 4096);
    let mut prefixed = x[..8192].to_vec();
    prefixed.extend(noise(&mut rng, 4096));
    let mut short_end = x[..4096].to_vec();
    short_end.extend(noise(&mut rng, 100));
    let mut text_a = prose(50_000);
    text_a.extend(noise(&mut rng, 5000));
    let mut text_b = prose(50_000);
    text_b.extend(noise(&mut rng, 3000));
    for (name, bytes) in [
        ("x", x.clone()),
        ("x-prefix-then-other", prefixed),
        ("x-middle-blocks", x[4096..].to_vec()),
        ("x-first-block-and-short-end", short_end),
        ("text-a", text_a),
        ("text-b", text_b),
    ] {
        b.file(&shared_blocks, name, &bytes, false);
    }

    let single = b.path("single-file", StorePathSpec::File);
    b.file(&single, "", &prose(12_345), true);
    let lone_link = b.path("lone-link", StorePathSpec::Symlink);
    b.symlink(&lone_link, "", "/nix/store/nowhere");

    b.finish(&[
        sizes,
        mixed,
        tails,
        names,
        links,
        copies,
        shared_blocks,
        single,
        lone_link,
    ])
}

/// Builds `store` with `extra`, checks it with fsck.erofs and verify; returns the image and
/// the build report.
fn build_and_check(
    store: &SyntheticStore,
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> (PathBuf, Value) {
    let image = dir.join(format!("{name}.erofs"));
    let mut args = extra.to_vec();
    args.push("--json");
    let out = build_native(store, &image, &args);
    assert_success(&out);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let extracted = dir.join(format!("{name}.x"));
    extract(&image, &extracted);
    common::assert_holds_closure(&extracted, store.closure());
    assert_verifies(store, &image);
    fs::remove_dir_all(&extracted).unwrap();
    (image, report)
}

/// Every combination of algorithm, tail packing and fragments the native writer takes.
const COMBINATIONS: [(&str, &[&str]); 9] = [
    ("lz4hc", &[]),
    ("lz4hc-12", &["--compression-level", "12"]),
    ("lz4", &["--compression", "lz4"]),
    ("none", &["--compression", "none"]),
    ("no-tails", &["--erofs-ztailpacking", "false"]),
    ("fragments", &["--erofs-fragments"]),
    (
        "fragments-no-tails",
        &["--erofs-fragments", "--erofs-ztailpacking", "false"],
    ),
    (
        "fragments-lz4",
        &["--erofs-fragments", "--compression", "lz4"],
    ),
    // Nothing is compressed, so there are no fragments to pack.
    (
        "fragments-none",
        &["--erofs-fragments", "--compression", "none"],
    ),
];

#[test]
fn edge_cases_read_back_with_every_algorithm_with_and_without_tail_packing_and_fragments() {
    let store = edge_store();
    let work = tempfile::tempdir().unwrap();
    let mut sizes = Vec::new();
    let mut file_bytes = 0;
    for (name, extra) in COMBINATIONS {
        let (image, report) = build_and_check(&store, work.path(), name, extra);
        file_bytes = report["file_bytes"].as_u64().unwrap();
        let features = incompat_features(&image);
        let tails = !(name.contains("none") || name.contains("no-tails"));
        let fragments = name.starts_with("fragments") && name != "fragments-none";
        assert_eq!(features & ZTAILPACKING != 0, tails, "{name}: {features:#x}");
        assert_eq!(
            features & FRAGMENTS != 0,
            fragments,
            "{name}: {features:#x}"
        );
        assert_eq!(packed_nid(&image) != 0, fragments, "{name}");
        sizes.push((name, fs::metadata(&image).unwrap().len()));
    }
    eprintln!("image sizes of the edge store: {sizes:?}");
    let size = |n: &str| sizes.iter().find(|(name, _)| *name == n).unwrap().1;
    assert!(size("lz4hc") < size("none"), "{sizes:?}");
    assert!(size("lz4hc") <= size("no-tails"), "{sizes:?}");
    assert!(size("fragments") < size("lz4hc"), "{sizes:?}");
    assert!(size("fragments-no-tails") < size("no-tails"), "{sizes:?}");
    // 20 copies each of 300 KB of noise, 70 KB of zeros and 5 KB of text are stored once:
    // over 5 MB less than the file data, even uncompressed.
    assert!(
        size("none") + 5_000_000 < file_bytes,
        "{sizes:?} of {file_bytes}"
    );
}

#[test]
fn images_are_byte_identical_whatever_the_thread_count() {
    let store = edge_store();
    let work = tempfile::tempdir().unwrap();
    for extra in [&[][..], &["--erofs-fragments"][..]] {
        let one = work.path().join("one.erofs");
        let four = work.path().join("four.erofs");
        let mut args = vec!["--threads", "1", "--no-read-back"];
        args.extend_from_slice(extra);
        assert_success(&build_native(&store, &one, &args));
        args[1] = "4";
        assert_success(&build_native(&store, &four, &args));
        assert!(
            fs::read(&one).unwrap() == fs::read(&four).unwrap(),
            "{extra:?}: --threads 1 and --threads 4 wrote different images"
        );
    }
}

#[test]
fn what_only_mkfs_erofs_does_is_refused_naming_the_way_to_it() {
    let store = SyntheticStore::tricky();
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("refused.erofs");
    for extra in [
        &["--compression", "zstd"][..],
        &["--compression", "lzma"][..],
    ] {
        let out = build_native(&store, &image, extra);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(
            stderr.contains("--erofs-writer mkfs"),
            "{extra:?}: {stderr}"
        );
        assert!(stderr.contains("not supported"), "{extra:?}: {stderr}");
        assert_eq!(listing(work.path()), Vec::<String>::new(), "{extra:?}");
    }
    // A level lz4 does not have is a bad level, as with mkfs.erofs.
    let out = build_native(
        &store,
        &image,
        &["--compression", "lz4", "--compression-level", "3"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no levels"),
        "{}",
        text(&out.stderr)
    );
}

/// A read-only loop mount of an erofs image by the running kernel, unmounted when dropped.
struct KernelMount {
    dir: tempfile::TempDir,
}

impl KernelMount {
    fn new(image: &Path) -> KernelMount {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "erofs", "-o", "loop,ro"])
            .arg(image)
            .arg(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "this test has the kernel read the image: it must run as root (as on CI) with loop \
             devices and erofs in /proc/filesystems; mount {} failed: {}",
            image.display(),
            text(&out.stderr)
        );
        KernelMount { dir }
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        common::unmount(self.dir.path());
    }
}

#[test]
fn the_kernel_reads_the_edge_cases_as_the_store_has_them() {
    let store = edge_store();
    let work = tempfile::tempdir().unwrap();
    for (name, extra) in COMBINATIONS {
        if name == "lz4hc-12" {
            continue;
        }
        let image = work.path().join(format!("{name}.erofs"));
        let mut args = extra.to_vec();
        args.push("--no-read-back");
        assert_success(&build_native(&store, &image, &args));
        let mounted = KernelMount::new(&image);
        common::assert_holds_closure(mounted.dir.path(), store.closure());
        let links = mounted.dir.path().join(store.path("links").base_name());
        let first = fs::metadata(links.join("first")).unwrap();
        assert_eq!(first.nlink(), 3, "{name}: hard links share one inode");
        assert_eq!(
            first.ino(),
            fs::metadata(links.join("third")).unwrap().ino()
        );
    }
}
