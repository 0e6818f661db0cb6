//! The verification report: the JSON schema (`storedisk verify --json`) as serde structs (the
//! CLI lays it out as text, and the harness reads it back). Store paths are written in full (`/nix/store/<hash>-<name>`),
//! NAR hashes as `sha256:<nix32>`, sizes in bytes.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::image::ImageFormat;
use crate::locate::Location;

/// Top level of `storedisk verify --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// True when no check is `false` (checks that could not run are `null` and do not count).
    pub ok: bool,
    /// Number of individual findings (missing paths, mismatches, invalid entries, image
    /// references, leaked paths, policy violations); the text report's first line.
    pub findings: usize,
    /// `"squashfs"` or `"erofs"`.
    pub format: ImageFormat,
    /// The IMAGE argument as given; the first one when the store disk is a set of layers.
    pub image: String,
    /// Every image of the store disk, in the order given: one, or the layers of a set.
    #[serde(default)]
    pub images: Vec<ImageEntry>,
    /// Store paths at the images' roots, sorted by base name (then layer), hashed from the
    /// image contents. A path at the root of two layers is listed once per layer.
    pub paths: Vec<PathEntry>,
    pub checks: Checks,
    /// The checks that ran (`ok` true or false), in the order of `checks`; empty when nothing
    /// was checked (every check `null`).
    #[serde(default)]
    pub checked: Vec<CheckName>,
    /// Checks named by `storedisk verify --require` that did not run, with why: each is a
    /// finding and makes `ok` false.
    #[serde(default)]
    pub required_not_run: Vec<NotRun>,
}

/// The six checks by name, as the keys of `checks` and the values of `--require`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckName {
    Complete,
    Integrity,
    SelfContained,
    RunnerOverlap,
    Policy,
    Disjoint,
}

impl CheckName {
    /// Every check, in the order of `checks`.
    pub const ALL: [CheckName; 6] = [
        CheckName::Complete,
        CheckName::Integrity,
        CheckName::SelfContained,
        CheckName::RunnerOverlap,
        CheckName::Policy,
        CheckName::Disjoint,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CheckName::Complete => "complete",
            CheckName::Integrity => "integrity",
            CheckName::SelfContained => "self_contained",
            CheckName::RunnerOverlap => "runner_overlap",
            CheckName::Policy => "policy",
            CheckName::Disjoint => "disjoint",
        }
    }
}

impl fmt::Display for CheckName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A required check that did not run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotRun {
    pub check: CheckName,
    /// The check's own `why`: which input was missing and the flag that gives it.
    pub why: String,
}

/// One image of the store disk: the image, or one layer of a set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageEntry {
    /// The IMAGE argument as given.
    pub image: String,
    pub format: ImageFormat,
    /// Number of store paths at its root.
    pub paths: usize,
    /// Sum of the NAR sizes of the store paths at its root.
    pub nar_bytes: u64,
}

/// One store path packed in the image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathEntry {
    pub path: String,
    /// The image holding it: an index into `images` (0 for a single image).
    #[serde(default)]
    pub layer: usize,
    /// NAR size of the path's contents as read from the image.
    pub nar_size: u64,
    /// NAR hash of the path's contents as read from the image (`sha256:<nix32>`).
    pub nar_hash: String,
}

/// The six checks. Each has `ok`: `true`, `false`, or `null` with `why` when its inputs were
/// not given. The other fields are always present (empty when the check did not run).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checks {
    pub complete: Complete,
    pub integrity: Integrity,
    pub self_contained: SelfContained,
    pub runner_overlap: RunnerOverlap,
    pub policy: Policy,
    /// Absent from reports written before layer sets.
    #[serde(default)]
    pub disjoint: Disjoint,
}

/// An input a check needs and was not given: a value, so that the library says what was
/// missing and the front end says how to give it (the CLI names its flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingInput {
    /// The guest closure (neither given nor packed in the image as a closure-info).
    GuestClosure,
    /// NAR hashes for some packed paths (the closure given records none for them).
    RecordedHashes,
    /// The image's own store path (the image file is not in the store).
    ImagePath,
    /// The runner's closure.
    Runner,
    /// Globs of what the runner closure may hold outside the image.
    AllowGlobs,
    /// A second image: one image has nothing to be disjoint from.
    SecondLayer,
}

