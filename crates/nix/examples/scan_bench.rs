//! Micro-benchmark of [`ReferenceScanner`]: scans files (disk images, say) for the hash parts of
//! the store paths listed in a closure JSON file and prints the throughput.
//!
//! `cargo run --release -p storedisk-nix --example scan_bench -- CLOSURE.json FILE... [--rounds N]
//! [--absent]`
//!
//! With `--absent` each candidate's hash part is reversed (so almost surely absent): the scanner
//! then reads every file to its end instead of stopping once every candidate is found.
//!
//! Each file is read into memory once and then fed to a fresh scanner in 4 MiB pieces (as the
//! verifier's `predict_references` does), `N` times; the best round is reported.

use std::time::Instant;

use storedisk_nix::{ReferenceScanner, StorePath};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut rounds = 5usize;
    if let Some(at) = args.iter().position(|a| a == "--rounds") {
        rounds = args.get(at + 1).ok_or("--rounds needs a number")?.parse()?;
        args.drain(at..at + 2);
    }
    let absent = args.iter().any(|a| a == "--absent");
    args.retain(|a| a != "--absent");
    let (closure, files) = args
        .split_first()
        .ok_or("usage: scan_bench CLOSURE.json FILE... [--rounds N]")?;
    let listed: serde_json::Value = serde_json::from_slice(&std::fs::read(closure)?)?;
    let mut candidates = Vec::new();
    for entry in listed.as_array().ok_or("the closure is not a JSON array")? {
        let path = entry["path"].as_str().ok_or("an entry without a path")?;
        let base = path.strip_prefix("/nix/store/").ok_or("not a store path")?;
        let base = if absent {
            let (hash, name) = base.split_once('-').ok_or("a store path without a name")?;
            format!("{}-{name}", hash.chars().rev().collect::<String>())
        } else {
            base.to_owned()
        };
        candidates.push(StorePath::from_base_name(&base)?);
    }
    for file in files {
        let data = std::fs::read(file)?;
        let mut best = f64::INFINITY;
        let mut found = 0;
        for _ in 0..rounds {
            let started = Instant::now();
            let mut scanner = ReferenceScanner::new(candidates.iter().cloned());
            for piece in data.chunks(4 << 20) {
                scanner.scan(piece);
            }
            best = best.min(started.elapsed().as_secs_f64());
            found = scanner.found().len();
        }
        println!(
            "{file}: {:.1} MB in {:.1} ms: {:.0} MB/s, {found} of {} candidates found",
            data.len() as f64 / 1e6,
            best * 1e3,
            data.len() as f64 / 1e6 / best,
            candidates.len()
        );
    }
    Ok(())
}
