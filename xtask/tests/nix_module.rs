//! The NixOS module's reading of microvm.nix's options (nix/flags.nix), evaluated with real Nix:
//! nix/tests.nix must report no failing case (it also covers nix/lib.nix's pure fixes), and a flag storedisk cannot honour must stop the
//! evaluation with an error naming the option and the flag.

use std::path::{Path, PathBuf};
use std::process::Output;

use storedisk_testkit::nix_command;

fn nix_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix")
}

fn instantiate(args: &[&str]) -> Output {
    nix_command("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .args(args)
        .output()
        .expect("running nix-instantiate")
}

#[test]
fn every_case_of_nix_tests_holds() {
    let tests = nix_dir().join("tests.nix");
    let out = instantiate(&[tests.to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "nix/tests.nix does not evaluate: {stderr}"
    );
    let failures: Vec<String> =
        serde_json::from_slice(&out.stdout).expect("nix/tests.nix gives a JSON list");
    assert!(failures.is_empty(), "failing cases: {failures:#?}");
}

#[test]
fn a_flag_storedisk_cannot_honour_stops_evaluation_naming_it() {
    let flags = nix_dir().join("flags.nix");
    for (expr, option, flag) in [
        (
            "(import FLAGS).erofs [ \"-zlz4hc\" \"-C65536\" ]",
            "microvm.storeDiskErofsFlags",
            "-C65536",
        ),
        (
            "(import FLAGS).squashfs [ \"-b\" \"1048576\" ]",
            "microvm.storeDiskSquashfsFlags",
            "-b 1048576",
        ),
    ] {
        let expr = expr.replace("FLAGS", flags.to_str().expect("utf-8 path"));
        let out = instantiate(&["--expr", &expr]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{expr} evaluated: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr.contains(option) && stderr.contains(&format!("\"{flag}\"")),
            "{expr}: {stderr}"
        );
    }
}
