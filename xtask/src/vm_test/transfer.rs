//! What a deployment copies: a real `nix copy --to file://DIR?compression=...` of a runner into a
//! binary cache, measured from the `.narinfo` files the copy wrote (NarSize, FileSize).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::tools::Nix;

/// One store path as the cache recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CachedPath {
    pub store_path: String,
    pub nar_size: u64,
    pub file_size: u64,
}

/// The store paths in a `file://` binary cache, by store path.
pub fn read_cache(dir: &Path) -> Result<BTreeMap<String, CachedPath>> {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading cache {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "narinfo") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let info =
                parse_narinfo(&text).with_context(|| format!("parsing {}", path.display()))?;
            out.insert(info.store_path.clone(), info);
        }
    }
    Ok(out)
}

/// Parses the fields we need from a `.narinfo`.
pub fn parse_narinfo(text: &str) -> Result<CachedPath> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(": ")))
            .with_context(|| format!("no {name} field"))
    };
    Ok(CachedPath {
        store_path: field("StorePath")?.trim().to_owned(),
        nar_size: field("NarSize")?
            .trim()
            .parse()
            .context("NarSize is not a number")?,
        file_size: field("FileSize")?
            .trim()
            .parse()
            .context("FileSize is not a number")?,
    })
}

/// Copies `paths` into the cache at `dir` with `compression` and returns the store paths this
/// copy added (those already in the cache are not copied again, as in a real redeploy).
pub fn copy(nix: &Nix, paths: &[&str], dir: &Path, compression: &str) -> Result<Vec<CachedPath>> {
    let before = read_cache(dir)?;
    std::fs::create_dir_all(dir)?;
    let url = format!("file://{}?compression={compression}", dir.display());
    nix.cmd("nix")
        .args(["copy", "--to", &url])
        .args(paths)
        .run()?;
    let after = read_cache(dir)?;
    Ok(after
        .into_iter()
        .filter(|(k, _)| !before.contains_key(k))
        .map(|(_, v)| v)
        .collect())
}

/// `/nix/store/<hash>-name` -> `name`.
pub fn redact(store_path: &str) -> String {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name.to_owned(),
        _ => base.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narinfo_fields() {
        let text = "StorePath: /nix/store/0lyq0sg1l3gs2arnigm78m73jfxf2za7-a\nURL: nar/x.nar\nCompression: none\nFileHash: sha256:x\nFileSize: 168\nNarHash: sha256:y\nNarSize: 168\nReferences: \n";
        let info = parse_narinfo(text).unwrap();
        assert_eq!(info.nar_size, 168);
        assert_eq!(info.file_size, 168);
        assert_eq!(redact(&info.store_path), "a");
        assert!(parse_narinfo("StorePath: /nix/store/x\n").is_err());
    }
}
