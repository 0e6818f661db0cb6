//! `storedisk build` end to end on the testkit's synthetic store: images are extracted by the
//! peers' own tools (`unsquashfs`, `fsck.erofs --extract`) and every store path is compared with
//! the closure by NAR hash; modes, owners and times are checked in the extraction; images are
//! rebuilt under varied conditions and compared byte for byte; every bad input must fail with
//! exit code 2, name the culprit and leave nothing behind.

#![allow(clippy::unwrap_used)] // Tests: a failed setup step should panic with its message.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::build_cmd;
use sha2::{Digest, Sha256};
use storedisk_nix::nar::hash_path;
use storedisk_nix::StoreDir;
use storedisk_testkit::{
    assert_success, listing, store_path_for, text, tool, ErofsUtils, SyntheticStore,
};

fn storedisk() -> assert_cmd::Command {
    assert_cmd::Command::new(env!("CARGO_BIN_EXE_storedisk"))
}

fn sha256_of(path: &Path) -> String {
    let digest = Sha256::digest(fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `storedisk build` of the synthetic store's roots; `extra` comes before the roots.
fn build(store: &SyntheticStore, format: &str, output: &Path, extra: &[&str]) -> Output {
    build_cmd(store, format, output, extra).output().unwrap()
}

/// Every erofs-utils the tests can reach; microvm.nix's flags need one of 1.6+ among them.
fn erofs_utils() -> Vec<ErofsUtils> {
    let newest = storedisk_testkit::newest_erofs_utils();
    let all = storedisk_testkit::erofs_utils();
    assert!(all.iter().any(|u| u.version == newest.version));
    all
}

/// The tricky store, minus its 255-byte file name when `utils` cannot pack one (1.5 cuts names
/// to 254 bytes).
fn store_for(utils: &ErofsUtils) -> SyntheticStore {
    if utils.version >= (1, 6) {
        return SyntheticStore::tricky();
    }
    let (builder, toplevel) = SyntheticStore::tricky_builder();
    let hello = store_path_for("hello-2.12.1");
    let long = builder
        .store_dir()
        .join(hello.base_name())
        .join("share/doc/hello")
        .join("n".repeat(255));
    fs::remove_file(long).unwrap();
    builder.finish(&[toplevel])
}

/// Runs an oracle tool; its failure fails the test with what it printed.
fn run_oracle(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The superblock as unsquashfs describes it (`unsquashfs -s`).
fn squashfs_superblock(image: &Path) -> String {
    let out = std::process::Command::new(tool("unsquashfs"))
        .arg("-s")
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "unsquashfs -s: {}", text(&out.stderr));
    // Complaints about the superblock's contents go to stderr.
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

fn extract_squashfs(image: &Path, into: &Path) {
    run_oracle(
        std::process::Command::new(tool("unsquashfs"))
            .arg("-no-progress")
            .arg("-d")
            .arg(into)
            .arg(image),
    );
}

fn extract_erofs(fsck: &Path, image: &Path, into: &Path) {
    run_oracle(
        std::process::Command::new(fsck)
            .arg(format!("--extract={}", into.display()))
            .arg(image),
    );
}

#[test]
fn squashfs_holds_every_path_byte_for_byte_with_canonical_metadata() {
    let store = SyntheticStore::tricky();
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("store.squashfs");
    let out = build(&store, "squashfs", &image, &[]);
    assert_success(&out);
    let summary = text(&out.stdout);
    assert!(summary.contains("6 store paths"), "{summary}");

    let extracted = work.path().join("x");
    extract_squashfs(&image, &extracted);
    common::assert_holds_closure(&extracted, store.closure());
    assert!(!extracted
        .join(store.path("outside-1.0").base_name())
        .exists());
    common::assert_canonical_metadata(&extracted, 1);

    // unsquashfs's own listing: every entry root-owned, numeric ids.
    let listing = std::process::Command::new(tool("unsquashfs"))
        .arg("-lln")
        .arg(&image)
        .output()
        .unwrap();
    assert!(listing.status.success());
    let listing = text(&listing.stdout);
    let entries: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains("squashfs-root"))
        .collect();
    assert!(entries.len() > 20, "{listing}");
    for line in &entries {
        let owner = line.split_whitespace().nth(1).unwrap();
        assert_eq!(owner, "0/0", "{line}");
    }
    let stat = squashfs_superblock(&image);
    assert!(stat.contains("Compression zstd"), "{stat}");
    assert!(stat.contains("compression-level 15"), "{stat}");
    assert!(stat.contains("Block size 131072"), "{stat}");
    assert!(
        stat.contains("Thu Jan  1 00:00:01 1970"),
        "superblock time: {stat}"
    );
}

/// A directory whose listing is too long for a basic directory inode (more than 64 KiB, more
/// than 256 entries per header), a large file and its copy followed by more data (written over
/// the copy's blocks), and small copies: unsquashfs extracts it byte for byte, and the build's
/// read-back (every NAR hash) passes.
#[test]
fn squashfs_large_directories_and_copies_extract_byte_for_byte() {
    use storedisk_testkit::{pseudo_random_bytes, StorePathSpec, SyntheticStoreBuilder};
    let mut b = SyntheticStoreBuilder::new();
    let p = b.path("bigdir-1.0", StorePathSpec::Directory);
    for i in 0..2500 {
        let name = format!("many/an-entry-with-a-long-name-to-fill-the-listing-{i:05}");
        b.file(&p, &name, format!("{}", i % 7).as_bytes(), false);
    }
    let blob = pseudo_random_bytes(7, 300_000);
    b.file(&p, "blob", &blob, false);
    b.file(&p, "blob-copy", &blob, true);
    b.file(&p, "later", &pseudo_random_bytes(8, 200_000), false);
    let store = b.finish(&[p]);
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("big.squashfs");
    assert_success(&build(&store, "squashfs", &image, &[]));
    let extracted = work.path().join("x");
    extract_squashfs(&image, &extracted);
    common::assert_holds_closure(&extracted, store.closure());
    common::assert_canonical_metadata(&extracted, 1);
    // Stored once: the image is smaller than the two random files side by side.
    let len = fs::metadata(&image).unwrap().len();
    assert!(len < 560_000, "{len} bytes: the copy was stored again");
}

#[test]
fn erofs_holds_every_path_byte_for_byte_with_canonical_metadata() {
    for utils in erofs_utils() {
        let work = tempfile::tempdir().unwrap();
        if utils.version < (1, 6) {
            // A name this version would cut must be refused plainly, not fail deep inside it.
            let tricky = SyntheticStore::tricky();
            let image = work.path().join("refused.erofs");
            let out = build(
                &tricky,
                "erofs",
                &image,
                &[
                    "--erofs-writer",
                    "mkfs",
                    "--mkfs-erofs",
                    utils.mkfs.to_str().unwrap(),
                ],
            );
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{stderr}");
            assert!(
                stderr.contains(&"n".repeat(255)) && stderr.contains("255-byte"),
                "{stderr}"
            );
            assert_eq!(listing(work.path()), Vec::<String>::new());
        }
        let store = store_for(&utils);
        let image = work.path().join("store.erofs");
        let out = build(
            &store,
            "erofs",
            &image,
            &[
                "--erofs-writer",
                "mkfs",
                "--mkfs-erofs",
                utils.mkfs.to_str().unwrap(),
                "--json",
            ],
        );
        assert_success(&out);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["store_paths"], 6, "{report}");
        assert_eq!(report["compression"], "lz4hc", "{report}");
        let tool_used = report["tool"].as_str().unwrap();
        assert!(
            tool_used.contains(&utils.mkfs.display().to_string()),
            "{tool_used}"
        );
        // 1.7+ reads the tree as a tar stream (no staged copy); 1.5 needs the staging.
        let how = if utils.version >= (1, 7) {
            "tar stream"
        } else {
            "staged copy"
        };
        assert!(tool_used.contains(how), "{tool_used}");
        assert_eq!(
            report["image_bytes"].as_u64().unwrap(),
            fs::metadata(&image).unwrap().len()
        );

        let extracted = work.path().join("x");
        extract_erofs(&utils.fsck, &image, &extracted);
        common::assert_holds_closure(&extracted, store.closure());
        assert!(!extracted
            .join(store.path("outside-1.0").base_name())
            .exists());
        common::assert_canonical_metadata(&extracted, 0);
        if utils.version >= (1, 8) {
            // This fsck.erofs extracts hard links as links: the image kept them as one inode.
            common::assert_tricky_hard_links(&extracted, &store);
        }
        let uuid_in = |image: &Path| -> Vec<u8> {
            // The superblock starts at 1024; its UUID field is at offset 48, 16 bytes.
            fs::read(image).unwrap()[1024 + 48..1024 + 64].to_vec()
        };
        assert_ne!(uuid_in(&image), vec![0; 16], "the image needs a UUID");
    }
}

/// Recreates `from` at `to` entry by entry in reverse name order (directory listing order
/// differs), keeping hard links, symlinks and modes.
fn copy_tree_reversed(from: &Path, to: &Path, inodes: &mut BTreeMap<(u64, u64), PathBuf>) {
    let meta = fs::symlink_metadata(from).unwrap();
    if meta.file_type().is_symlink() {
        symlink(fs::read_link(from).unwrap(), to).unwrap();
    } else if meta.is_file() {
        if let Some(first) = inodes.get(&(meta.dev(), meta.ino())) {
            fs::hard_link(first, to).unwrap();
        } else {
            fs::copy(from, to).unwrap();
            fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777)).unwrap();
            inodes.insert((meta.dev(), meta.ino()), to.to_owned());
        }
    } else {
        fs::create_dir(to).unwrap();
        let mut names: Vec<_> = fs::read_dir(from)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names.reverse();
        for name in names {
            copy_tree_reversed(&from.join(&name), &to.join(&name), inodes);
        }
    }
}

