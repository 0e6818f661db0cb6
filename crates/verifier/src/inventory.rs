//! The inventory of an image: the store paths at its root, each with the NAR hash and NAR size
//! of its contents and the other packed paths it references, computed in one pass by streaming
//! the image's files into a NAR hasher and Nix's reference scanner.

use std::collections::BTreeSet;
use std::io::{self, Write};

use storedisk_nix::{NarEncoder, NarHash, NarHasher, ReferenceScanner, StorePath};

use crate::error::VerifyError;
use crate::image::ImageSource;
use crate::reader::{guard, ImageReader};
use crate::tree::{dump_node, NodeId, NodeKind};

/// A store path packed in the image, with its NAR hash and size as computed from the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedPath {
    pub path: StorePath,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// The packed paths (itself included) whose hash part occurs in its NAR: the references Nix
    /// records for it, as far as they are packed. What the graph checks use when no closure
    /// says; empty unless the inventory was taken with `scan_references`.
    pub references: BTreeSet<StorePath>,
    /// The image it was read from: its index in a set of layers (0 for a single image).
    pub layer: usize,
}

/// An entry at the image root that cannot be a valid store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidEntry {
    pub name: String,
    pub why: String,
    /// The image it is a root entry of (see [`PackedPath::layer`]).
    pub layer: usize,
}

/// What the image holds, or what a set of layers holds together ([`Inventory::merge`]).
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// Sorted by base name, then layer. A path at the root of several layers (which the
    /// `disjoint` check reports) has one entry per layer, so every copy is hashed and compared.
    pub paths: Vec<PackedPath>,
    pub invalid: Vec<InvalidEntry>,
}

impl Inventory {
    pub fn contains(&self, path: &StorePath) -> bool {
        self.get(path).is_some()
    }

    /// The path's entry; of several copies, the one of the first layer.
    pub fn get(&self, path: &StorePath) -> Option<&PackedPath> {
        let at = self.paths.partition_point(|p| p.path < *path);
        self.paths.get(at).filter(|p| p.path == *path)
    }

    /// The union of the inventories of a set of layers, `layers[i]` becoming layer `i`: the
    /// view through which the checks see the layers as one store disk.
    pub fn merge(layers: Vec<Inventory>) -> Inventory {
        let mut merged = Inventory::default();
        for (layer, inventory) in layers.into_iter().enumerate() {
            merged.paths.extend(
                inventory
                    .paths
                    .into_iter()
                    .map(|p| PackedPath { layer, ..p }),
            );
            merged.invalid.extend(
                inventory
                    .invalid
                    .into_iter()
                    .map(|e| InvalidEntry { layer, ..e }),
            );
        }
        merged
            .paths
            .sort_by(|a, b| a.path.cmp(&b.path).then(a.layer.cmp(&b.layer)));
        merged
    }
}

/// The root entries that are valid store path names, and the ones that are not.
pub fn root_store_paths(reader: &dyn ImageReader) -> (Vec<(StorePath, NodeId)>, Vec<InvalidEntry>) {
    let tree = reader.tree();
    let mut valid = Vec::new();
    let mut invalid = Vec::new();
    for &id in tree.root_children() {
        let raw = &tree.node(id).name;
        let name = String::from_utf8_lossy(raw).into_owned();
        let parsed = std::str::from_utf8(raw)
            .map_err(|_| "the name is not UTF-8".to_owned())
            .and_then(|s| StorePath::from_base_name(s).map_err(|e| e.reason));
        match parsed {
            Ok(path) => match tree.first_special_under(id) {
                Some((bad, kind)) => invalid.push(InvalidEntry {
                    name,
                    why: format!(
                        "{} is {kind}, which a Nix store path cannot contain",
                        tree.path_of(bad)
                    ),
                    layer: 0,
                }),
                None => valid.push((path, id)),
            },
            Err(why) => invalid.push(InvalidEntry {
                name,
                why: format!("not a store path name: {why}"),
                layer: 0,
            }),
        }
    }
    (valid, invalid)
}

/// One pass over a NAR: its sha256 and length, and which candidate hash parts occur in it.
struct HashAndScan {
    hasher: NarHasher,
    scanner: ReferenceScanner,
}

