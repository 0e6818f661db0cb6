//! `cargo xtask test`: the test suite on a fresh machine. Installs what the tests use as oracles
//! (peers' tools, Nix 2.26, erofs-utils 1.8.6) through `setup` when something is missing, then
//! runs `cargo test --workspace` with the provisioned tools first on `PATH`. Tests that need a
//! tool fail, never skip, without it; this command is how they always have it.

use std::time::Duration;

use anyhow::Result;

use crate::cmd::Cmd;
use crate::setup;
use crate::tools::{self, NIX_CONFIG};

/// `cargo xtask test [-- CARGO TEST ARGS]`
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Arguments passed on to `cargo test` (after `--`), e.g. `-- -p storedisk-verifier`.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

pub fn run(args: TestArgs) -> Result<()> {
    setup::ensure()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    Cmd::new(cargo)
        .args(["test", "--workspace"])
        .args(&args.cargo_args)
        .env("PATH", tools::path_with(&tools::tools_dir().join("bin")))
        .env("NIX_CONFIG", NIX_CONFIG)
        .current_dir(tools::workspace_root())
        .timeout(Duration::from_secs(3600))
        .inherit_output()
        .run()?;
    Ok(())
}
