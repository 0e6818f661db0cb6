//! `cargo xtask`: storedisk's build tasks, plain Rust over `xshell`.

fn main() -> anyhow::Result<()> {
    let task = std::env::args().nth(1);
    match task.as_deref() {
        None | Some("--help" | "-h" | "help") => {
            println!("usage: cargo xtask <task>\n\ntasks:\n  (added by later issues)");
            Ok(())
        }
        Some(other) => anyhow::bail!("unknown task {other:?}; run `cargo xtask --help`"),
    }
}
