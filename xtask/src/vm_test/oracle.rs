//! The second oracle: bounds on the verifier's leaked and shared sets from `nix copy` alone.
//! `classify.rs` predicts both sets with the reachability walk the verifier itself uses, so a
//! bug in that walk would pass both; these bounds walk nothing. For one scenario and disk (and
//! kind and architecture), with `fixed` the variant that closes every leak:
//!
//! - a leaked path is a guest path this variant copies and `fixed` does not
//!   (leaked(v) ⊆ copied(v) ∩ guest − copied(fixed));
//! - a shared path is a guest path this variant copies and `fixed` copies too (the runner needs
//!   it whatever the fixes: busybox, the initrd); the one exception is the kernel package, which
//!   a runner without fix 5 boots and so shares, while `fixed` boots a kernel-image path instead;
//! - every guest path this variant copies is leaked or shared, never both.
//!
//! "Guest path" is the guest's closure as Nix reports it (`nix path-info --recursive` of the
//! toplevel and closure info). Violations join the run's `verify_disagreements`, so the run and
//! the gate fail. Without a `fixed` run in the group (a `--variant` selection) only the bounds
//! that need none are checked.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use storedisk_verifier::ImageFormat;

use super::plan::{Arch, RunKind, Variant};
use super::Run;

/// One first deployment as the oracle sees it: what `nix copy` copied, the guest's closure,
/// and the verifier's two sets.
pub struct Deployment<'a> {
    pub copied: &'a BTreeSet<String>,
    pub guest_closure: &'a BTreeSet<String>,
    pub leaked: &'a [String],
    pub shared: &'a [String],
    /// The kernel package, when this runner boots it (no fix 5): it may then be shared
    /// although `fixed` does not copy it.
    pub boots_kernel_package: Option<&'a str>,
}

/// Which bound a verdict breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Broken {
    LeakedNotCopied,
    LeakedNotGuest,
    LeakedCopiedByFixed,
    SharedNotCopied,
    SharedNotGuest,
    SharedNotCopiedByFixed,
    LeakedAndShared,
    Unclassified,
}

impl Broken {
    fn text(self) -> &'static str {
        match self {
            Broken::LeakedNotCopied => "the verifier calls leaked what nix copy did not copy",
            Broken::LeakedNotGuest => "the verifier calls leaked what is not in the guest closure",
            Broken::LeakedCopiedByFixed => {
                "the verifier calls leaked what fixed copies too (a leak is what fixed does not copy)"
            }
            Broken::SharedNotCopied => "the verifier calls shared what nix copy did not copy",
            Broken::SharedNotGuest => "the verifier calls shared what is not in the guest closure",
            Broken::SharedNotCopiedByFixed => {
                "the verifier calls shared what fixed does not copy (the runner needs a shared path whatever the fixes)"
            }
            Broken::LeakedAndShared => "the verifier calls both leaked and shared",
            Broken::Unclassified => "nix copy copied guest paths the verifier calls neither leaked nor shared",
        }
    }
}

/// One broken bound and the paths that break it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub broken: Broken,
    pub paths: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.broken.text(), self.paths.join(", "))
    }
}

