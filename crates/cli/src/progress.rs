//! Progress on stderr for long steps: a byte-counting bar (or a spinner for steps without a byte
//! count), drawn only when stderr is a terminal, so logs and pipes stay clean.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One progress line on stderr, reused across the phases of a command.
#[derive(Debug)]
pub struct TerminalProgress {
    bar: ProgressBar,
}

impl TerminalProgress {
    /// A progress line on stderr; indicatif draws nothing when stderr is not a terminal.
    pub fn stderr() -> Self {
        TerminalProgress {
            bar: ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
        }
    }

    /// Starts a phase named `name`; `total_bytes` 0 shows a spinner instead of a bar.
    pub fn phase(&self, name: &str, total_bytes: u64) {
        if total_bytes > 0 {
            self.bar.disable_steady_tick();
            self.bar.set_style(
                ProgressStyle::with_template(
                    "{msg:>12} [{bar:32}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            self.bar.set_length(total_bytes);
        } else {
            self.bar.set_style(
                ProgressStyle::with_template("{msg:>12} {spinner} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            self.bar.unset_length();
            self.bar.enable_steady_tick(Duration::from_millis(120));
        }
        self.bar.set_position(0);
        self.bar.set_message(name.to_owned());
    }

    /// `bytes` more of the current phase are done.
    pub fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    /// Removes the line.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl storedisk_builder::ProgressSink for TerminalProgress {
    fn phase(&self, name: &str, total_bytes: u64) {
        TerminalProgress::phase(self, name, total_bytes);
    }

    fn advance(&self, bytes: u64) {
        TerminalProgress::advance(self, bytes);
    }

    fn finish(&self) {
        TerminalProgress::finish(self);
    }
}
