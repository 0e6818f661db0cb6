//! `cargo xtask`: storedisk's build tasks, plain Rust. Each subcommand is a module; every external
//! program they start goes through [`cmd::Cmd`] (logged, timed, bounded by a timeout).

mod bench;
mod cmd;
mod setup;
mod test;
mod tools;
mod vm_test;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "storedisk's build tasks", long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Benchmark `storedisk build` and `verify` against gensquashfs, mksquashfs and mkfs.erofs.
    Bench(bench::BenchArgs),
    /// Install and check the tools the harness needs (Nix, QEMU, kernel, busybox, peers' tools).
    Setup(setup::SetupArgs),
    /// Run the test suite with the tools it uses as oracles (installed first when missing).
    Test(test::TestArgs),
    /// Build microVMs with and without each store-disk fix, boot them, measure `nix copy`, compare
    /// with the snapshots in golden/.
    VmTest(vm_test::VmTestArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.task {
        Task::Bench(args) => bench::run(args),
        Task::Setup(args) => setup::run(args),
        Task::Test(args) => test::run(args),
        Task::VmTest(args) => vm_test::run(args),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
