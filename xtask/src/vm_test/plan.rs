//! The harness's plan: what vm-tests/default.nix says to build (`-A plan`), as typed entries
//! (kind, disk format and variant are enums, not strings), and the `--scenario/--disk/--variant`
//! selection over it.

use std::fmt;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use storedisk_verifier::ImageFormat;

/// What a plan entry deploys: the runner (`run`), version 2's runner over version 1's
/// (`update`), or a host system that declares the VM (`host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    Run,
    Update,
    Host,
}

impl RunKind {
    pub fn name(self) -> &'static str {
        match self {
            RunKind::Run => "run",
            RunKind::Update => "update",
            RunKind::Host => "host",
        }
    }
}

/// The guest's architecture: x86_64 like this host, or aarch64, emulated.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    #[default]
    #[serde(rename = "x86_64")]
    X86_64,
    Aarch64,
}

/// Which store-disk fixes a runner has; vm-tests/default.nix's `variants`. Declared in the
/// order tables show them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    Unfixed,
    Upstream,
    Fixed,
    FixImage,
    FixSymlink,
    FixInit,
    FixReginfo,
    FixKernel,
    LeakImage,
    LeakSymlink,
    LeakInit,
    LeakReginfo,
    LeakKernel,
}

impl Variant {
    pub const ALL: [Variant; 13] = [
        Variant::Unfixed,
        Variant::Upstream,
        Variant::Fixed,
        Variant::FixImage,
        Variant::FixSymlink,
        Variant::FixInit,
        Variant::FixReginfo,
        Variant::FixKernel,
        Variant::LeakImage,
        Variant::LeakSymlink,
        Variant::LeakInit,
        Variant::LeakReginfo,
        Variant::LeakKernel,
    ];

    /// The variant's name, as in vm-tests/default.nix and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Unfixed => "unfixed",
            Variant::Upstream => "upstream",
            Variant::Fixed => "fixed",
            Variant::FixImage => "fix-image",
            Variant::FixSymlink => "fix-symlink",
            Variant::FixInit => "fix-init",
            Variant::FixReginfo => "fix-reginfo",
            Variant::FixKernel => "fix-kernel",
            Variant::LeakImage => "leak-image",
            Variant::LeakSymlink => "leak-symlink",
            Variant::LeakInit => "leak-init",
            Variant::LeakReginfo => "leak-reginfo",
            Variant::LeakKernel => "leak-kernel",
        }
    }

    /// A column heading for the snapshots' copied-paths matrix.
    pub fn short(self) -> &'static str {
        match self {
            Variant::Unfixed => "U",
            Variant::Upstream => "up",
            Variant::Fixed => "F",
            Variant::FixImage => "fI",
            Variant::FixSymlink => "fS",
            Variant::FixInit => "fN",
            Variant::FixReginfo => "fR",
            Variant::FixKernel => "fK",
            Variant::LeakImage => "lI",
            Variant::LeakSymlink => "lS",
            Variant::LeakInit => "lN",
            Variant::LeakReginfo => "lR",
            Variant::LeakKernel => "lK",
        }
    }

    /// The variants that apply exactly one fix to `unfixed`.
    pub fn is_single_fix(self) -> bool {
        self.name().starts_with("fix-")
    }

    /// The variants that apply every fix but one (and `upstream`, which also leaves fix 5 out).
    pub fn is_leave_one_out(self) -> bool {
        self.name().starts_with("leak-")
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The five fixes: `image` (leak 1, the image's references), `symlink` (leak 2,
/// share/microvm/system written without string context), `init` (leak 3, init=), `reg_info`
/// (leak 4, regInfo=), `kernel` (the runner boots a store path holding only the kernel image,
/// not the kernel package); `drop_symlink`: upstream's way with leak 2, no symlink at all;
/// `host`: the host system declaring the VM names its toplevel without context.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Fixes {
    pub image: bool,
    pub symlink: bool,
    pub drop_symlink: bool,
    pub init: bool,
    pub reg_info: bool,
    pub kernel: bool,
    pub host: bool,
}

/// One entry of vm-tests/default.nix's `plan`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanEntry {
    pub kind: RunKind,
    /// The guest's architecture (vm-tests/aarch64.nix's entries say aarch64).
    #[serde(default)]
    pub arch: Arch,
    pub scenario: String,
    pub format: ImageFormat,
    pub variant: Variant,
    pub fixes: Fixes,
    pub runner: String,
    pub store_disk: String,
    pub toplevel: String,
    /// The closure info, `None` for a guest that registers no closure (no `regInfo=`).
    pub reg_info: Option<String>,
    /// The kernel package the guest toplevel references.
    pub kernel: String,
    /// A host system declaring this VM (nixos-modules/host), deployed by `host` entries.
    pub host_system: String,
}

