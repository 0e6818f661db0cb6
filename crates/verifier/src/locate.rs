//! Finding where, inside a referrer's files on disk, the reference to another store path sits:
//! the file and line holding the path's hash part, or the symlink whose target names it. Run
//! after the checks, on the leaks `runner_overlap` found ([`locate_leaks`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Where a reference sits inside a store path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Location {
    /// Path relative to the referrer (`""` when the referrer is itself the file or symlink).
    pub file: String,
    /// 1-based line of the first occurrence, for regular files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// The symlink's target, when the reference is a symlink.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
    /// The text around the occurrence (at most ~160 bytes, lossy UTF-8), for regular files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub excerpt: Option<String>,
}

/// Looks for `needle` (a store path's hash part) in the tree at `root` (symlinks are not
/// followed). Files are streamed; the first match in sorted order is returned.
pub fn locate_reference(root: &Path, needle: &str) -> io::Result<Option<Location>> {
    locate_in(root, "", needle.as_bytes())
}

fn locate_in(path: &Path, rel: &str, needle: &[u8]) -> io::Result<Option<Location>> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path)?;
        let bytes = target.as_os_str().as_bytes();
        if find(bytes, needle).is_some() {
            return Ok(Some(Location {
                file: rel.to_owned(),
                line: None,
                symlink_target: Some(String::from_utf8_lossy(bytes).into_owned()),
                excerpt: None,
            }));
        }
        return Ok(None);
    }
    if meta.is_dir() {
        let mut names: Vec<_> = fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let child_rel = if rel.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", name.to_string_lossy())
            };
            if let Some(found) = locate_in(&path.join(&name), &child_rel, needle)? {
                return Ok(Some(found));
            }
        }
        return Ok(None);
    }
    if meta.is_file() {
        return search_file(path, rel, needle);
    }
    Ok(None)
}

/// Streams a file in 1 MiB chunks, keeping an overlap so a match across chunks is found.
fn search_file(path: &Path, rel: &str, needle: &[u8]) -> io::Result<Option<Location>> {
    const CHUNK: usize = 1 << 20;
    let mut file = fs::File::open(path)?;
    let mut window: Vec<u8> = Vec::with_capacity(CHUNK + 4096);
    let mut lines_before_window = 0u64;
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        window.extend_from_slice(&chunk[..n]);
        if let Some(at) = find(&window, needle) {
            let line_start = window[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
            let line_end = window[at..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(window.len(), |p| at + p);
            let from = line_start.max(at.saturating_sub(80));
            let to = line_end.min(at + needle.len() + 80);
            let line = lines_before_window
                + window[..at].iter().filter(|&&b| b == b'\n').count() as u64
                + 1;
            return Ok(Some(Location {
                file: rel.to_owned(),
                line: Some(line),
                symlink_target: None,
                excerpt: Some(String::from_utf8_lossy(&window[from..to]).trim().to_owned()),
            }));
        }
        // Keep the tail (enough for a match and some context) for the next round.
        let keep = window.len().min(needle.len() + 256);
        let drop = window.len() - keep;
        lines_before_window += window[..drop].iter().filter(|&&b| b == b'\n').count() as u64;
        window.drain(..drop);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Fills in where the runner (its files at `runner_dir`) references the first hop of each
/// leak's chain. Most chains share their first hop (the toplevel, the closure info), so each
/// hop is searched once. A runner whose files are not there leaves every location empty.
pub fn locate_leaks(
    leaks: &mut [crate::report::Leak],
    runner_dir: &Path,
    store_dir: &storedisk_nix::StoreDir,
) {
    if !(runner_dir.exists() || runner_dir.is_symlink()) {
        return;
    }
    let mut located: BTreeMap<String, Option<Location>> = BTreeMap::new();
    for leak in leaks {
        let Some(next) = leak.chain.get(1) else {
            continue;
        };
        let Ok(next_path) = store_dir.parse_path(next) else {
            continue;
        };
        leak.location = located
            .entry(next.clone())
            .or_insert_with(|| {
                locate_reference(runner_dir, next_path.hash_part())
                    .ok()
                    .flatten()
            })
            .clone();
    }
}

/// Fills in where each way into the guest closure sits in the files of the path that holds it
/// (under `physical_store`), for a way in with one target. An image's references are not
/// looked up: they are in the image's bytes, and the image is the whole closure's size.
pub fn locate_ways_in(
    ways: &mut [crate::checks::WayIn],
    physical_store: &Path,
    store_dir: &storedisk_nix::StoreDir,
) {
    for way in ways.iter_mut().filter(|w| !w.image) {
        let [to] = way.to.as_slice() else {
            continue;
        };
        let (Ok(from), Ok(to)) = (store_dir.parse_path(&way.from), store_dir.parse_path(to)) else {
            continue;
        };
        let files = store_dir.physical(physical_store, &from);
        way.location = locate_reference(&files, to.hash_part()).ok().flatten();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_line_and_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("runner");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("share/microvm")).unwrap();
        fs::write(
            root.join("bin/microvm-run"),
            "#!/bin/sh\nexec qemu \\\n  -append init=/nix/store/abc/init\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("/nix/store/xyz-system", root.join("share/microvm/system"))
            .unwrap();
        let at = locate_reference(&root, "abc").unwrap().unwrap();
        assert_eq!((at.file.as_str(), at.line), ("bin/microvm-run", Some(3)));
        assert!(at.excerpt.unwrap().contains("init=/nix/store/abc/init"));
        let at = locate_reference(&root, "xyz").unwrap().unwrap();
        assert_eq!(at.file, "share/microvm/system");
        assert_eq!(at.symlink_target.as_deref(), Some("/nix/store/xyz-system"));
        assert_eq!(locate_reference(&root, "nothere").unwrap(), None);
    }

    #[test]
    fn finds_a_match_straddling_chunks_with_the_right_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big");
        let mut data = vec![b'x'; (1 << 20) - 3];
        data[10] = b'\n';
        data.extend_from_slice(b"NEEDLE\n");
        fs::write(&file, &data).unwrap();
        let at = locate_reference(&file, "NEEDLE").unwrap().unwrap();
        assert_eq!(at.line, Some(2));
    }
}
