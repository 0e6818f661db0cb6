//! `storedisk verify` over a set of layers: real layer images built by `storedisk build` from
//! halves of the synthetic store's closure (each from a closure file listing exactly its half,
//! without references), checked as one store disk: complete and disjoint when together they hold
//! the closure once, `complete` naming what a missing layer held, `disjoint` naming a path
//! packed twice and both images, a mismatch naming its layer, exit 2 naming a corrupt or
//! missing layer, a layer of another format, or a miscounted `--image-path`; every layer's store
//! path travels with the runner.

#![allow(clippy::unwrap_used)] // Tests: a failed setup should panic loudly.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use assert_cmd::Command as Cmd;
use common::verify;
use serde_json::{json, Value};
use storedisk_nix::StorePath;
use storedisk_testkit::{store_path_for, SyntheticStore};

/// The guest closure split in two: the toplevel's own side and what it runs on.
const HALF_A: [&str; 3] = ["nixos-system-guest", "hello-2.12.1", "current-hello"];
const HALF_B: [&str; 3] = ["busybox-1.36.1", "glibc-2.40", "config.json"];

fn paths(store: &SyntheticStore, names: &[&str]) -> Vec<StorePath> {
    names.iter().map(|n| store.path(n)).collect()
}

/// Builds a `format` image of exactly `paths`: from a closure file that lists them with their
/// recorded hashes and no references, so the builder packs nothing else.
fn layer(store: &SyntheticStore, name: &str, format: &str, paths: &[StorePath]) -> PathBuf {
    layer_with(store, name, &["--format", format], paths)
}

