//! Test fixtures shared by storedisk's test suites and benchmarks: a NixOS-like generated
//! closure of any size ([`closure_gen`], for `cargo xtask bench` and the harness's realistic
//! scenario), a synthetic Nix store holding every case a
//! store disk must get right, written to a temp directory with its closure as
//! exportReferencesGraph JSON, a lookup for the external tools tests use as oracles, and helpers
//! to read what a command under test printed, the Nix settings every test and the harness run
//! Nix with, and the generators of pseudo-random test data.
//!
//! Everything here is deterministic: the same code gives the same store paths and bytes on
//! every machine. The NAR hashes in the closure come from `storedisk_nix::nar::hash_path`, which
//! its own tests check against vectors made by real `nix-hash`.

#![allow(clippy::unwrap_used)] // Test support: a failure to set up a fixture should panic loudly.

pub mod closure_gen;
mod output;
pub mod rng;
mod synthetic;
mod tools;

pub use output::{assert_success, listing, text};
pub use rng::XorShift64;
pub use synthetic::{
    pseudo_random_bytes, store_path_for, StorePathSpec, SyntheticStore, SyntheticStoreBuilder,
};
pub use tools::{
    erofs_utils, erofs_utils_version, newest_erofs_utils, nix_command, tool, ErofsUtils, NIX_CONFIG,
};