impl fmt::Display for MissingInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MissingInput::GuestClosure => {
                "no guest closure (none given, and no closure-info registration in the image)"
            }
            MissingInput::RecordedHashes => "the closure records no NAR hash for some packed paths",
            MissingInput::ImagePath => "the image's store path is not known",
            MissingInput::Runner => "no runner closure",
            MissingInput::AllowGlobs => "no allowed globs",
            MissingInput::SecondLayer => "one image: nothing to compare",
        })
    }
}

impl Checks {
    /// Which input kept check `name` from running, if a missing input did.
    pub fn missing_input(&self, name: CheckName) -> Option<MissingInput> {
        match name {
            CheckName::Complete => self.complete.missing_input,
            CheckName::Integrity => self.integrity.missing_input,
            CheckName::SelfContained => self.self_contained.missing_input,
            CheckName::RunnerOverlap => self.runner_overlap.missing_input,
            CheckName::Policy => self.policy.missing_input,
            CheckName::Disjoint => self.disjoint.missing_input,
        }
    }

    /// Each check's name, `ok` and `why`, in schema order.
    pub fn statuses(&self) -> [(CheckName, Option<bool>, Option<&str>); 6] {
        [
            (
                CheckName::Complete,
                self.complete.ok,
                self.complete.why.as_deref(),
            ),
            (
                CheckName::Integrity,
                self.integrity.ok,
                self.integrity.why.as_deref(),
            ),
            (
                CheckName::SelfContained,
                self.self_contained.ok,
                self.self_contained.why.as_deref(),
            ),
            (
                CheckName::RunnerOverlap,
                self.runner_overlap.ok,
                self.runner_overlap.why.as_deref(),
            ),
            (
                CheckName::Policy,
                self.policy.ok,
                self.policy.why.as_deref(),
            ),
            (
                CheckName::Disjoint,
                self.disjoint.ok,
                self.disjoint.why.as_deref(),
            ),
        ]
    }

    /// The checks that ran: `ok` is `true` or `false`.
    pub fn ran(&self) -> Vec<CheckName> {
        self.statuses()
            .into_iter()
            .filter(|(_, ok, _)| ok.is_some())
            .map(|(name, _, _)| name)
            .collect()
    }
}

/// Every path of the closure is in the image.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Complete {
    pub ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// The input whose absence kept the check from running, when that is why it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_input: Option<MissingInput>,
    /// Where the closure came from: `"file"` (`--closure`), `"nix-db"` (the local Nix
    /// database, for the roots recorded in the image's closure-info registration), or
    /// `"image-registration"` (that registration itself); `null` when there is none.
    pub closure_source: Option<String>,
    /// Number of paths in the closure.
    pub closure_paths: usize,
    /// Closure paths absent from the image.
    pub missing: Vec<Missing>,
    /// Packed paths that are not in the closure (informational, not a failure).
    pub extra: Vec<String>,
}

/// A closure path absent from the image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Missing {
    pub path: String,
    /// A closure path that references it, `null` for a root: a packed one first, the
    /// closure-info only when nothing else references it, then the first by base name.
    pub needed_by: Option<String>,
}

/// Each packed path's NAR hash equals the closure's recorded narHash ("nothing lost").
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Integrity {
    /// `false` on any mismatch or invalid root entry; `null` when no closure was given and
    /// every root entry is a valid store path.
    pub ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// The input whose absence kept the check from running, when that is why it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_input: Option<MissingInput>,
    /// Number of packed paths compared with a recorded hash.
    pub checked: usize,
    pub mismatched: Vec<Mismatch>,
    /// Root entries that cannot be store paths (bad name, or a device/FIFO/socket inside).
    pub invalid_entries: Vec<InvalidEntryReport>,
    /// Packed closure paths the closure records no narHash for (not compared).
    pub unchecked: Vec<String>,
}

/// A packed path whose contents differ from what Nix recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mismatch {
    pub path: String,
    /// The image holding this copy: an index into `images`.
    #[serde(default)]
    pub layer: usize,
    /// Recorded narHash (`sha256:<nix32>`).
    pub expected: String,
    /// NAR hash of the image's contents.
    pub actual: String,
    /// Recorded narSize, when known.
    pub expected_size: Option<u64>,
    pub actual_size: u64,
}

/// A root entry that cannot be a store path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvalidEntryReport {
    pub name: String,
    /// The image it is the root entry of: an index into `images`.
    #[serde(default)]
    pub layer: usize,
    pub why: String,
}