/// [`layer`] with `storedisk build` flags of the caller's choice.
fn layer_with(store: &SyntheticStore, name: &str, flags: &[&str], paths: &[StorePath]) -> PathBuf {
    let entries: Vec<Value> = paths
        .iter()
        .map(|p| {
            let info = store.closure().get(p).unwrap();
            json!({
                "path": store.logical(p),
                "narHash": info.nar_hash.unwrap().to_nix32(),
                "narSize": info.nar_size.unwrap(),
                "references": [],
            })
        })
        .collect();
    let closure = store.scratch().join(format!("{name}.closure.json"));
    fs::write(&closure, serde_json::to_string(&entries).unwrap()).unwrap();
    let image = store.scratch().join(format!("{name}.img"));
    Cmd::cargo_bin("storedisk")
        .unwrap()
        .arg("build")
        .args(flags)
        .arg("--closure")
        .arg(&closure)
        .arg("--store-dir")
        .arg(store.store_dir())
        .arg("--mkfs-erofs")
        .arg(storedisk_testkit::newest_erofs_utils().mkfs)
        .arg("-o")
        .arg(&image)
        .args(paths.iter().map(|p| store.logical(p)))
        .assert()
        .success();
    image
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sorted_logical(store: &SyntheticStore, paths: &[StorePath]) -> Vec<String> {
    let mut v: Vec<String> = paths.iter().map(|p| store.logical(p)).collect();
    v.sort();
    v
}

fn strings(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn nar_bytes(store: &SyntheticStore, paths: &[StorePath]) -> u64 {
    paths
        .iter()
        .map(|p| store.closure().get(p).unwrap().nar_size.unwrap())
        .sum()
}

#[test]
fn two_disjoint_layers_holding_the_closure_pass_as_one_store_disk() {
    let store = SyntheticStore::tricky();
    let closure = s(store.closure_json());
    for format in ["squashfs", "erofs"] {
        let (a, b) = (paths(&store, &HALF_A), paths(&store, &HALF_B));
        let image_a = layer(&store, &format!("{format}-a"), format, &a);
        let image_b = layer(&store, &format!("{format}-b"), format, &b);
        let out = verify(&[s(&image_a), s(&image_b), "--closure", closure, "--json"]);
        assert_eq!(out.code, 0, "{format}: {}{}", out.stdout, out.stderr);
        let report = out.json();
        let checks = &report["checks"];
        assert_eq!(checks["complete"]["ok"], true, "{format}");
        assert_eq!(checks["integrity"]["ok"], true, "{format}");
        assert_eq!(checks["integrity"]["checked"], store.closure().len());
        assert_eq!(checks["disjoint"]["ok"], true, "{format}");
        assert_eq!(checks["disjoint"]["layers"], 2);
        assert!(strings(&report["checked"]).contains(&"disjoint".to_owned()));
        assert_eq!(report["format"], format);
        assert_eq!(report["image"], s(&image_a), "the first IMAGE, as before");
        assert_eq!(
            report["images"],
            json!([
                {"image": s(&image_a), "format": format, "paths": 3,
                 "nar_bytes": nar_bytes(&store, &a)},
                {"image": s(&image_b), "format": format, "paths": 3,
                 "nar_bytes": nar_bytes(&store, &b)},
            ])
        );
        // Every path once, with the layer it came from.
        for entry in report["paths"].as_array().unwrap() {
            let path = entry["path"].as_str().unwrap();
            let in_a = sorted_logical(&store, &a).contains(&path.to_owned());
            assert_eq!(entry["layer"], if in_a { 0 } else { 1 }, "{format} {path}");
        }
        assert_eq!(report["paths"].as_array().unwrap().len(), 6);

        let text = verify(&[s(&image_a), s(&image_b), "--closure", closure]).stdout;
        assert!(text.starts_with("OK\n"), "{text}");
        assert!(
            text.contains(&format!("{format} store disk of 2 layers: 6 store paths")),
            "{text}"
        );
        assert!(
            text.contains(&format!("  layer 0: {}: 3 store paths", s(&image_a)))
                && text.contains(&format!("  layer 1: {}: 3 store paths", s(&image_b))),
            "{text}"
        );
        assert!(text.contains("  disjoint: ok\n"), "{text}");
    }
}

#[test]
fn a_missing_layer_leaves_its_paths_missing() {
    let store = SyntheticStore::tricky();
    let a = paths(&store, &HALF_A);
    let image_a = layer(&store, "a", "squashfs", &a);
    let out = verify(&[s(&image_a), "--closure", s(store.closure_json()), "--json"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let report = out.json();
    let complete = &report["checks"]["complete"];
    assert_eq!(complete["ok"], false);
    let missing: Vec<String> = complete["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["path"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(missing, sorted_logical(&store, &paths(&store, &HALF_B)));
    // One image: nothing to compare, and not a finding.
    assert_eq!(report["checks"]["disjoint"]["ok"], Value::Null);
    assert_eq!(
        report["checks"]["disjoint"]["why"],
        "one image: nothing to compare"
    );
    assert_eq!(report["findings"], 3);
    assert_eq!(report["images"].as_array().unwrap().len(), 1);

    // ...unless it is required.
    let out = verify(&[
        s(&image_a),
        "--closure",
        s(store.closure_json()),
        "--require",
        "disjoint",
        "--json",
    ]);
    assert_eq!(out.code, 1);
    assert_eq!(
        out.json()["required_not_run"],
        json!([{"check": "disjoint", "why": "one image: nothing to compare"}])
    );
}

#[test]
fn a_path_in_two_layers_is_a_disjoint_finding_naming_both_images() {
    let store = SyntheticStore::tricky();
    let a = paths(&store, &HALF_A);
    let mut b = paths(&store, &HALF_B);
    let hello = store.path("hello-2.12.1");
    b.push(hello.clone());
    let image_a = layer(&store, "a", "squashfs", &a);
    let image_b = layer(&store, "b-with-hello", "squashfs", &b);
    let args = [
        s(&image_a),
        s(&image_b),
        "--closure",
        s(store.closure_json()),
    ];
    let out = verify(&[&args[..], &["--json"]].concat());
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let report = out.json();
    let disjoint = &report["checks"]["disjoint"];
    assert_eq!(disjoint["ok"], false);
    assert_eq!(
        disjoint["duplicates"],
        json!([{"path": store.logical(&hello), "images": [s(&image_a), s(&image_b)]}])
    );
    assert_eq!(report["findings"], 1);
    assert_eq!(report["ok"], false);
    // Together they are still complete and intact: both copies compared.
    assert_eq!(report["checks"]["complete"]["ok"], true);
    assert_eq!(report["checks"]["complete"]["extra"], json!([]));
    assert_eq!(report["checks"]["integrity"]["ok"], true);
    assert_eq!(
        report["checks"]["integrity"]["checked"],
        store.closure().len() + 1
    );
    assert_eq!(report["images"][1]["paths"], 4);

    let text = verify(&args).stdout;
    assert!(text.starts_with("1 finding\n"), "{text}");
    assert!(
        text.contains(&format!(
            "disjoint: 1 store path(s) are at the root of more than one layer\n  {}\n    in {} and {}\n",
            store.logical(&hello),
            s(&image_a),
            s(&image_b)
        )),
        "{text}"
    );
}

#[test]
fn a_flipped_byte_in_the_second_layer_is_a_mismatch_naming_that_layer() {
    let store = SyntheticStore::tricky();
    let image_a = layer(&store, "a", "erofs", &paths(&store, &HALF_A));
    // Uncompressed, so config.json's bytes are in the file as they are.
    let flags = ["--format", "erofs", "--compression", "none"];
    let image_b = layer_with(&store, "b", &flags, &paths(&store, &HALF_B));
    let mut bytes = fs::read(&image_b).unwrap();
    let needle = b"{\"answer\": 42}";
    let found: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(at, _)| at)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "config.json's bytes occur once in the image"
    );
    bytes[found[0] + 2] ^= 0x20; // "answer" -> "Answer"
    fs::write(&image_b, &bytes).unwrap();
    let args = [
        s(&image_a),
        s(&image_b),
        "--closure",
        s(store.closure_json()),
    ];
    let out = verify(&[&args[..], &["--json"]].concat());
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let report = out.json();
    let integrity = &report["checks"]["integrity"];
    assert_eq!(integrity["ok"], false);
    let mismatched = integrity["mismatched"].as_array().unwrap();
    assert_eq!(mismatched.len(), 1, "{integrity}");
    let config = store.logical(&store.path("config.json"));
    assert_eq!(mismatched[0]["path"], config.as_str());
    assert_eq!(mismatched[0]["layer"], 1);
    assert_eq!(report["checks"]["disjoint"]["ok"], true);
    let text = verify(&args).stdout;
    assert!(
        text.contains(&format!("  {config} (in {})\n", s(&image_b))),
        "{text}"
    );
}

#[test]
fn a_corrupt_or_missing_layer_exits_2_naming_it() {
    let store = SyntheticStore::tricky();
    let image_a = layer(&store, "a", "squashfs", &paths(&store, &HALF_A));
    let image_b = layer(&store, "b", "squashfs", &paths(&store, &HALF_B));
    let bytes = fs::read(&image_b).unwrap();
    let truncated = store.scratch().join("b-truncated.img");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = store.scratch().join("b-garbage.img");
    let mut junk = b"hsqs".to_vec();
    junk.extend(storedisk_testkit::pseudo_random_bytes(7, 8192));
    fs::write(&garbage, junk).unwrap();
    let text = store.scratch().join("b-text.img");
    fs::write(&text, "not an image\n").unwrap();
    let missing = store.scratch().join("b-missing.img");
    for bad in [&truncated, &garbage, &text, &missing] {
        let out = verify(&[s(&image_a), s(bad), "--closure", s(store.closure_json())]);
        assert_eq!(
            out.code,
            2,
            "{}: {}{}",
            bad.display(),
            out.stdout,
            out.stderr
        );
        assert!(out.stdout.is_empty(), "no report: {}", out.stdout);
        assert!(
            out.stderr.contains(s(bad)),
            "the error names {}: {}",
            bad.display(),
            out.stderr
        );
        assert!(
            !out.stderr.contains(s(&image_a)),
            "only the bad layer is named: {}",
            out.stderr
        );
    }
}

#[test]
fn layers_of_two_formats_exit_2_naming_the_odd_one() {
    let store = SyntheticStore::tricky();
    let image_a = layer(&store, "a", "squashfs", &paths(&store, &HALF_A));
    let image_b = layer(&store, "b", "erofs", &paths(&store, &HALF_B));
    let out = verify(&[s(&image_a), s(&image_b)]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "{} is erofs, but {} is squashfs: the layers of one store disk must share a format",
            s(&image_b),
            s(&image_a)
        )),
        "{}",
        out.stderr
    );
}

#[test]
fn image_path_is_given_once_per_image_or_not_at_all() {
    let store = SyntheticStore::tricky();
    let image_a = layer(&store, "a", "squashfs", &paths(&store, &HALF_A));
    let image_b = layer(&store, "b", "squashfs", &paths(&store, &HALF_B));
    let disk_a = store_path_for("disk-a").to_string();
    let out = verify(&[s(&image_a), s(&image_b), "--image-path", &disk_a]);
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr
            .contains("--image-path given 1 time(s) for 2 IMAGE(s): give it once per IMAGE"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty());
}

/// A runner closure as `nix path-info --json` would give it: `runner -> disk images`, each
/// image recording the references listed with it (leak 1), plus the guest closure.
fn runner_closure(store: &SyntheticStore, disks: &[(&str, &[&str])]) -> PathBuf {
    let runner = store_path_for("microvm-run");
    let guest = store.closure();
    let mut entries: Vec<Value> = guest
        .iter()
        .map(|i| {
            json!({
                "path": store.logical(&i.path),
                "narSize": i.nar_size,
                "references": i.references.iter().map(|r| store.logical(r)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut runner_refs = Vec::new();
    for (disk, references) in disks {
        let p = store.logical(&store_path_for(disk));
        let references: Vec<String> = references
            .iter()
            .map(|r| store.logical(&store.path(r)))
            .collect();
        entries.push(json!({"path": p, "narSize": 4096, "references": references}));
        runner_refs.push(p);
    }
    entries.push(json!({
        "path": store.logical(&runner),
        "narSize": 1000,
        "references": runner_refs,
    }));
    let file = store.scratch().join("runner.json");
    fs::write(&file, serde_json::to_string(&entries).unwrap()).unwrap();
    file
}

fn leaked_and_shared(report: &Value) -> (Vec<String>, Vec<String>) {
    let overlap = &report["checks"]["runner_overlap"];
    let leaked = overlap["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["path"].as_str().unwrap().to_owned())
        .collect();
    (leaked, strings(&overlap["shared"]))
}

#[test]
fn every_layers_store_path_travels_with_the_runner_and_its_references_leak() {
    let store = SyntheticStore::tricky();
    let image_a = layer(&store, "a", "squashfs", &paths(&store, &HALF_A));
    let image_b = layer(&store, "b", "squashfs", &paths(&store, &HALF_B));
    // The second layer's image records a reference to glibc, which no guest root is: only cutting
    // that image's edges shows glibc as leaked rather than needed by the runner.
    let runner = runner_closure(&store, &[("disk-a", &[]), ("disk-b", &["glibc-2.40"])]);
    let disk_a = store_path_for("disk-a").to_string();
    let disk_b = store_path_for("disk-b").to_string();
    let runner_path = store_path_for("microvm-run").to_string();
    let base = [
        s(&image_a),
        s(&image_b),
        "--closure",
        s(store.closure_json()),
        "--runner-closure",
        s(&runner),
        "--runner",
        &runner_path,
        "--json",
    ];
    let out = verify(
        &[
            &base[..],
            &["--image-path", &disk_a, "--image-path", &disk_b],
        ]
        .concat(),
    );
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let report = out.json();
    let glibc = store.logical(&store.path("glibc-2.40"));
    assert_eq!(
        leaked_and_shared(&report),
        (vec![glibc.clone()], vec![]),
        "the layer images themselves are not leaked"
    );
    // Each image's references were not asked (no Nix here): not checked, naming the first.
    let sc = &report["checks"]["self_contained"];
    assert_eq!(sc["ok"], Value::Null);
    assert!(sc["why"].as_str().unwrap().starts_with(s(&image_a)), "{sc}");
    assert_eq!(
        sc["image_paths"],
        json!([
            format!("/nix/store/{disk_a}"),
            format!("/nix/store/{disk_b}")
        ])
    );

    // The same layers under store paths the runner does not hold: its disks are then ordinary
    // runner paths, and glibc looks like a runner need.
    let (x, y) = (
        store_path_for("disk-x").to_string(),
        store_path_for("disk-y").to_string(),
    );
    let out = verify(&[&base[..], &["--image-path", &x, "--image-path", &y]].concat());
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(leaked_and_shared(&out.json()), (vec![], vec![glibc]));
}