#[test]
fn images_are_byte_identical_whatever_the_root_order_directory_threads_or_listing_order() {
    let store = SyntheticStore::tricky();
    let work = tempfile::tempdir().unwrap();
    let other_cwd = tempfile::tempdir().unwrap();
    // The same store laid down in reverse order, elsewhere.
    let reversed = work.path().join("reversed-store");
    fs::create_dir(&reversed).unwrap();
    let mut inodes = BTreeMap::new();
    let mut tops: Vec<_> = fs::read_dir(store.store_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    tops.sort();
    tops.reverse();
    for top in tops {
        copy_tree_reversed(&top, &reversed.join(top.file_name().unwrap()), &mut inodes);
    }

    let toplevel = store.path("nixos-system-guest");
    let hello = store.path("hello-2.12.1");
    let glibc = store.path("glibc-2.40");
    let mkfs = erofs_utils()
        .into_iter()
        .max_by_key(|u| u.version)
        .unwrap()
        .mkfs;
    for format in ["squashfs", "erofs"] {
        let run =
            |roots: Vec<String>, store_dir: &Path, cwd: &Path, threads: &str, output: &Path| {
                let out = storedisk()
                    .current_dir(cwd)
                    .args([
                        "build",
                        "--threads",
                        threads,
                        "--format",
                        format,
                        "--mkfs-erofs",
                    ])
                    .arg(&mkfs)
                    .arg("--closure")
                    .arg(store.closure_json())
                    .arg("--store-dir")
                    .arg(store_dir)
                    .arg("--output")
                    .arg(output)
                    .args(roots)
                    .output()
                    .unwrap();
                assert_success(&out);
            };
        let first = work.path().join(format!("first.{format}"));
        run(
            vec![
                store.logical(&toplevel),
                store.logical(&hello),
                store.logical(&glibc),
            ],
            store.store_dir(),
            work.path(),
            "1",
            &first,
        );
        // Relative output path, other working directory, base names in another order,
        // two threads, the reversed store.
        let second_name = format!("second.{format}");
        run(
            vec![
                glibc.base_name().to_owned(),
                toplevel.base_name().to_owned(),
                hello.base_name().to_owned(),
            ],
            &reversed,
            other_cwd.path(),
            "2",
            Path::new(&second_name),
        );
        let second = other_cwd.path().join(&second_name);
        assert_eq!(
            sha256_of(&first),
            sha256_of(&second),
            "{format} images of the same closure differ"
        );
    }
}

/// Runs a build expected to fail: exit code 2, stderr naming `culprit`, `out_dir` left empty.
fn assert_fails_cleanly(mut cmd: assert_cmd::Command, out_dir: &Path, culprit: &str) {
    let out = cmd.output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains(culprit),
        "the error must name {culprit:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        listing(out_dir),
        Vec::<String>::new(),
        "left behind in the output directory"
    );
}

