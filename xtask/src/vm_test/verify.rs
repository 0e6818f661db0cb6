//! The verifier's verdict on one run: `storedisk verify IMAGE --closure ... --image-path ...
//! --runner RUNNER --json`, read back into the verifier's own report types, of which the harness
//! keeps each check's result and the leaked and shared sets of `runner_overlap`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use storedisk_verifier::Report;

use crate::cmd::Cmd;
use crate::tools::{path_with, Nix, NIX_CONFIG};

/// What the harness keeps of a verify run.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// `true`/`false`: the verifier's overall verdict; `None`: it could not give one.
    pub ok: Option<bool>,
    /// Each check's `ok` (true, false or null), by check name.
    pub checks: BTreeMap<&'static str, Option<bool>>,
    /// Leaked store paths (`runner_overlap.paths`), sorted.
    pub leaked: Vec<String>,
    /// Packed store paths the runner needs by itself (`runner_overlap.shared`), sorted.
    pub shared: Vec<String>,
    /// How many store paths the image holds (the inventory).
    pub packed_paths: usize,
    pub duplicated_bytes: u64,
    /// Why there is no verdict (the verifier failed to run or printed no report).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

impl Verdict {
    fn unavailable(why: String) -> Verdict {
        Verdict {
            ok: None,
            checks: BTreeMap::new(),
            leaked: Vec::new(),
            shared: Vec::new(),
            packed_paths: 0,
            duplicated_bytes: 0,
            unavailable: Some(why),
        }
    }

    /// The names of the checks that reported `false`, comma-separated.
    fn failing_checks(&self) -> String {
        self.checks
            .iter()
            .filter(|(_, ok)| **ok == Some(false))
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A short text for tables.
    pub fn summary(&self) -> String {
        match (&self.unavailable, self.ok) {
            (Some(why), _) => format!("could not run: {}", why.lines().next().unwrap_or("")),
            (None, Some(true)) => "ok".to_owned(),
            (None, _) if !self.leaked.is_empty() => {
                format!("{} leaked ({})", self.leaked.len(), self.failing_checks())
            }
            (None, _) => format!("fails: {}", self.failing_checks()),
        }
    }
}

/// The `storedisk verify` command line of one run (the verifier library's own inputs are
/// `storedisk_verifier::VerifyInputs`; this is the harness running the binary, as a user does).
pub struct VerifyCommand<'a> {
    pub storedisk: &'a Path,
    pub nix: &'a Nix,
    /// The store disk's images: one, or every layer of a layered one.
    pub images: &'a [String],
    pub closure_file: &'a Path,
    /// The runner to check for overlap; `None` checks the image alone.
    pub runner: Option<&'a str>,
}

/// Runs `storedisk verify ... --json` and keeps its [`Verdict`].
pub fn verdict(inputs: &VerifyCommand<'_>) -> Result<Verdict> {
    let mut cmd = Cmd::new(inputs.storedisk)
        .arg("verify")
        .args(inputs.images)
        .arg("--closure")
        .arg(inputs.closure_file)
        .arg("--json");
    for image in inputs.images {
        cmd = cmd.args(["--image-path", image]);
    }
    if let Some(runner) = inputs.runner {
        cmd = cmd.args(["--runner", runner]);
    }
    let finished = cmd
        .env("PATH", path_with(&inputs.nix.bin_dir))
        .env("NIX_CONFIG", NIX_CONFIG)
        .timeout(Duration::from_secs(900))
        .run_unchecked()?;
    let code = finished.status.and_then(|s| s.code());
    if !matches!(code, Some(0 | 1)) {
        return Ok(Verdict::unavailable(format!(
            "`{}` {}: {}",
            finished.display,
            finished.outcome(),
            finished.stderr.trim()
        )));
    }
    match serde_json::from_str::<Report>(&finished.stdout) {
        Ok(report) => Ok(verdict_from_report(&report)),
        Err(e) => Ok(Verdict::unavailable(format!(
            "`{}` printed no report of the verifier's schema ({e}): {}",
            finished.display,
            crate::cmd::tail_lines(&finished.stdout, 5)
        ))),
    }
}

/// The parts of a `storedisk verify --json` report the harness keeps.
pub fn verdict_from_report(report: &Report) -> Verdict {
    let c = &report.checks;
    let checks = c
        .statuses()
        .iter()
        .map(|(name, ok, _)| (name.as_str(), *ok))
        .collect();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    Verdict {
        ok: Some(report.ok),
        checks,
        leaked: sorted(
            c.runner_overlap
                .paths
                .iter()
                .map(|p| p.path.clone())
                .collect(),
        ),
        shared: sorted(c.runner_overlap.shared.clone()),
        packed_paths: report.paths.len(),
        duplicated_bytes: c.runner_overlap.duplicated_bytes,
        unavailable: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_verifiers_own_schema() {
        let report = serde_json::json!({
            "ok": false, "findings": 2, "format": "erofs", "image": "/nix/store/i-disk",
            "paths": [
                {"path": "/nix/store/b-bb", "nar_size": 1, "nar_hash": "sha256:x"},
                {"path": "/nix/store/a-aa", "nar_size": 1, "nar_hash": "sha256:y"}
            ],
            "checks": {
                "complete": {"ok": true, "closure_source": "file", "closure_paths": 2, "missing": [], "extra": []},
                "integrity": {"ok": true, "checked": 2, "mismatched": [], "invalid_entries": [], "unchecked": []},
                "self_contained": {"ok": true, "image_path": "/nix/store/i-disk", "references": [],
                                   "would_reference": [], "would_reference_count": 0},
                "runner_overlap": {"ok": false, "runner": "/nix/store/r-run", "runner_closure_paths": 5,
                    "guest_roots": [], "duplicated_bytes": 300, "shared_bytes": 7,
                    "shared": ["/nix/store/s-busybox"],
                    "paths": [
                        {"path": "/nix/store/l6-nixos-system-large", "nar_size": 100, "chain": [], "where": null},
                        {"path": "/nix/store/6z-closure-info", "nar_size": 200, "chain": [],
                         "where": {"file": "bin/run", "line": 3}}
                    ]},
                "policy": {"ok": null, "why": "no allow globs", "allow": [], "violations": []}
            }
        });
        let report: Report = serde_json::from_value(report).unwrap();
        let v = verdict_from_report(&report);
        assert_eq!(v.ok, Some(false));
        assert_eq!(
            v.leaked,
            [
                "/nix/store/6z-closure-info",
                "/nix/store/l6-nixos-system-large"
            ]
        );
        assert_eq!(v.shared, ["/nix/store/s-busybox"]);
        assert_eq!(v.packed_paths, 2);
        assert_eq!(v.duplicated_bytes, 300);
        assert_eq!(v.checks["policy"], None);
        assert_eq!(v.summary(), "2 leaked (runner_overlap)");
    }

    #[test]
    fn a_report_of_another_shape_is_not_a_verdict() {
        assert!(serde_json::from_str::<Report>(r#"{"ok": true}"#).is_err());
    }
}
