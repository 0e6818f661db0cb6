//! The six checks, as pure functions over data: the inventory, closures, the image's recorded
//! references and the reference scanner's prediction. Nothing here starts a process.
//!
//! A set of layers is checked as one store disk: `complete`, `integrity`, `runner_overlap` and
//! `policy` see the layers' merged [`Inventory`]; `self_contained` is checked per image and
//! merged ([`merge_self_contained`]); `disjoint` compares the layers. [`ways_in`] reads a
//! failed `runner_overlap` as the few references that let the guest closure in.

use std::collections::{BTreeMap, BTreeSet};

use globset::{Glob, GlobSetBuilder};
use storedisk_nix::{Closure, StoreDir, StorePath};

use crate::error::VerifyError;
use crate::inventory::{InvalidEntry, Inventory};
use crate::report::{
    Complete, Disjoint, Duplicate, Integrity, InvalidEntryReport, Leak, Mismatch, Missing,
    MissingInput, Policy, RunnerOverlap, SelfContained, Violation,
};

pub mod ways_in;
pub use ways_in::{ways_in, WayIn};

/// Where the guest closure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosureSource {
    /// `--closure FILE`.
    File,
    /// The local Nix database, for the roots recorded in the image.
    NixDb,
    /// The closure-info `registration` file packed in the image.
    ImageRegistration,
}

impl ClosureSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ClosureSource::File => "file",
            ClosureSource::NixDb => "nix-db",
            ClosureSource::ImageRegistration => "image-registration",
        }
    }
}

/// The guest closure the image should hold.
#[derive(Debug, Clone)]
pub struct GuestClosure {
    pub closure: Closure,
    pub source: ClosureSource,
}

/// The runner and its closure.
#[derive(Debug, Clone)]
pub struct Runner {
    pub path: StorePath,
    pub closure: Closure,
}