/// `storedisk build` with every input named (bad ones included), not yet run.
fn build_with(
    format: &str,
    closure: &Path,
    store_dir: &Path,
    output: &Path,
    roots: &[String],
) -> assert_cmd::Command {
    let mut cmd = storedisk();
    cmd.args(["build", "--format", format, "--closure"])
        .arg(closure)
        .arg("--store-dir")
        .arg(store_dir)
        .arg("--output")
        .arg(output)
        .args(roots);
    cmd
}

#[test]
fn bad_roots_and_closures_fail_naming_the_path_and_leave_nothing() {
    let store = SyntheticStore::tricky();
    let out_dir = tempfile::tempdir().unwrap();
    let output = out_dir.path().join("image");
    let toplevel = store.logical(&store.roots()[0]);
    // An output path that is a directory fails before any work, naming it.
    let out_is_dir = out_dir.path().join("a-directory");
    fs::create_dir(&out_is_dir).unwrap();
    let cmd = build_with(
        "squashfs",
        store.closure_json(),
        store.store_dir(),
        &out_is_dir,
        std::slice::from_ref(&toplevel),
    );
    let out = {
        let mut cmd = cmd;
        cmd.output().unwrap()
    };
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("a-directory"),
        "{}",
        text(&out.stderr)
    );
    fs::remove_dir(&out_is_dir).unwrap();
    for format in ["squashfs", "erofs"] {
        // Not a store path at all, and a malformed one.
        for bad in ["not-a-store-path", "/nix/store/tooshort-x"] {
            let cmd = build_with(
                format,
                store.closure_json(),
                store.store_dir(),
                &output,
                &[bad.to_owned()],
            );
            assert_fails_cleanly(cmd, out_dir.path(), bad);
        }
        // On disk, but not in the closure.
        let outside = store.logical(&store.path("outside-1.0"));
        let cmd = build_with(
            format,
            store.closure_json(),
            store.store_dir(),
            &output,
            &[toplevel.clone(), outside.clone()],
        );
        assert_fails_cleanly(cmd, out_dir.path(), &outside);

        // In the closure, missing on disk.
        let ghost = store_path_for("ghost-1.0");
        let mut closure: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(store.closure_json()).unwrap()).unwrap();
        closure.as_array_mut().unwrap().push(serde_json::json!({
            "path": store.logical(&ghost),
            "narHash": "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            "narSize": 1,
            "references": [],
        }));
        let ghost_json = store.scratch().join(format!("ghost-{format}.json"));
        fs::write(&ghost_json, closure.to_string()).unwrap();
        let cmd = build_with(
            format,
            &ghost_json,
            store.store_dir(),
            &output,
            &[toplevel.clone(), store.logical(&ghost)],
        );
        assert_fails_cleanly(cmd, out_dir.path(), &store.logical(&ghost));

        // A store dir that does not hold the closure at all.
        let empty = tempfile::tempdir().unwrap();
        let cmd = build_with(
            format,
            store.closure_json(),
            empty.path(),
            &output,
            std::slice::from_ref(&toplevel),
        );
        assert_fails_cleanly(cmd, out_dir.path(), "missing on disk");

        // A closure file that is not one.
        let junk = store.scratch().join("junk.json");
        fs::write(&junk, "{\"nothing\": 1}").unwrap();
        let cmd = build_with(
            format,
            &junk,
            store.store_dir(),
            &output,
            std::slice::from_ref(&toplevel),
        );
        assert_fails_cleanly(cmd, out_dir.path(), &junk.display().to_string());
    }
    // A compression the format does not have.
    let mut cmd = build_with(
        "squashfs",
        store.closure_json(),
        store.store_dir(),
        &output,
        std::slice::from_ref(&toplevel),
    );
    cmd.args(["--compression", "lz4hc"]);
    assert_fails_cleanly(cmd, out_dir.path(), "lz4hc");
    let mut cmd = build_with(
        "squashfs",
        store.closure_json(),
        store.store_dir(),
        &output,
        std::slice::from_ref(&toplevel),
    );
    cmd.args(["--compression", "zstd", "--compression-level", "40"]);
    assert_fails_cleanly(cmd, out_dir.path(), "40");
    // mkfs.erofs itself refusing (while the tree streams to it, or after it was staged):
    // nothing is left behind.
    let newest = erofs_utils().into_iter().max_by_key(|u| u.version).unwrap();
    let mut cmd = build_with(
        "erofs",
        store.closure_json(),
        store.store_dir(),
        &output,
        std::slice::from_ref(&toplevel),
    );
    cmd.args(["--erofs-writer", "mkfs", "--mkfs-erofs"])
        .arg(&newest.mkfs);
    cmd.args(["--compression", "lz4hc", "--compression-level", "99"]);
    assert_fails_cleanly(cmd, out_dir.path(), "invalid compression level 99");
}

