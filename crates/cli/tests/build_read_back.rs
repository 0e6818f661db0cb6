//! The read-back's failure as a person and a program see it: a closure whose recorded NAR
//! hashes are all wrong (the store changed under it, or the wrong closure file) fails the build
//! with a message that counts the differing paths and names the first few, never one line per
//! path; `--json` gives every one of them; nothing is left behind.

#![allow(clippy::unwrap_used)] // Tests: a failed setup step should panic with its message.

use std::fs;

use serde_json::Value;
use storedisk_testkit::{listing, text, SyntheticStore};

#[test]
fn a_read_back_of_many_wrong_paths_names_a_few_and_json_lists_them_all() {
    let store = SyntheticStore::tricky();
    let scratch = tempfile::tempdir().unwrap();
    // Every path gets the next path's recorded hash: each one then reads back "wrong".
    let mut entries: Vec<Value> =
        serde_json::from_slice(&fs::read(store.closure_json()).unwrap()).unwrap();
    let hashes: Vec<Value> = entries.iter().map(|e| e["narHash"].clone()).collect();
    for (i, entry) in entries.iter_mut().enumerate() {
        entry["narHash"] = hashes[(i + 1) % hashes.len()].clone();
    }
    let count = entries.len();
    assert!(count > 3, "the synthetic closure has {count} paths");
    let closure = scratch.path().join("wrong-hashes.json");
    fs::write(&closure, serde_json::to_string(&entries).unwrap()).unwrap();
    let out_dir = scratch.path().join("out");
    fs::create_dir(&out_dir).unwrap();

    let build = |json: bool| {
        let mut cmd = assert_cmd::Command::new(env!("CARGO_BIN_EXE_storedisk"));
        cmd.args(["build", "--format", "squashfs", "--closure"])
            .arg(&closure)
            .arg("--store-dir")
            .arg(store.store_dir())
            .arg("--output")
            .arg(out_dir.join("disk.img"))
            .args(store.roots().iter().map(|r| store.logical(r)));
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    };

    let out = build(false);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let wanted = format!(
        "failed its read-back check, so it was not kept: {count} path(s) differ from the closure \
         of {count} ({count} with other contents): "
    );
    assert!(stderr.contains(&wanted), "{wanted}\nnot in\n{stderr}");
    assert_eq!(
        stderr.matches(" reads back with NAR hash ").count(),
        3,
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("; and {} more (--json lists them all)", count - 3)),
        "{stderr}"
    );
    assert!(text(&out.stdout).is_empty());
    assert_eq!(listing(&out_dir), Vec::<String>::new());

    let out = build(true);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let failure: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        failure["error"].as_str().unwrap().contains(&wanted),
        "{failure}"
    );
    let read_back = &failure["read_back"];
    assert_eq!(read_back["closure_paths"], count);
    let mismatched: Vec<&str> = read_back["mismatched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["path"].as_str().unwrap())
        .collect();
    let mut every_path: Vec<String> = entries
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_owned())
        .collect();
    every_path.sort();
    assert_eq!(mismatched, every_path);
    assert_eq!(read_back["missing"], serde_json::json!([]));
    assert_eq!(listing(&out_dir), Vec::<String>::new());
}
