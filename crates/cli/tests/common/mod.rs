//! What several `storedisk verify` test files share: running it with no Nix on PATH (so the
//! answers cannot depend on the machine) and reading what it printed.

#![allow(dead_code)] // Each test file uses its own part.

use std::time::Duration;

use assert_cmd::Command as Cmd;
use serde_json::Value;

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