#[test]
fn a_fifo_in_a_store_path_fails_naming_it() {
    let store = SyntheticStore::tricky();
    let out_dir = tempfile::tempdir().unwrap();
    let output = out_dir.path().join("image");
    let share = store.physical(&store.path("hello-2.12.1")).join("share");
    fs::set_permissions(&share, fs::Permissions::from_mode(0o755)).unwrap();
    let fifo = share.join("a-pipe");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo (coreutils) failed");
    for format in ["squashfs", "erofs"] {
        let cmd = build_with(
            format,
            store.closure_json(),
            store.store_dir(),
            &output,
            &[store.logical(&store.roots()[0])],
        );
        assert_fails_cleanly(cmd, out_dir.path(), &fifo.display().to_string());
    }
}

#[test]
fn a_symlink_target_too_long_for_backhand_fails_naming_it_and_erofs_keeps_it() {
    let (mut builder, toplevel) = SyntheticStore::tricky_builder();
    let long_target = format!("/nix/store/{}", "t".repeat(300));
    builder.symlink(&toplevel, "long-link", &long_target);
    let store = builder.finish(std::slice::from_ref(&toplevel));
    let out_dir = tempfile::tempdir().unwrap();
    let link = store.physical(&toplevel).join("long-link");
    let cmd = build_with(
        "squashfs",
        store.closure_json(),
        store.store_dir(),
        &out_dir.path().join("image"),
        &[store.logical(&toplevel)],
    );
    assert_fails_cleanly(cmd, out_dir.path(), &link.display().to_string());

    // erofs has no such limit: the link is packed verbatim.
    let image = out_dir.path().join("image.erofs");
    let utils = erofs_utils()
        .into_iter()
        .max_by_key(|u| u.version)
        .expect("an erofs-utils");
    let out = build(
        &store,
        "erofs",
        &image,
        &["--mkfs-erofs", utils.mkfs.to_str().unwrap()],
    );
    assert_success(&out);
    let extracted = out_dir.path().join("extracted");
    extract_erofs(&utils.fsck, &image, &extracted);
    let target = fs::read_link(extracted.join(toplevel.base_name()).join("long-link")).unwrap();
    assert_eq!(target.to_str(), Some(long_target.as_str()));
}

