//! The verification report: the JSON schema (`storedisk verify --json`) as serde structs, and
//! the readable text rendering. Store paths are written in full (`/nix/store/<hash>-<name>`),
//! NAR hashes as `sha256:<nix32>`, sizes in bytes.

use std::fmt::{self, Write as _};

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

impl Checks {
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

    /// ` (in LABEL)` naming layer `index` of a set; empty for a single image.
    fn in_layer(&self, index: usize) -> String {
        match self.images.get(index) {
            Some(layer) if self.images.len() > 1 => format!(" (in {})", layer.image),
            _ => String::new(),
        }
    }

    /// True when no check ran: every check is `null`.
    pub fn nothing_checked(&self) -> bool {
        self.checks.ran().is_empty()
    }

    /// The readable report: `OK`, `nothing checked` (every check lacked its inputs) or
    /// `N findings` first, then a section per failing check, then a short summary of what was
    /// checked and, for each check that did not run, why and the flag that would enable it.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        if self.ok && self.nothing_checked() {
            out.push_str("nothing checked\n");
        } else if self.ok {
            out.push_str("OK\n");
        } else {
            let _ = writeln!(
                out,
                "{} finding{}",
                self.findings,
                if self.findings == 1 { "" } else { "s" }
            );
        }
        let c = &self.checks;
        if !self.required_not_run.is_empty() {
            let _ = writeln!(
                out,
                "\n{} required check(s) did not run",
                self.required_not_run.len()
            );
            for n in &self.required_not_run {
                let _ = writeln!(out, "  {}: {}", n.check, n.why);
            }
        }
        if c.complete.ok == Some(false) {
            let _ = writeln!(
                out,
                "\ncomplete: {} of {} closure paths are missing from the image",
                c.complete.missing.len(),
                c.complete.closure_paths
            );
            for m in &c.complete.missing {
                match &m.needed_by {
                    Some(by) => {
                        let _ = writeln!(out, "  {}\n    needed by {by}", m.path);
                    }
                    None => {
                        let _ = writeln!(out, "  {} (a root of the closure)", m.path);
                    }
                }
            }
        }
        if c.integrity.ok == Some(false) {
            let _ = writeln!(
                out,
                "\nintegrity: {} path(s) differ from what Nix recorded",
                c.integrity.mismatched.len()
            );
            for m in &c.integrity.mismatched {
                let _ = writeln!(
                    out,
                    "  {}{}\n    expected {}\n    actual   {}",
                    m.path,
                    self.in_layer(m.layer),
                    m.expected,
                    m.actual
                );
            }
            for e in &c.integrity.invalid_entries {
                let _ = writeln!(
                    out,
                    "  invalid root entry {:?}{}: {}",
                    e.name,
                    self.in_layer(e.layer),
                    e.why
                );
            }
        }
        if c.self_contained.ok == Some(false) {
            let _ = writeln!(
                out,
                "\nself_contained: Nix records {} reference(s) from the image {}",
                c.self_contained.references.len(),
                if c.self_contained.image_paths.len() > 1 {
                    c.self_contained.image_paths.join(", ")
                } else {
                    c.self_contained
                        .image_path
                        .as_deref()
                        .unwrap_or("?")
                        .to_owned()
                }
            );
            for r in &c.self_contained.references {
                let _ = writeln!(out, "  {r}");
            }
            let _ = writeln!(
                out,
                "  (build the image with __structuredAttrs = true; unsafeDiscardReferences.out = true;)"
            );
        }
        if c.runner_overlap.ok == Some(false) {
            let _ = writeln!(
                out,
                "\nrunner_overlap: {} path(s) leak into the runner's closure, {} copied twice",
                c.runner_overlap.paths.len(),
                human_bytes(c.runner_overlap.duplicated_bytes)
            );
            for leak in &c.runner_overlap.paths {
                let _ = writeln!(out, "  {} ({})", leak.path, human_bytes(leak.nar_size));
                let _ = writeln!(out, "    chain: {}", leak.chain.join(" -> "));
                if let Some(at) = &leak.location {
                    let _ = writeln!(out, "    where: {at}");
                }
            }
        }
        if c.policy.ok == Some(false) {
            let _ = writeln!(
                out,
                "\npolicy: {} runner closure path(s) match no --allow pattern",
                c.policy.violations.len()
            );
            for v in &c.policy.violations {
                let size = v
                    .nar_size
                    .map(human_bytes)
                    .unwrap_or_else(|| "size unknown".to_owned());
                let _ = writeln!(
                    out,
                    "  {} ({size})\n    chain: {}",
                    v.path,
                    v.chain.join(" -> ")
                );
            }
        }
        if c.disjoint.ok == Some(false) {
            let _ = writeln!(
                out,
                "\ndisjoint: {} store path(s) are at the root of more than one layer",
                c.disjoint.duplicates.len()
            );
            for d in &c.disjoint.duplicates {
                let _ = writeln!(out, "  {}\n    in {}", d.path, d.images.join(" and "));
            }
        }
        let total: u64 = self.paths.iter().map(|p| p.nar_size).sum();
        if self.images.len() > 1 {
            let _ = writeln!(
                out,
                "\n{} store disk of {} layers: {} store paths, {} of NAR content",
                self.format,
                self.images.len(),
                self.paths.len(),
                human_bytes(total)
            );
            for (i, layer) in self.images.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "  layer {i}: {}: {} store paths, {}",
                    layer.image,
                    layer.paths,
                    human_bytes(layer.nar_bytes)
                );
            }
        } else {
            let _ = writeln!(
                out,
                "\n{} image {}: {} store paths, {} of NAR content",
                self.format,
                self.image,
                self.paths.len(),
                human_bytes(total)
            );
        }
        for (name, ok, why) in c.statuses() {
            let required = self.required_not_run.iter().any(|n| n.check == name);
            let state = match ok {
                Some(true) => "ok".to_owned(),
                Some(false) => "FAILED".to_owned(),
                None if required => format!(
                    "REQUIRED, not checked: {}",
                    why.unwrap_or("its inputs were not given")
                ),
                None => format!(
                    "not checked: {}",
                    why.unwrap_or("its inputs were not given")
                ),
            };
            let _ = writeln!(out, "  {name}: {state}");
        }
        let _ = writeln!(
            out,
            "  without unsafeDiscardReferences Nix would record {} reference(s) from {}",
            c.self_contained.would_reference_count,
            if self.images.len() > 1 {
                "these images"
            } else {
                "this image"
            }
        );
        if !c.runner_overlap.shared.is_empty() {
            let _ = writeln!(
                out,
                "  the runner shares {} packed path(s) ({}) it needs itself",
                c.runner_overlap.shared.len(),
                human_bytes(c.runner_overlap.shared_bytes)
            );
        }
        out
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
