//! `storedisk closure_info` (placeholder until its issue lands).

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ClosureInfoArgs {}

pub fn run(_args: ClosureInfoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