/// Two files on which erofs-utils 1.8.6 and 1.9.4, given microvm.nix's
/// `-zlz4hc -Eztailpacking -Efragments`, write an image whose file data reads back wrong (with
/// fsck.erofs, and in a guest kernel 6.12): found by the vm-test harness. The store path with
/// them must never become a store disk silently.
fn fragments_corruption_store() -> SyntheticStore {
    let mut builder = storedisk_testkit::SyntheticStoreBuilder::new();
    let lib = builder.path("lib-22", storedisk_testkit::StorePathSpec::Directory);
    let mut text = String::new();
    let mut link = b"seed".to_vec();
    while text.len() < 8255 {
        let hex = Sha256::digest(&link)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        text.push_str(&hex);
        text.push('\n');
        link = hex.into_bytes();
    }
    text.truncate(8255);
    builder.file(&lib, "lib/a.txt", text.as_bytes(), false);
    let depends = format!("/nix/store/{}-lib-11\n", "d".repeat(32));
    builder.file(&lib, "nix-support/depends", depends.as_bytes(), false);
    builder.finish(&[lib])
}

#[test]
fn erofs_fragments_corruption_is_caught_by_the_read_back() {
    let store = fragments_corruption_store();
    let utils = erofs_utils()
        .into_iter()
        .max_by_key(|u| u.version)
        .expect("an erofs-utils");
    let mkfs = utils.mkfs.to_str().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let image = out_dir.path().join("image");

    // Without the read-back, the corrupt image is kept and fsck.erofs extracts other bytes.
    let out = build(
        &store,
        "erofs",
        &image,
        &[
            "--erofs-writer",
            "mkfs",
            "--mkfs-erofs",
            mkfs,
            "--erofs-fragments",
            "--no-read-back",
        ],
    );
    assert_success(&out);
    let extracted = out_dir.path().join("extracted");
    extract_erofs(&utils.fsck, &image, &extracted);
    let lib = store.roots()[0].clone();
    let (hash, _) = hash_path(&extracted.join(lib.base_name())).unwrap();
    assert_ne!(
        Some(hash),
        store.closure().get(&lib).unwrap().nar_hash,
        "mkfs.erofs {:?} no longer corrupts this input: revisit the -Efragments default",
        utils.version
    );
    fs::remove_file(&image).unwrap();
    fs::remove_dir_all(&extracted).unwrap();

    // With it (the default), the build fails naming the path, and nothing is left.
    let mut cmd = storedisk();
    cmd.args([
        "build",
        "--format",
        "erofs",
        "--erofs-fragments",
        "--erofs-writer",
        "mkfs",
        "--mkfs-erofs",
        mkfs,
        "--closure",
    ])
    .arg(store.closure_json())
    .arg("--store-dir")
    .arg(store.store_dir())
    .arg("--output")
    .arg(&image)
    .arg(store.logical(&lib));
    assert_fails_cleanly(cmd, out_dir.path(), lib.base_name());

    // The default flags (no -Efragments) pack it correctly.
    let out = build(
        &store,
        "erofs",
        &image,
        &["--erofs-writer", "mkfs", "--mkfs-erofs", mkfs],
    );
    assert_success(&out);
    extract_erofs(&utils.fsck, &image, &extracted);
    common::assert_holds_closure(&extracted, store.closure());
    fs::remove_file(&image).unwrap();
    fs::remove_dir_all(&extracted).unwrap();

    // storedisk's own writer packs it correctly with fragments and tail packing, read back and
    // extracted by fsck.erofs.
    let out = build(&store, "erofs", &image, &["--erofs-fragments"]);
    assert_success(&out);
    extract_erofs(&utils.fsck, &image, &extracted);
    common::assert_holds_closure(&extracted, store.closure());
}

