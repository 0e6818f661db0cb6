//! Deterministic mutation testing of both readers on stable Rust (the cargo-fuzz targets in
//! `fuzz/` need nightly): every committed seed image is mutated thousands of times (bit flips,
//! byte sets, interesting integers, truncations, insertions, chunk copies) with a seeded PRNG,
//! and each mutant must give an inventory or an image error, never a panic, another error kind,
//! or a library panic caught by the readers' guard.

#![allow(clippy::unwrap_used)] // Tests: a failed setup should panic loudly.

use std::fs;
use std::path::{Path, PathBuf};

use storedisk_testkit::XorShift64;
use storedisk_verifier::{inventory_of, judge_untrusted, Limits};

/// Mutants per format; `STOREDISK_MUTANTS` overrides it for longer runs.
fn mutants_per_format() -> usize {
    std::env::var("STOREDISK_MUTANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
}

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), fs::read(&p).unwrap()))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

fn mutate(rng: &mut XorShift64, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.index(4) {
        if data.is_empty() {
            break;
        }
        // Keep most mutations in the metadata-rich first 2 KiB (superblocks, inode tables).
        let at = if rng.index(3) == 0 {
            rng.index(data.len())
        } else {
            rng.index(data.len().min(2048))
        };
        match rng.index(7) {
            0 => data[at] ^= 1 << rng.index(8),
            1 => data[at] = rng.next_u64() as u8,
            2 => {
                let value: u32 = [
                    0,
                    1,
                    0x7fff_ffff,
                    0x8000_0000,
                    0xffff_ffff,
                    0x1000,
                    data.len() as u32,
                ][rng.index(7)];
                for (i, b) in value.to_le_bytes().iter().enumerate() {
                    if let Some(slot) = data.get_mut(at + i) {
                        *slot = *b;
                    }
                }
            }
            3 => data.truncate(at),
            4 => {
                let n = 1 + rng.index(64);
                let insert: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(at..at, insert);
            }
            5 => {
                let from = rng.index(data.len());
                let n = rng.index(256).min(data.len() - from).min(data.len() - at);
                let chunk = data[from..from + n].to_vec();
                data[at..at + n].copy_from_slice(&chunk);
            }
            _ => {
                let n = rng.index(512).min(data.len() - at);
                data.drain(at..at + n);
            }
        }
    }
    data
}

/// Runs the mutants; returns (inventories, image errors).
fn run(target: &str, seed_value: u64) -> (usize, usize) {
    let seeds = seeds(target);
    for (path, bytes) in &seeds {
        let inv = inventory_of(bytes, &Limits::for_fuzzing())
            .unwrap_or_else(|e| panic!("seed {} must be readable: {e}", path.display()));
        assert!(
            !inv.paths.is_empty(),
            "seed {} has store paths",
            path.display()
        );
    }
    let mut rng = XorShift64::new(seed_value);
    let (mut ok, mut errors) = (0, 0);
    let total = mutants_per_format();
    for i in 0..total {
        let (path, seed) = &seeds[i % seeds.len()];
        let mutant = mutate(&mut rng, seed);
        match judge_untrusted(&mutant, &Limits::for_fuzzing()) {
            Ok(true) => ok += 1,
            Ok(false) => errors += 1,
            Err(bug) => panic!("{target} mutant {i} of {}: {bug}", path.display()),
        }
    }
    eprintln!("{target}: {total} mutants, {ok} read, {errors} rejected");
    (ok, errors)
}

#[test]
fn squashfs_mutants_never_panic() {
    let (_, errors) = run("squashfs_reader", 0x5eed_0001);
    assert!(errors > 0, "mutations must reach the error paths");
}

#[test]
fn erofs_mutants_never_panic() {
    let (_, errors) = run("erofs_reader", 0x5eed_0002);
    assert!(errors > 0, "mutations must reach the error paths");
}
