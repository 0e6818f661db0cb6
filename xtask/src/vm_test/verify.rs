//! The verifier's verdict on one run: `storedisk verify IMAGE --closure ... --image-path ...
//! --runner RUNNER --json`, of which the harness keeps the checks' results and the leaked set
//! (`runner_overlap`: paths the runner copies only because of a guest reference).

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

use crate::cmd::Cmd;
use crate::tools::{path_with, Nix, NIX_CONFIG};

/// What the harness keeps of a verify run.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// `true`/`false`: the verifier's overall verdict; `None`: it could not give one.
    pub ok: Option<bool>,
    /// Each check's `ok` (true, false or null).
    pub checks: serde_json::Map<String, Value>,
    /// Leaked paths (hash-redacted), from `checks.runner_overlap.paths`.
    pub leaked: Option<Vec<String>>,
    pub duplicated_bytes: Option<u64>,
    /// Why there is no verdict (verifier missing or failing to run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

impl Verdict {
    /// The names of the checks that reported `false`, comma-separated.
    fn failing_checks(&self) -> String {
        self.checks
            .iter()
            .filter(|(_, v)| v.as_bool() == Some(false))
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The verifier said it cannot run because its subcommand is still a placeholder.
    pub fn not_implemented(&self) -> bool {
        self.unavailable
            .as_deref()
            .is_some_and(|u| u.contains("not implemented"))
    }

    /// A short text for tables.
    pub fn summary(&self) -> String {
        match (&self.unavailable, self.ok, &self.leaked) {
            (Some(_), _, _) if self.not_implemented() => {
                "n/a (verify not implemented yet)".to_owned()
            }
            (Some(why), _, _) => format!("could not run: {}", why.lines().next().unwrap_or("")),
            (None, Some(true), _) => "ok".to_owned(),
            (None, _, Some(leaked)) if !leaked.is_empty() => {
                format!("{} leaked ({})", leaked.len(), self.failing_checks())
            }
            (None, _, _) => format!("fails: {}", self.failing_checks()),
        }
    }
}

pub struct VerifyInputs<'a> {
    pub storedisk: &'a Path,
    pub nix: &'a Nix,
    pub image: &'a str,
    pub closure_file: &'a Path,
    pub runner: &'a str,
}

pub fn verify(inputs: &VerifyInputs<'_>) -> Result<Verdict> {
    let finished = Cmd::new(inputs.storedisk)
        .arg("verify")
        .arg(inputs.image)
        .arg("--closure")
        .arg(inputs.closure_file)
        .args([
            "--image-path",
            inputs.image,
            "--runner",
            inputs.runner,
            "--json",
        ])
        .env("PATH", path_with(&inputs.nix.bin_dir))
        .env("NIX_CONFIG", NIX_CONFIG)
        .timeout(Duration::from_secs(900))
        .run_unchecked()?;
    let code = finished.status.and_then(|s| s.code());
    if !matches!(code, Some(0 | 1)) {
        return Ok(Verdict {
            ok: None,
            checks: Default::default(),
            leaked: None,
            duplicated_bytes: None,
            unavailable: Some(format!(
                "`{}` {}: {}",
                finished.display,
                finished.outcome(),
                finished.stderr.trim()
            )),
        });
    }
    let report: Value = serde_json::from_str(&finished.stdout).map_err(|e| {
        anyhow::anyhow!(
            "`{}` printed no JSON report ({e}): {}",
            finished.display,
            crate::cmd::tail_lines(&finished.stdout, 5)
        )
    })?;
    Ok(verdict_from_report(&report))
}

/// Reads the parts of a `storedisk verify --json` report the harness keeps.
pub fn verdict_from_report(report: &Value) -> Verdict {
    let checks_value = report
        .get("checks")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let checks = checks_value
        .iter()
        .map(|(k, v)| (k.clone(), v.get("ok").cloned().unwrap_or(Value::Null)))
        .collect();
    let overlap = checks_value.get("runner_overlap");
    let leaked = overlap
        .and_then(|o| o.get("paths"))
        .and_then(Value::as_array)
        .map(|paths| {
            let mut names: Vec<String> = paths
                .iter()
                .filter_map(|p| p.get("path").and_then(Value::as_str))
                .map(super::transfer::redact)
                .collect();
            names.sort();
            names
        });
    Verdict {
        ok: report.get("ok").and_then(Value::as_bool),
        checks,
        leaked,
        duplicated_bytes: overlap
            .and_then(|o| o.get("duplicated_bytes"))
            .and_then(Value::as_u64),
        unavailable: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_leaked_set() {
        let report = serde_json::json!({
            "ok": false,
            "checks": {
                "complete": {"ok": true},
                "self_contained": {"ok": true},
                "runner_overlap": {"ok": false, "duplicated_bytes": 300, "paths": [
                    {"path": "/nix/store/l6n4d8r98v80dym5d2hjq5g6x3abax1h-nixos-system-large", "nar_size": 100, "chain": []},
                    {"path": "/nix/store/6zd6v57skds92hbvv670gd6rnz2wckwg-closure-info", "nar_size": 200, "chain": []}
                ]},
                "policy": {"ok": null, "why": "no --allow"}
            }
        });
        let v = verdict_from_report(&report);
        assert_eq!(v.ok, Some(false));
        assert_eq!(
            v.leaked.as_deref().unwrap(),
            ["closure-info", "nixos-system-large"]
        );
        assert_eq!(v.duplicated_bytes, Some(300));
        assert_eq!(v.checks["policy"], Value::Null);
        assert_eq!(v.summary(), "2 leaked (runner_overlap)");
    }
}
