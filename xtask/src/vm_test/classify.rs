//! Every path `nix copy` copied, classified, and the verifier checked against it. The harness
//! works out on its own, from Nix's data, what the verifier works out from the image: a copied
//! path is `in_image` when it is in the guest's closure (what the store disk packs), and the
//! runner *needs it by itself* when the runner reaches it through references without entering a
//! guest root (the toplevel, the closure info) and without following the store disk's own
//! references. The verifier's leaked set must be exactly the copied in-image paths the runner
//! does not need by itself, its shared set exactly those it does.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use serde::Serialize;
use storedisk_nix::{Closure, StoreDir, StorePath};

use super::plan::PlanEntry;
use super::verify::Verdict;

/// What a copied path is, as the verifier sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathClass {
    /// In the image, and copied only because of a reference to the guest side.
    Leaked,
    /// In the image, and needed by the runner for itself (its shell, the kernel it boots).
    Shared,
    /// Not in the image: the runner side (scripts, hypervisor, the image itself).
    Runner,
}

/// A runner's (or, for a `host` entry, the host system's) closure, from `nix path-info --json
/// --recursive`: every path, and the paths it reaches by itself, never entering a guest root and
/// ignoring the store disk's references.
#[derive(Debug)]
pub struct RunnerClosure {
    pub all: BTreeSet<String>,
    pub own: BTreeSet<String>,
    /// What it reaches ignoring the store disk's references only (guest roots entered): what
    /// a copy takes whatever the image's bytes name.
    pub without_image: BTreeSet<String>,
}

impl RunnerClosure {
    pub fn read(runner_closure_json: &str, plan: &PlanEntry) -> Result<RunnerClosure> {
        let store_dir = StoreDir::default();
        let deployed = plan.deployed();
        let mut closure = Closure::from_json(runner_closure_json, None, &store_dir)
            .with_context(|| format!("reading the closure of {deployed}"))?;
        let all = closure.iter().map(|i| closure.display(&i.path)).collect();
        let parse = |p: &str| -> Result<StorePath> {
            store_dir
                .parse_path(p)
                .with_context(|| format!("{p} is not a store path"))
        };
        let disk = parse(&plan.store_disk)?;
        if closure.contains(&disk) {
            closure.clear_references(&disk);
        }
        let cut = plan
            .guest_roots()
            .into_iter()
            .map(parse)
            .collect::<Result<BTreeSet<_>>>()?;
        let reached = closure
            .reachable_avoiding([parse(deployed)?], &cut)
            .with_context(|| format!("walking the closure of {deployed}"))?;
        let own = reached.iter().map(|p| closure.display(p)).collect();
        let without_image = closure
            .requisites([parse(deployed)?])
            .with_context(|| format!("walking the closure of {deployed}"))?
            .iter()
            .map(|p| closure.display(p))
            .collect();
        Ok(RunnerClosure {
            all,
            own,
            without_image,
        })
    }
}

/// One copied path's place in the picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    pub in_image: bool,
    /// The verifier's class; `None` where no verifier ran (updates).
    pub class: Option<PathClass>,
}

/// Classifies `copied` by the guest closure (for `in_image`) and the verifier's sets.
pub fn classify(
    copied: &str,
    guest_closure: &BTreeSet<String>,
    verdict: Option<&Verdict>,
) -> Classified {
    let in_image = guest_closure.contains(copied);
    let class = verdict.filter(|v| v.unavailable.is_none()).map(|v| {
        if v.leaked.iter().any(|p| p == copied) {
            PathClass::Leaked
        } else if v.shared.iter().any(|p| p == copied) {
            PathClass::Shared
        } else {
            PathClass::Runner
        }
    });
    Classified { in_image, class }
}