#[test]
fn an_unreadable_file_fails_naming_it() {
    // Root reads everything, so as root the build runs as `nobody` (via setpriv).
    let as_root = fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let store = SyntheticStore::tricky();
    let out_dir = tempfile::tempdir().unwrap();
    for dir in [store.scratch(), out_dir.path()] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
    }
    fs::set_permissions(store.closure_json(), fs::Permissions::from_mode(0o644)).unwrap();
    let secret = store
        .physical(&store.path("hello-2.12.1"))
        .join("share/doc/hello/COPYING");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
    let output = out_dir.path().join("image");
    for format in ["squashfs", "erofs"] {
        let mut cmd = if as_root {
            let mut cmd = assert_cmd::Command::new(tool("setpriv"));
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(env!("CARGO_BIN_EXE_storedisk"));
            cmd
        } else {
            storedisk()
        };
        cmd.args(["build", "--format", format, "--closure"])
            .arg(store.closure_json())
            .arg("--store-dir")
            .arg(store.store_dir())
            .arg("--output")
            .arg(&output)
            .arg(store.logical(&store.roots()[0]));
        assert_fails_cleanly(cmd, out_dir.path(), &secret.display().to_string());
    }
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o444)).unwrap();
}

#[test]
fn every_squashfs_compression_gives_the_same_content() {
    let store = SyntheticStore::tricky();
    let work = tempfile::tempdir().unwrap();
    for (compression, level, shown) in [
        ("zstd", Some("3"), "zstd"),
        ("xz", None, "xz"),
        ("gzip", Some("6"), "gzip"),
        ("lz4", None, "lz4"),
    ] {
        let image = work.path().join(format!("{compression}.squashfs"));
        let mut extra = vec!["--compression", compression];
        if let Some(level) = level {
            extra.extend(["--compression-level", level]);
        }
        assert_success(&build(&store, "squashfs", &image, &extra));
        let stat = squashfs_superblock(&image);
        assert!(stat.contains(&format!("Compression {shown}")), "{stat}");
        // The compressor options unsquashfs reads back are the ones asked for (backhand 0.25
        // wrote gzip's 8 bytes of options as 7, which unsquashfs refused).
        assert!(!stat.contains("error"), "{stat}");
        if let Some(level) = level {
            assert!(
                stat.contains(&format!("compression-level {level}")),
                "{stat}"
            );
        }
        let extracted = work.path().join(compression);
        extract_squashfs(&image, &extracted);
        common::assert_holds_closure(&extracted, store.closure());
    }
}

