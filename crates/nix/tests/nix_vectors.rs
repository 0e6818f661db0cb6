//! Checks nix-base32 and NAR hashing against vectors made by real Nix (`nix-hash`,
//! `nix-store --dump`), committed in `tests/nix_vectors.json`.
//!
//! The vectors were made, and are remade, with Nix 2.26 on PATH (`cargo xtask setup` provisions
//! it under target/tools/bin):
//!
//! ```text
//! PATH=$PWD/target/tools/bin:$PATH STOREDISK_WRITE_VECTORS=1 cargo test -p storedisk-nix --test nix_vectors
//! ```
//!
//! With `STOREDISK_WRITE_VECTORS=1` the test builds the same trees, asks `nix-hash --type sha256
//! --base32` and `nix-store --dump` about each, and rewrites the JSON; otherwise it compares.

#![allow(clippy::unwrap_used)] // Test code: a failed setup step should panic with its message.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};
use storedisk_nix::base32;
use storedisk_nix::nar::hash_path;

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nix_vectors.json");

fn write(path: &Path, contents: &[u8], executable: bool) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
    let mode = if executable { 0o755 } else { 0o644 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn write_mode(path: &Path, contents: &[u8], mode: u32) {
    fs::write(path, contents).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Makes one case's tree at the given path.
type MakeTree = Box<dyn Fn(&Path)>;

/// The trees the vectors describe, by case name.
fn make_trees(dir: &Path) -> Vec<(&'static str, std::path::PathBuf)> {
    let big: Vec<u8> = (0..1_048_583u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let cases: Vec<(&'static str, MakeTree)> = vec![
        ("file", Box::new(|p: &Path| write(p, b"hello\n", false))),
        (
            "executable",
            Box::new(|p: &Path| write(p, b"#!/bin/sh\necho hi\n", true)),
        ),
        ("empty-file", Box::new(|p: &Path| write(p, b"", false))),
        // Nix's exec rule is the owner's x bit alone: 0710 is executable, 0654 is not.
        (
            "owner-exec-only",
            Box::new(|p: &Path| write_mode(p, b"x\n", 0o710)),
        ),
        (
            "group-exec-only",
            Box::new(|p: &Path| write_mode(p, b"x\n", 0o654)),
        ),
        (
            "non-utf8-name",
            Box::new(|p: &Path| {
                use std::os::unix::ffi::OsStrExt;
                let name = std::ffi::OsStr::from_bytes(b"caf\xe9-latin1");
                write(&p.join(name), b"bytes, not text\n", false);
            }),
        ),
        (
            "seven-bytes",
            Box::new(|p: &Path| write(p, b"1234567", false)),
        ),
        (
            "symlink",
            Box::new(|p: &Path| symlink("../some/target", p).unwrap()),
        ),
        ("empty-dir", Box::new(|p: &Path| fs::create_dir(p).unwrap())),
        (
            "tree",
            Box::new(move |p: &Path| {
                write(&p.join("bin/tool"), b"\x7fELF not really\n", true);
                write(&p.join("share/doc/README"), b"read me\n", false);
                write(&p.join("share/doc/empty"), b"", false);
                fs::create_dir_all(p.join("share/empty-dir")).unwrap();
                symlink(
                    "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-gone/x",
                    p.join("share/dangling"),
                )
                .unwrap();
                symlink("tool", p.join("bin/alias")).unwrap();
                write(&p.join("share/\u{fc}nic\u{f6}de"), b"utf-8\n", false);
                write(&p.join("share").join("l".repeat(255)), b"long\n", false);
                write(&p.join("B-upper-sorts-first"), b"B\n", false);
                write(&p.join("lib/big.bin"), &big, false);
            }),
        ),
    ];
    cases
        .into_iter()
        .map(|(name, make)| {
            let p = dir.join(name);
            make(&p);
            (name, p)
        })
        .collect()
}

/// `nix-hash` and `nix-store --dump` read files and print: they need no Nix settings (the
/// tests' NIX_CONFIG, storedisk_testkit's, is for evaluating and building).
fn nix_command(program: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("running {program}: {e} (is Nix on PATH? see the module comment)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn nar_hashes_and_base32_match_real_nix() {
    let dir = tempfile::tempdir().unwrap();
    let trees = make_trees(dir.path());
    let digests = ["", "abc", "The quick brown fox jumps over the lazy dog"];

    let mut ours: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for (name, path) in &trees {
        let (hash, size) = hash_path(path).unwrap();
        ours.insert(
            format!("nar/{name}"),
            serde_json::json!({"nar_hash": hash.to_nix32(), "nar_size": size}),
        );
    }
    for text in digests {
        let digest = Sha256::digest(text.as_bytes());
        ours.insert(
            format!("base32/sha256({text:?})"),
            serde_json::json!({"hex": data_encoding::HEXLOWER.encode(&digest), "nix32": base32::encode(&digest)}),
        );
        // Store path hash parts are 20-byte (160-bit) digests: check that length too.
        ours.insert(
            format!("base32/sha256({text:?})[..20]"),
            serde_json::json!({"hex": data_encoding::HEXLOWER.encode(&digest[..20]), "nix32": base32::encode(&digest[..20])}),
        );
    }

    if std::env::var_os("STOREDISK_WRITE_VECTORS").is_some() {
        let mut from_nix: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for (name, path) in &trees {
            let p = path.to_str().unwrap();
            let hash = String::from_utf8(nix_command(
                "nix-hash",
                &["--type", "sha256", "--base32", p],
            ))
            .unwrap();
            let size = nix_command("nix-store", &["--dump", p]).len();
            from_nix.insert(
                format!("nar/{name}"),
                serde_json::json!({"nar_hash": format!("sha256:{}", hash.trim()), "nar_size": size}),
            );
        }
        for (key, value) in &ours {
            if let Some(hex) = value.get("hex").and_then(|h| h.as_str()) {
                let algo = if hex.len() == 40 { "sha1" } else { "sha256" };
                let nix32 = String::from_utf8(nix_command(
                    "nix-hash",
                    &["--type", algo, "--to-base32", hex],
                ))
                .unwrap();
                from_nix.insert(
                    key.clone(),
                    serde_json::json!({"hex": hex, "nix32": nix32.trim()}),
                );
            }
        }
        let text = serde_json::to_string_pretty(&from_nix).unwrap() + "\n";
        fs::write(VECTORS, text).unwrap();
    }

    let vectors: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&fs::read_to_string(VECTORS).unwrap()).unwrap();
    assert_eq!(
        vectors.len(),
        ours.len(),
        "vector file and test cases disagree on the set of cases"
    );
    for (key, want) in &vectors {
        assert_eq!(ours.get(key), Some(want), "case {key}");
    }
}
