//! `storedisk`: the command-line front end. It parses flags, wires the library crates together,
//! prints results and maps outcomes to exit codes; the logic lives in the libraries.
//!
//! Exit codes, for every subcommand: 0 success, 1 findings (verify), 2 could not run (bad
//! arguments, bad input, I/O).

mod build_cmd;
mod closure_file;
mod closure_info_cmd;
mod layers_cmd;
mod nix_db;
mod progress;
mod verify_cmd;
mod verify_text;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code when a command could not run at all.
pub const EXIT_COULD_NOT_RUN: u8 = 2;
/// Exit code when a check ran and found problems.
pub const EXIT_FINDINGS: u8 = 1;

#[derive(Debug, Parser)]
#[command(name = "storedisk", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pack the closure of store paths into one squashfs or erofs store disk image.
    Build(build_cmd::BuildArgs),
    /// Write nixpkgs closureInfo's files (registration, store-paths, total-nar-size).
    ClosureInfo(closure_info_cmd::ClosureInfoArgs),
    /// Show how `build --layers N` would split a closure into layers (the plan, no image).
    Layers(layers_cmd::LayersArgs),
    /// Prove a store disk is complete, intact and self-contained; find what a runner leaks.
    Verify(verify_cmd::VerifyArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Build(args) => build_cmd::run(args),
        Command::ClosureInfo(args) => closure_info_cmd::run(args),
        Command::Layers(args) => layers_cmd::run(args),
        Command::Verify(args) => verify_cmd::run(args),
    };
    match outcome {
        Ok(code) => code,
        Err(err) => {
            // Libraries put each cause in their message once and never also chain it as a
            // `source` (the workspace's error convention), so the chain reads without repeats.
            eprintln!("storedisk: error: {err:#}");
            ExitCode::from(EXIT_COULD_NOT_RUN)
        }
    }
}