impl PlanEntry {
    /// `scenario/format/variant`.
    pub fn label(&self) -> String {
        format!("{}/{}/{}", self.scenario, self.format, self.variant)
    }

    /// What this entry's deployment copies: the host system for `host`, else the runner.
    pub fn deployed(&self) -> &str {
        match self.kind {
            RunKind::Host => &self.host_system,
            RunKind::Run | RunKind::Update => &self.runner,
        }
    }

    /// The guest's roots: what a runner must not reach (the toplevel and the closure info).
    pub fn guest_roots(&self) -> Vec<&str> {
        let mut roots = vec![self.toplevel.as_str()];
        roots.extend(self.reg_info.as_deref());
        roots
    }

    /// The attribute of vm-tests/default.nix that builds `attr` of this run.
    pub fn attr_path(&self, attr: &str) -> String {
        if self.arch == Arch::Aarch64 {
            return format!("aarch64.runs.{}.{}.{attr}", self.format, self.variant);
        }
        let set = match self.kind {
            RunKind::Run => "runs",
            RunKind::Update => "updates",
            RunKind::Host => "hosts",
        };
        format!(
            "{set}.{}.{}.{}.{attr}",
            self.scenario, self.format, self.variant
        )
    }
}

/// The opt-in scenario with a closure of NixOS size.
pub const REALISTIC: &str = "realistic";
/// Scenarios that run only when named with `--scenario` (they take long).
pub const OPT_IN_SCENARIOS: &[&str] = &[REALISTIC];

impl PlanEntry {
    /// A first deployment of `scenario` with the store paths the unit tests use:
    /// `/nix/store/0000…0N-<name>` for the runner (1), the store disk (2), the toplevel (3), the
    /// closure info (4) and the kernel package (5).
    #[cfg(test)]
    pub fn example(scenario: &str, format: ImageFormat, variant: Variant) -> PlanEntry {
        let path = |n: u32, name: &str| format!("/nix/store/{n:032}-{name}");
        PlanEntry {
            kind: RunKind::Run,
            arch: Arch::X86_64,
            scenario: scenario.to_owned(),
            format,
            variant,
            fixes: Fixes {
                image: false,
                symlink: false,
                drop_symlink: false,
                init: false,
                reg_info: false,
                kernel: false,
                host: false,
            },
            runner: path(1, &format!("microvm-qemu-{scenario}")),
            store_disk: path(2, &format!("microvm-store-disk.{format}")),
            toplevel: path(3, &format!("nixos-system-{scenario}")),
            reg_info: Some(path(4, "closure-info")),
            kernel: path(5, "linux-host"),
            host_system: path(9, "nixos-system-host"),
        }
    }
}

/// The order scenarios are shown in; an unknown one sorts last, by name.
const SCENARIO_ORDER: &[&str] = &["minimal", "nix-db", "no-reginfo", "large", REALISTIC];

fn scenario_rank(s: &str) -> usize {
    SCENARIO_ORDER
        .iter()
        .position(|x| *x == s)
        .unwrap_or(usize::MAX)
}

/// What `--scenario/--disk/--variant` ask for; empty means all.
#[derive(Debug, Default)]
pub struct Selection<'a> {
    pub scenarios: &'a [String],
    pub disks: &'a [String],
    pub variants: &'a [String],
}

impl Selection<'_> {
    /// True when some variants are left out: snapshots, which show every variant, cannot be
    /// compared then.
    pub fn filters_variants(&self) -> bool {
        !self.variants.is_empty()
    }
}