#[test]
fn erofs_compressions_give_the_same_content() {
    let work = tempfile::tempdir().unwrap();
    for utils in erofs_utils() {
        let store = store_for(&utils);
        let mut cases = vec![("lz4", None), ("none", None), ("lz4hc", Some("12"))];
        if utils.version >= (1, 6) {
            cases.push(("zstd", Some("10")));
        }
        let mut sizes = BTreeMap::new();
        for (compression, level) in cases {
            let image = work.path().join(format!(
                "{compression}-{}.{}.erofs",
                utils.version.0, utils.version.1
            ));
            let mut extra = vec![
                "--erofs-writer",
                "mkfs",
                "--mkfs-erofs",
                utils.mkfs.to_str().unwrap(),
                "--compression",
                compression,
            ];
            if let Some(level) = level {
                extra.extend(["--compression-level", level]);
            }
            assert_success(&build(&store, "erofs", &image, &extra));
            sizes.insert(compression, fs::metadata(&image).unwrap().len());
            let extracted = work
                .path()
                .join(image.file_name().unwrap())
                .with_extension("x");
            extract_erofs(&utils.fsck, &image, &extracted);
            common::assert_holds_closure(&extracted, store.closure());
        }
        // The store's 1.5 MB of partly compressible data must come out smaller compressed.
        assert!(sizes["lz4hc"] < sizes["none"], "{sizes:?}");
    }
}

/// `feature_incompat` of an erofs superblock (at byte 1024 of the image; the field is at 0x50
/// of the superblock, erofs_fs.h).
fn erofs_incompat_features(image: &Path) -> u32 {
    let bytes = fs::read(image).unwrap();
    u32::from_le_bytes(bytes[1024 + 0x50..1024 + 0x54].try_into().unwrap())
}

#[test]
fn erofs_tail_packing_can_be_left_out_for_old_guest_kernels() {
    const ZTAILPACKING: u32 = 0x10; // EROFS_FEATURE_INCOMPAT_ZTAILPACKING
    let utils = storedisk_testkit::newest_erofs_utils();
    let store = store_for(&utils);
    let work = tempfile::tempdir().unwrap();
    let mut features = BTreeMap::new();
    for setting in ["true", "false"] {
        let image = work.path().join(format!("{setting}.erofs"));
        assert_success(&build(
            &store,
            "erofs",
            &image,
            &[
                "--mkfs-erofs",
                utils.mkfs.to_str().unwrap(),
                "--erofs-ztailpacking",
                setting,
            ],
        ));
        let extracted = work.path().join(format!("{setting}.x"));
        extract_erofs(&utils.fsck, &image, &extracted);
        common::assert_holds_closure(&extracted, store.closure());
        features.insert(setting, erofs_incompat_features(&image) & ZTAILPACKING);
    }
    assert_eq!(features["true"], ZTAILPACKING, "the default packs tails");
    assert_eq!(features["false"], 0, "--erofs-ztailpacking false must not");
}

