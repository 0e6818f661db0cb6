//! Where the CLI gets closures: a closure file (any JSON form `Closure::from_json` reads, or
//! registration text), or Nix itself (`nix path-info --json --recursive`, through the
//! CLI's `nix_db`, the one module that runs Nix).

use std::path::Path;

use anyhow::{bail, Context as _};
use storedisk_nix::{Closure, StoreDir, StorePath};

use crate::nix_db;

/// The `nix` command (found on PATH).
pub const NIX: &str = "nix";

/// Reads a closure file: JSON (any form `Closure::from_json` takes) or registration text.
pub fn load(file: &Path, key: Option<&str>, store_dir: &StoreDir) -> anyhow::Result<Closure> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the closure file {}", file.display()))?;
    let closure = if text.trim_start().starts_with(['[', '{']) {
        Closure::from_json(&text, key, store_dir)
    } else {
        if key.is_some() {
            bail!(
                "--closure-key applies to JSON, but {} is registration text",
                file.display()
            );
        }
        Closure::from_registration(&text, store_dir)
    };
    closure.with_context(|| format!("closure file {}", file.display()))
}

/// The closure of `roots` as the local Nix database records it.
pub fn from_nix(roots: &[StorePath], store_dir: &StoreDir) -> anyhow::Result<Closure> {
    let paths: Vec<String> = roots.iter().map(|r| store_dir.display(r)).collect();
    nix_db::query_closure(NIX, &paths, store_dir)
        .context("asking Nix for the closure (install Nix, or pass --closure FILE)")
}