/// Applies the selection; an unknown name is an error, not an empty run. Sorted by kind,
/// scenario, format, variant.
pub fn select(plan: Vec<PlanEntry>, selection: &Selection<'_>) -> Result<Vec<PlanEntry>> {
    fn check(wanted: &[String], mut known: Vec<String>, what: &str) -> Result<()> {
        known.sort();
        known.dedup();
        for w in wanted {
            if !known.contains(w) {
                bail!("unknown {what} {w:?}; known: {}", known.join(", "));
            }
        }
        Ok(())
    }
    check(
        selection.scenarios,
        plan.iter().map(|p| p.scenario.clone()).collect(),
        "scenario",
    )?;
    check(
        selection.disks,
        plan.iter().map(|p| p.format.to_string()).collect(),
        "disk",
    )?;
    check(
        selection.variants,
        plan.iter().map(|p| p.variant.to_string()).collect(),
        "variant",
    )?;
    let keep = |wanted: &[String], v: &str| wanted.is_empty() || wanted.iter().any(|w| w == v);
    let mut selected: Vec<PlanEntry> = plan
        .into_iter()
        .filter(|p| {
            keep(selection.scenarios, &p.scenario)
                && keep(selection.disks, &p.format.to_string())
                && keep(selection.variants, p.variant.name())
        })
        .collect();
    selected.sort_by_key(|p| {
        (
            p.kind,
            scenario_rank(&p.scenario),
            p.scenario.clone(),
            p.format.to_string(),
            p.variant,
        )
    });
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: RunKind, scenario: &str, format: ImageFormat, variant: Variant) -> PlanEntry {
        PlanEntry {
            kind,
            ..PlanEntry::example(scenario, format, variant)
        }
    }

    #[test]
    fn plan_json_from_nix_deserializes_into_enums() {
        let json = r#"[{"kind":"update","scenario":"minimal","format":"erofs","variant":"leak-reginfo",
            "fixes":{"image":true,"symlink":true,"dropSymlink":false,"init":true,"regInfo":false,
                     "kernel":true,"host":true},
            "runner":"/nix/store/r","storeDisk":"/nix/store/d","toplevel":"/nix/store/t",
            "regInfo":null,"kernel":"/nix/store/k","hostSystem":"/nix/store/h"}]"#;
        let plan: Vec<PlanEntry> = serde_json::from_str(json).unwrap();
        assert_eq!(plan[0].kind, RunKind::Update);
        assert_eq!(plan[0].format, ImageFormat::Erofs);
        assert_eq!(plan[0].variant, Variant::LeakReginfo);
        assert!(plan[0].fixes.kernel && !plan[0].fixes.reg_info);
        assert_eq!(plan[0].guest_roots(), ["/nix/store/t"]);
        assert_eq!(
            plan[0].attr_path("runner"),
            "updates.minimal.erofs.leak-reginfo.runner"
        );
        let unknown = json.replace("leak-reginfo", "leak-everything");
        assert!(serde_json::from_str::<Vec<PlanEntry>>(&unknown).is_err());
    }

    #[test]
    fn variant_names_round_trip_through_serde() {
        for v in Variant::ALL {
            let json = serde_json::to_string(&v).unwrap();
            assert_eq!(json, format!("\"{}\"", v.name()));
            assert_eq!(serde_json::from_str::<Variant>(&json).unwrap(), v);
        }
        let mut sorted = Variant::ALL;
        sorted.sort();
        assert_eq!(sorted, Variant::ALL, "ALL is in declaration (table) order");
    }

    #[test]
    fn select_filters_sorts_and_rejects_unknown_names() {
        let plan = vec![
            entry(
                RunKind::Update,
                "minimal",
                ImageFormat::Erofs,
                Variant::Fixed,
            ),
            entry(RunKind::Run, "large", ImageFormat::Squashfs, Variant::Fixed),
            entry(
                RunKind::Run,
                "minimal",
                ImageFormat::Erofs,
                Variant::Upstream,
            ),
            entry(
                RunKind::Run,
                "minimal",
                ImageFormat::Erofs,
                Variant::Unfixed,
            ),
        ];
        let all = select(plan.clone(), &Selection::default()).unwrap();
        let labels: Vec<String> = all
            .iter()
            .map(|p| format!("{:?} {}", p.kind, p.label()))
            .collect();
        assert_eq!(
            labels,
            [
                "Run minimal/erofs/unfixed",
                "Run minimal/erofs/upstream",
                "Run large/squashfs/fixed",
                "Update minimal/erofs/fixed"
            ]
        );
        let disks = ["squashfs".to_owned()];
        let only = select(
            plan.clone(),
            &Selection {
                disks: &disks,
                ..Selection::default()
            },
        )
        .unwrap();
        assert_eq!(only.len(), 1);
        let bad = ["ext4".to_owned()];
        let err = select(
            plan,
            &Selection {
                disks: &bad,
                ..Selection::default()
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown disk \"ext4\"; known: erofs, squashfs"
        );
    }
}
