//! The ways into the guest closure behind a failed `runner_overlap`: each reference from the
//! runner's side (the runner, one of its scripts, an image of the store disk) to a leaked path,
//! with what it drags in by itself. A leak report lists hundreds of paths that all come in
//! through two or three such references; these are what a person fixes.
//!
//! Derived from the check's result and the runner's closure, after the check: the report's JSON
//! stays what it was, and the readable report leads with these.

use std::collections::{BTreeMap, BTreeSet};

use storedisk_nix::{StoreDir, StorePath};

use crate::checks::Runner;
use crate::locate::Location;
use crate::report::RunnerOverlap;

/// One way into the guest closure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WayIn {
    /// The runner-side store path holding the reference: it is not leaked itself (the runner
    /// needs it), and a path it references is.
    pub from: String,
    /// The leaked paths `from` references: one, or for an image every leaked path Nix recorded
    /// as the image's reference.
    pub to: Vec<String>,
    /// `from` is an image of the store disk, and `to` are the references Nix recorded for it
    /// (an image built without `unsafeDiscardReferences`).
    pub image: bool,
    /// Leaked paths this way in brings along by itself (`to` and what they reach through other
    /// leaked paths), and their NAR bytes. Ways in overlap: a path two of them reach is counted
    /// by both, so closing one may leave its paths coming in through another.
    pub drags: usize,
    pub drags_bytes: u64,
    /// Where `from`'s files hold the reference, when they are on disk and `to` is one path
    /// ([`crate::locate::locate_ways_in`]).
    pub location: Option<Location>,
}

/// The ways in behind `overlap` (empty when nothing leaked or the check did not run), most
/// bytes dragged first, then by `from` and `to`. `image_paths` are the store disk's images,
/// whose references the check cut as edges.
pub fn ways_in(
    overlap: &RunnerOverlap,
    runner: &Runner,
    image_paths: &[StorePath],
    store_dir: &StoreDir,
) -> Vec<WayIn> {
    let closure = &runner.closure;
    let leaked: BTreeMap<StorePath, u64> = overlap
        .paths
        .iter()
        .filter_map(|leak| Some((store_dir.parse_path(&leak.path).ok()?, leak.nar_size)))
        .collect();
    if leaked.is_empty() {
        return Vec::new();
    }
    let Ok(all) = closure.requisites([runner.path.clone()]) else {
        return Vec::new();
    };
    let kept: BTreeSet<StorePath> = all
        .iter()
        .filter(|p| !leaked.contains_key(*p))
        .cloned()
        .collect();
    // Every edge from a kept path to a leaked one enters the guest side: the check followed
    // every other edge of a kept path, so its target is a guest root, or the edge is an image's.
    let mut entries: BTreeMap<(StorePath, Option<StorePath>), BTreeSet<StorePath>> =
        BTreeMap::new();
    for from in &kept {
        let Some(info) = closure.get(from) else {
            continue;
        };
        let image = image_paths.contains(from);
        for to in info.references.iter().filter(|r| leaked.contains_key(*r)) {
            let key = (from.clone(), (!image).then(|| to.clone()));
            entries.entry(key).or_default().insert(to.clone());
        }
    }
    let mut ways: Vec<WayIn> = entries
        .into_iter()
        .map(|((from, single), to)| {
            // What `to` reaches without passing through a path the runner keeps anyway: a kept
            // path's own references into the guest are ways in of their own.
            let dragged = closure
                .reachable_avoiding(to.iter().cloned(), &kept)
                .unwrap_or_default();
            WayIn {
                from: store_dir.display(&from),
                to: to.iter().map(|p| store_dir.display(p)).collect(),
                image: single.is_none(),
                drags: dragged.len(),
                drags_bytes: dragged.iter().filter_map(|p| leaked.get(p)).sum(),
                location: None,
            }
        })
        .collect();
    ways.sort_by(|a, b| {
        (b.drags_bytes, b.drags)
            .cmp(&(a.drags_bytes, a.drags))
            .then_with(|| (&a.from, &a.to).cmp(&(&b.from, &b.to)))
    });
    ways
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use insta::assert_snapshot;

    use super::*;
    use crate::checks::world::{names, short, World, GUEST};

    /// One line per way in: `from -> to: N paths, B bytes`, `image` marking an image's
    /// recorded references.
    fn ways_in_of(input: &str) -> String {
        let w = World::parse(input);
        let store_dir = StoreDir::default();
        let runner = w.runner().expect("a world with a runner");
        let overlap = w.runner_overlap().unwrap();
        let mut out = String::new();
        for way in ways_in(&overlap, &runner, &w.image_paths(), &store_dir) {
            let _ = writeln!(
                out,
                "{}{} -> {}: {} paths, {} B",
                if way.image { "image " } else { "" },
                short(&way.from),
                names(&way.to),
                way.drags,
                way.drags_bytes
            );
        }
        if out.is_empty() {
            out.push_str("none\n");
        }
        out
    }

    // microvm.nix's runner with every leak open: the system symlink and init= name the
    // toplevel, regInfo= the closure-info, and the image keeps its references.
    const EVERY_LEAK: &str = "
        runner -> toplevel microvm-run
        microvm-run -> toplevel closure-info busybox disk
        disk -> toplevel app lib busybox closure-info
        runner: runner
        image: disk
        size: lib=4096 app=1000
    ";

    #[test]
    fn every_leak_of_an_unfixed_runner_is_its_own_way_in() {
        assert_snapshot!(ways_in_of(&format!("{GUEST}{EVERY_LEAK}")), @r"
        image disk -> app closure-info lib toplevel: 4 paths, 5296 B
        microvm-run -> closure-info: 4 paths, 5296 B
        microvm-run -> toplevel: 3 paths, 5196 B
        runner -> toplevel: 3 paths, 5196 B
        ");
    }

    #[test]
    fn closing_the_closure_info_leaves_the_toplevels_ways_in() {
        let input = format!("{GUEST}{EVERY_LEAK}")
            .replace(
                "microvm-run -> toplevel closure-info",
                "microvm-run -> toplevel",
            )
            .replace("disk -> toplevel app lib busybox closure-info", "");
        assert_snapshot!(ways_in_of(&input), @r"
        microvm-run -> toplevel: 3 paths, 5196 B
        runner -> toplevel: 3 paths, 5196 B
        ");
    }

    #[test]
    fn an_image_reference_to_a_shared_path_is_no_way_in() {
        // The image names busybox, which the runner's script needs anyway: shared, not leaked.
        let input = "
            toplevel -> busybox
            packed: toplevel busybox
            guest: toplevel
            runner -> toplevel script disk
            script -> busybox
            disk -> busybox
            runner: runner
            image: disk
        ";
        assert_snapshot!(ways_in_of(input), @"runner -> toplevel: 1 paths, 100 B");
    }

    #[test]
    fn a_runner_that_leaks_nothing_has_no_way_in() {
        let input = "
            toplevel -> busybox
            packed: toplevel busybox
            guest: toplevel
            runner -> script
            script -> busybox
            runner: runner
        ";
        assert_snapshot!(ways_in_of(input), @"none");
    }
}
