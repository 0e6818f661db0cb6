//! storedisk-verifier: opens a squashfs or erofs Nix store disk image (a file read with
//! positioned reads, or a buffer), inventories the store paths at its root with NAR hashes computed by streaming
//! the image's files (nothing is extracted), and runs the checks that prove the image is
//! self-contained: `complete`, `integrity`, `self_contained`, `runner_overlap`, `policy`, and
//! for a set of layers `disjoint`.
//!
//! A store disk may also be a set of *layers*: several images of the same format, each holding
//! whole store paths, disjoint, together the closure (the guest stacks them with overlayfs).
//! [`verify`] takes the images as [`Layer`]s and checks the set as one store disk: their
//! inventories are merged ([`Inventory::merge`]) and the `disjoint` check compares them.
//!
//! Invariants: read-only; every size, offset and count read from an image is bounded
//! ([`Limits`]) before it drives an allocation or a loop, and a panic inside a format library
//! becomes [`VerifyError::ReaderPanic`]. It starts no process (the CLI asks Nix and passes the answers in); the checks are pure
//! functions over data. The JSON shape lives in [`report`].

pub mod checks;
pub mod error;
pub mod image;
pub mod inventory;
pub mod limits;
pub mod locate;
pub mod reader;
pub mod report;
pub mod tree;

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Serialize;
use storedisk_nix::{Closure, StoreDir, StorePath};

pub use checks::{ClosureSource, GuestClosure, Runner, WayIn};
pub use error::VerifyError;
pub use image::{detect_format, ImageFile, ImageFormat, ImageSource};
pub use inventory::{take_inventory, Inventory, PackedPath};
pub use limits::Limits;
pub use reader::{open_image, ImageReader};
pub use report::{CheckName, Report};

/// One image of the store disk to verify: the image, or one layer of a set.
pub struct Layer<'a> {
    /// How to name the image in the report and in errors (the IMAGE argument as given).
    pub label: String,
    /// The image's bytes.
    pub image: ImageSource<'a>,
    /// The image opened over them.
    pub reader: &'a (dyn ImageReader + 'a),
    /// The image's own store path, when it is one.
    pub image_path: Option<StorePath>,
    /// The image's references from the Nix database, or why they are unknown.
    pub image_references: Option<Result<BTreeSet<StorePath>, String>>,
}

impl std::fmt::Debug for Layer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("label", &self.label)
            .field("format", &self.reader.format())
            .field("image_path", &self.image_path)
            .field("image_references", &self.image_references)
            .finish_non_exhaustive()
    }
}

/// Everything besides the image that the checks use. Each missing input makes the checks that
/// need it `null`.
#[derive(Debug, Clone, Default)]
pub struct VerifyInputs {
    /// The logical store directory (`/nix/store`).
    pub store_dir: StoreDir,
    pub guest: Option<GuestClosure>,
    pub runner: Option<Runner>,
    /// The closure-info packed in the image, if any ([`recorded_closure`]): its registration
    /// lists the closure rather than using it, which matters for the guest roots.
    pub registration_path: Option<StorePath>,
    /// `--allow` globs.
    pub allow: Vec<String>,
    /// A physical directory holding store paths (for `where` of leaks).
    pub physical_store: Option<PathBuf>,
}