/// Where the verifier and `nix copy` disagree, one message per difference (empty: they agree).
/// `copied`: the store paths `nix copy` of the runner copied (a first deployment, into an
/// empty cache, so it is the runner's whole closure).
pub fn disagreements(
    label: &str,
    copied: &BTreeSet<String>,
    guest_closure: &BTreeSet<String>,
    runner_own: &BTreeSet<String>,
    verdict: &Verdict,
) -> Vec<String> {
    let duplicated: BTreeSet<&String> = copied.intersection(guest_closure).collect();
    let expected_leaked: BTreeSet<&String> = duplicated
        .iter()
        .copied()
        .filter(|p| !runner_own.contains(*p))
        .collect();
    let expected_shared: BTreeSet<&String> = duplicated
        .iter()
        .copied()
        .filter(|p| runner_own.contains(*p))
        .collect();
    let leaked: BTreeSet<&String> = verdict.leaked.iter().collect();
    let shared: BTreeSet<&String> = verdict.shared.iter().collect();
    let mut out = Vec::new();
    let mut differ = |what: &str, verifier: &BTreeSet<&String>, copy: &BTreeSet<&String>| {
        let only_verifier: Vec<&str> = verifier.difference(copy).map(|p| p.as_str()).collect();
        let only_copy: Vec<&str> = copy.difference(verifier).map(|p| p.as_str()).collect();
        if !only_verifier.is_empty() {
            out.push(format!(
                "{label}: the verifier calls {} {what}, but nix copy does not show them so: {}",
                only_verifier.len(),
                only_verifier.join(", ")
            ));
        }
        if !only_copy.is_empty() {
            out.push(format!(
                "{label}: nix copy shows {} {what} path(s) the verifier does not report: {}",
                only_copy.len(),
                only_copy.join(", ")
            ));
        }
    };
    differ("leaked", &leaked, &expected_leaked);
    differ("shared", &shared, &expected_shared);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_test::plan::Variant;
    use std::collections::BTreeMap;
    use storedisk_verifier::ImageFormat;

    // The paths of PlanEntry::example("g", ..) and three more.
    const RUNNER: &str = "/nix/store/00000000000000000000000000000001-microvm-qemu-g";
    const DISK: &str = "/nix/store/00000000000000000000000000000002-microvm-store-disk.erofs";
    const TOPLEVEL: &str = "/nix/store/00000000000000000000000000000003-nixos-system-g";
    const REGINFO: &str = "/nix/store/00000000000000000000000000000004-closure-info";
    const KERNEL: &str = "/nix/store/00000000000000000000000000000005-linux-host";
    const SCRIPT: &str = "/nix/store/00000000000000000000000000000006-microvm-g-microvm-run";
    const BUSYBOX: &str = "/nix/store/00000000000000000000000000000007-busybox";
    const APP: &str = "/nix/store/00000000000000000000000000000008-app";

    fn plan() -> PlanEntry {
        PlanEntry::example("g", ImageFormat::Erofs, Variant::Upstream)
    }

    /// A `nix path-info --json` object from `path: [references]`.
    fn path_info(graph: &[(&str, &[&str])]) -> String {
        let object: BTreeMap<&str, serde_json::Value> = graph
            .iter()
            .map(|(p, refs)| {
                (
                    *p,
                    serde_json::json!({"narHash": "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
                                       "narSize": 8, "references": refs}),
                )
            })
            .collect();
        serde_json::to_string(&object).unwrap()
    }

    fn set(paths: &[&str]) -> BTreeSet<String> {
        paths.iter().map(|p| p.to_string()).collect()
    }

    fn verdict(leaked: &[&str], shared: &[&str]) -> Verdict {
        Verdict {
            ok: Some(leaked.is_empty()),
            checks: BTreeMap::new(),
            leaked: leaked.iter().map(|p| p.to_string()).collect(),
            shared: shared.iter().map(|p| p.to_string()).collect(),
            packed_paths: 0,
            duplicated_bytes: 0,
            unavailable: None,
        }
    }

    // The upstream shape: the script boots the kernel package and passes regInfo= with context;
    // the disk keeps references to the closure (leak 1).
    fn upstream_closure() -> String {
        path_info(&[
            (RUNNER, &[SCRIPT]),
            (SCRIPT, &[BUSYBOX, KERNEL, REGINFO, DISK]),
            (REGINFO, &[TOPLEVEL, APP, BUSYBOX, KERNEL]),
            (TOPLEVEL, &[APP, BUSYBOX, KERNEL]),
            (DISK, &[APP, TOPLEVEL]),
            (APP, &[BUSYBOX]),
            (BUSYBOX, &[]),
            (KERNEL, &[]),
        ])
    }

    #[test]
    fn the_runner_needs_its_shell_and_kernel_but_not_the_guest() {
        let closure = RunnerClosure::read(&upstream_closure(), &plan()).unwrap();
        assert_eq!(closure.own, set(&[BUSYBOX, DISK, KERNEL, RUNNER, SCRIPT]));
        // regInfo= reaches the guest without the image's references (which name APP and
        // TOPLEVEL): all but nothing.
        assert_eq!(closure.without_image, closure.all);
    }

    #[test]
    fn without_reginfo_only_the_images_references_reach_the_closure_info() {
        let closure = path_info(&[
            (RUNNER, &[SCRIPT]),
            (SCRIPT, &[BUSYBOX, KERNEL, TOPLEVEL, DISK]),
            (REGINFO, &[TOPLEVEL, APP, BUSYBOX, KERNEL]),
            (TOPLEVEL, &[APP, BUSYBOX, KERNEL]),
            (DISK, &[REGINFO]),
            (APP, &[BUSYBOX]),
            (BUSYBOX, &[]),
            (KERNEL, &[]),
        ]);
        let without = RunnerClosure::read(&closure, &plan())
            .unwrap()
            .without_image;
        assert_eq!(
            without,
            set(&[RUNNER, SCRIPT, BUSYBOX, KERNEL, TOPLEVEL, APP, DISK])
        );
    }

    #[test]
    fn a_verifier_that_agrees_with_nix_copy_passes() {
        let own = RunnerClosure::read(&upstream_closure(), &plan())
            .unwrap()
            .own;
        let copied = set(&[
            RUNNER, SCRIPT, BUSYBOX, KERNEL, REGINFO, TOPLEVEL, APP, DISK,
        ]);
        let guest = set(&[TOPLEVEL, REGINFO, APP, BUSYBOX, KERNEL]);
        let v = verdict(&[APP, REGINFO, TOPLEVEL], &[BUSYBOX, KERNEL]);
        assert_eq!(
            disagreements("g", &copied, &guest, &own, &v),
            Vec::<String>::new()
        );
        let c = classify(KERNEL, &guest, Some(&v));
        assert_eq!((c.in_image, c.class), (true, Some(PathClass::Shared)));
        let c = classify(APP, &guest, Some(&v));
        assert_eq!((c.in_image, c.class), (true, Some(PathClass::Leaked)));
        let c = classify(SCRIPT, &guest, Some(&v));
        assert_eq!((c.in_image, c.class), (false, Some(PathClass::Runner)));
        assert_eq!(classify(APP, &guest, None).class, None);
    }

    #[test]
    fn a_verifier_that_misses_or_invents_a_leak_is_caught() {
        let own = RunnerClosure::read(&upstream_closure(), &plan())
            .unwrap()
            .own;
        let copied = set(&[
            RUNNER, SCRIPT, BUSYBOX, KERNEL, REGINFO, TOPLEVEL, APP, DISK,
        ]);
        let guest = set(&[TOPLEVEL, REGINFO, APP, BUSYBOX, KERNEL]);
        // Misses APP, calls the kernel (which the runner boots) leaked.
        let v = verdict(&[REGINFO, TOPLEVEL, KERNEL], &[BUSYBOX]);
        let found = disagreements("g", &copied, &guest, &own, &v);
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(found[0].contains("calls 1 leaked") && found[0].contains("linux-host"));
        assert!(found[1].contains("shows 1 leaked") && found[1].contains("-app"));
        assert!(found[2].contains("shows 1 shared") && found[2].contains("linux-host"));
    }

    #[test]
    fn with_every_fix_nothing_in_the_image_is_leaked() {
        // fixed: the script boots a kernel-image path, init=/regInfo= carry no context, the
        // disk has no references.
        let image = "/nix/store/00000000000000000000000000000009-microvm-kernel-image";
        let closure = path_info(&[
            (RUNNER, &[SCRIPT]),
            (SCRIPT, &[BUSYBOX, image, DISK]),
            (image, &[]),
            (DISK, &[]),
            (BUSYBOX, &[]),
        ]);
        let mut p = plan();
        p.variant = Variant::Fixed;
        let own = RunnerClosure::read(&closure, &p).unwrap().own;
        let copied = set(&[RUNNER, SCRIPT, BUSYBOX, image, DISK]);
        let guest = set(&[TOPLEVEL, REGINFO, APP, BUSYBOX, KERNEL]);
        let v = verdict(&[], &[BUSYBOX]);
        assert!(disagreements("g", &copied, &guest, &own, &v).is_empty());
        assert!(!classify(image, &guest, Some(&v)).in_image);
    }
}
