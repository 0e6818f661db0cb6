//! Booting: picks the accelerator (a short KVM probe, else TCG), runs a runner's own
//! `bin/microvm-run` under a timeout with the serial console logged to a file, and reads the
//! guest's `STOREDISK-RESULT {...}` line.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::cmd::Cmd;

/// `--accel`
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM when the probe boots a kernel with it, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// How the runner is told to run QEMU (through its MICROVM_ACCEL / MICROVM_CPU variables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn env(self) -> [(&'static str, &'static str); 2] {
        match self {
            Accel::Kvm => [("MICROVM_ACCEL", "kvm"), ("MICROVM_CPU", "host")],
            Accel::Tcg => [("MICROVM_ACCEL", "tcg"), ("MICROVM_CPU", "max")],
        }
    }
}

/// Resolves `--accel auto` by booting the kernel with KVM for a few seconds: it must reach the
/// kernel's own output (on some hosts /dev/kvm exists but the guest hangs in the decompressor).
pub fn choose_accel(
    choice: AccelChoice,
    qemu: &Path,
    vmlinuz: &Path,
    log_dir: &Path,
) -> Result<Accel> {
    match choice {
        AccelChoice::Kvm => return Ok(Accel::Kvm),
        AccelChoice::Tcg => return Ok(Accel::Tcg),
        AccelChoice::Auto => {}
    }
    let kvm_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm_usable {
        eprintln!("accel: /dev/kvm is not usable, using TCG");
        return Ok(Accel::Tcg);
    }
    let log = log_dir.join("kvm-probe.log");
    let probe = Cmd::new(qemu)
        .args([
            "-M",
            "microvm",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
        ])
        .args([
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-kernel",
        ])
        .arg(vmlinuz)
        .args([
            "-append",
            "console=ttyS0 panic=-1 rdinit=/storedisk-kvm-probe",
        ])
        .log_file(&log)
        .timeout(Duration::from_secs(20))
        .run_unchecked()?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // With no initrd the kernel panics (no root) and panic=-1 + -no-reboot ends QEMU.
    if !probe.timed_out() && text.contains("Linux version") {
        eprintln!("accel: KVM boots a kernel here, using it");
        Ok(Accel::Kvm)
    } else {
        eprintln!(
            "accel: KVM probe {} without kernel output (log {}), using TCG",
            probe.outcome(),
            log.display()
        );
        Ok(Accel::Tcg)
    }
}

/// What one boot showed.
#[derive(Debug, Clone, Serialize)]
pub struct BootOutcome {
    pub ok: bool,
    pub seconds: f64,
    /// The guest's result line, parsed.
    pub result: Option<serde_json::Value>,
    /// Why the boot counts as failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub log: String,
    pub attempts: u32,
}

/// Runs `runner/bin/microvm-run` and judges the boot. A boot that hangs before the guest says
/// anything (seen under TCG: the kernel stalls calibrating its clock) is tried once more; the
/// first log is kept next to the second and the attempt count recorded. The runner runs in
/// `state_dir` (created), where it puts its control socket, as microvm@.service runs it in the
/// VM's state directory. A boot that cannot even start (no state directory, no runner) is a
/// failed outcome too, with the reason as its `error`: one machine's failure is that run's, and
/// the report is still written.
pub fn boot(
    runner: &Path,
    accel: Accel,
    log: &Path,
    state_dir: &Path,
    timeout: Duration,
) -> BootOutcome {
    try_boot(runner, accel, log, state_dir, timeout).unwrap_or_else(|e| BootOutcome {
        ok: false,
        seconds: 0.0,
        result: None,
        error: Some(format!("{e:#}")),
        log: log.display().to_string(),
        attempts: 1,
    })
}

fn try_boot(
    runner: &Path,
    accel: Accel,
    log: &Path,
    state_dir: &Path,
    timeout: Duration,
) -> Result<BootOutcome> {
    std::fs::create_dir_all(state_dir)?;
    let boot_once = |log: &Path| boot_once(runner, accel, log, state_dir, timeout);
    let mut outcome = boot_once(log)?;
    if !outcome.ok && outcome.result.is_none() {
        let first = log.with_extension("attempt1.log");
        let _ = std::fs::rename(log, &first);
        eprintln!(
            "boot: no result from {} (log kept at {}); trying once more",
            runner.display(),
            first.display()
        );
        outcome = boot_once(log)?;
        outcome.attempts = 2;
    }
    Ok(outcome)
}

fn boot_once(
    runner: &Path,
    accel: Accel,
    log: &Path,
    state_dir: &Path,
    timeout: Duration,
) -> Result<BootOutcome> {
    let finished = Cmd::new(runner.join("bin/microvm-run"))
        .envs(accel.env())
        .current_dir(state_dir)
        .log_file(log)
        .timeout(timeout)
        .run_unchecked()?;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let result = parse_result_line(&text);
    let guest_ok = result
        .as_ref()
        .and_then(|r| r.get("ok"))
        .and_then(|v| v.as_bool())
        == Some(true);
    let error = if !guest_ok {
        Some(match &result {
            Some(r) => format!("guest reported failure: {r}"),
            None => format!("no STOREDISK-RESULT line; QEMU {}", finished.outcome()),
        })
    } else if !finished.success() {
        Some(format!(
            "guest passed but QEMU {} (no clean power-off)",
            finished.outcome()
        ))
    } else {
        None
    };
    if let Some(error) = &error {
        eprintln!(
            "boot FAILED: {error}\n--- last lines of the serial log {} ---\n{}",
            log.display(),
            crate::cmd::tail_lines(&text, 30)
        );
    }
    Ok(BootOutcome {
        ok: error.is_none(),
        seconds: (finished.elapsed.as_secs_f64() * 10.0).round() / 10.0,
        result,
        error,
        log: log.display().to_string(),
        attempts: 1,
    })
}

/// The JSON after the last `STOREDISK-RESULT ` marker in a serial log.
pub fn parse_result_line(log: &str) -> Option<serde_json::Value> {
    log.lines()
        .filter_map(|line| {
            line.split_once("STOREDISK-RESULT ")
                .map(|(_, json)| json.trim())
        })
        .filter_map(|json| serde_json::from_str(json).ok())
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_that_cannot_start_is_a_failed_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let outcome = boot(
            &dir.path().join("no-runner"),
            Accel::Tcg,
            &dir.path().join("boot.log"),
            &dir.path().join("state"),
            Duration::from_secs(5),
        );
        assert!(!outcome.ok);
        assert_eq!(outcome.result, None);
        let error = outcome.error.unwrap_or_default();
        assert!(error.contains("no-runner/bin/microvm-run"), "{error}");
    }

    #[test]
    fn result_line_is_found_among_kernel_noise() {
        let log = "[    1.0] Linux version 6.12\r\nstage 2: ok\r\nSTOREDISK-RESULT {\"ok\":true,\"files_checked\":3}\r\n[    2.0] reboot: Power down\r\n";
        let r = parse_result_line(log).unwrap();
        assert_eq!(r["ok"], true);
        assert_eq!(r["files_checked"], 3);
        assert!(parse_result_line("STOREDISK-RESULT {not json").is_none());
        assert!(parse_result_line("nothing").is_none());
    }
}
