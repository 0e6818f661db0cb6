//! What several test files share: `storedisk build` of a synthetic store's roots, and
//! `storedisk verify` run with no Nix on PATH (so the answers cannot depend on the machine)
//! with what it printed.

#![allow(dead_code)] // Each test file uses its own part.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use assert_cmd::Command as Cmd;
use serde_json::Value;
use storedisk_testkit::SyntheticStore;

/// `storedisk build --format FORMAT --closure ... --store-dir ... --output OUTPUT EXTRA ROOTS`
/// of `store`'s roots, not yet run.
pub fn build_cmd(store: &SyntheticStore, format: &str, output: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_storedisk"));
    cmd.args(["build", "--format", format, "--closure"])
        .arg(store.closure_json())
        .arg("--store-dir")
        .arg(store.store_dir())
        .arg("--output")
        .arg(output)
        .args(extra)
        .args(store.roots().iter().map(|r| store.logical(r)))
        .stdin(Stdio::null());
    cmd
}

/// What one `storedisk verify` run printed, and its exit code.
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// The `--json` report; panics with both streams when there is none.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("no JSON report ({e}): {}{}", self.stdout, self.stderr))
    }

    pub fn first_line(&self) -> &str {
        self.stdout.lines().next().unwrap_or_default()
    }
}

/// Runs `storedisk verify ARGS` with an empty PATH and a 120 s hang guard (not a timing
/// assert); a panic is a test failure whatever the exit code.
pub fn verify(args: &[&str]) -> Outcome {
    let out = Cmd::cargo_bin("storedisk")
        .expect("the storedisk binary")
        .arg("verify")
        .args(args)
        .env("PATH", "")
        .timeout(Duration::from_secs(120))
        .output()
        .expect("running storedisk verify");
    let outcome = Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !outcome.stderr.contains("panicked"),
        "verify panicked: {}",
        outcome.stderr
    );
    outcome
}
