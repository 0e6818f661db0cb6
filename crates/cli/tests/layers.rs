//! Layered store disks end to end on the testkit's synthetic store: `storedisk layers` plans,
//! `storedisk build --layers` writes the images and `layers.json`, and the peers' own tools
//! (`unsquashfs`, `fsck.erofs --extract`) extract each layer: together they must hold the
//! closure byte for byte (NAR hashes), no path twice, exactly as the manifest says; builds are
//! byte-identical when repeated; `--exact` packs only the ROOTs; bad input fails with exit 2,
//! naming the culprit, without touching what was there.

#![allow(clippy::unwrap_used)] // Tests: a failed setup step should panic with its message.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::Output;

use storedisk_nix::nar::hash_path;
use storedisk_testkit::{assert_success, listing, newest_erofs_utils, text, tool, SyntheticStore};

fn storedisk() -> assert_cmd::Command {
    assert_cmd::Command::new(env!("CARGO_BIN_EXE_storedisk"))
}

fn ok(output: Output) -> Output {
    assert_success(&output);
    output
}

/// `storedisk <subcommand> ... --closure --store-dir <extra> ROOTS`.
fn run(store: &SyntheticStore, subcommand: &[&str], extra: &[&str]) -> Output {
    storedisk()
        .args(subcommand)
        .arg("--closure")
        .arg(store.closure_json())
        .arg("--store-dir")
        .arg(store.store_dir())
        .args(extra)
        .args(store.roots().iter().map(|r| store.logical(r)))
        .output()
        .unwrap()
}

fn extract(format: &str, image: &Path, into: &Path) {
    let mut cmd = match format {
        "squashfs" => {
            let mut cmd = std::process::Command::new(tool("unsquashfs"));
            cmd.arg("-no-progress").arg("-d").arg(into).arg(image);
            cmd
        }
        _ => {
            let mut cmd = std::process::Command::new(newest_erofs_utils().fsck);
            cmd.arg(format!("--extract={}", into.display())).arg(image);
            cmd
        }
    };
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(dir.join("layers.json")).unwrap()).unwrap()
}

