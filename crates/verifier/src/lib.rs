//! storedisk-verifier: opens a squashfs or erofs Nix store disk image (a file read with
//! positioned reads, or a buffer), inventories the store paths at its root with NAR hashes computed by streaming
//! the image's files (nothing is extracted), and runs the checks that prove the image is
//! self-contained: `complete`, `integrity`, `self_contained`, `runner_overlap`, `policy`.
//!
//! Invariants: read-only; every size, offset and count read from an image is bounded
//! ([`Limits`]) before it drives an allocation or a loop, and a panic inside a format library
//! becomes [`VerifyError::CorruptImage`]. Only [`nix_db`] starts processes; the checks are pure
//! functions over data. The JSON shape lives in [`report`].

pub mod checks;
pub mod error;
pub mod image;
pub mod inventory;
pub mod limits;
pub mod locate;
pub mod nix_db;
pub mod reader;
pub mod report;
pub mod tree;

use std::collections::BTreeSet;
use std::path::PathBuf;

use storedisk_nix::{Closure, StoreDir, StorePath};

pub use checks::{ClosureSource, GuestClosure, Runner};
pub use error::VerifyError;
pub use image::{detect_format, ImageFile, ImageFormat, ImageSource};
pub use inventory::{take_inventory, Inventory, PackedPath};
pub use limits::Limits;
pub use reader::{open_image, ImageReader};
pub use report::{CheckName, Report};

