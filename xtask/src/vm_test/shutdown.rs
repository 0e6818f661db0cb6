//! `microvm-shutdown`, tried for real: boots the runner built with `storedisk.hold` (its guest
//! stays up after its result line), waits for that line, runs the runner's own
//! `bin/microvm-shutdown` (ctrl-alt-del over the QMP socket, as microvm.nix's) and checks that
//! QEMU then ends by itself, soon.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use super::boot::{parse_result_line, Accel};
use crate::cmd::Cmd;

/// How long QEMU may take to end once microvm-shutdown ran.
const STOP_WITHIN: Duration = Duration::from_secs(60);

/// What the shutdown test showed.
#[derive(Debug, Clone, Serialize)]
pub struct ShutdownOutcome {
    pub ok: bool,
    /// Seconds from starting the runner to the guest's result line.
    pub boot_seconds: f64,
    /// Seconds from running microvm-shutdown to QEMU's end.
    pub stop_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub log: String,
}

pub fn check(
    runner: &Path,
    accel: Accel,
    logs: &Path,
    boot_timeout: Duration,
) -> Result<ShutdownOutcome> {
    let log = logs.join("shutdown.log");
    let state_dir = logs.join("state/shutdown");
    std::fs::create_dir_all(&state_dir)?;
    let _ = std::fs::remove_file(&log);
    let qemu_timeout = boot_timeout + STOP_WITHIN;
    let started = Instant::now();
    std::thread::scope(|scope| {
        let qemu = scope.spawn(|| {
            let finished = Cmd::new(runner.join("bin/microvm-run"))
                .envs(accel.env())
                .current_dir(&state_dir)
                .log_file(&log)
                .timeout(qemu_timeout)
                .run_unchecked();
            (finished, Instant::now())
        });
        let mut booted = None;
        while started.elapsed() < boot_timeout && !qemu.is_finished() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if parse_result_line(&text).is_some() {
                booted = Some(started.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let shutdown_at = Instant::now();
        let shutdown = booted.map(|_| {
            Cmd::new(runner.join("bin/microvm-shutdown"))
                .current_dir(&state_dir)
                .timeout(STOP_WITHIN)
                .run_unchecked()
        });
        let (finished, ended_at) = qemu
            .join()
            .map_err(|_| anyhow::anyhow!("the QEMU thread panicked"))?;
        let finished = finished?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let guest_ok = parse_result_line(&text).and_then(|r| r.get("ok").and_then(|v| v.as_bool()))
            == Some(true);
        let stop = booted.map(|_| ended_at.saturating_duration_since(shutdown_at));
        let error = match (booted, &shutdown) {
            (None, _) => Some(format!(
                "no STOREDISK-RESULT line within {}s; QEMU {}",
                boot_timeout.as_secs(),
                finished.outcome()
            )),
            _ if !guest_ok => Some("the guest reported a failure before the shutdown".to_owned()),
            (_, Some(Err(e))) => Some(format!("microvm-shutdown could not run: {e:#}")),
            (_, Some(Ok(s))) if !s.success() => Some(format!(
                "microvm-shutdown {}: {}",
                s.outcome(),
                s.stderr.trim()
            )),
            _ if finished.timed_out() => Some(format!(
                "QEMU was still running {}s after microvm-shutdown",
                STOP_WITHIN.as_secs()
            )),
            _ if stop.is_some_and(|s| s > STOP_WITHIN) => Some(format!(
                "QEMU ended {:.0}s after microvm-shutdown",
                stop.map_or(0.0, |s| s.as_secs_f64())
            )),
            _ => None,
        };
        if let Some(error) = &error {
            eprintln!(
                "shutdown test FAILED: {error}\n--- last lines of {} ---\n{}",
                log.display(),
                crate::cmd::tail_lines(&text, 20)
            );
        }
        let round = |d: Duration| (d.as_secs_f64() * 10.0).round() / 10.0;
        Ok(ShutdownOutcome {
            ok: error.is_none(),
            boot_seconds: booted.map_or(0.0, round),
            stop_seconds: stop.map(round),
            error,
            log: log.display().to_string(),
        })
    })
}