/// Layer name -> the store paths the plan puts in it.
fn plan_paths(plan: &serde_json::Value) -> BTreeMap<String, BTreeSet<String>> {
    plan["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let paths = l["paths"].as_array().unwrap();
            (
                l["name"].as_str().unwrap().to_owned(),
                paths
                    .iter()
                    .map(|p| p.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn layers_together_hold_the_closure_once_byte_for_byte_as_planned() {
    let store = SyntheticStore::tricky();
    let plan: serde_json::Value = serde_json::from_slice(
        &ok(run(&store, &["layers", "--layers", "4", "--json"], &[])).stdout,
    )
    .unwrap();
    let planned = plan_paths(&plan);
    assert!(planned.len() >= 2, "{plan:#}");
    assert_eq!(planned.keys().last().map(String::as_str), Some("top"));
    let root = store.logical(&store.roots()[0]);
    assert!(
        planned["top"].contains(&root),
        "the root is on top: {plan:#}"
    );

    for format in ["squashfs", "erofs"] {
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().join("layers");
        let dir_arg = dir.to_str().unwrap();
        let out = ok(run(
            &store,
            &["build", "--format", format, "--layers", "4"],
            &["--output", dir_arg],
        ));
        assert!(
            text(&out.stdout).contains("layers in"),
            "{}",
            text(&out.stdout)
        );
        let built = manifest(&dir);
        assert_eq!(
            plan_paths(&built),
            planned,
            "{format}: the build follows the plan"
        );
        assert_eq!(built["format"], format);

        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for layer in built["layers"].as_array().unwrap() {
            let name = layer["name"].as_str().unwrap();
            let image = dir.join(layer["image"].as_str().unwrap());
            assert_eq!(
                fs::metadata(&image).unwrap().len(),
                layer["image_bytes"].as_u64().unwrap()
            );
            let into = work.path().join(format!("x-{name}"));
            extract(format, &image, &into);
            let roots: BTreeSet<String> = fs::read_dir(&into)
                .unwrap()
                .map(|e| format!("/nix/store/{}", e.unwrap().file_name().to_string_lossy()))
                .collect();
            assert_eq!(roots, planned[name], "{format}/{name}: the image root");
            for path in &roots {
                if let Some(other) = seen.insert(path.clone(), name.to_owned()) {
                    panic!("{path} is in {other} and {name}");
                }
                let base = path.trim_start_matches("/nix/store/");
                let info = store
                    .closure()
                    .iter()
                    .find(|i| i.path.base_name() == base)
                    .unwrap();
                let (hash, size) = hash_path(&into.join(base)).unwrap();
                assert_eq!(Some(hash), info.nar_hash, "{format}/{name}: {base}");
                assert_eq!(Some(size), info.nar_size, "{format}/{name}: {base}");
            }
        }
        let all: BTreeSet<String> = store
            .closure()
            .iter()
            .map(|i| format!("/nix/store/{}", i.path.base_name()))
            .collect();
        assert_eq!(
            seen.keys().cloned().collect::<BTreeSet<_>>(),
            all,
            "{format}"
        );
    }
}

#[test]
fn layered_builds_are_byte_identical_and_replace_only_an_earlier_build() {
    let store = SyntheticStore::tricky();
    let work = tempfile::tempdir().unwrap();
    let build = |dir: &Path| {
        run(
            &store,
            &["build", "--format", "squashfs", "--layers", "3"],
            &["--output", dir.to_str().unwrap(), "--threads", "1"],
        )
    };
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    ok(build(&a));
    ok(build(&b));
    assert_eq!(listing(&a), listing(&b));
    for name in listing(&a) {
        assert_eq!(
            fs::read(a.join(&name)).unwrap(),
            fs::read(b.join(&name)).unwrap(),
            "{name} differs between two builds"
        );
    }
    // Over an earlier layered build: replaced whole, nothing else left beside it.
    fs::write(a.join("stale.squashfs"), b"old").unwrap();
    ok(build(&a));
    assert_eq!(listing(&a), listing(&b));
    assert_eq!(listing(work.path()), ["a", "b"]);

    // Over a directory that is not a layered build: refused, untouched.
    let foreign = work.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("keep.txt"), b"mine").unwrap();
    let out = build(&foreign);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("foreign") && stderr.contains("layers.json"),
        "{stderr}"
    );
    assert_eq!(listing(&foreign), ["keep.txt"]);
    assert_eq!(fs::read(foreign.join("keep.txt")).unwrap(), b"mine");
    assert_eq!(
        listing(work.path()),
        ["a", "b", "foreign"],
        "no temp dir left"
    );
}

#[test]
fn exact_packs_only_the_roots() {
    let store = SyntheticStore::tricky();
    let hello = store.path("hello-2.12.1");
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("one.squashfs");
    // Without --closure: no Nix is asked, the path is taken as it is.
    ok(storedisk()
        .args(["build", "--format", "squashfs", "--exact", "--store-dir"])
        .arg(store.store_dir())
        .arg("--output")
        .arg(&image)
        .arg(store.logical(&hello))
        .output()
        .unwrap());
    let into = work.path().join("x");
    extract("squashfs", &image, &into);
    let names: Vec<String> = fs::read_dir(&into)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [hello.base_name()]);
    let info = store.closure().get(&hello).unwrap();
    assert!(
        !info.references.is_empty() && !info.references.iter().all(|r| *r == hello),
        "the test needs a path with references, which --exact leaves out"
    );
}

#[test]
fn bad_layer_counts_fail_naming_the_limit() {
    let store = SyntheticStore::tricky();
    let work = tempfile::tempdir().unwrap();
    for count in ["1", "21"] {
        let out = run(&store, &["layers", "--layers", count], &[]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("between 2 and 20"), "{stderr}");
        let dir = work.path().join("out");
        let out = run(
            &store,
            &["build", "--format", "erofs", "--layers", count],
            &["--output", dir.to_str().unwrap()],
        );
        assert_eq!(out.status.code(), Some(2));
        assert!(!dir.exists());
    }
    assert_eq!(fs::read_dir(work.path()).unwrap().count(), 0);
}

#[test]
fn every_one_of_n_layers_is_built_even_empty_and_exact_without_roots_is_empty() {
    let store = SyntheticStore::tricky();
    for format in ["squashfs", "erofs"] {
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().join("layers");
        ok(run(
            &store,
            &["build", "--format", format, "--layers", "20"],
            &["--output", dir.to_str().unwrap()],
        ));
        let built = manifest(&dir);
        let layers = built["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 20, "{format}: one image per layer asked for");
        let empty: Vec<&serde_json::Value> = layers
            .iter()
            .filter(|l| l["paths"].as_array().unwrap().is_empty())
            .collect();
        assert!(
            !empty.is_empty(),
            "{format}: the tricky store fills all 18 buckets? {built:#}"
        );
        for layer in empty {
            let into = work
                .path()
                .join(format!("x-{}", layer["name"].as_str().unwrap()));
            extract(format, &dir.join(layer["image"].as_str().unwrap()), &into);
            assert_eq!(listing(&into), Vec::<String>::new(), "{format}: {layer}");
        }

        // The same empty layer on its own: `--exact` with no ROOT, byte for byte.
        let alone = work.path().join(format!("empty.{format}"));
        ok(storedisk()
            .args(["build", "--format", format, "--exact", "--store-dir"])
            .arg(store.store_dir())
            .arg("--output")
            .arg(&alone)
            .output()
            .unwrap());
        let in_set = dir.join(empty_image_name(layers));
        assert_eq!(
            fs::read(&alone).unwrap(),
            fs::read(&in_set).unwrap(),
            "{format}: an empty layer is the same image however it is built"
        );
    }
    // Anything but --exact still needs a ROOT, and says so.
    let out = storedisk()
        .args([
            "build",
            "--format",
            "squashfs",
            "--output",
            "/nonexistent/x",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no ROOT given"),
        "{}",
        text(&out.stderr)
    );
}

fn empty_image_name(layers: &[serde_json::Value]) -> String {
    layers
        .iter()
        .find(|l| l["paths"].as_array().unwrap().is_empty())
        .and_then(|l| l["image"].as_str())
        .unwrap()
        .to_owned()
}
