//! `storedisk closure-info` against the oracle it replaces: nixpkgs' closureInfo builder, i.e.
//! its jq programs run by real `jq` on the same structured-attrs file, compared byte for byte;
//! plus the empty closure and the refusals (non-empty output directory, unreadable input).

#![allow(clippy::unwrap_used)] // Tests: a failed setup step should panic with its message.

use std::fs;
use std::path::Path;
use std::process::Output;

use storedisk_testkit::{text, tool, SyntheticStore};

const FILES: [&str; 3] = ["registration", "store-paths", "total-nar-size"];

fn storedisk() -> assert_cmd::Command {
    assert_cmd::Command::new(env!("CARGO_BIN_EXE_storedisk"))
}

fn closure_info(closure: &Path, output: &Path, extra: &[&str]) -> Output {
    storedisk()
        .args(["closure-info", "--closure"])
        .arg(closure)
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .unwrap()
}

/// nixpkgs' closureInfo build command (pkgs/build-support/closure-info.nix), run by sh and jq
/// with `$NIX_ATTRS_JSON_FILE` = `attrs` and `$out` = `out`.
fn nixpkgs_closure_info(attrs: &Path, out: &Path) {
    let jq = tool("jq");
    fs::create_dir(out).unwrap();
    let script = r#"
      jq -r ".closure | map(.narSize) | add" < "$NIX_ATTRS_JSON_FILE" > $out/total-nar-size
      jq -r '.closure | map([.path, .narHash, .narSize, "", (.references | length)] + .references) | add | map("\(.)\n") | add' < "$NIX_ATTRS_JSON_FILE" | head -n -1 > $out/registration
      jq -r '.closure[].path' < "$NIX_ATTRS_JSON_FILE" > $out/store-paths
    "#;
    let path = format!(
        "{}:{}",
        jq.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let status = std::process::Command::new("sh")
        .args(["-e", "-c", script])
        .env("PATH", path)
        .env("NIX_ATTRS_JSON_FILE", attrs)
        .env("out", out)
        .status()
        .unwrap();
    assert!(status.success(), "the nixpkgs jq programs failed");
}

fn assert_same_files(ours: &Path, theirs: &Path) {
    for file in FILES {
        let a = fs::read_to_string(ours.join(file)).unwrap();
        let b = fs::read_to_string(theirs.join(file)).unwrap();
        assert_eq!(a, b, "{file} differs from nixpkgs' closureInfo");
    }
}

#[test]
fn writes_what_nixpkgs_closure_info_writes() {
    let store = SyntheticStore::tricky();
    let work = tempfile::tempdir().unwrap();
    // Reversed, so that following the file's order (as jq does) is tested too.
    let mut closure: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(store.closure_json()).unwrap()).unwrap();
    closure.as_array_mut().unwrap().reverse();
    let attrs = work.path().join("attrs.json");
    let attrs_json = serde_json::json!({
        "closure": closure,
        "name": "closure-info",
        "outputs": {"out": "/nix/store/00000000000000000000000000000000-closure-info"},
    });
    fs::write(&attrs, attrs_json.to_string()).unwrap();

    let theirs = work.path().join("theirs");
    nixpkgs_closure_info(&attrs, &theirs);
    let registration = fs::read_to_string(theirs.join("registration")).unwrap();
    assert!(registration.lines().count() > 6 * 5, "{registration}");

    let ours = work.path().join("ours");
    let out = closure_info(&attrs, &ours, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_same_files(&ours, &theirs);

    // The same with the key named, and from the plain exportReferencesGraph array.
    let keyed = work.path().join("keyed");
    let out = closure_info(&attrs, &keyed, &["--closure-key", "closure"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_same_files(&keyed, &theirs);
    let plain = work.path().join("plain.json");
    fs::write(&plain, closure.to_string()).unwrap();
    let from_plain = work.path().join("from-plain");
    let out = closure_info(&plain, &from_plain, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_same_files(&from_plain, &theirs);
}

#[test]
fn an_empty_closure_gives_what_nixpkgs_gives() {
    // nixpkgs special-cases an empty rootPaths: `echo 0 > total-nar-size`, empty other files.
    let work = tempfile::tempdir().unwrap();
    let empty = work.path().join("empty.json");
    fs::write(&empty, "[]").unwrap();
    let ours = work.path().join("ours");
    let out = closure_info(&empty, &ours, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        fs::read_to_string(ours.join("total-nar-size")).unwrap(),
        "0\n"
    );
    assert_eq!(fs::read_to_string(ours.join("registration")).unwrap(), "");
    assert_eq!(fs::read_to_string(ours.join("store-paths")).unwrap(), "");
}

#[test]
fn refuses_a_non_empty_output_directory_and_leaves_nothing() {
    let store = SyntheticStore::tricky();
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("info");
    fs::create_dir(&output).unwrap();
    fs::write(output.join("keep-me"), "mine").unwrap();
    let out = closure_info(store.closure_json(), &output, &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&output.display().to_string()) && stderr.contains("not empty"),
        "{stderr}"
    );
    assert_eq!(fs::read_to_string(output.join("keep-me")).unwrap(), "mine");
    assert_only_entry(work.path(), "info");

    // An existing empty directory is fine: it is replaced by the complete one.
    fs::remove_file(output.join("keep-me")).unwrap();
    let out = closure_info(store.closure_json(), &output, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for file in FILES {
        assert!(output.join(file).is_file(), "{file}");
    }
}

#[test]
fn a_missing_or_bad_closure_file_fails_naming_it() {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("info");
    let missing = work.path().join("no-such-closure.json");
    let bad = work.path().join("bad.json");
    fs::write(&bad, "[{\"path\": \"/nix/store/not-a-store-path\"}]").unwrap();
    for closure in [&missing, &bad] {
        let out = closure_info(closure, &output, &[]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(&closure.display().to_string()), "{stderr}");
        assert!(!output.exists());
    }
    assert_only_entry(work.path(), "bad.json");
}

/// `dir` holds `name` and nothing else: no temp file was left behind.
fn assert_only_entry(dir: &Path, name: &str) {
    let names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from(name)],
        "temp files left behind"
    );
}
