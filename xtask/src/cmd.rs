//! The one way xtask runs an external program: every command line is logged, timed, bounded by a
//! timeout (its whole process group is killed on expiry) and its output captured, so that a failure
//! reports what ran, how long it took and the tail of what it printed.
//!
//! Command lines are built with [`Cmd::new`] and `.arg(..)`, or, where a line reads best as
//! shell, the matklad way with xshell's `cmd!` (`cmd!(sh, "apt-get install {packages...}")`,
//! setup.rs) converted by `Cmd::from`: xshell quotes and splits arguments safely, [`Cmd`] adds
//! what xshell lacks (timeouts that kill the process group, logs, timing). Nothing else in
//! xtask starts a process (`xtask/tests/tidy.rs` checks it).

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How many lines of output an error message shows.
const TAIL_LINES: usize = 40;

/// An external command, built up and then run once through [`Cmd::run`] or [`Cmd::run_unchecked`].
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    timeout: Duration,
    stdin: Option<Vec<u8>>,
    log_file: Option<PathBuf>,
    quiet: bool,
    inherit_output: bool,
}

/// What a finished (or killed) command left behind.
#[derive(Debug)]
pub struct Finished {
    /// `None` when the command was killed because it ran past its timeout.
    pub status: Option<ExitStatus>,
    /// Standard output as text (invalid UTF-8 replaced: see [`Finished::stdout_bytes`]).
    pub stdout: String,
    pub stderr: String,
    /// Standard output as it came, kept only when it is not valid UTF-8 (a decompressor's).
    stdout_raw: Option<Vec<u8>>,
    pub elapsed: Duration,
    /// The command line, for messages.
    pub display: String,
    /// Where stdout and stderr went instead of memory, if the command had a log file.
    pub log_file: Option<PathBuf>,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }

    /// Standard output byte for byte, binary or not.
    pub fn stdout_bytes(&self) -> &[u8] {
        self.stdout_raw.as_deref().unwrap_or(self.stdout.as_bytes())
    }

    /// The last lines of everything the command printed (or wrote to its log file).
    pub fn tail(&self) -> String {
        let text = match &self.log_file {
            Some(path) => {
                String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
            }
            None => format!("{}{}", self.stdout, self.stderr),
        };
        tail_lines(&text, TAIL_LINES)
    }

    /// One line saying how the command ended.
    pub fn outcome(&self) -> String {
        match self.status {
            None => format!("timed out after {:.0?}", self.elapsed),
            Some(status) => match status.code() {
                Some(code) => format!("exited with status {code} after {:.1?}", self.elapsed),
                None => format!(
                    "was killed by a signal ({status}) after {:.1?}",
                    self.elapsed
                ),
            },
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl From<xshell::Cmd<'_>> for Cmd {
    fn from(cmd: xshell::Cmd<'_>) -> Cmd {
        let command: Command = cmd.into();
        let mut out = Cmd::new(command.get_program()).args(command.get_args());
        for (key, value) in command.get_envs() {
            if let Some(value) = value {
                out = out.env(key, value);
            }
        }
        if let Some(dir) = command.get_current_dir() {
            out = out.current_dir(dir);
        }
        out
    }
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            cwd: None,
            timeout: Duration::from_secs(600),
            stdin: None,
            log_file: None,
            quiet: false,
            inherit_output: false,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Cmd {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn envs<I, K, V>(mut self, vars: I) -> Cmd
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Cmd {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Cmd {
        self.timeout = timeout;
        self
    }

    /// Send stdout and stderr to this file (created or truncated) instead of capturing them.
    pub fn log_file(mut self, path: impl AsRef<Path>) -> Cmd {
        self.log_file = Some(path.as_ref().to_owned());
        self
    }

    /// Let the command print straight to this process's stdout and stderr (a test run whose
    /// output a person or CI reads as it comes); nothing is captured.
    pub fn inherit_output(mut self) -> Cmd {
        self.inherit_output = true;
        self
    }

    /// Do not log the command line (for probes whose failure is an expected answer).
    pub fn quiet(mut self) -> Cmd {
        self.quiet = true;
        self
    }

    /// The command line as a shell would read it.
    pub fn display(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.envs {
            // Long values (NIX_CONFIG) would drown the line; the name says enough.
            let v = v.to_string_lossy();
            if v.len() <= 40 && !v.contains('\n') {
                let _ = write!(out, "{}={} ", k.to_string_lossy(), shell_quote(&v));
            }
        }
        out.push_str(&shell_quote(&self.program.to_string_lossy()));
        for arg in &self.args {
            out.push(' ');
            out.push_str(&shell_quote(&arg.to_string_lossy()));
        }
        out
    }

    /// Runs the command; any exit other than success (or a timeout) is an error carrying the
    /// command line and the tail of its output.
    pub fn run(&self) -> Result<Finished> {
        let finished = self.run_unchecked()?;
        if !finished.success() {
            bail!(
                "command failed: `{}` {}\n--- last lines of its output ---\n{}",
                finished.display,
                finished.outcome(),
                finished.tail()
            );
        }
        Ok(finished)
    }

    /// Runs the command and returns its stdout, trimmed.
    pub fn read(&self) -> Result<String> {
        Ok(self.run()?.stdout.trim().to_owned())
    }

    /// Runs the command and returns its stdout byte for byte (a decompressor's output).
    pub fn read_bytes(&self) -> Result<Vec<u8>> {
        let finished = self.run()?;
        Ok(finished.stdout_bytes().to_vec())
    }

    /// Runs the command; only a failure to start it is an error. Non-zero exits and timeouts are
    /// reported in the returned [`Finished`].
    pub fn run_unchecked(&self) -> Result<Finished> {
        let display = self.display();
        if !self.quiet {
            eprintln!("$ {display}");
        }
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        // Its own process group, so that a timeout kills the children too (nix-build's builders,
        // the hypervisor under a runner script).
        command.process_group(0);
        command.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        match &self.log_file {
            _ if self.inherit_output => {
                command.stdout(Stdio::inherit()).stderr(Stdio::inherit());
            }
            Some(path) => {
                let file = File::create(path)
                    .with_context(|| format!("creating log file {}", path.display()))?;
                command.stdout(file.try_clone()?).stderr(file);
            }
            None => {
                command.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
        }
        let start = Instant::now();
        let mut child = command.spawn().with_context(|| {
            format!(
                "could not start `{display}` (is {} installed? try `cargo xtask setup`)",
                self.program.to_string_lossy()
            )
        })?;
        if let Some(bytes) = &self.stdin {
            let mut stdin = child.stdin.take().context("stdin pipe")?;
            let bytes = bytes.clone();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&bytes);
            });
        }
        let stdout = child.stdout.take().map(spawn_reader);
        let stderr = child.stderr.take().map(spawn_reader);
        let status = wait_with_timeout(&mut child, self.timeout)?;
        let elapsed = start.elapsed();
        let collect = |h: Option<JoinHandle<Vec<u8>>>| {
            h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
        };
        // Text keeps the bytes it was made of; only output that is not UTF-8 is kept twice.
        let (stdout, stdout_raw) = match String::from_utf8(collect(stdout)) {
            Ok(text) => (text, None),
            Err(e) => (
                String::from_utf8_lossy(e.as_bytes()).into_owned(),
                Some(e.into_bytes()),
            ),
        };
        let finished = Finished {
            status,
            stdout,
            stdout_raw,
            stderr: String::from_utf8_lossy(&collect(stderr)).into_owned(),
            elapsed,
            display,
            log_file: self.log_file.clone(),
        };
        if !self.quiet {
            if finished.success() {
                eprintln!("  ok in {:.1?}", finished.elapsed);
            } else {
                eprintln!("  {}", finished.outcome());
            }
        }
        Ok(finished)
    }
}

fn spawn_reader(mut source: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = source.read_to_end(&mut buf);
        buf
    })
}

