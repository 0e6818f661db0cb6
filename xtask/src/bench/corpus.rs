//! `cargo xtask bench --store-dir DIR --closure FILE`: benchmark on a closure of your own
//! instead of the generated one. DIR must hold exactly the closure's store paths (the peer
//! tools pack the whole directory); FILE is any closure `storedisk build --closure` reads
//! (exportReferencesGraph or `nix path-info --json` output, registration text). Paths without
//! a recorded NAR hash are hashed from DIR, and a complete copy of the closure (hashes, sizes,
//! references) is written beside the bench's other files, so the build's read-back and
//! `storedisk verify --closure` check every path.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use storedisk_nix::{nar, Closure, StoreDir};

use super::closure_gen::GeneratedClosure;

/// Loads the closure in `closure_file` whose store paths are under `store_dir`, checks that
/// the directory holds exactly them, and writes the completed closure JSON into `work`.
pub fn load(store_dir: &Path, closure_file: &Path, work: &Path) -> Result<GeneratedClosure> {
    let logical = StoreDir::default();
    let text = fs::read_to_string(closure_file)
        .with_context(|| format!("cannot read the closure file {}", closure_file.display()))?;
    let closure = if text.trim_start().starts_with(['[', '{']) {
        Closure::from_json(&text, None, &logical)
    } else {
        Closure::from_registration(&text, &logical)
    }
    .with_context(|| format!("closure file {}", closure_file.display()))?;
    if closure.is_empty() {
        bail!(
            "the closure file {} lists no store path",
            closure_file.display()
        );
    }
    let store_dir = fs::canonicalize(store_dir)
        .with_context(|| format!("--store-dir {}", store_dir.display()))?;
    let wanted: BTreeSet<String> = closure
        .iter()
        .map(|i| i.path.base_name().to_owned())
        .collect();
    for name in &wanted {
        let physical = store_dir.join(name);
        if fs::symlink_metadata(&physical).is_err() {
            bail!(
                "{} (in the closure file {}) is not in --store-dir {}",
                physical.display(),
                closure_file.display(),
                store_dir.display()
            );
        }
    }
    let listing = fs::read_dir(&store_dir)
        .with_context(|| format!("cannot list --store-dir {}", store_dir.display()))?;
    for entry in listing {
        let name = entry?.file_name();
        if !wanted.contains(&*name.to_string_lossy()) {
            bail!(
                "--store-dir {} holds {}, which the closure file {} does not list: the peer \
                 tools pack the whole directory, so it must hold exactly the closure",
                store_dir.display(),
                name.to_string_lossy(),
                closure_file.display()
            );
        }
    }

    let mut counts = Counts::default();
    let mut entries = Vec::new();
    let mut nar_bytes = 0u64;
    for info in closure.iter() {
        let physical = store_dir.join(info.path.base_name());
        counts.walk(&physical)?;
        let (hash, size) = match (info.nar_hash, info.nar_size) {
            (Some(hash), Some(size)) => (hash, size),
            _ => nar::hash_path(&physical)
                .with_context(|| format!("hashing {}", physical.display()))?,
        };
        nar_bytes += size;
        let references: Vec<String> = info.references.iter().map(|r| logical.display(r)).collect();
        entries.push(serde_json::json!({
            "path": logical.display(&info.path),
            "narHash": hash.to_nix32(),
            "narSize": size,
            "references": references,
            "valid": true,
        }));
    }
    fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let closure_json = work.join("corpus-closure.json");
    fs::write(&closure_json, serde_json::to_string_pretty(&entries)?)
        .with_context(|| format!("writing {}", closure_json.display()))?;
    Ok(GeneratedClosure {
        store_dir,
        closure_json,
        roots: closure.roots().iter().map(|r| logical.display(r)).collect(),
        store_paths: closure.len(),
        files: counts.files,
        symlinks: counts.symlinks,
        file_bytes: counts.file_bytes,
        nar_bytes,
    })
}

#[derive(Debug, Default)]
struct Counts {
    files: usize,
    symlinks: usize,
    file_bytes: u64,
}

impl Counts {
    fn walk(&mut self, path: &Path) -> Result<()> {
        let meta =
            fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if meta.is_symlink() {
            self.symlinks += 1;
        } else if meta.is_file() {
            self.files += 1;
            self.file_bytes += meta.len();
        } else if meta.is_dir() {
            let mut children: Vec<PathBuf> = fs::read_dir(path)
                .with_context(|| format!("listing {}", path.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            children.sort();
            for child in children {
                self.walk(&child)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_path(name: &str) -> String {
        format!("{}-{name}", "a".repeat(32))
    }

    #[test]
    fn loads_a_closure_and_refuses_a_directory_with_more_or_less() {
        let dir = std::env::temp_dir().join(format!("xtask-corpus-{}", std::process::id()));
        let store = dir.join("store");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(store.join(store_path("lib")).join("lib")).unwrap();
        fs::write(store.join(store_path("lib")).join("lib/libx.so"), b"elf").unwrap();
        fs::write(store.join(store_path("tool")), b"#!/bin/sh\n").unwrap();
        let closure = dir.join("closure.json");
        let json = serde_json::json!([
            { "path": format!("/nix/store/{}", store_path("lib")), "references": [] },
            { "path": format!("/nix/store/{}", store_path("tool")),
              "references": [format!("/nix/store/{}", store_path("lib"))] },
        ]);
        fs::write(&closure, json.to_string()).unwrap();

        let loaded = load(&store, &closure, &dir.join("work")).unwrap();
        assert_eq!(
            (loaded.store_paths, loaded.files, loaded.file_bytes),
            (2, 2, 13)
        );
        assert_eq!(loaded.roots, [format!("/nix/store/{}", store_path("tool"))]);
        assert!(loaded.nar_bytes > 13);
        let written = fs::read_to_string(&loaded.closure_json).unwrap();
        assert!(written.contains("narHash"), "{written}");

        fs::write(store.join("stray"), b"").unwrap();
        let err = load(&store, &closure, &dir.join("work")).unwrap_err();
        assert!(format!("{err:#}").contains("stray"), "{err:#}");
        fs::remove_file(store.join("stray")).unwrap();
        fs::remove_file(store.join(store_path("tool"))).unwrap();
        let err = load(&store, &closure, &dir.join("work")).unwrap_err();
        assert!(format!("{err:#}").contains("tool"), "{err:#}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
