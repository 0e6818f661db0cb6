//! `storedisk verify` invocations, not image contents: what it says when no check had its
//! inputs (`nothing checked`, never `OK`), `--require` turning a check that did not run into a
//! finding, and bad invocations (flag misuse, a missing or wrong image, a closure file that is
//! not a closure) exiting 2 with a message naming the thing at fault and no report.

#![allow(clippy::unwrap_used)] // Tests: a failed setup should panic loudly.

mod common;

use std::fs;
use std::path::PathBuf;

use assert_cmd::Command as Cmd;
use common::{verify, Outcome};
use serde_json::{json, Value};
use storedisk_testkit::SyntheticStore;

/// The synthetic store and a squashfs image of its closure made by our builder (no peer tool
/// needed).
fn store_and_image() -> (SyntheticStore, PathBuf) {
    let store = SyntheticStore::tricky();
    let image = store.scratch().join("guest.squashfs");
    Cmd::cargo_bin("storedisk")
        .unwrap()
        .args(["build", "--format", "squashfs", "--closure"])
        .arg(store.closure_json())
        .arg("--store-dir")
        .arg(store.store_dir())
        .arg("-o")
        .arg(&image)
        .arg(store.logical(&store.roots()[0]))
        .assert()
        .success();
    (store, image)
}

// ---- nothing checked, --require ----