/// The bounds `d` breaks; `fixed_copied` is what `fixed` copied in the same group, `None`
/// when `fixed` did not run (its bounds are then not checked).
pub fn violations(d: &Deployment<'_>, fixed_copied: Option<&BTreeSet<String>>) -> Vec<Violation> {
    let leaked: BTreeSet<&String> = d.leaked.iter().collect();
    let shared: BTreeSet<&String> = d.shared.iter().collect();
    let mut out = Vec::new();
    let mut check = |broken: Broken, paths: Vec<&String>| {
        if !paths.is_empty() {
            out.push(Violation {
                broken,
                paths: paths.into_iter().cloned().collect(),
            });
        }
    };
    fn not_in<'p>(set: &BTreeSet<&'p String>, of: &BTreeSet<String>) -> Vec<&'p String> {
        set.iter().copied().filter(|p| !of.contains(*p)).collect()
    }
    check(Broken::LeakedNotCopied, not_in(&leaked, d.copied));
    check(Broken::LeakedNotGuest, not_in(&leaked, d.guest_closure));
    check(Broken::SharedNotCopied, not_in(&shared, d.copied));
    check(Broken::SharedNotGuest, not_in(&shared, d.guest_closure));
    if let Some(fixed) = fixed_copied {
        let by_fixed = leaked.iter().copied().filter(|p| fixed.contains(*p));
        check(Broken::LeakedCopiedByFixed, by_fixed.collect());
        let not_by_fixed = shared
            .iter()
            .copied()
            .filter(|p| !fixed.contains(*p) && d.boots_kernel_package != Some(p.as_str()));
        check(Broken::SharedNotCopiedByFixed, not_by_fixed.collect());
    }
    check(
        Broken::LeakedAndShared,
        leaked.intersection(&shared).copied().collect(),
    );
    let unclassified = d
        .copied
        .intersection(d.guest_closure)
        .filter(|p| !leaked.contains(p) && !shared.contains(p));
    check(Broken::Unclassified, unclassified.collect());
    out
}

/// The runs one `fixed` bounds: first deployments of one kind, architecture, scenario and disk.
type Group = (RunKind, Arch, String, ImageFormat);

fn group(run: &Run) -> Group {
    (
        run.plan.kind,
        run.plan.arch,
        run.plan.scenario.clone(),
        run.plan.format,
    )
}

/// The store paths a run's `nix copy` copied; `None` when nothing was measured.
fn copied_paths(run: &Run) -> Option<BTreeSet<String>> {
    let t = run.transfer.as_ref()?;
    Some(t.copied.iter().map(|c| c.store_path.clone()).collect())
}

/// Checks every verified first deployment (runs and host systems; updates are not verified)
/// against the bounds and appends what breaks them to its `verify_disagreements`.
pub fn check_all(runs: &mut [Run]) {
    let checked = |r: &Run| r.plan.kind != RunKind::Update;
    let fixed: BTreeMap<Group, BTreeSet<String>> = runs
        .iter()
        .filter(|r| checked(r) && r.plan.variant == Variant::Fixed)
        .filter_map(|r| Some((group(r), copied_paths(r)?)))
        .collect();
    for run in runs.iter_mut().filter(|r| checked(r)) {
        let (Some(copied), Some(facts), Some(verdict)) =
            (copied_paths(run), run.facts.as_ref(), run.verify.as_ref())
        else {
            continue;
        };
        if verdict.unavailable.is_some() {
            continue;
        }
        let deployment = Deployment {
            copied: &copied,
            guest_closure: &facts.guest_closure,
            leaked: &verdict.leaked,
            shared: &verdict.shared,
            boots_kernel_package: (!run.plan.fixes.kernel).then_some(run.plan.kernel.as_str()),
        };
        let label = match run.plan.kind {
            RunKind::Run => run.label(),
            kind => format!("{} {}", kind.name(), run.label()),
        };
        let found: Vec<String> = violations(&deployment, fixed.get(&group(run)))
            .into_iter()
            .map(|v| format!("{label} (nix copy bound): {v}"))
            .collect();
        run.verify_disagreements.extend(found);
    }
}

#[cfg(test)]
mod tests {
    //! Each test is a small world in text, one directive per line (`#` starts a comment):
    //!
    //! - `guest: a b`: the guest closure, as Nix reports it;
    //! - `VARIANT copies: a b`: what `nix copy` of that variant's runner copied;
    //! - `VARIANT leaked: a`, `VARIANT shared: b`: the verifier's sets for it (empty if absent).
    //!
    //! A later directive replaces an earlier one, so a test states the base world and then the
    //! one verdict it changes. `linux-host` is the kernel package; a variant has fix 5 as in
    //! vm-tests/default.nix. The rendering is each variant's `verify_disagreements` (or `ok`),
    //! pinned in an inline snapshot.

    use super::*;
    use crate::vm_test::plan::PlanEntry;
    use crate::vm_test::verify::Verdict;
    use crate::vm_test::{CopiedPath, RunnerFacts, Transfer};
    use insta::assert_snapshot;

