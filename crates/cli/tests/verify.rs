//! `storedisk verify` end to end: images of the synthetic store made by the peers (mksquashfs,
//! gensquashfs, mkfs.erofs 1.5 and 1.8) and by our builder pass; each check fails when it
//! should (a missing path, a flipped byte, runner leaks, a policy violation) and not when the
//! runner only shares what it needs; hostile images exit 2 without a panic.

#![allow(clippy::unwrap_used)] // Tests: a failed setup should panic loudly.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use assert_cmd::Command as Cmd;
use serde_json::Value;
use storedisk_nix::StorePath;
use storedisk_testkit::{tool, StorePathSpec, SyntheticStore, SyntheticStoreBuilder};

/// Runs `storedisk verify ARGS --json`; returns the exit code, the parsed report (when there
/// is one) and stderr.
fn verify(args: &[&str]) -> (i32, Option<Value>, String) {
    let out = Cmd::cargo_bin("storedisk")
        .unwrap()
        .arg("verify")
        .args(args)
        .arg("--json")
        // A hang guard, not a timing assert: a hostile image must never make verify spin.
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "verify panicked: {stderr}");
    let json = serde_json::from_slice(&out.stdout).ok();
    (out.status.code().unwrap_or(-1), json, stderr)
}

/// Runs `storedisk verify ARGS` (the readable report) and returns its stdout.
fn verify_text(args: &[&str]) -> String {
    let out = Cmd::cargo_bin("storedisk")
        .unwrap()
        .arg("verify")
        .args(args)
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies `paths` (hard links between them kept) into a fresh directory: the tree the peers pack.
fn stage(store: &SyntheticStore, paths: &[StorePath], name: &str) -> PathBuf {
    let dir = store.scratch().join(name);
    fs::create_dir_all(&dir).unwrap();
    let mut cmd = Command::new("cp");
    cmd.arg("-a");
    for p in paths {
        cmd.arg(store.physical(p));
    }
    cmd.arg(&dir);
    run(&mut cmd);
    dir
}

fn closure_paths(store: &SyntheticStore) -> Vec<StorePath> {
    store.closure().iter().map(|i| i.path.clone()).collect()
}

/// Every peer's way of packing `tree`, as (label, image file).
fn peer_images(tree: &Path, out: &Path) -> Vec<(String, PathBuf)> {
    let mut images = Vec::new();
    let mut make = |label: &str, args: &dyn Fn(&Path) -> Command| {
        let image = out.join(format!("{label}.img"));
        run(&mut args(&image));
        images.push((label.to_owned(), image));
    };
    make("mksquashfs-4.5", &|img| {
        let mut c = Command::new(tool("mksquashfs"));
        c.arg(tree)
            .arg(img)
            .args(["-noappend", "-all-root", "-quiet", "-no-progress"]);
        c
    });
    make("gensquashfs-zstd", &|img| {
        let mut c = Command::new(tool("gensquashfs"));
        c.args(["-c", "zstd", "--all-root", "-q", "-D"])
            .arg(tree)
            .arg(img);
        c
    });
    let erofs18 = mkfs_erofs_18();
    for (label, flags) in [
        (
            "mkfs.erofs-1.8-microvm",
            &[
                "-zlz4hc",
                "-Eztailpacking",
                "-Efragments",
                "-T",
                "0",
                "--all-root",
            ][..],
        ),
        (
            "mkfs.erofs-1.8-dedupe",
            &["-zlz4hc", "-Ededupe", "--all-root"][..],
        ),
        ("mkfs.erofs-1.8-zstd", &["-zzstd", "--all-root"][..]),
        ("mkfs.erofs-1.8-plain", &["--all-root"][..]),
    ] {
        make(label, &|img| {
            let mut c = Command::new(&erofs18);
            c.args(flags).arg(img).arg(tree);
            c
        });
    }
    images
}

/// mkfs.erofs 1.5 (Debian 12) images: the 1.5 tool cannot pack the tricky store (it fails
/// with ENOENT on a 255-byte file name), so these come from `erofs15_store`.
fn erofs15_images(tree: &Path, out: &Path) -> Vec<(String, PathBuf)> {
    let erofs15 = storedisk_testkit::erofs_utils_version(1, 5).mkfs;
    let mut images = Vec::new();
    for (label, flags) in [
        ("mkfs.erofs-1.5-lz4hc", &["-zlz4hc"][..]),
        ("mkfs.erofs-1.5-plain", &[][..]),
    ] {
        let image = out.join(format!("{label}.img"));
        run(Command::new(&erofs15).args(flags).arg(&image).arg(tree));
        images.push((label.to_owned(), image));
    }
    images
}

/// erofs-utils 1.6+ (microvm.nix's flags need it): 1.8.6, provisioned by `cargo xtask setup`.
fn mkfs_erofs_18() -> PathBuf {
    storedisk_testkit::newest_erofs_utils().mkfs
}

/// The tricky cases mkfs.erofs 1.5 can pack (everything but the 255-byte name).
fn erofs15_store() -> SyntheticStore {
    use StorePathSpec::*;
    let mut b = storedisk_testkit::SyntheticStoreBuilder::new();
    let lib = b.path("lib-1.0", Directory);
    b.file(
        &lib,
        "lib/libfoo.so",
        &storedisk_testkit::pseudo_random_bytes(3, 1_200_000),
        true,
    );
    b.symlink(&lib, "lib/libfoo.so.1", "libfoo.so");
    b.file(&lib, "share/empty", b"", false);
    b.dir(&lib, "share/empty-dir");
    b.file(&lib, "a/b/c/d/e/f/deep", b"deep\n", false);
    b.file(
        &lib,
        &format!("share/{}", "n".repeat(200)),
        b"long name\n",
        false,
    );
    let app = b.path("app-2.0", Directory);
    let script = format!("#!{}/lib/libfoo.so\n", b.logical(&lib));
    b.file(&app, "bin/app", script.as_bytes(), true);
    b.hard_link(&app, "share/copy-of-empty", &lib, "share/empty");
    b.symlink(&app, "share/dangling", "/nix/store/nowhere");
    let one = b.path("one-file", File);
    b.file(
        &one,
        "",
        format!("uses {}\n", b.logical(&app)).as_bytes(),
        false,
    );
    let link = b.path("just-a-link", Symlink);
    b.symlink(&link, "", &b.logical(&one));
    b.finish(&[link])
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    &report["checks"][name]
}

fn paths_of(list: &Value, key: &str) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v[key].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn images_from_every_peer_pass_complete_and_integrity() {
    let store = SyntheticStore::tricky();
    let tree = stage(&store, &closure_paths(&store), "tree");
    let closure = store.closure_json().to_str().unwrap();
    for (label, image) in peer_images(&tree, store.scratch()) {
        assert_verifies(&store, &label, &image, closure);
    }
    let old = erofs15_store();
    let tree = stage(&old, &closure_paths(&old), "tree");
    for (label, image) in erofs15_images(&tree, old.scratch()) {
        assert_verifies(&old, &label, &image, old.closure_json().to_str().unwrap());
    }
}

/// backhand's parallel reader read every file as empty with one rayon thread (it prefetched
/// `threads / 2` blocks): verify must give the same answer on a one-core machine.
#[test]
fn squashfs_verifies_on_a_single_thread() {
    let store = SyntheticStore::tricky();
    let tree = stage(&store, &closure_paths(&store), "tree");
    let closure = store.closure_json().to_str().unwrap();
    let squashfs: Vec<_> = peer_images(&tree, store.scratch())
        .into_iter()
        .filter(|(label, _)| label.contains("squashfs"))
        .collect();
    assert!(!squashfs.is_empty(), "no squashfs peer image was made");
    for (label, image) in squashfs {
        let out = Cmd::cargo_bin("storedisk")
            .unwrap()
            .env("RAYON_NUM_THREADS", "1")
            .args(["verify", image.to_str().unwrap(), "--closure", closure])
            .timeout(Duration::from_secs(120))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{label} with one thread: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// IMAGE verifies against CLOSURE: complete, intact, every path's NAR hash and size as recorded.
fn assert_verifies(store: &SyntheticStore, label: &str, image: &Path, closure: &str) {
    {
        let (code, report, stderr) = verify(&[image.to_str().unwrap(), "--closure", closure]);
        assert_eq!(code, 0, "{label}: {stderr}");
        let report = report.unwrap();
        assert_eq!(check(&report, "complete")["ok"], true, "{label}");
        assert_eq!(check(&report, "integrity")["ok"], true, "{label}");
        assert_eq!(
            check(&report, "integrity")["checked"],
            store.closure().len(),
            "{label}: every packed path compared"
        );
        let packed = paths_of(&report["paths"], "path");
        let expected: Vec<String> = store
            .closure()
            .iter()
            .map(|i| store.logical(&i.path))
            .collect();
        assert_eq!(packed, expected, "{label}");
        for entry in report["paths"].as_array().unwrap() {
            let p = StorePath::from_base_name(
                entry["path"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("/nix/store/"),
            )
            .unwrap();
            let info = store.closure().get(&p).unwrap();
            assert_eq!(
                entry["nar_hash"],
                info.nar_hash.unwrap().to_nix32(),
                "{label} {p}"
            );
            assert_eq!(entry["nar_size"], info.nar_size.unwrap(), "{label} {p}");
        }
    }
}

#[test]
fn images_from_our_builder_pass_complete_and_integrity() {
    let store = SyntheticStore::tricky();
    let closure = store.closure_json().to_str().unwrap();
    let root = store.logical(&store.roots()[0]);
    for (format, compression) in [
        ("squashfs", "zstd"),
        ("squashfs", "lz4"),
        ("erofs", "lz4hc"),
        ("erofs", "none"),
    ] {
        let image = store
            .scratch()
            .join(format!("built-{format}-{compression}.img"));
        Cmd::cargo_bin("storedisk")
            .unwrap()
            .args([
                "build",
                "--format",
                format,
                "--compression",
                compression,
                "--closure",
                closure,
            ])
            .arg("--store-dir")
            .arg(store.store_dir())
            .arg("--mkfs-erofs")
            .arg(mkfs_erofs_18())
            .arg("-o")
            .arg(&image)
            .arg(&root)
            .assert()
            .success();
        let (code, report, stderr) = verify(&[image.to_str().unwrap(), "--closure", closure]);
        assert_eq!(code, 0, "{format}/{compression}: {stderr}");
        let report = report.unwrap();
        assert_eq!(report["format"], format);
        assert_eq!(check(&report, "complete")["ok"], true);
        assert_eq!(check(&report, "integrity")["ok"], true);
    }
}

#[test]
fn a_path_removed_from_the_image_is_reported_missing_with_who_needs_it() {
    let store = SyntheticStore::tricky();
    let busybox = store.path("busybox-1.36.1");
    let without: Vec<StorePath> = closure_paths(&store)
        .into_iter()
        .filter(|p| *p != busybox)
        .collect();
    let tree = stage(&store, &without, "tree-without-busybox");
    let image = store.scratch().join("missing.img");
    run(Command::new(tool("mksquashfs"))
        .arg(&tree)
        .arg(&image)
        .args(["-noappend", "-all-root", "-quiet"]));
    let (code, report, _) = verify(&[
        image.to_str().unwrap(),
        "--closure",
        store.closure_json().to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    let report = report.unwrap();
    let complete = check(&report, "complete");
    assert_eq!(complete["ok"], false);
    assert_eq!(
        paths_of(&complete["missing"], "path"),
        vec![store.logical(&busybox)]
    );
    let needed_by = complete["missing"][0]["needed_by"].as_str().unwrap();
    let referrers: Vec<String> = store
        .closure()
        .iter()
        .filter(|i| i.references.contains(&busybox) && i.path != busybox)
        .map(|i| store.logical(&i.path))
        .collect();
    assert!(
        referrers.contains(&needed_by.to_owned()),
        "{needed_by} does not reference busybox"
    );
    assert_eq!(report["findings"], 1);
    // The readable report says so on its first line.
    let stdout = verify_text(&[
        image.to_str().unwrap(),
        "--closure",
        store.closure_json().to_str().unwrap(),
    ]);
    assert_eq!(stdout.lines().next(), Some("1 finding"));
    assert!(stdout.contains(&store.logical(&busybox)));
}

#[test]
fn one_flipped_byte_of_file_data_is_an_integrity_mismatch_naming_the_path() {
    let store = SyntheticStore::tricky();
    let tree = stage(&store, &closure_paths(&store), "tree");
    let image = store.scratch().join("plain.erofs");
    run(Command::new(mkfs_erofs_18())
        .arg("--all-root")
        .arg(&image)
        .arg(&tree));
    let mut bytes = fs::read(&image).unwrap();
    let needle = b"{\"answer\": 42}";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("config.json's bytes are in the image");
    assert_eq!(
        bytes.windows(needle.len()).filter(|w| *w == needle).count(),
        1,
        "the file content occurs once"
    );
    bytes[at + 2] ^= 0x20; // "answer" -> "Answer"
    fs::write(&image, &bytes).unwrap();
    let (code, report, stderr) = verify(&[
        image.to_str().unwrap(),
        "--closure",
        store.closure_json().to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{stderr}");
    let report = report.unwrap();
    let integrity = check(&report, "integrity");
    assert_eq!(integrity["ok"], false);
    let config = store.path("config.json");
    assert_eq!(
        paths_of(&integrity["mismatched"], "path"),
        vec![store.logical(&config)]
    );
    let m = &integrity["mismatched"][0];
    assert_eq!(
        m["expected"],
        store
            .closure()
            .get(&config)
            .unwrap()
            .nar_hash
            .unwrap()
            .to_nix32()
    );
    assert_ne!(m["actual"], m["expected"]);
    assert_eq!(check(&report, "complete")["ok"], true);
}

/// The tricky store plus runner paths; returns the store and the runners by name.
/// A runner store path named `name` whose `bin/microvm-run` is a busybox script ending in
/// `body`: like microvm.nix's, its shell is a path the guest packs too.
fn add_runner(b: &mut SyntheticStoreBuilder, name: &str, body: &str) -> StorePath {
    let busybox = storedisk_testkit::store_path_for("busybox-1.36.1");
    let runner = b.path(name, StorePathSpec::Directory);
    let script = format!("#!{}/bin/sh\n{body}", b.logical(&busybox));
    b.file(&runner, "bin/microvm-run", script.as_bytes(), true);
    runner
}

fn store_with_runners() -> (SyntheticStore, Vec<StorePath>) {
    let (mut b, toplevel) = SyntheticStore::tricky_builder();
    let top = b.logical(&toplevel);

    // Leak 2: the `system` symlink.
    let symlink_runner = add_runner(&mut b, "microvm-run-symlink", "exec qemu -kernel bzImage\n");
    b.symlink(&symlink_runner, "share/microvm/system", &top);

    // Leak 3: `init=` on the kernel command line.
    let text_runner = add_runner(
        &mut b,
        "microvm-run-text",
        &format!("# microvm runner\nexec qemu \\\n  -append \"console=ttyS0 init={top}/init\"\n"),
    );

    // No leak: only busybox (and through it glibc), which the guest packs too.
    let clean_runner = add_runner(&mut b, "microvm-run-clean", "exec qemu -kernel bzImage\n");

    // Policy: a runner that drags a kernel-dev path, which the image does not hold.
    let kernel_dev = b.path("linux-6.12-dev", StorePathSpec::Directory);
    b.file(
        &kernel_dev,
        "include/config.h",
        b"#define CONFIG_X 1\n",
        false,
    );
    let headers = format!("# headers: {}\nexec qemu\n", b.logical(&kernel_dev));
    let polluted_runner = add_runner(&mut b, "microvm-run-polluted", &headers);

    let store = b.finish(&[toplevel]);
    (
        store,
        vec![symlink_runner, text_runner, clean_runner, polluted_runner],
    )
}

fn guest_image(store: &SyntheticStore) -> PathBuf {
    let tree = stage(store, &closure_paths(store), "guest-tree");
    let image = store.scratch().join("guest.img");
    run(Command::new(tool("mksquashfs"))
        .arg(&tree)
        .arg(&image)
        .args(["-noappend", "-all-root", "-quiet"]));
    image
}

/// `IMAGE --closure ... --runner-closure ... --store-dir ...` for `runner`, its closure file
/// written.
fn runner_args(store: &SyntheticStore, image: &Path, runner: &StorePath) -> Vec<String> {
    let runner_closure = store.scratch().join(format!("{}.json", runner.name()));
    store.write_closure_json(std::slice::from_ref(runner), &runner_closure);
    [
        image,
        Path::new("--closure"),
        store.closure_json(),
        Path::new("--runner-closure"),
        &runner_closure,
        Path::new("--store-dir"),
        store.store_dir(),
    ]
    .iter()
    .map(|p| p.to_str().unwrap().to_owned())
    .collect()
}

fn verify_runner(
    store: &SyntheticStore,
    image: &Path,
    runner: &StorePath,
    extra: &[&str],
) -> (i32, Value) {
    let args = runner_args(store, image, runner);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    let (code, report, stderr) = verify(&args);
    (
        code,
        report.unwrap_or_else(|| panic!("no report: {stderr}")),
    )
}

/// What leaks through the toplevel: it and everything only it references.
fn expected_leaks(store: &SyntheticStore) -> Vec<String> {
    let mut leaked: Vec<String> = [
        "nixos-system-guest",
        "hello-2.12.1",
        "config.json",
        "current-hello",
    ]
    .iter()
    .map(|n| store.logical(&store.path(n)))
    .collect();
    leaked.sort_by(|a, b| a.rsplit('/').next().cmp(&b.rsplit('/').next()));
    leaked
}

#[test]
fn a_system_symlink_leak_is_found_with_its_chain_and_location() {
    let (store, runners) = store_with_runners();
    let image = guest_image(&store);
    let runner = &runners[0];
    let (code, report) = verify_runner(&store, &image, runner, &[]);
    assert_eq!(code, 1);
    let overlap = check(&report, "runner_overlap");
    assert_eq!(overlap["ok"], false);
    assert_eq!(paths_of(&overlap["paths"], "path"), expected_leaks(&store));
    let toplevel = store.logical(&store.path("nixos-system-guest"));
    let hello = store.logical(&store.path("hello-2.12.1"));
    for leak in overlap["paths"].as_array().unwrap() {
        assert_eq!(leak["chain"][0], store.logical(runner));
        assert_eq!(
            leak["chain"][1],
            toplevel.as_str(),
            "every leak goes through the toplevel"
        );
        assert_eq!(leak["where"]["file"], "share/microvm/system");
        assert_eq!(leak["where"]["symlink_target"], toplevel.as_str());
        if leak["path"] == hello.as_str() {
            assert_eq!(leak["chain"].as_array().unwrap().len(), 3);
            assert_eq!(leak["chain"][2], hello.as_str());
        }
    }
    let sizes: u64 = [
        "nixos-system-guest",
        "hello-2.12.1",
        "config.json",
        "current-hello",
    ]
    .iter()
    .map(|n| {
        store
            .closure()
            .get(&store.path(n))
            .unwrap()
            .nar_size
            .unwrap()
    })
    .sum();
    assert_eq!(overlap["duplicated_bytes"], sizes);
    let shared = paths_of(
        &overlap["shared"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| serde_json::json!({"p": s}))
            .collect(),
        "p",
    );
    assert!(shared.contains(&store.logical(&store.path("busybox-1.36.1"))));
    // The readable report names the one way in, the symlink, with what it drags and its fix.
    let args = runner_args(&store, &image, runner);
    let text = verify_text(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let way = format!(
        "  - {} -> {toplevel}: 4 path(s), {}\n      at symlink share/microvm/system -> {toplevel}\n      fix: set microvm.systemSymlink = false",
        store.logical(runner),
        storedisk_verifier::report::human_bytes(sizes)
    );
    assert!(text.contains(&way), "{way}\nnot in\n{text}");
}

#[test]
fn an_init_line_leak_is_found_in_the_runner_script() {
    let (store, runners) = store_with_runners();
    let image = guest_image(&store);
    let (code, report) = verify_runner(&store, &image, &runners[1], &[]);
    assert_eq!(code, 1);
    let overlap = check(&report, "runner_overlap");
    assert_eq!(paths_of(&overlap["paths"], "path"), expected_leaks(&store));
    let first = &overlap["paths"][0];
    assert_eq!(first["where"]["file"], "bin/microvm-run");
    assert_eq!(first["where"]["line"], 4);
    assert!(first["where"]["excerpt"]
        .as_str()
        .unwrap()
        .contains("init=/nix/store/"));
    // The readable report leads with the way in: the script's reference, its line and the
    // fix; --verbose adds every leaked path's chain and where its first hop sits.
    let args = runner_args(&store, &image, &runners[1]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = verify_text(&args);
    assert_eq!(text.lines().next(), Some("4 findings"));
    assert!(text.contains("  1 way(s) into the guest closure"), "{text}");
    assert!(text.contains("      at bin/microvm-run line 4: "), "{text}");
    assert!(
        text.contains("      fix: pass init= without string context"),
        "{text}"
    );
    assert!(!text.contains("    chain: "), "{text}");
    let verbose = verify_text(&[&args[..], &["--verbose"]].concat());
    assert!(
        verbose.contains("where: bin/microvm-run line 4"),
        "{verbose}"
    );
    assert!(verbose.contains("    chain: "), "{verbose}");
}

/// Leak 4 (`regInfo=`): the runner references only the closure-info, whose registration lists
/// the whole closure. The toplevel is referenced by the closure-info, yet it is a guest root:
/// everything the guest alone needs must be reported, not just the closure-info.
#[test]
fn a_reginfo_leak_through_the_closure_info_reports_the_whole_guest() {
    let (mut b, toplevel) = SyntheticStore::tricky_builder();
    let guest_names = SyntheticStore::TRICKY_CLOSURE;
    // Registration text with paths only (no hashes or references): enough for the verifier to
    // recognise the closure-info, and for Nix's scanner to record every path as a reference.
    let registration: String = guest_names
        .iter()
        .map(|n| {
            format!(
                "{}\n\n\n\n0\n",
                b.logical(&storedisk_testkit::store_path_for(n))
            )
        })
        .collect();
    let closure_info = b.path("closure-info", StorePathSpec::Directory);
    b.file(
        &closure_info,
        "registration",
        registration.as_bytes(),
        false,
    );
    let body = format!(
        "exec qemu -append \"regInfo={}/registration\"\n",
        b.logical(&closure_info)
    );
    let runner = add_runner(&mut b, "microvm-run-reginfo", &body);
    let store = b.finish(&[toplevel, closure_info.clone()]);
    let image = guest_image(&store);

    let (code, report) = verify_runner(&store, &image, &runner, &[]);
    assert_eq!(code, 1, "{report}");
    let overlap = check(&report, "runner_overlap");
    let mut expected = expected_leaks(&store);
    expected.push(store.logical(&closure_info));
    expected.sort_by(|a, b| a.rsplit('/').next().cmp(&b.rsplit('/').next()));
    assert_eq!(paths_of(&overlap["paths"], "path"), expected);
    // busybox and glibc run the runner's own script: shared, not leaked.
    let strings = |key: &str| -> Vec<String> {
        overlap[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let shared = strings("shared");
    for name in ["busybox-1.36.1", "glibc-2.40"] {
        assert!(
            shared.contains(&store.logical(&store.path(name))),
            "{name}: {shared:?}"
        );
    }
    let guest_roots = strings("guest_roots");
    assert!(
        guest_roots.contains(&store.logical(&store.roots()[0])),
        "{guest_roots:?}"
    );
}

/// Leak 1 (the image's own references), with no guest closure at all: the guest side comes
/// from the image (its unreferenced root paths, references found by Nix's scanner in each
/// packed path), the image's recorded references are cut as edges, and what the runner needs
/// by itself (busybox for its script, glibc through it) stays shared.
#[test]
fn an_image_reference_leak_without_a_guest_closure_spares_what_the_runner_needs() {
    let (mut b, toplevel) = SyntheticStore::tricky_builder();
    let guest: Vec<StorePath> = SyntheticStore::TRICKY_CLOSURE
        .iter()
        .map(|n| storedisk_testkit::store_path_for(n))
        .collect();
    // An image whose metadata is uncompressed, so every packed name is in its bytes and Nix's
    // scanner (the testkit's) records the whole guest as its references.
    let scratch = tempfile::tempdir().unwrap();
    let image_file = scratch.path().join("disk.img");
    let mut mksquashfs = Command::new(tool("mksquashfs"));
    mksquashfs
        .args(guest.iter().map(|p| b.store_dir().join(p.base_name())))
        .arg(&image_file)
        .args([
            "-noappend",
            "-all-root",
            "-quiet",
            "-noI",
            "-noD",
            "-noF",
            "-noX",
        ]);
    run(&mut mksquashfs);
    let image = b.path("microvm-store-disk.squashfs", StorePathSpec::File);
    b.file(&image, "", &std::fs::read(&image_file).unwrap(), false);
    let body = format!("exec qemu -drive file={},if=none\n", b.logical(&image));
    let runner = add_runner(&mut b, "microvm-run-image", &body);
    // A runner that needs only busybox: without any closure of the guest, the packed paths'
    // references must come from the image, or busybox would look like a guest root.
    let clean = add_runner(&mut b, "microvm-run-busybox-only", "exec qemu\n");
    let store = b.finish(&[toplevel, runner.clone(), clean.clone()]);
    let clean_closure = store.scratch().join("clean.json");
    store.write_closure_json(std::slice::from_ref(&clean), &clean_closure);
    let (code, report, stderr) = verify(&[
        image_file.to_str().unwrap(),
        "--runner-closure",
        clean_closure.to_str().unwrap(),
    ]);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert_eq!(code, 0, "{report}");
    assert_eq!(check(&report, "runner_overlap")["ok"], true, "{report}");

    let runner_closure = store.scratch().join("runner.json");
    store.write_closure_json(std::slice::from_ref(&runner), &runner_closure);
    assert!(
        store
            .closure()
            .get(&image)
            .unwrap()
            .references
            .contains(&store.roots()[0]),
        "the uncompressed image should reference the toplevel"
    );

    let (code, report, stderr) = verify(&[
        store.physical(&image).to_str().unwrap(),
        "--image-path",
        &store.logical(&image),
        "--runner-closure",
        runner_closure.to_str().unwrap(),
    ]);
    let report = report.unwrap_or_else(|| panic!("no report: {stderr}"));
    assert_eq!(code, 1, "{report}");
    assert_eq!(check(&report, "complete")["ok"], Value::Null);
    let overlap = check(&report, "runner_overlap");
    assert_eq!(paths_of(&overlap["paths"], "path"), expected_leaks(&store));
    let leak = &overlap["paths"][0];
    assert_eq!(leak["chain"][1], store.logical(&image), "{leak}");
    let shared: Vec<&str> = overlap["shared"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for name in ["busybox-1.36.1", "glibc-2.40"] {
        assert!(
            shared.contains(&store.logical(&store.path(name)).as_str()),
            "{name}: {shared:?}"
        );
    }
}

#[test]
fn a_runner_sharing_only_what_it_needs_is_ok() {
    let (store, runners) = store_with_runners();
    let image = guest_image(&store);
    let (code, report) = verify_runner(&store, &image, &runners[2], &[]);
    assert_eq!(code, 0, "{report:#}");
    let overlap = check(&report, "runner_overlap");
    assert_eq!(overlap["ok"], true);
    assert_eq!(overlap["duplicated_bytes"], 0);
    let shared: Vec<&str> = overlap["shared"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut expected = vec![
        store.logical(&store.path("busybox-1.36.1")),
        store.logical(&store.path("glibc-2.40")),
    ];
    expected.sort_by(|a, b| a.rsplit('/').next().cmp(&b.rsplit('/').next()));
    assert_eq!(shared, expected);
}

#[test]
fn policy_flags_runner_paths_outside_the_image_that_no_pattern_allows() {
    let (store, runners) = store_with_runners();
    let image = guest_image(&store);
    let runner = &runners[3];
    let (code, report) = verify_runner(&store, &image, runner, &["--allow", "microvm-run-*"]);
    assert_eq!(code, 1);
    let policy = check(&report, "policy");
    assert_eq!(policy["ok"], false);
    let dev = store.logical(&store.path("linux-6.12-dev"));
    assert_eq!(paths_of(&policy["violations"], "path"), vec![dev.clone()]);
    assert_eq!(
        policy["violations"][0]["chain"],
        serde_json::json!([store.logical(runner), dev])
    );
    assert_eq!(
        check(&report, "runner_overlap")["ok"],
        true,
        "kernel-dev is pollution, not a leak"
    );
    let (code, report) = verify_runner(
        &store,
        &image,
        runner,
        &["--allow", "microvm-run-*", "--allow", "linux-*-dev"],
    );
    assert_eq!(code, 0);
    assert_eq!(check(&report, "policy")["ok"], true);
    let (code, report) = verify_runner(&store, &image, runner, &[]);
    assert_eq!(code, 0);
    assert_eq!(check(&report, "policy")["ok"], Value::Null);
    assert!(check(&report, "policy")["why"].is_string());
}

#[test]
fn checks_without_their_inputs_are_null_with_a_reason() {
    let store = SyntheticStore::tricky();
    let tree = stage(&store, &closure_paths(&store), "tree");
    let image = store.scratch().join("bare.img");
    run(Command::new(tool("mksquashfs"))
        .arg(&tree)
        .arg(&image)
        .args(["-noappend", "-all-root", "-quiet"]));
    let (code, report, _) = verify(&[image.to_str().unwrap()]);
    assert_eq!(code, 0);
    let report = report.unwrap();
    for name in [
        "complete",
        "integrity",
        "self_contained",
        "runner_overlap",
        "policy",
    ] {
        assert_eq!(check(&report, name)["ok"], Value::Null, "{name}");
        assert!(
            check(&report, name)["why"]
                .as_str()
                .is_some_and(|w| !w.is_empty()),
            "{name}"
        );
    }
    assert_eq!(
        report["paths"].as_array().unwrap().len(),
        store.closure().len()
    );
}

/// Hostile variants of a valid image: truncations, garbage after a valid magic, flipped
/// superblock/metadata bytes.
fn hostile_variants(valid: &[u8], magic_len: usize) -> Vec<(String, Vec<u8>)> {
    // mksquashfs pads to 4 KiB: cutting only padding leaves a valid image, so the last cut
    // removes more than that.
    let mut out = vec![("empty".to_owned(), Vec::new())];
    for cut in [
        1,
        64,
        95,
        1023,
        1100,
        4096,
        valid.len() / 3,
        valid.len() / 2,
        valid.len() - 4097,
    ] {
        if cut < valid.len() {
            out.push((format!("truncated at {cut}"), valid[..cut].to_vec()));
        }
    }
    let mut random = storedisk_testkit::pseudo_random_bytes(7, valid.len());
    random[..magic_len].copy_from_slice(&valid[..magic_len]);
    if magic_len > 4 {
        // erofs: keep the superblock magic at 1024 too.
        random[1024..1028].copy_from_slice(&valid[1024..1028]);
    }
    out.push(("random bytes after a valid magic".to_owned(), random));
    for offset in [
        4,
        12,
        16,
        20,
        22,
        28,
        40,
        48,
        64,
        72,
        80,
        1024 + 8,
        1024 + 12,
        1024 + 14,
        1024 + 40,
        1024 + 56,
    ] {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut flipped = valid.to_vec();
            if offset < flipped.len() {
                flipped[offset] ^= mask;
                out.push((format!("byte {offset} ^ {mask:#x}"), flipped));
            }
        }
    }
    out
}

#[test]
fn hostile_images_exit_2_without_a_panic() {
    let store = SyntheticStore::tricky();
    let tree = stage(&store, &closure_paths(&store), "tree");
    let sq = store.scratch().join("ok.squashfs");
    run(Command::new(tool("mksquashfs")).arg(&tree).arg(&sq).args([
        "-noappend",
        "-all-root",
        "-quiet",
    ]));
    let er = store.scratch().join("ok.erofs");
    run(Command::new(mkfs_erofs_18())
        .args(["-zlz4hc", "--all-root"])
        .arg(&er)
        .arg(&tree));
    let closure = store.closure_json().to_str().unwrap();
    for (format, image, magic_len) in [("squashfs", sq, 4), ("erofs", er, 1028)] {
        let valid = fs::read(&image).unwrap();
        for (what, bytes) in hostile_variants(&valid, magic_len) {
            let file = store.scratch().join("hostile.img");
            fs::write(&file, &bytes).unwrap();
            let (code, report, stderr) = verify(&[file.to_str().unwrap(), "--closure", closure]);
            // A flipped byte may land in a field that does not matter (a timestamp); then the
            // image is still valid and must still verify. Otherwise: exit 2 with a message.
            match code {
                0 | 1 => {
                    let report = report.unwrap_or_else(|| panic!("{format} {what}: no report"));
                    if code == 1 {
                        assert_eq!(
                            check(&report, "integrity")["ok"],
                            false,
                            "{format} {what}: {report:#}"
                        );
                    }
                }
                2 => assert!(
                    stderr.contains("corrupt image")
                        || stderr.contains("not a squashfs or erofs image")
                        || stderr.contains("safety limit"),
                    "{format} {what}: unexpected message {stderr}"
                ),
                other => panic!("{format} {what}: exit code {other}: {stderr}"),
            }
            if what.starts_with("truncated") || what == "empty" || what.starts_with("random") {
                assert_eq!(code, 2, "{format} {what} must not verify: {stderr}");
                assert!(stderr.starts_with("storedisk: error: "), "{stderr}");
            }
        }
    }
}

#[test]
fn without_closure_the_registration_packed_in_the_image_is_used() {
    let store = SyntheticStore::tricky();
    let mut paths = closure_paths(&store);
    let tree = stage(&store, &paths, "tree-with-closure-info");
    // A closure-info path, as microvm.nix packs next to the toplevel.
    let files = storedisk_nix::registration::closure_info(store.closure()).unwrap();
    let info = storedisk_testkit::store_path_for("closure-info");
    let info_dir = tree.join(info.base_name());
    fs::create_dir(&info_dir).unwrap();
    fs::write(info_dir.join("registration"), &files.registration).unwrap();
    fs::write(info_dir.join("store-paths"), &files.store_paths).unwrap();
    // Drop a path from the image: the recorded closure must notice.
    let glibc = store.path("glibc-2.40");
    fs::remove_dir_all(tree.join(glibc.base_name())).unwrap();
    paths.retain(|p| *p != glibc);
    let image = store.scratch().join("with-registration.img");
    run(Command::new(tool("gensquashfs"))
        .args(["-c", "zstd", "--all-root", "-q", "-D"])
        .arg(&tree)
        .arg(&image));
    // An empty PATH: no Nix to ask, so the registration itself is the closure.
    let out = Cmd::cargo_bin("storedisk")
        .unwrap()
        .args(["verify", image.to_str().unwrap(), "--json"])
        .env("PATH", "")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let complete = check(&report, "complete");
    assert_eq!(complete["closure_source"], "image-registration");
    assert_eq!(
        paths_of(&complete["missing"], "path"),
        vec![store.logical(&glibc)]
    );
    assert_eq!(complete["extra"], serde_json::json!([store.logical(&info)]));
    assert_eq!(check(&report, "integrity")["ok"], true);
    assert_eq!(check(&report, "integrity")["checked"], paths.len());
}