#[test]
fn with_no_inputs_the_report_says_nothing_checked_and_how_to_check() {
    let (_store, image) = store_and_image();
    let image = image.to_str().unwrap();
    let text = verify(&[image]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert_eq!(text.first_line(), "nothing checked", "{}", text.stdout);
    assert!(!text.stdout.contains("OK"), "{}", text.stdout);
    for (check, flag) in [
        ("complete", "--closure FILE"),
        ("integrity", "--closure FILE"),
        ("self_contained", "--image-path STOREPATH"),
        ("runner_overlap", "--runner STOREPATH"),
        ("policy", "--allow GLOB"),
    ] {
        let line = text
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{check}: ")))
            .unwrap_or_else(|| panic!("no status line for {check}: {}", text.stdout));
        assert!(line.contains("not checked: "), "{line}");
        assert!(line.contains(flag), "{check} should name {flag}: {line}");
    }

    let report = verify(&[image, "--json"]);
    assert_eq!(report.code, 0, "{}", report.stderr);
    let report = report.json();
    assert_eq!(report["checked"], json!([]));
    assert_eq!(report["required_not_run"], json!([]));
    assert_eq!(report["findings"], 0);
}

#[test]
fn with_a_closure_the_report_lists_what_ran() {
    let (store, image) = store_and_image();
    let (image, closure) = (
        image.to_str().unwrap(),
        store.closure_json().to_str().unwrap(),
    );
    let text = verify(&[image, "--closure", closure]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert_eq!(text.first_line(), "OK", "{}", text.stdout);
    assert!(text.stdout.contains("  complete: ok\n"), "{}", text.stdout);
    assert!(text.stdout.contains("  integrity: ok\n"), "{}", text.stdout);
    let report = verify(&[image, "--closure", closure, "--json"]).json();
    assert_eq!(report["checked"], json!(["complete", "integrity"]));
    assert_eq!(report["ok"], true);
}

#[test]
fn a_required_check_that_did_not_run_is_a_finding_naming_it_and_why() {
    let (store, image) = store_and_image();
    let (image, closure) = (
        image.to_str().unwrap(),
        store.closure_json().to_str().unwrap(),
    );
    let args = [
        image,
        "--closure",
        closure,
        "--require",
        "complete,self_contained",
    ];
    let text = verify(&args);
    assert_eq!(text.code, 1, "{}{}", text.stdout, text.stderr);
    assert_eq!(text.first_line(), "1 finding", "{}", text.stdout);
    assert!(
        text.stdout.contains(
            "self_contained: the image's store path is not known: give --image-path STOREPATH"
        ),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .contains("  self_contained: REQUIRED, not checked: "),
        "{}",
        text.stdout
    );

    let out = verify(&[&args[..], &["--json"]].concat());
    assert_eq!(out.code, 1, "{}", out.stderr);
    let report = out.json();
    assert_eq!(report["ok"], false);
    assert_eq!(report["findings"], 1);
    assert_eq!(report["checked"], json!(["complete", "integrity"]));
    assert_eq!(
        report["required_not_run"],
        json!([{
            "check": "self_contained",
            "why": "the image's store path is not known"
        }])
    );
    // What was missing, as a value: the text above turned it into the flag.
    assert_eq!(
        report["checks"]["self_contained"]["missing_input"],
        "image_path"
    );
    // The check itself is reported as before: not checked.
    assert_eq!(report["checks"]["self_contained"]["ok"], Value::Null);
}

#[test]
fn required_checks_that_ran_and_passed_exit_0() {
    let (store, image) = store_and_image();
    let out = verify(&[
        image.to_str().unwrap(),
        "--closure",
        store.closure_json().to_str().unwrap(),
        "--require",
        "integrity",
        "--require",
        "complete",
    ]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.first_line(), "OK", "{}", out.stdout);
}

#[test]
fn require_all_with_nothing_to_check_fails_on_every_check() {
    let (_store, image) = store_and_image();
    let out = verify(&[image.to_str().unwrap(), "--require", "all", "--json"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let report = out.json();
    // `disjoint` too: a single image has no layers to compare.
    assert_eq!(report["findings"], 6);
    let named: Vec<&str> = report["required_not_run"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["check"].as_str().unwrap())
        .collect();
    assert_eq!(
        named,
        [
            "complete",
            "integrity",
            "self_contained",
            "runner_overlap",
            "policy",
            "disjoint"
        ]
    );
}

// ---- bad invocations: exit 2, the culprit named, no report ----

/// Asserts exit 2, no report on stdout, and a message on stderr containing every `needle`.
fn assert_could_not_run(out: &Outcome, needles: &[&str]) {
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.is_empty(),
        "a report was printed: {}",
        out.stdout
    );
    for needle in needles {
        assert!(
            out.stderr.contains(needle),
            "the message should name {needle:?}: {}",
            out.stderr
        );
    }
}

#[test]
fn flag_misuse_exits_2_naming_the_flag() {
    let (_store, image) = store_and_image();
    let image = image.to_str().unwrap();
    assert_could_not_run(&verify(&[image, "--bogus"]), &["--bogus"]);
    assert_could_not_run(
        &verify(&[image, "--require", "bogus", "--json"]),
        &["bogus", "--require", "self_contained"],
    );
    assert_could_not_run(
        &verify(&[image, "--require", "complete,", "--json"]),
        &["--require"],
    );
    assert_could_not_run(&verify(&[image, "--closure"]), &["--closure"]);
    assert_could_not_run(&verify(&["--json"]), &["IMAGE"]);
}

#[test]
fn a_missing_image_exits_2_naming_it() {
    let scratch = tempfile::tempdir().unwrap();
    let missing = scratch.path().join("no-such.img");
    let missing = missing.to_str().unwrap();
    assert_could_not_run(&verify(&[missing, "--json"]), &[missing, "No such file"]);
}

#[test]
fn a_directory_as_image_exits_2_naming_it() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_str().unwrap();
    assert_could_not_run(&verify(&[dir]), &[dir, "not a regular file"]);
    assert_could_not_run(&verify(&[dir, "--json"]), &[dir, "not a regular file"]);
}

#[test]
fn a_closure_file_that_is_not_a_closure_exits_2_naming_it() {
    let (store, image) = store_and_image();
    let image = image.to_str().unwrap();
    for (name, contents, why) in [
        ("text.json", "hello, world\n", "registration text"),
        ("broken.json", "[{\"path\": ", "not valid JSON"),
        ("object.json", "{\"a\": 1}", "closure JSON"),
    ] {
        let file = store.scratch().join(name);
        fs::write(&file, contents).unwrap();
        let file = file.to_str().unwrap();
        assert_could_not_run(&verify(&[image, "--closure", file, "--json"]), &[file, why]);
    }
    let missing = store.scratch().join("no-such-closure.json");
    let missing = missing.to_str().unwrap();
    assert_could_not_run(
        &verify(&[image, "--closure", missing]),
        &[missing, "cannot read the closure file"],
    );
}