/// Everything besides the image that the checks use. Each missing input makes the checks that
/// need it `null`.
#[derive(Debug, Clone, Default)]
pub struct VerifyInputs {
    /// The logical store directory (`/nix/store`).
    pub store_dir: StoreDir,
    pub guest: Option<GuestClosure>,
    /// The image's own store path.
    pub image_path: Option<StorePath>,
    /// The image's references from the Nix database, or why they are unknown.
    pub image_references: Option<Result<BTreeSet<StorePath>, String>>,
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
/// plus image bytes scanned for references.
pub fn progress_total(reader: &dyn ImageReader, image: ImageSource<'_>) -> u64 {
    reader.tree().file_bytes().saturating_add(image.len())
}

/// The closure recorded in the image: the `registration` file of a packed closure-info path
/// (nixpkgs `closureInfo`), if there is one. Returns the closure-info path and its closure.
pub fn recorded_closure(
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

/// Runs every check. `image` is where the image's bytes are, `reader` the opened image over them,
/// `label` how to name the image in the report. `progress` receives byte counts (it may be
/// called from two threads: hashing and reference scanning run in parallel).
pub fn verify(
    label: &str,
    image: ImageSource<'_>,
    reader: &dyn ImageReader,
    inputs: &VerifyInputs,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Report, VerifyError> {
    let store_dir = &inputs.store_dir;
    // Candidates for "what would Nix record": everything the build of the image could see.
    let mut candidates: BTreeSet<StorePath> = inventory::root_store_paths(reader)
        .0
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    if let Some(guest) = &inputs.guest {
        candidates.extend(guest.closure.iter().map(|i| i.path.clone()));
    }
    let (inventory, would_reference) = std::thread::scope(|scope| {
        let scan = scope.spawn(|| inventory::predict_references(image, candidates, progress));
        // Packed paths' own references are needed only when no guest closure records them.
        let inventory = take_inventory(reader, inputs.guest.is_none(), progress);
        let would = scan
            .join()
            .map_err(|_| VerifyError::Input("the reference scanner thread panicked".to_owned()));
        (inventory, would)
    });
    let inventory = inventory?;
    let would_reference = would_reference??;
    let guest = inputs.guest.as_ref();
    let checks = report::Checks {
        complete: checks::check_complete(
            &inventory,
            guest,
            inputs.registration_path.as_ref(),
            store_dir,
        ),
        integrity: checks::check_integrity(&inventory, guest, store_dir),
        self_contained: checks::check_self_contained(
            inputs.image_path.as_ref(),
            inputs.image_references.clone(),
            &would_reference,
            store_dir,
        ),
        runner_overlap: checks::check_runner_overlap(
            &inventory,
            guest,
            inputs.runner.as_ref(),
            inputs.image_path.as_ref(),
            inputs.registration_path.as_ref(),
            inputs.physical_store.as_deref(),
            store_dir,
        )?,
        policy: checks::check_policy(&inventory, inputs.runner.as_ref(), &inputs.allow, store_dir)?,
    };
    let findings = checks.complete.missing.len()
        + checks.integrity.mismatched.len()
        + checks.integrity.invalid_entries.len()
        + checks.self_contained.references.len()
        + checks.runner_overlap.paths.len()
        + checks.policy.violations.len();
    let ok = [
        checks.complete.ok,
        checks.integrity.ok,
        checks.self_contained.ok,
        checks.runner_overlap.ok,
        checks.policy.ok,
    ]
    .iter()
    .all(|c| *c != Some(false));
    let checked = checks.ran();
    Ok(Report {
        ok,
        findings,
        format: reader.format(),
        image: label.to_owned(),
        paths: inventory
            .paths
            .iter()
            .map(|p| report::PathEntry {
                path: store_dir.display(&p.path),
                nar_size: p.nar_size,
                nar_hash: p.nar_hash.to_nix32(),
            })
            .collect(),
        checks,
        checked,
        required_not_run: Vec::new(),
    })
}

/// Reads a freshly built image back and checks that it holds exactly `closure` with the NAR
/// hashes recorded there: the builder's guard against writers (ours, mkfs.erofs) that produce
/// images the kernel reads differently from the store. `Err` says what differs; paths of the
/// closure without a recorded narHash are hashed from `physical_store` for the comparison.
pub fn read_back(
    image: &std::path::Path,
    closure: &Closure,
    physical_store: &std::path::Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), String> {
    let store_dir = &closure.store_dir;
    let file = ImageFile::open(image).map_err(|e| e.to_string())?;
    let reader = open_image(&file, &Limits::default()).map_err(|e| e.to_string())?;
    let inventory = take_inventory(reader.as_ref(), false, progress).map_err(|e| e.to_string())?;
    let mut expected = closure.clone();
    for info in closure.iter().filter(|i| i.nar_hash.is_none()) {
        let physical = physical_store.join(info.path.base_name());
        let (hash, size) = storedisk_nix::nar::hash_path(&physical).map_err(|e| e.to_string())?;
        expected.set_nar_hash(&info.path, hash, size);
    }
    let guest = GuestClosure {
        closure: expected,
        source: ClosureSource::File,
    };
    let complete = checks::check_complete(&inventory, Some(&guest), None, store_dir);
    let integrity = checks::check_integrity(&inventory, Some(&guest), store_dir);
    let mut problems: Vec<String> = Vec::new();
    problems.extend(
        complete
            .missing
            .iter()
            .map(|m| format!("{} is missing", m.path)),
    );
    problems.extend(
        complete
            .extra
            .iter()
            .map(|p| format!("{p} is not in the closure")),
    );
    problems.extend(integrity.mismatched.iter().map(|m| {
        format!(
            "{} reads back with NAR hash {} ({} bytes), not {} ({} bytes)",
            m.path,
            m.actual,
            m.actual_size,
            m.expected,
            m.expected_size.map_or("?".to_owned(), |s| s.to_string())
        )
    }));
    problems.extend(
        integrity
            .invalid_entries
            .iter()
            .map(|e| format!("root entry {:?}: {}", e.name, e.why)),
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Opens `bytes` and computes the inventory only: what the fuzz targets exercise.
pub fn inventory_of(bytes: &[u8], limits: &Limits) -> Result<Inventory, VerifyError> {
    let reader = open_image(bytes, limits)?;
    take_inventory(reader.as_ref(), true, &|_| {})
}