#[test]
fn without_mkfs_erofs_the_newest_installed_one_is_used_whatever_the_path_order() {
    let all = erofs_utils();
    let newest = all.iter().max_by_key(|u| u.version).unwrap();
    let oldest = all.iter().min_by_key(|u| u.version).unwrap();
    assert!(
        newest.version > oldest.version,
        "this test needs two erofs-utils versions (found {all:?}): `cargo xtask setup` installs \
         Debian 12's 1.5 and unpacks 1.8.6 under target/tools"
    );
    let store = store_for(oldest);
    let work = tempfile::tempdir().unwrap();
    // The oldest comes first on PATH: the order must not decide.
    let mut dirs = vec![
        oldest.mkfs.parent().unwrap().to_owned(),
        newest.mkfs.parent().unwrap().to_owned(),
    ];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let image = work.path().join("store.erofs");
    let mut cmd = storedisk();
    cmd.env("PATH", std::env::join_paths(dirs).unwrap())
        .env_remove("STOREDISK_MKFS_EROFS")
        .args([
            "build",
            "--format",
            "erofs",
            "--erofs-writer",
            "mkfs",
            "--json",
            "--closure",
        ])
        .arg(store.closure_json())
        .arg("--store-dir")
        .arg(store.store_dir())
        .arg("--output")
        .arg(&image)
        .args(store.roots().iter().map(|r| store.logical(r)));
    let out = cmd.output().unwrap();
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tool_used = report["tool"].as_str().unwrap();
    let (major, minor) = newest.version;
    assert!(
        tool_used.starts_with(&format!("mkfs.erofs {major}.{minor}")),
        "{tool_used}"
    );
    let (major, minor) = oldest.version;
    assert!(
        tool_used.contains(&format!("newest found, over {major}.{minor}")),
        "{tool_used}"
    );
    let extracted = work.path().join("x");
    extract_erofs(&newest.fsck, &image, &extracted);
    common::assert_holds_closure(&extracted, store.closure());
}

#[test]
fn registration_text_and_json_closures_give_the_same_image() {
    let store = SyntheticStore::tricky();
    let work = tempfile::tempdir().unwrap();
    let info = work.path().join("info");
    let out = storedisk()
        .args(["closure-info", "--closure"])
        .arg(store.closure_json())
        .arg("--output")
        .arg(&info)
        .output()
        .unwrap();
    assert_success(&out);
    let from_json = work.path().join("json.squashfs");
    assert_success(&build(&store, "squashfs", &from_json, &[]));
    let from_registration = work.path().join("registration.squashfs");
    let out = build_with(
        "squashfs",
        &info.join("registration"),
        store.store_dir(),
        &from_registration,
        &[store.logical(&store.roots()[0])],
    )
    .output()
    .unwrap();
    assert_success(&out);
    assert_eq!(sha256_of(&from_json), sha256_of(&from_registration));
}

#[test]
fn without_a_closure_file_nix_is_asked() {
    let nix_store = tool("nix-store");
    let nix_bin = nix_store.parent().unwrap().to_owned();
    let source = tempfile::tempdir().unwrap();
    let tree = source.path().join("storedisk-test-tree");
    fs::create_dir_all(tree.join("bin")).unwrap();
    fs::write(tree.join("bin/tool"), "#!/bin/sh\necho from nix\n").unwrap();
    fs::set_permissions(tree.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("bin/tool", tree.join("link")).unwrap();
    let added = std::process::Command::new(&nix_store)
        .arg("--add")
        .arg(&tree)
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "nix-store --add: {}",
        text(&added.stderr)
    );
    let path = text(&added.stdout).trim().to_owned();
    let store_path = StoreDir::default().parse_path(&path).unwrap();

    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("nix.squashfs");
    let search_path = format!(
        "{}:{}",
        nix_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = storedisk()
        .env("PATH", search_path)
        .args(["build", "--format", "squashfs", "--output"])
        .arg(&image)
        .arg(&path)
        .output()
        .unwrap();
    assert_success(&out);
    let extracted = work.path().join("x");
    extract_squashfs(&image, &extracted);
    let hash = std::process::Command::new(&nix_store)
        .args(["--query", "--hash"])
        .arg(&path)
        .output()
        .unwrap();
    let want: storedisk_nix::NarHash = text(&hash.stdout).trim().parse().unwrap();
    let (got, _) = hash_path(&extracted.join(store_path.base_name())).unwrap();
    assert_eq!(got, want, "the image holds {path} as Nix has it");
    assert_eq!(listing(&extracted), vec![store_path.base_name().to_owned()]);
}