/// Waits for `child`; past `timeout` kills its process group and returns `None`. It polls
/// at 1% of the time waited so far (1 to 25 ms), so the bench's wall times, taken around this
/// wait, are late by at most 1% or 1 ms (a fixed 25 ms was 15% of a 0.15 s verify).
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            kill_group(child);
            child.wait()?;
            return Ok(None);
        }
        let poll =
            (start.elapsed() / 100).clamp(Duration::from_millis(1), Duration::from_millis(25));
        std::thread::sleep(poll);
    }
}

/// Kills the process group led by `child` (it was started with `process_group(0)`).
fn kill_group(child: &mut Child) {
    let group = format!("-{}", child.id());
    let killed = Command::new("kill")
        .args(["-KILL", "--", &group])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !killed {
        let _ = child.kill();
    }
}

/// Quotes `s` for a POSIX shell when it needs quoting.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%^".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let done = Cmd::new("sh")
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .quiet()
            .run_unchecked()
            .unwrap();
        assert_eq!(done.status.and_then(|s| s.code()), Some(3));
        assert_eq!(done.stdout, "out\n");
        assert_eq!(done.stderr, "err\n");
    }

    #[test]
    fn failure_error_names_command_and_tail() {
        let err = Cmd::new("sh")
            .args(["-c", "echo the-reason >&2; exit 1"])
            .quiet()
            .run()
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("sh -c"), "{text}");
        assert!(text.contains("the-reason"), "{text}");
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let start = Instant::now();
        // The grandchild `sleep` must die too, or reading its stdout would block for 30 s.
        let done = Cmd::new("sh")
            .args(["-c", "sleep 30 & sleep 30; echo never"])
            .timeout(Duration::from_millis(300))
            .quiet()
            .run_unchecked()
            .unwrap();
        assert!(done.timed_out());
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(!done.stdout.contains("never"));
    }

    #[test]
    fn stdin_and_log_file() {
        let dir = std::env::temp_dir().join(format!("xtask-cmd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let done = Cmd::new("sh")
            .args(["-c", "echo hello; echo e >&2"])
            .log_file(&log)
            .quiet()
            .run()
            .unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\ne\n");
        assert!(done.tail().contains("hello"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn binary_output_is_kept_byte_for_byte() {
        let bytes = Cmd::new("printf")
            .arg(r"a\377\000b")
            .quiet()
            .read_bytes()
            .unwrap();
        assert_eq!(bytes, b"a\xff\x00b");
        let text = Cmd::new("printf").arg("text").quiet().run().unwrap();
        assert_eq!(text.stdout_bytes(), b"text");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a/b-c"), "a/b-c");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
