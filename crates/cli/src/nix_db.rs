//! Asking the local Nix database (`nix path-info --json`), with a timeout: the one place the
//! `storedisk` binary starts Nix. The verifier library takes its answers as data (closures,
//! references) and never runs a process.

use std::collections::BTreeSet;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use storedisk_nix::{Closure, StoreDir, StorePath};

use anyhow::{anyhow, Result};

/// Runs `nix path-info --json [--recursive] PATHS...` and returns its standard output.
/// How long `nix path-info` may take: a stuck Nix (a locked database, a hung daemon) must not
/// hang a CI gate.
const NIX_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `cmd` to completion like `Command::output`, killing it past `timeout`.
fn output_within(mut cmd: Command, timeout: Duration) -> std::io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let stdout = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(pipe) = out.as_mut() {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    });
    let stderr = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(pipe) = err.as_mut() {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer after {} s", timeout.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn path_info_json(nix: &str, paths: &[String], recursive: bool) -> Result<String> {
    let mut cmd = Command::new(nix);
    cmd.args([
        "--extra-experimental-features",
        "nix-command",
        "path-info",
        "--json",
    ]);
    if recursive {
        cmd.arg("--recursive");
    }
    cmd.arg("--").args(paths);
    let output = output_within(cmd, NIX_TIMEOUT)
        .map_err(|e| anyhow!("cannot run {nix}: {e} (is Nix installed and on PATH?)"))?;
    if !output.status.success() {
        return Err(anyhow!(
            "`{nix} path-info --json{} {}` failed: {}",
            if recursive { " --recursive" } else { "" },
            paths.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    String::from_utf8(output.stdout).map_err(|_| anyhow!("nix path-info printed invalid UTF-8"))
}

/// The closure of `paths` as the Nix database records it.
pub fn query_closure(nix: &str, paths: &[String], store_dir: &StoreDir) -> Result<Closure> {
    let text = path_info_json(nix, paths, true)?;
    Ok(Closure::from_json(&text, None, store_dir)?)
}

/// The references the Nix database records for one path (which must be valid).
pub fn query_references(
    nix: &str,
    path: &str,
    store_dir: &StoreDir,
) -> Result<BTreeSet<StorePath>> {
    let text = path_info_json(nix, &[path.to_owned()], false)?;
    references_from_path_info(&text, path, store_dir)
}

/// Picks `path`'s references out of either `nix path-info --json` shape (an array of objects
/// with `path`, or an object keyed by path).
pub fn references_from_path_info(
    text: &str,
    path: &str,
    store_dir: &StoreDir,
) -> Result<BTreeSet<StorePath>> {
    let bad = |why: &str| anyhow!("unexpected nix path-info output for {path}: {why}");
    let value: Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
    let info = match &value {
        Value::Array(items) => items
            .iter()
            .find(|i| i.get("path").and_then(Value::as_str) == Some(path)),
        Value::Object(map) => map.get(path),
        _ => None,
    }
    .filter(|v| v.is_object())
    .ok_or_else(|| bad("the path is missing or not valid"))?;
    let mut refs = BTreeSet::new();
    for r in info
        .get("references")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let text = r
            .as_str()
            .ok_or_else(|| bad("a reference is not a string"))?;
        refs.insert(
            store_dir
                .parse_path_or_base_name(text)
                .map_err(|e| bad(&e.to_string()))?,
        );
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-image";
    const R: &str = "/nix/store/1b2c3d4f5g6h7i8j9k0l1m2n3p4q5r6s-glibc";

    #[test]
    fn reads_both_path_info_shapes() {
        let store = StoreDir::default();
        let new = format!(r#"{{"{P}": {{"references": ["{R}"], "narSize": 1}}}}"#);
        let old = format!(r#"[{{"path": "{P}", "references": ["{R}"]}}]"#);
        for text in [new, old] {
            let refs = references_from_path_info(&text, P, &store).unwrap();
            assert_eq!(refs.len(), 1);
            assert_eq!(store.display(refs.iter().next().unwrap()), R);
        }
        assert!(references_from_path_info(&format!(r#"{{"{P}": null}}"#), P, &store).is_err());
    }
}
