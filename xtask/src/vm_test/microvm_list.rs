//! `microvm -l`, kept working: for each host variant, the host system's own install script
//! (as `install-microvm-<name>.service` runs it) sets up a VM state directory, and the fixture's
//! `microvm-list` (microvm.nix's `microvm -l` comparison, pkgs/microvm-command.nix:170-208) says
//! whether the deployed runner's `share/microvm/system` names the newest toplevel: after version 1
//! is installed, after version 2 is built but not installed, and after version 2 is installed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use storedisk_verifier::ImageFormat;

use super::plan::{RunKind, Variant};
use super::Run;
use crate::cmd::Cmd;

/// What `microvm -l` says of one VM: `current` or `outdated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListState {
    Current,
    Outdated,
}

/// The three moments of an update, as `microvm -l` sees them.
#[derive(Debug, Clone, Serialize)]
pub struct ListCheck {
    pub scenario: String,
    pub format: ImageFormat,
    pub variant: Variant,
    pub v1_installed: ListState,
    pub v2_built: ListState,
    pub v2_installed: ListState,
}

impl ListCheck {
    /// What a working `microvm -l` says: current, outdated, current.
    pub fn works(&self) -> bool {
        (self.v1_installed, self.v2_built, self.v2_installed)
            == (ListState::Current, ListState::Outdated, ListState::Current)
    }

    pub fn text(&self) -> String {
        let name = |s: ListState| match s {
            ListState::Current => "current",
            ListState::Outdated => "outdated",
        };
        format!(
            "{} / {} / {}",
            name(self.v1_installed),
            name(self.v2_built),
            name(self.v2_installed)
        )
    }
}

/// Reads `microvm-list`'s line for `name`.
pub fn parse_state(output: &str, name: &str) -> Result<ListState> {
    let line = output
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(": ")))
        .with_context(|| format!("microvm-list printed no line for {name}: {output:?}"))?;
    if line.starts_with("current(") {
        Ok(ListState::Current)
    } else if line.starts_with("outdated(") {
        Ok(ListState::Outdated)
    } else {
        anyhow::bail!("microvm-list's line for {name} is neither current nor outdated: {line:?}")
    }
}

/// Runs the check for every `host` entry whose version 2 (the `update` entry of the same format
/// and variant) was selected too.
pub fn check_all(runs: &[Run], microvm_list: &Path, work: &Path) -> Result<Vec<ListCheck>> {
    let v2: BTreeMap<(ImageFormat, Variant), &Run> = runs
        .iter()
        .filter(|r| r.plan.kind == RunKind::Update)
        .map(|r| ((r.plan.format, r.plan.variant), r))
        .collect();
    let mut checks = Vec::new();
    for v1 in runs.iter().filter(|r| r.plan.kind == RunKind::Host) {
        let Some(v2) = v2.get(&(v1.plan.format, v1.plan.variant)) else {
            eprintln!(
                "microvm -l: {} not tried (its version 2 is not selected)",
                v1.label()
            );
            continue;
        };
        let name = &v1.plan.scenario;
        let state_dir = work
            .join("microvm-state")
            .join(format!("{}-{}", v1.plan.format, v1.plan.variant));
        if state_dir.exists() {
            std::fs::remove_dir_all(&state_dir)
                .with_context(|| format!("clearing {}", state_dir.display()))?;
        }
        std::fs::create_dir_all(&state_dir)?;
        let install = |host_system: &str| -> Result<()> {
            Cmd::new(Path::new(host_system).join(format!("bin/install-microvm-{name}")))
                .env("MICROVM_STATE_DIR", &state_dir)
                .timeout(Duration::from_secs(60))
                .quiet()
                .run()?;
            Ok(())
        };
        let list = || -> Result<ListState> {
            let output = Cmd::new(microvm_list)
                .env("MICROVM_STATE_DIR", &state_dir)
                .timeout(Duration::from_secs(60))
                .quiet()
                .read()?;
            parse_state(&output, name)
        };
        install(&v1.plan.host_system)?;
        let v1_installed = list()?;
        // Version 2 built, not installed yet: the `toplevel` a rebuilt host (or a flake) names.
        let toplevel_link = state_dir.join(name).join("toplevel");
        std::fs::remove_file(&toplevel_link)
            .with_context(|| format!("removing {}", toplevel_link.display()))?;
        std::os::unix::fs::symlink(&v2.plan.toplevel, &toplevel_link)?;
        let v2_built = list()?;
        install(&v2.plan.host_system)?;
        let v2_installed = list()?;
        let check = ListCheck {
            scenario: v1.plan.scenario.clone(),
            format: v1.plan.format,
            variant: v1.plan.variant,
            v1_installed,
            v2_built,
            v2_installed,
        };
        eprintln!("[microvm -l] {}: {}", v1.label(), check.text());
        checks.push(check);
    }
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_list_line_of_the_vm() {
        let out = "other: current(x)\nminimal: outdated(nixos-system-minimal), rebuild(nixos-system-minimal-v2)\n";
        assert_eq!(parse_state(out, "minimal").unwrap(), ListState::Outdated);
        assert_eq!(
            parse_state("minimal: current(nixos-system-minimal)", "minimal").unwrap(),
            ListState::Current
        );
        assert!(parse_state("minimal: stale(x)", "minimal").is_err());
        assert!(parse_state("", "minimal").is_err());
    }
}