    /// Every path of a world: one hash, the names tell them apart.
    fn store(name: &str) -> String {
        format!("/nix/store/{}-{name}", "0".repeat(32))
    }

    fn names(words: &str) -> Vec<String> {
        words.split_whitespace().map(store).collect()
    }

    /// The `minimal` guest's shape: unfixed leaks the guest and shares its shell, initrd and
    /// kernel package; fix 5 alone makes the kernel package a leak; leak-kernel copies only
    /// the kernel package besides what fixed copies, and shares it.
    const MINIMAL: &str = "
        guest: toplevel app busybox initrd linux-host closure-info
        fixed copies: runner-f busybox initrd kernel-image disk-f
        fixed shared: busybox initrd
        unfixed copies: runner-u busybox initrd linux-host closure-info toplevel app disk-u
        unfixed leaked: closure-info toplevel app
        unfixed shared: busybox initrd linux-host
        fix-kernel copies: runner-k busybox initrd kernel-image linux-host closure-info toplevel app disk-u
        fix-kernel leaked: linux-host closure-info toplevel app
        fix-kernel shared: busybox initrd
        leak-kernel copies: runner-lk busybox initrd linux-host disk-f
        leak-kernel shared: busybox initrd linux-host
    ";

    /// Runs the oracle over the world's runs and renders their disagreements.
    fn oracle(input: &str) -> String {
        let mut guest = BTreeSet::new();
        // variant -> (copies, leaked, shared)
        let mut seen: BTreeMap<Variant, [Vec<String>; 3]> = BTreeMap::new();
        for line in input.lines() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let (key, words) = line.split_once(':').expect("KEY: WORDS");
            if key == "guest" {
                guest = names(words).into_iter().collect();
                continue;
            }
            let (variant, what) = key.split_once(' ').expect("VARIANT WHAT: WORDS");
            let variant = Variant::ALL
                .into_iter()
                .find(|v| v.name() == variant)
                .unwrap_or_else(|| panic!("unknown variant {variant:?}"));
            let slot = match what {
                "copies" => 0,
                "leaked" => 1,
                "shared" => 2,
                other => panic!("unknown directive {other:?}"),
            };
            seen.entry(variant).or_default()[slot] = names(words);
        }
        let mut runs: Vec<Run> = seen
            .iter()
            .map(|(&variant, [copies, leaked, shared])| {
                let mut plan = PlanEntry::example("s", ImageFormat::Erofs, variant);
                plan.kernel = store("linux-host");
                plan.fixes.kernel = matches!(
                    variant,
                    Variant::Fixed
                        | Variant::FixKernel
                        | Variant::LeakImage
                        | Variant::LeakSymlink
                        | Variant::LeakInit
                        | Variant::LeakReginfo
                );
                let mut run = Run::new(plan);
                run.transfer = Some(transfer(copies));
                run.verify = Some(verdict(leaked, shared));
                run.facts = Some(RunnerFacts {
                    guest_closure: guest.clone(),
                    runner_own: BTreeSet::new(),
                    guest_only_via_image: BTreeSet::new(),
                });
                run
            })
            .collect();
        check_all(&mut runs);
        let mut out = String::new();
        for run in &runs {
            if run.verify_disagreements.is_empty() {
                out.push_str(&format!("{}: ok\n", run.plan.variant));
            }
            for d in &run.verify_disagreements {
                let short = d.replace(&format!("/nix/store/{}-", "0".repeat(32)), "");
                out.push_str(&short.replace("s/erofs/", ""));
                out.push('\n');
            }
        }
        out
    }

    fn transfer(copies: &[String]) -> Transfer {
        Transfer {
            paths: copies.len(),
            nar_bytes: 0,
            in_image_bytes: 0,
            compressed_bytes: 0,
            leaked_paths: None,
            copied: copies
                .iter()
                .map(|p| CopiedPath {
                    name: crate::vm_test::transfer::redact(p),
                    store_path: p.clone(),
                    nar_size: 0,
                    compressed_size: 0,
                    host_provided: false,
                    in_image: false,
                    class: None,
                })
                .collect(),
        }
    }

    fn verdict(leaked: &[String], shared: &[String]) -> Verdict {
        Verdict {
            ok: Some(leaked.is_empty()),
            checks: BTreeMap::new(),
            leaked: leaked.to_vec(),
            shared: shared.to_vec(),
            packed_paths: 0,
            duplicated_bytes: 0,
            unavailable: None,
        }
    }

    #[test]
    fn an_honest_verifier_passes() {
        assert_snapshot!(oracle(MINIMAL), @r"
        unfixed: ok
        fixed: ok
        fix-kernel: ok
        leak-kernel: ok
        ");
    }

    #[test]
    fn a_verifier_that_misses_a_leak_is_caught() {
        // Not reported at all.
        assert_snapshot!(oracle(&format!("{MINIMAL}
            unfixed leaked: closure-info toplevel
        ")), @r"
        unfixed (nix copy bound): nix copy copied guest paths the verifier calls neither leaked nor shared: app
        fixed: ok
        fix-kernel: ok
        leak-kernel: ok
        ");
        // Reported as shared: fixed does not copy it, so the runner does not need it.
        assert_snapshot!(oracle(&format!("{MINIMAL}
            unfixed leaked: closure-info toplevel
            unfixed shared: busybox initrd linux-host app
        ")), @r"
        unfixed (nix copy bound): the verifier calls shared what fixed does not copy (the runner needs a shared path whatever the fixes): app
        fixed: ok
        fix-kernel: ok
        leak-kernel: ok
        ");
    }

    #[test]
    fn a_verifier_that_invents_a_leak_is_caught() {
        // A guest path the runner needs whatever the fixes, called leaked.
        assert_snapshot!(oracle(&format!("{MINIMAL}
            unfixed leaked: closure-info toplevel app busybox
            unfixed shared: initrd linux-host
        ")), @r"
        unfixed (nix copy bound): the verifier calls leaked what fixed copies too (a leak is what fixed does not copy): busybox
        fixed: ok
        fix-kernel: ok
        leak-kernel: ok
        ");
        // A runner-side path, and a guest path this runner never copied.
        assert_snapshot!(oracle(&format!("{MINIMAL}
            fixed leaked: runner-f
            leak-kernel leaked: app
        ")), @r"
        unfixed: ok
        fixed (nix copy bound): the verifier calls leaked what is not in the guest closure: runner-f
        fixed (nix copy bound): the verifier calls leaked what fixed copies too (a leak is what fixed does not copy): runner-f
        fix-kernel: ok
        leak-kernel (nix copy bound): the verifier calls leaked what nix copy did not copy: app
        ");
    }

    #[test]
    fn only_a_runner_without_fix_5_may_share_the_kernel_package() {
        // fix-kernel boots a kernel-image path: the kernel package it copies is a leak.
        assert_snapshot!(oracle(&format!("{MINIMAL}
            fix-kernel leaked: closure-info toplevel app
            fix-kernel shared: busybox initrd linux-host
        ")), @r"
        unfixed: ok
        fixed: ok
        fix-kernel (nix copy bound): the verifier calls shared what fixed does not copy (the runner needs a shared path whatever the fixes): linux-host
        leak-kernel: ok
        ");
    }

    #[test]
    fn without_fixed_only_the_bounds_that_need_none_are_checked() {
        // The invented busybox leak needs fixed's copy to be seen; the runner-side path does not.
        let without_fixed: String = MINIMAL
            .lines()
            .filter(|l| !l.trim_start().starts_with("fixed "))
            .collect::<Vec<_>>()
            .join("\n");
        assert_snapshot!(oracle(&format!("{without_fixed}
            unfixed leaked: closure-info toplevel app busybox
            unfixed shared: initrd linux-host runner-u
        ")), @r"
        unfixed (nix copy bound): the verifier calls shared what is not in the guest closure: runner-u
        fix-kernel: ok
        leak-kernel: ok
        ");
    }
}