impl Runner {
    /// The runner named by `named`, or else the closure's single root.
    pub fn from_closure(closure: Closure, named: Option<StorePath>) -> Result<Self, VerifyError> {
        let path = match named {
            Some(p) => {
                if !closure.contains(&p) {
                    return Err(VerifyError::Input(format!(
                        "the runner {} is not in the runner closure",
                        closure.display(&p)
                    )));
                }
                p
            }
            None => {
                let roots = closure.roots();
                if roots.is_empty() && !closure.is_empty() {
                    return Err(VerifyError::Input(
                        "the runner closure has no root: every path in it is referenced by \
                         another (a reference cycle?); name the runner"
                            .to_owned(),
                    ));
                }
                if roots.len() != 1 {
                    return Err(VerifyError::Input(format!(
                        "the runner closure has {} roots ({}); name the runner",
                        roots.len(),
                        roots
                            .iter()
                            .map(|r| r.base_name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                roots
                    .into_iter()
                    .next()
                    .ok_or_else(|| VerifyError::Input("empty runner closure".to_owned()))?
            }
        };
        Ok(Runner { path, closure })
    }
}

/// `complete`: every closure path is packed. `registration_path` is the closure-info packed in
/// the image, if any: its registration lists every path, so it is named as needing a missing
/// path only when no other path references it.
pub fn check_complete(
    inventory: &Inventory,
    guest: Option<&GuestClosure>,
    registration_path: Option<&StorePath>,
    store_dir: &StoreDir,
) -> Complete {
    let Some(guest) = guest else {
        return Complete {
            why: Some(MissingInput::GuestClosure.to_string()),
            missing_input: Some(MissingInput::GuestClosure),
            ..Complete::default()
        };
    };
    let closure = &guest.closure;
    let mut referrers_of: BTreeMap<&StorePath, Vec<&StorePath>> = BTreeMap::new();
    for info in closure.iter() {
        for r in info.references.iter().filter(|r| **r != info.path) {
            referrers_of.entry(r).or_default().push(&info.path);
        }
    }
    let mut missing = Vec::new();
    for info in closure.iter() {
        if inventory.contains(&info.path) {
            continue;
        }
        // Prefer a referrer that is itself packed: that is the path that will break.
        let referrers = referrers_of
            .get(&info.path)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let users = || referrers.iter().filter(|r| Some(**r) != registration_path);
        let needed_by = users()
            .find(|r| inventory.contains(r))
            .or_else(|| users().next())
            .or(referrers.first())
            .map(|r| store_dir.display(r));
        missing.push(Missing {
            path: store_dir.display(&info.path),
            needed_by,
        });
    }
    let mut extra: Vec<String> = inventory
        .paths
        .iter()
        .filter(|p| !closure.contains(&p.path))
        .map(|p| store_dir.display(&p.path))
        .collect();
    // A path in two layers is one extra path.
    extra.dedup();
    Complete {
        missing_input: None,
        ok: Some(missing.is_empty()),
        why: None,
        closure_source: Some(guest.source.as_str().to_owned()),
        closure_paths: closure.len(),
        missing,
        extra,
    }
}

/// `integrity`: packed NAR hashes equal the recorded ones; root entries are store paths.
pub fn check_integrity(
    inventory: &Inventory,
    guest: Option<&GuestClosure>,
    store_dir: &StoreDir,
) -> Integrity {
    let invalid_entries: Vec<InvalidEntryReport> = inventory
        .invalid
        .iter()
        .map(|InvalidEntry { name, why, layer }| InvalidEntryReport {
            name: name.clone(),
            layer: *layer,
            why: why.clone(),
        })
        .collect();
    let Some(guest) = guest else {
        let bad = !invalid_entries.is_empty();
        return Integrity {
            ok: bad.then_some(false),
            why: Some(MissingInput::GuestClosure.to_string()),
            missing_input: Some(MissingInput::GuestClosure),
            invalid_entries,
            ..Integrity::default()
        };
    };
    let mut mismatched = Vec::new();
    let mut unchecked = Vec::new();
    let mut checked = 0;
    for packed in &inventory.paths {
        let Some(info) = guest.closure.get(&packed.path) else {
            continue;
        };
        let Some(expected) = info.nar_hash else {
            unchecked.push(store_dir.display(&packed.path));
            continue;
        };
        checked += 1;
        let size_differs = info.nar_size.is_some_and(|s| s != packed.nar_size);
        if expected != packed.nar_hash || size_differs {
            mismatched.push(Mismatch {
                path: store_dir.display(&packed.path),
                layer: packed.layer,
                expected: expected.to_nix32(),
                actual: packed.nar_hash.to_nix32(),
                expected_size: info.nar_size,
                actual_size: packed.nar_size,
            });
        }
    }
    // A path with no recorded narHash proves nothing either way: not "ok".
    let (ok, why) = if !mismatched.is_empty() || !invalid_entries.is_empty() {
        (Some(false), None)
    } else if !unchecked.is_empty() {
        let why = format!(
            "{} packed path(s) have no recorded narHash to compare with",
            unchecked.len()
        );
        (None, Some(why))
    } else {
        (Some(true), None)
    };
    Integrity {
        ok,
        missing_input: why.as_ref().map(|_| MissingInput::RecordedHashes),
        why,
        checked,
        mismatched,
        invalid_entries,
        unchecked,
    }
}

/// `self_contained`: the image's store path has no references in the Nix database.
/// `references` is `None` when the image is not a store path, or the reason Nix gave none.
pub fn check_self_contained(
    image_path: Option<&StorePath>,
    references: Option<Result<BTreeSet<StorePath>, String>>,
    would_reference: &BTreeSet<StorePath>,
    store_dir: &StoreDir,
) -> SelfContained {
    let would: Vec<String> = would_reference
        .iter()
        .map(|p| store_dir.display(p))
        .collect();
    let base = SelfContained {
        image_path: image_path.map(|p| store_dir.display(p)),
        image_paths: image_path
            .map(|p| store_dir.display(p))
            .into_iter()
            .collect(),
        would_reference_count: would.len(),
        would_reference: would,
        ..SelfContained::default()
    };
    match (image_path, references) {
        (None, _) => SelfContained {
            why: Some(MissingInput::ImagePath.to_string()),
            missing_input: Some(MissingInput::ImagePath),
            ..base
        },
        (Some(_), None) => SelfContained {
            why: Some("the image's references were not queried".to_owned()),
            ..base
        },
        (Some(_), Some(Err(why))) => SelfContained {
            why: Some(why),
            ..base
        },
        (Some(me), Some(Ok(refs))) => {
            let references: Vec<String> = refs
                .iter()
                .filter(|r| *r != me)
                .map(|r| store_dir.display(r))
                .collect();
            SelfContained {
                ok: Some(references.is_empty()),
                references,
                ..base
            }
        }
    }
}

/// `self_contained` of a set of layers from each image's own (`(label, result)`, in layer
/// order): failed when any image has references, passed when every image passed, otherwise not
/// checked, with the first image's reason. References are the union of the images'. A single
/// image's result is returned as it is.
pub fn merge_self_contained(per_image: Vec<(String, SelfContained)>) -> SelfContained {
    if per_image.len() == 1 {
        if let Some((_, only)) = per_image.into_iter().next() {
            return only;
        }
        return SelfContained::default();
    }
    let oks: Vec<Option<bool>> = per_image.iter().map(|(_, s)| s.ok).collect();
    let ok = if oks.contains(&Some(false)) {
        Some(false)
    } else if !oks.is_empty() && oks.iter().all(|ok| *ok == Some(true)) {
        Some(true)
    } else {
        None
    };
    let not_run = per_image.iter().find(|(_, s)| s.ok.is_none());
    let (why, missing_input) = match (ok, not_run) {
        (None, Some((label, s))) => (
            Some(format!(
                "{label}: {}",
                s.why.as_deref().unwrap_or("not checked")
            )),
            s.missing_input,
        ),
        _ => (None, None),
    };
    let image_path = per_image.first().and_then(|(_, s)| s.image_path.clone());
    let mut image_paths = Vec::new();
    let mut references = BTreeSet::new();
    let mut would = BTreeSet::new();
    for (_, s) in per_image {
        image_paths.extend(s.image_path);
        references.extend(s.references);
        would.extend(s.would_reference);
    }
    SelfContained {
        missing_input,
        ok,
        why,
        image_path,
        image_paths,
        references: references.into_iter().collect(),
        would_reference_count: would.len(),
        would_reference: would.into_iter().collect(),
    }
}

/// `disjoint`: no store path is at the root of two of the layers named `labels` (indexed by
/// [`crate::PackedPath::layer`]). Not checked for a single image.
pub fn check_disjoint(inventory: &Inventory, labels: &[String], store_dir: &StoreDir) -> Disjoint {
    if labels.len() < 2 {
        return Disjoint {
            why: Some(MissingInput::SecondLayer.to_string()),
            missing_input: Some(MissingInput::SecondLayer),
            layers: labels.len(),
            ..Disjoint::default()
        };
    }
    let label = |layer: usize| {
        labels
            .get(layer)
            .cloned()
            .unwrap_or_else(|| format!("layer {layer}"))
    };
    let mut duplicates = Vec::new();
    // The inventory is sorted by path, then layer: copies of a path are neighbours.
    for copies in inventory.paths.chunk_by(|a, b| a.path == b.path) {
        if let [first, ..] = copies {
            if copies.len() > 1 {
                duplicates.push(Duplicate {
                    path: store_dir.display(&first.path),
                    images: copies.iter().map(|p| label(p.layer)).collect(),
                });
            }
        }
    }
    Disjoint {
        missing_input: None,
        ok: Some(duplicates.is_empty()),
        why: None,
        layers: labels.len(),
        duplicates,
    }
}

/// The guest side of the graph: the paths a runner must not need, because reaching them means
/// reaching into the guest. They are the packed paths that no other packed path references,
/// not counting the references of `registration_path` (the closure-info, whose registration
/// text lists the whole closure rather than using it; counting it would hide the toplevel).
/// References come from the guest closure, or else from the runner closure, or else from the
/// image itself (Nix's scanner over each packed path's NAR, as Nix found them when it built it).
pub fn guest_roots(
    inventory: &Inventory,
    guest: Option<&Closure>,
    runner: &Closure,
    registration_path: Option<&StorePath>,
) -> BTreeSet<StorePath> {
    let packed: BTreeSet<&StorePath> = inventory.paths.iter().map(|p| &p.path).collect();
    let mut referenced: BTreeSet<&StorePath> = BTreeSet::new();
    for p in packed.iter().filter(|p| Some(**p) != registration_path) {
        let recorded = guest.and_then(|g| g.get(p)).or_else(|| runner.get(p));
        let references = match recorded {
            Some(info) => &info.references,
            None => match inventory.get(p) {
                Some(packed) => &packed.references,
                None => continue,
            },
        };
        referenced.extend(references.iter().filter(|r| *r != *p));
    }
    packed
        .iter()
        .filter(|p| !referenced.contains(*p))
        .map(|p| (*p).clone())
        .collect()
}

/// `runner_overlap`: what the runner's closure holds only through the guest side.
/// `image_paths` are the store paths of the image, or of every layer of a set.
pub fn check_runner_overlap(
    inventory: &Inventory,
    guest: Option<&GuestClosure>,
    runner: Option<&Runner>,
    image_paths: &[StorePath],
    registration_path: Option<&StorePath>,
    store_dir: &StoreDir,
) -> Result<RunnerOverlap, VerifyError> {
    let Some(runner) = runner else {
        return Ok(RunnerOverlap {
            why: Some(MissingInput::Runner.to_string()),
            missing_input: Some(MissingInput::Runner),
            ..RunnerOverlap::default()
        });
    };
    let closure = &runner.closure;
    let mut cut = guest_roots(
        inventory,
        guest.map(|g| &g.closure),
        closure,
        registration_path,
    );
    // The image itself is meant to travel with the runner; what it references (leak 1) is what
    // leaks, so its edges are cut rather than the paths it points to: a path the runner also
    // needs by itself (the busybox of its script) stays shared, not leaked. So does each layer
    // of a set: every one travels with the runner.
    for me in image_paths {
        cut.remove(me);
    }
    cut.remove(&runner.path);
    let mut graph = closure.clone();
    for me in image_paths {
        graph.clear_references(me);
    }
    let all = closure.requisites([runner.path.clone()])?;
    let kept = graph.reachable_avoiding([runner.path.clone()], &cut)?;
    let chains = closure.shortest_chains(&runner.path)?;
    let size_of = |p: &StorePath| {
        closure
            .get(p)
            .and_then(|i| i.nar_size)
            .or_else(|| inventory.get(p).map(|x| x.nar_size))
            .unwrap_or(0)
    };
    let mut paths = Vec::new();
    for leaked in all.difference(&kept) {
        let chain = chains.get(leaked).cloned().unwrap_or_default();
        paths.push(Leak {
            path: store_dir.display(leaked),
            nar_size: size_of(leaked),
            chain: chain.iter().map(|p| store_dir.display(p)).collect(),
            // Filled in after the checks, from the runner's files ([`crate::locate`]).
            location: None,
        });
    }
    // Copied twice: with the image and with the runner. A leaked path the image lacks (an
    // incomplete image, which `complete` reports) travels once.
    let duplicated_bytes = all
        .difference(&kept)
        .filter(|p| inventory.contains(p))
        .map(size_of)
        .sum();
    let shared: Vec<&StorePath> = kept.iter().filter(|p| inventory.contains(p)).collect();
    Ok(RunnerOverlap {
        missing_input: None,
        ok: Some(paths.is_empty()),
        why: None,
        runner: Some(store_dir.display(&runner.path)),
        runner_closure_paths: all.len(),
        guest_roots: cut.iter().map(|p| store_dir.display(p)).collect(),
        duplicated_bytes,
        paths,
        shared_bytes: shared.iter().map(|p| size_of(p)).sum(),
        shared: shared.iter().map(|p| store_dir.display(p)).collect(),
    })
}

/// `policy`: every runner closure path outside the image matches an `--allow` glob.
pub fn check_policy(
    inventory: &Inventory,
    runner: Option<&Runner>,
    allow: &[String],
    store_dir: &StoreDir,
) -> Result<Policy, VerifyError> {
    if allow.is_empty() {
        return Ok(Policy {
            why: Some(MissingInput::AllowGlobs.to_string()),
            missing_input: Some(MissingInput::AllowGlobs),
            ..Policy::default()
        });
    }
    let Some(runner) = runner else {
        return Ok(Policy {
            why: Some(MissingInput::Runner.to_string()),
            missing_input: Some(MissingInput::Runner),
            allow: allow.to_vec(),
            ..Policy::default()
        });
    };
    let mut set = GlobSetBuilder::new();
    for pattern in allow {
        let glob = Glob::new(pattern)
            .map_err(|e| VerifyError::Input(format!("allowed glob {pattern:?}: {e}")))?;
        set.add(glob);
    }
    let set = set
        .build()
        .map_err(|e| VerifyError::Input(format!("allowed globs: {e}")))?;
    let chains = runner.closure.shortest_chains(&runner.path)?;
    let mut violations = Vec::new();
    for p in runner.closure.requisites([runner.path.clone()])? {
        if inventory.contains(&p) || set.is_match(p.name()) || set.is_match(p.base_name()) {
            continue;
        }
        violations.push(Violation {
            path: store_dir.display(&p),
            nar_size: runner.closure.get(&p).and_then(|i| i.nar_size),
            chain: chains
                .get(&p)
                .map(|c| c.iter().map(|x| store_dir.display(x)).collect())
                .unwrap_or_default(),
        });
    }
    Ok(Policy {
        missing_input: None,
        ok: Some(violations.is_empty()),
        why: None,
        allow: allow.to_vec(),
        violations,
    })
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod world;