/// Bytes the progress callback will be told about in total for [`verify`]: file data hashed
/// plus image bytes scanned for references, over every layer.
pub fn progress_total(layers: &[Layer<'_>]) -> u64 {
    layers.iter().fold(0u64, |total, layer| {
        total
            .saturating_add(layer.reader.tree().file_bytes())
            .saturating_add(layer.image.len())
    })
}

/// The closure recorded in the store disk: the `registration` file of a packed closure-info
/// path (nixpkgs `closureInfo`) in the first layer that has one. Returns the closure-info path
/// and its closure.
pub fn recorded_closure(
    layers: &[Layer<'_>],
    store_dir: &StoreDir,
) -> Result<Option<(StorePath, Closure)>, VerifyError> {
    for layer in layers {
        let found =
            recorded_closure_in(layer.reader, store_dir).map_err(|e| e.in_image(&layer.label))?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

fn recorded_closure_in(
    reader: &dyn ImageReader,
    store_dir: &StoreDir,
) -> Result<Option<(StorePath, Closure)>, VerifyError> {
    let (valid, _) = inventory::root_store_paths(reader);
    for (path, id) in valid {
        let Some(text) = inventory::read_small_file(reader, id, "registration", 256 << 20)? else {
            continue;
        };
        let Ok(text) = String::from_utf8(text) else {
            continue;
        };
        if let Ok(closure) = Closure::from_registration(&text, store_dir) {
            if !closure.is_empty() {
                return Ok(Some((path, closure)));
            }
        }
    }
    Ok(None)
}

/// Runs every check over the store disk made of `layers` (one image, or the layers of a set,
/// all of one format; their order gives the report's layer indexes). `progress` receives byte counts (it
/// may be called from two threads: hashing and reference scanning run in parallel).
///
/// Each layer is inventoried and scanned for references on its own; an error names the layer.
pub fn verify(
    layers: &[Layer<'_>],
    inputs: &VerifyInputs,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Report, VerifyError> {
    let store_dir = &inputs.store_dir;
    let Some(first) = layers.first() else {
        return Err(VerifyError::Input("no image to verify".to_owned()));
    };
    let format = first.reader.format();
    if let Some(odd) = layers.iter().find(|l| l.reader.format() != format) {
        return Err(VerifyError::Input(format!(
            "{} is {}, but {} is {}: the layers of one store disk must share a format",
            odd.label,
            odd.reader.format(),
            first.label,
            format
        )));
    }
    // Every layer's root store paths: a path in one layer may reference one in another.
    let packed: BTreeSet<StorePath> = layers
        .iter()
        .flat_map(|l| inventory::root_store_paths(l.reader).0)
        .map(|(p, _)| p)
        .collect();
    // Candidates for "what would Nix record": everything the build of an image could see.
    let mut candidates = packed.clone();
    if let Some(guest) = &inputs.guest {
        candidates.extend(guest.closure.iter().map(|i| i.path.clone()));
    }
    // Packed paths' own references are needed only when no guest closure records them.
    let scan_for: Vec<StorePath> = match inputs.guest {
        Some(_) => Vec::new(),
        None => packed.into_iter().collect(),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (inventories, would_reference) = std::thread::scope(|scope| {
        let scan = scope.spawn(|| {
            layers
                .iter()
                .map(|l| {
                    inventory::predict_references(l.image, candidates.iter().cloned(), progress)
                        .map_err(|e| e.in_image(&l.label))
                })
                .collect::<Result<Vec<_>, _>>()
        });
        let inventories = layers
            .iter()
            .map(|l| {
                inventory::take_inventory_scanning(l.reader, &scan_for, threads, progress)
                    .map_err(|e| e.in_image(&l.label))
            })
            .collect::<Result<Vec<_>, _>>();
        let would = scan
            .join()
            .map_err(|_| VerifyError::Input("the reference scanner thread panicked".to_owned()));
        (inventories, would)
    });
    let inventory = Inventory::merge(inventories?);
    let would_reference = would_reference??;
    let labels: Vec<String> = layers.iter().map(|l| l.label.clone()).collect();
    let image_paths: Vec<StorePath> = layers.iter().filter_map(|l| l.image_path.clone()).collect();
    let guest = inputs.guest.as_ref();
    let self_contained = layers
        .iter()
        .zip(&would_reference)
        .map(|(l, would)| {
            let checked = checks::check_self_contained(
                l.image_path.as_ref(),
                l.image_references.clone(),
                would,
                store_dir,
            );
            (l.label.clone(), checked)
        })
        .collect();
    let checks = report::Checks {
        complete: checks::check_complete(
            &inventory,
            guest,
            inputs.registration_path.as_ref(),
            store_dir,
        ),
        integrity: checks::check_integrity(&inventory, guest, store_dir),
        self_contained: checks::merge_self_contained(self_contained),
        runner_overlap: checks::check_runner_overlap(
            &inventory,
            guest,
            inputs.runner.as_ref(),
            &image_paths,
            inputs.registration_path.as_ref(),
            store_dir,
        )?,
        policy: checks::check_policy(&inventory, inputs.runner.as_ref(), &inputs.allow, store_dir)?,
        disjoint: checks::check_disjoint(&inventory, &labels, store_dir),
    };
    let mut checks = checks;
    // The checks are pure over the data gathered above; where each leak sits in the runner's
    // files is looked up afterwards, on disk.
    if let (Some(runner), Some(physical)) = (&inputs.runner, &inputs.physical_store) {
        locate::locate_leaks(
            &mut checks.runner_overlap.paths,
            &store_dir.physical(physical, &runner.path),
            store_dir,
        );
    }
    let findings = checks.complete.missing.len()
        + checks.integrity.mismatched.len()
        + checks.integrity.invalid_entries.len()
        + checks.self_contained.references.len()
        + checks.runner_overlap.paths.len()
        + checks.policy.violations.len()
        + checks.disjoint.duplicates.len();
    let ok = checks
        .statuses()
        .iter()
        .all(|(_, ok, _)| *ok != Some(false));
    let checked = checks.ran();
    let images = labels
        .iter()
        .enumerate()
        .map(|(i, label)| {
            let mine = || inventory.paths.iter().filter(|p| p.layer == i);
            report::ImageEntry {
                image: label.clone(),
                format,
                paths: mine().count(),
                nar_bytes: mine().map(|p| p.nar_size).sum(),
            }
        })
        .collect();
    Ok(Report {
        ok,
        findings,
        format,
        image: first.label.clone(),
        images,
        paths: inventory
            .paths
            .iter()
            .map(|p| report::PathEntry {
                path: store_dir.display(&p.path),
                layer: p.layer,
                nar_size: p.nar_size,
                nar_hash: p.nar_hash.to_nix32(),
            })
            .collect(),
        checks,
        checked,
        required_not_run: Vec::new(),
    })
}

/// Why a freshly built image failed its read-back.
#[derive(Debug)]
pub enum ReadBackError {
    /// The image, or a store path to hash for the comparison, could not be read.
    Unreadable(String),
    /// The image reads, but holds other contents than the closure.
    Differs(ReadBackDiff),
}

/// What a freshly built image holds that the closure does not say, path by path (the JSON of
/// `storedisk build --json` when the read-back fails).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReadBackDiff {
    /// Number of store paths in the closure.
    pub closure_paths: usize,
    /// Closure paths absent from the image.
    pub missing: Vec<String>,
    /// Paths at the image's root that are not in the closure.
    pub extra: Vec<String>,
    /// Paths whose contents read back with another NAR hash or size.
    pub mismatched: Vec<report::Mismatch>,
    /// Root entries that cannot be store paths.
    pub invalid_entries: Vec<report::InvalidEntryReport>,
}

impl ReadBackDiff {
    /// Number of paths (and root entries) that differ.
    pub fn count(&self) -> usize {
        self.missing.len() + self.extra.len() + self.mismatched.len() + self.invalid_entries.len()
    }
}

/// Reads a freshly built image back and checks that it holds exactly `closure` with the NAR
/// hashes recorded there: the builder's guard against writers (ours, mkfs.erofs) that produce
/// images the kernel reads differently from the store. Paths of the closure without a recorded
/// narHash are hashed from `physical_store` for the comparison.
pub fn read_back(
    image: &std::path::Path,
    closure: &Closure,
    physical_store: &std::path::Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), ReadBackError> {
    let unreadable = |e: &dyn std::fmt::Display| ReadBackError::Unreadable(e.to_string());
    let store_dir = &closure.store_dir;
    let file = ImageFile::open(image).map_err(|e| unreadable(&e))?;
    let reader = open_image(&file, &Limits::default()).map_err(|e| unreadable(&e))?;
    let inventory = take_inventory(reader.as_ref(), false, progress).map_err(|e| unreadable(&e))?;
    let mut expected = closure.clone();
    for info in closure.iter().filter(|i| i.nar_hash.is_none()) {
        let physical = physical_store.join(info.path.base_name());
        let (hash, size) = storedisk_nix::nar::hash_path(&physical).map_err(|e| unreadable(&e))?;
        expected.set_nar_hash(&info.path, hash, size);
    }
    let guest = GuestClosure {
        closure: expected,
        source: ClosureSource::File,
    };
    let complete = checks::check_complete(&inventory, Some(&guest), None, store_dir);
    let integrity = checks::check_integrity(&inventory, Some(&guest), store_dir);
    let diff = ReadBackDiff {
        closure_paths: closure.len(),
        missing: complete.missing.into_iter().map(|m| m.path).collect(),
        extra: complete.extra,
        mismatched: integrity.mismatched,
        invalid_entries: integrity.invalid_entries,
    };
    if diff.count() == 0 {
        Ok(())
    } else {
        Err(ReadBackError::Differs(diff))
    }
}

/// The ways into the guest closure behind `report`'s `runner_overlap` ([`checks::ways_in`]),
/// each located in the files of the path that holds it when `inputs.physical_store` has them.
/// Empty when nothing leaked or no runner was given.
pub fn ways_in(report: &Report, inputs: &VerifyInputs, layers: &[Layer<'_>]) -> Vec<WayIn> {
    let Some(runner) = &inputs.runner else {
        return Vec::new();
    };
    let image_paths: Vec<StorePath> = layers.iter().filter_map(|l| l.image_path.clone()).collect();
    let mut ways = checks::ways_in(
        &report.checks.runner_overlap,
        runner,
        &image_paths,
        &inputs.store_dir,
    );
    if let Some(physical) = &inputs.physical_store {
        locate::locate_ways_in(&mut ways, physical, &inputs.store_dir);
    }
    ways
}

/// What the fuzz targets and the mutation test demand of any bytes: an inventory (`Ok(true)`)
/// or an error that blames the image (`Ok(false)`); `Err` says what went wrong instead (an
/// error of another kind, or a reader library's panic, caught but still a bug).
pub fn judge_untrusted(bytes: &[u8], limits: &Limits) -> Result<bool, String> {
    match inventory_of(bytes, limits) {
        Ok(_) => Ok(true),
        Err(e) if !e.is_image_error() => Err(format!("unexpected error kind: {e}")),
        Err(e) if e.is_caught_panic() => Err(format!("a reader library panicked (caught): {e}")),
        Err(_) => Ok(false),
    }
}

/// Opens `bytes` and computes the inventory only: what the fuzz targets exercise.
pub fn inventory_of(bytes: &[u8], limits: &Limits) -> Result<Inventory, VerifyError> {
    let reader = open_image(bytes, limits)?;
    take_inventory(reader.as_ref(), true, &|_| {})
}
