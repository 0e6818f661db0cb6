//! The verification report: the JSON schema (`storedisk verify --json`) as serde structs, and
//! the readable text rendering. Store paths are written in full (`/nix/store/<hash>-<name>`),
//! NAR hashes as `sha256:<nix32>`, sizes in bytes.

use std::fmt::Write as _;

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
    /// The IMAGE argument as given.
    pub image: String,
    /// Store paths at the image root, sorted by base name, hashed from the image contents.
    pub paths: Vec<PathEntry>,
    pub checks: Checks,
}

/// One store path packed in the image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathEntry {
    pub path: String,
    /// NAR size of the path's contents as read from the image.
    pub nar_size: u64,
    /// NAR hash of the path's contents as read from the image (`sha256:<nix32>`).
    pub nar_hash: String,
}

/// The five checks. Each has `ok`: `true`, `false`, or `null` with `why` when its inputs were
/// not given. The other fields are always present (empty when the check did not run).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checks {
    pub complete: Complete,
    pub integrity: Integrity,
    pub self_contained: SelfContained,
    pub runner_overlap: RunnerOverlap,
    pub policy: Policy,
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
    /// A closure path that references it (the first by base name), `null` for a root.
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
    /// The image's store path, when known.
    pub image_path: Option<String>,
    /// References Nix recorded for the image (its own path excluded).
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
    /// Sum of the leaked paths' narSize: what a deployment copies twice.
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
    /// The readable report: `OK` or `N findings` first, then a section per failing check, then
    /// a short summary of what was checked.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        if self.ok {
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
                    "  {}\n    expected {}\n    actual   {}",
                    m.path, m.expected, m.actual
                );
            }
            for e in &c.integrity.invalid_entries {
                let _ = writeln!(out, "  invalid root entry {:?}: {}", e.name, e.why);
            }
        }
        if c.self_contained.ok == Some(false) {
            let _ = writeln!(
                out,
                "\nself_contained: Nix records {} reference(s) from the image {}",
                c.self_contained.references.len(),
                c.self_contained.image_path.as_deref().unwrap_or("?")
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
        let total: u64 = self.paths.iter().map(|p| p.nar_size).sum();
        let _ = writeln!(
            out,
            "\n{} image {}: {} store paths, {} of NAR content",
            self.format,
            self.image,
            self.paths.len(),
            human_bytes(total)
        );
        let statuses = [
            ("complete", c.complete.ok, &c.complete.why),
            ("integrity", c.integrity.ok, &c.integrity.why),
            ("self_contained", c.self_contained.ok, &c.self_contained.why),
            ("runner_overlap", c.runner_overlap.ok, &c.runner_overlap.why),
            ("policy", c.policy.ok, &c.policy.why),
        ];
        for (name, ok, why) in statuses {
            let state = match ok {
                Some(true) => "ok".to_owned(),
                Some(false) => "FAILED".to_owned(),
                None => format!("not checked: {}", why.as_deref().unwrap_or("no input")),
            };
            let _ = writeln!(out, "  {name}: {state}");
        }
        let _ = writeln!(
            out,
            "  without unsafeDiscardReferences Nix would record {} reference(s) from this image",
            c.self_contained.would_reference_count
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