impl Write for HashAndScan {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.write_all(buf)?;
        self.scanner.scan(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// NAR hash, size and references (among `candidates`) of one node, streamed from the image.
pub fn hash_node(
    reader: &dyn ImageReader,
    id: NodeId,
    candidates: &[StorePath],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(NarHash, u64, BTreeSet<StorePath>), VerifyError> {
    let tree = reader.tree();
    guard(
        reader.format(),
        &format!("reading {}", tree.path_of(id)),
        || {
            let sink = HashAndScan {
                hasher: NarHasher::new(),
                scanner: ReferenceScanner::new(candidates.iter().cloned()),
            };
            let mut encoder =
                NarEncoder::new(sink).map_err(|e| VerifyError::corrupt(e.to_string()))?;
            dump_node(tree, id, reader, &mut encoder, &mut |n| progress(n))?;
            let sink = encoder
                .finish()
                .map_err(|e| VerifyError::corrupt(e.to_string()))?;
            let (hash, size) = sink.hasher.finish();
            Ok((hash, size, sink.scanner.into_found()))
        },
    )
}

/// Hashes every store path at the image root; with `scan_references`, also finds which packed
/// paths each one references (costly on text full of hashes: only when no closure says).
///
/// Store paths are hashed on every core: workers take the next path from a shared counter
/// (largest first, so one big path does not finish alone at the end), each streaming its
/// files through a NAR hasher in bounded memory. The result does not depend on the number of
/// threads or their timing: paths are sorted at the end, and when several paths fail, the error
/// reported is the one of the first failing path in the (fixed) schedule.
pub fn take_inventory(
    reader: &dyn ImageReader,
    scan_references: bool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Inventory, VerifyError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    take_inventory_with(reader, scan_references, threads, progress)
}

/// [`take_inventory`] on `threads` threads (at least one).
pub fn take_inventory_with(
    reader: &dyn ImageReader,
    scan_references: bool,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Inventory, VerifyError> {
    let candidates: Vec<StorePath> = if scan_references {
        root_store_paths(reader)
            .0
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    } else {
        Vec::new()
    };
    take_inventory_scanning(reader, &candidates, threads, progress)
}

/// [`take_inventory`] finding, for each packed path, which of `candidates` it references: the
/// image's own paths for a single image, every layer's for a layer of a set (a path in one
/// layer may reference paths in another). No candidates, no scan.
pub fn take_inventory_scanning(
    reader: &dyn ImageReader,
    candidates: &[StorePath],
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Inventory, VerifyError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    let (valid, invalid) = root_store_paths(reader);
    let tree = reader.tree();
    let mut schedule: Vec<(u64, usize)> = valid
        .iter()
        .enumerate()
        .map(|(i, (_, id))| (tree.file_bytes_under(*id), i))
        .collect();
    schedule.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));

    let next = AtomicUsize::new(0);
    // Schedule position of the first failure: nothing after it is started.
    let first_failure = AtomicUsize::new(usize::MAX);
    type Hashed = (NarHash, u64, BTreeSet<StorePath>);
    let done: Mutex<Vec<(usize, Result<Hashed, VerifyError>)>> = Mutex::new(Vec::new());
    let work = || loop {
        let at = next.fetch_add(1, Ordering::Relaxed);
        if at >= schedule.len() || at > first_failure.load(Ordering::Relaxed) {
            return;
        }
        let (_, index) = schedule[at];
        let result = hash_node(reader, valid[index].1, candidates, progress);
        if result.is_err() {
            first_failure.fetch_min(at, Ordering::Relaxed);
        }
        done.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((at, result));
    };
    let threads = threads.clamp(1, schedule.len().max(1));
    if threads == 1 {
        work();
    } else {
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(work);
            }
            work();
        });
    }
    let mut done = done
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    done.sort_by_key(|(at, _)| *at);
    let mut hashed: Vec<Option<Hashed>> = vec![None; valid.len()];
    for (at, result) in done {
        hashed[schedule[at].1] = Some(result?);
    }
    let mut paths = Vec::with_capacity(valid.len());
    for ((path, _), hashed) in valid.into_iter().zip(hashed) {
        let (nar_hash, nar_size, references) = hashed
            .ok_or_else(|| VerifyError::Input(format!("internal error: {path} was not hashed")))?;
        paths.push(PackedPath {
            path,
            nar_hash,
            nar_size,
            references,
            layer: 0,
        });
    }
    paths.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Inventory { paths, invalid })
}