/// The image's own store path has no Nix references.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SelfContained {
    /// `false` when the Nix database records references from the image's store path to other
    /// paths; `null` when the image is not a store path (give `--image-path`) or Nix could not
    /// be asked.
    pub ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// The input whose absence kept the check from running, when that is why it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_input: Option<MissingInput>,
    /// The image's store path, when known (the first image's, for a set of layers).
    pub image_path: Option<String>,
    /// The store paths of every image whose store path is known (each layer of a set).
    #[serde(default)]
    pub image_paths: Vec<String>,
    /// References Nix recorded for the images (each one's own path excluded).
    pub references: Vec<String>,
    /// What Nix *would* record if the image were built without `unsafeDiscardReferences`:
    /// the closure's and the image's store paths whose hash part occurs in the image bytes
    /// (Nix's own scanning algorithm). Always computed.
    pub would_reference: Vec<String>,
    pub would_reference_count: usize,
}

/// The runner does not drag guest paths into its closure.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RunnerOverlap {
    /// `false` when any path is leaked; `null` without `--runner`/`--runner-closure`.
    pub ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// The input whose absence kept the check from running, when that is why it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_input: Option<MissingInput>,
    /// The runner's store path.
    pub runner: Option<String>,
    /// Number of paths in the runner's closure.
    pub runner_closure_paths: usize,
    /// The cut: the guest roots, packed paths no other packed path references apart from the
    /// closure-info (the toplevel, the closure-info). The image's own references are cut as
    /// edges, not listed here.
    pub guest_roots: Vec<String>,
    /// Sum of the narSize of the leaked paths the image holds: what a deployment copies twice.
    pub duplicated_bytes: u64,
    /// Leaked paths: in the runner's closure only through a reference to the guest side.
    pub paths: Vec<Leak>,
    /// Packed paths the runner needs for itself (informational, not a failure).
    pub shared: Vec<String>,
    pub shared_bytes: u64,
}

/// A leaked path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Leak {
    pub path: String,
    pub nar_size: u64,
    /// Shortest reference chain `[runner, ..., path]`.
    pub chain: Vec<String>,
    /// Where the first hop of `chain` (runner -> chain[1]) sits inside the runner's files,
    /// when they are readable under `--store-dir`; `null` otherwise.
    #[serde(rename = "where")]
    pub location: Option<Location>,
}

/// Paths in the runner closure must match an `--allow` pattern or be in the image.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Policy {
    /// `false` on any violation; `null` without `--allow` or without a runner closure.
    pub ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// The input whose absence kept the check from running, when that is why it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_input: Option<MissingInput>,
    /// The `--allow` globs, matched against a path's name (`glibc-2.40`) and base name
    /// (`<hash>-glibc-2.40`).
    pub allow: Vec<String>,
    pub violations: Vec<Violation>,
}

/// A runner closure path outside the image that no pattern allows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Violation {
    pub path: String,
    pub nar_size: Option<u64>,
    /// Shortest reference chain from the runner.
    pub chain: Vec<String>,
}

/// No store path is at the root of two layers: the guest stacks the layers with overlayfs, so
/// a second copy would be hidden by (or, for a directory, merged with) the first.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Disjoint {
    /// `false` when a store path is in two layers; `null` for a single image.
    pub ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// The input whose absence kept the check from running, when that is why it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_input: Option<MissingInput>,
    /// Number of images compared.
    pub layers: usize,
    pub duplicates: Vec<Duplicate>,
}

/// A store path at the root of several layers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Duplicate {
    pub path: String,
    /// The images holding it, in the order given.
    pub images: Vec<String>,
}

/// `1.5 MiB`-style sizes (binary units, one decimal).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

impl Report {
    /// Makes the checks in `required` count: each one that did not run (`ok` is `null`) is
    /// recorded in `required_not_run` as a finding, and the report fails.
    pub fn require(&mut self, required: &[CheckName]) {
        let not_run: Vec<NotRun> = self
            .checks
            .statuses()
            .into_iter()
            .filter(|(name, ok, _)| ok.is_none() && required.contains(name))
            .map(|(check, _, why)| NotRun {
                check,
                why: why.unwrap_or("its inputs were not given").to_owned(),
            })
            .collect();
        if !not_run.is_empty() {
            self.ok = false;
            self.findings += not_run.len();
        }
        self.required_not_run.extend(not_run);
    }

    /// True when no check ran: every check is `null`.
    pub fn nothing_checked(&self) -> bool {
        self.checks.ran().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn formats_sizes_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1_500_000), "1.4 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