/// Reads a small regular file at `rel` (a `/`-separated path) under root entry `id`; `None`
/// when it is absent, not a regular file, or larger than `max` bytes.
pub fn read_small_file(
    reader: &dyn ImageReader,
    id: NodeId,
    rel: &str,
    max: u64,
) -> Result<Option<Vec<u8>>, VerifyError> {
    let tree = reader.tree();
    let mut at = id;
    for part in rel.split('/') {
        let NodeKind::Directory { children } = &tree.node(at).kind else {
            return Ok(None);
        };
        let found = children
            .binary_search_by(|c| tree.node(*c).name.as_ref().cmp(part.as_bytes()))
            .ok()
            .map(|i| children[i]);
        match found {
            Some(c) => at = c,
            None => return Ok(None),
        }
    }
    let NodeKind::Regular { size, handle, .. } = tree.node(at).kind else {
        return Ok(None);
    };
    if size > max {
        return Ok(None);
    }
    guard(
        reader.format(),
        &format!("reading {}", tree.path_of(at)),
        || {
            use std::io::Read;
            let mut out = Vec::with_capacity(size as usize);
            reader
                .open_file(handle)?
                .take(size)
                .read_to_end(&mut out)
                .map_err(|e| VerifyError::corrupt(format!("{}: {e}", tree.path_of(at))))?;
            if out.len() as u64 != size {
                return Err(VerifyError::corrupt(format!(
                    "{}: file data ended after {} of {size} bytes",
                    tree.path_of(at),
                    out.len()
                )));
            }
            Ok(Some(out))
        },
    )
}

/// What Nix would record as the image's references if it scanned the image file: the
/// candidates whose hash part occurs anywhere in its bytes, read in bounded chunks. Reading
/// stops once every candidate is found (on erofs, where names are stored uncompressed, that is
/// usually in the first chunks); the rest is then reported as progress at once.
pub fn predict_references(
    image: ImageSource<'_>,
    candidates: impl IntoIterator<Item = StorePath>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<BTreeSet<StorePath>, VerifyError> {
    const CHUNK: u64 = 4 << 20;
    let mut scanner = ReferenceScanner::new(candidates);
    let mut buf = Vec::new();
    let mut at = 0u64;
    while at < image.len() {
        let n = (image.len() - at).min(CHUNK) as usize;
        buf.resize(n, 0);
        image
            .read_exact_at(&mut buf, at)
            .map_err(|e| image.io_error(e, "scanning the image for references"))?;
        scanner.scan(&buf);
        at += n as u64;
        if scanner.found_all() {
            progress(n as u64 + (image.len() - at));
            break;
        }
        progress(n as u64);
    }
    Ok(scanner.into_found())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn path(hash: &str, name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{hash}-{name}")).unwrap()
    }

    const A: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";
    const B: &str = "1b2c3d4f5g6h7i8j9k0l1m2n3p4q5r6s";

    /// An image of 10 MB of zeros with `A` at `a_at` and `B` at `b_at`, scanned for both.
    fn predict(a_at: usize, b_at: usize, candidates: &[StorePath]) -> (BTreeSet<StorePath>, u64) {
        let mut image = vec![0u8; 10 << 20];
        image[a_at..a_at + 32].copy_from_slice(A.as_bytes());
        image[b_at..b_at + 32].copy_from_slice(B.as_bytes());
        let reported = AtomicU64::new(0);
        let found = predict_references(
            ImageSource::from(&image),
            candidates.iter().cloned(),
            &|n| {
                reported.fetch_add(n, Ordering::Relaxed);
            },
        )
        .unwrap();
        (found, reported.into_inner())
    }

    #[test]
    fn predicts_references_anywhere_in_the_image_and_reports_all_of_it_as_progress() {
        let (a, b) = (path(A, "a"), path(B, "b"));
        let absent = path("2b2c3d4f5g6h7i8j9k0l1m2n3p4q5r6s", "c");
        let len = 10u64 << 20;
        // Both found in the first chunk: reading stops early, progress still covers the image.
        assert_eq!(
            predict(100, 5000, &[a.clone(), b.clone()]),
            (BTreeSet::from([a.clone(), b.clone()]), len)
        );
        // One near the end, one straddling two chunks.
        assert_eq!(
            predict((4 << 20) - 7, (10 << 20) - 40, &[a.clone(), b.clone()]),
            (BTreeSet::from([a.clone(), b.clone()]), len)
        );
        // A candidate never found: the whole image is read.
        assert_eq!(
            predict(100, 5000, &[a.clone(), absent]),
            (BTreeSet::from([a]), len)
        );
    }
}
