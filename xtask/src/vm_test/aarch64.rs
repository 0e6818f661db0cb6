//! The aarch64 guest (vm-tests/aarch64.nix): an emulated MicroVM built on this x86_64 machine,
//! with Debian's arm64 busybox as its userland and Debian's arm64 cloud kernel. Its runners start
//! `qemu-system-aarch64 -M virt -cpu max` under TCG (as microvm.nix runs a guest of another
//! architecture); the harness boots them from both store disk formats, verifies the disks, and
//! measures what `nix copy` of the `unfixed`, `upstream` and `fixed` runners transfers, through
//! the same steps as the x86_64 runs (`boot_all`, `runner_facts_all`, `verify_all`,
//! `transfer_all`). The runs have their own plan (`-A aarch64.plan`) and their own snapshots,
//! `golden/aarch64-<disk>.snap`. Selected by `--scenario aarch64` (or no `--scenario`).

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use super::boot::{Accel, AccelChoice};
use super::plan::{self, PlanEntry, Selection};
use super::{Harness, Phases, Run, VmTestArgs};
use crate::tools::{self, ELF_MACHINE_AARCH64};

/// The scenario name of the aarch64 runs (plan entries, labels, snapshot names).
pub const SCENARIO: &str = "aarch64";

/// The least time an emulated boot gets before it counts as hung: under TCG on this 2-core
/// machine one takes 8-10 s alone and several times that while other work runs.
const MIN_BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// What the harness did with the aarch64 guest.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Its runs (empty when the selection leaves it out), sorted by disk and variant.
    pub runs: Vec<Run>,
    /// `e_machine` of the guest's busybox, as packed (the verifier proved the bytes equal).
    pub elf_machine: Option<u16>,
}

impl Outcome {
    /// Failures beyond the x86_64 runs' hard assertions (which apply to these runs too): the
    /// packed userland is aarch64 and the guest ran an aarch64 program.
    pub fn assertions(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if self.runs.is_empty() {
            return failures;
        }
        match self.elf_machine {
            Some(ELF_MACHINE_AARCH64) => {}
            other => failures.push(format!(
                "the aarch64 guest's busybox has ELF machine {other:?}, want {ELF_MACHINE_AARCH64}"
            )),
        }
        for run in &self.runs {
            let output = run
                .boot
                .as_ref()
                .and_then(|b| b.outcome.result.as_ref())
                .and_then(|r| r.get("program_output"))
                .and_then(Value::as_str);
            if run.boot.as_ref().is_some_and(|b| b.outcome.ok) && output != Some("aarch64") {
                failures.push(format!(
                    "{}: the guest's `uname -m` printed {output:?}, not \"aarch64\"",
                    run.label()
                ));
            }
        }
        failures
    }
}

/// Whether `--scenario` asks for the aarch64 guest (no `--scenario` asks for everything).
pub fn selected(scenarios: &[String]) -> bool {
    scenarios.is_empty() || scenarios.iter().any(|s| s == SCENARIO)
}

/// `--scenario` names only the aarch64 guest: no x86_64 run is wanted.
pub fn only_aarch64(scenarios: &[String]) -> bool {
    !scenarios.is_empty() && scenarios.iter().all(|s| s == SCENARIO)
}

/// `--scenario` without the aarch64 guest's name, for the x86_64 plan's selection.
pub fn x86_64_scenarios(scenarios: &[String]) -> Vec<String> {
    scenarios
        .iter()
        .filter(|s| *s != SCENARIO)
        .cloned()
        .collect()
}

/// Evaluates, builds, boots, verifies and copies the aarch64 guest's runs, each step timed as
/// its own phase.
pub fn run_all(harness: &Harness<'_>, phases: &mut Phases) -> Result<Outcome> {
    if !selected(&harness.args.scenario) {
        eprintln!("aarch64 guest: not selected (--scenario)");
        return Ok(Outcome::default());
    }
    let plan = phases.time("aarch64 evaluate", || {
        super::evaluate(harness.toolchain, harness.nix_args, "aarch64.plan")
    })?;
    let plan = select(plan, harness.args)?;
    if plan.is_empty() {
        eprintln!("aarch64 guest: no run selected (--disk/--variant)");
        return Ok(Outcome::default());
    }
    eprintln!("{} aarch64 runs selected", plan.len());
    phases.time("aarch64 nix build", || {
        super::build(
            harness.toolchain,
            harness.nix_args,
            &plan,
            harness.logs,
            "nix-build-aarch64.log",
        )
    })?;
    let mut runs: Vec<Run> = plan.into_iter().map(Run::new).collect();
    // The runners pin `-accel tcg -cpu max` themselves; the boot settings are the user's, with
    // a longer least timeout.
    let boot_args = VmTestArgs {
        scenario: Vec::new(),
        disk: Vec::new(),
        variant: Vec::new(),
        accel: AccelChoice::Tcg,
        boot_all: harness.args.boot_all,
        boot_timeout: harness.args.boot_timeout.max(MIN_BOOT_TIMEOUT.as_secs()),
        jobs: harness.args.jobs,
    };
    phases.time("aarch64 boot", || {
        super::boot_all(&mut runs, Accel::Tcg, &boot_args, harness.logs)
    })?;
    phases.time("aarch64 closures", || {
        super::runner_facts_all(&mut runs, harness.toolchain, harness.work)
    })?;
    phases.time("aarch64 verify", || {
        super::verify_all(
            &mut runs,
            harness.toolchain,
            harness.storedisk,
            harness.work,
        )
    })?;
    phases.time("aarch64 transfer", || {
        super::transfer_all(&mut runs, harness.toolchain, harness.work)
    })?;
    // The guest's `sw/bin/busybox` links to the packed arm64 busybox.
    let toplevel = Path::new(&runs[0].plan.toplevel);
    let elf_machine = tools::elf_machine(&toplevel.join("sw/bin/busybox"))?;
    Ok(Outcome {
        runs,
        elf_machine: Some(elf_machine),
    })
}

/// The runs `--disk`/`--variant` ask for. Under `--scenario aarch64` alone the names are checked
/// against this plan; otherwise the x86_64 plan has checked them, and a variant the aarch64 guest
/// does not have just selects none of its runs.
fn select(plan: Vec<PlanEntry>, args: &VmTestArgs) -> Result<Vec<PlanEntry>> {
    let selection = Selection {
        scenarios: &[],
        disks: &args.disk,
        variants: &args.variant,
    };
    if only_aarch64(&args.scenario) {
        return plan::select(plan, &selection);
    }
    let keep = |wanted: &[String], v: &str| wanted.is_empty() || wanted.iter().any(|w| w == v);
    let plan = plan
        .into_iter()
        .filter(|p| {
            keep(&args.disk, &p.format.to_string()) && keep(&args.variant, p.variant.name())
        })
        .collect();
    plan::select(plan, &Selection::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_test::boot::BootOutcome;
    use crate::vm_test::plan::Variant;
    use crate::vm_test::BootRecord;
    use storedisk_verifier::ImageFormat;

    /// A booted aarch64 run whose guest printed `output`.
    fn run(variant: Variant, output: &str) -> Run {
        Run {
            plan: PlanEntry::example(SCENARIO, ImageFormat::Erofs, variant),
            boot: Some(BootRecord {
                outcome: BootOutcome {
                    ok: true,
                    seconds: 5.0,
                    result: Some(serde_json::json!({"ok": true, "program_output": output})),
                    error: None,
                    log: String::new(),
                    attempts: 1,
                },
                shared_with: None,
            }),
            transfer: None,
            verify: None,
            runner_kernel_modules: Vec::new(),
            verify_disagreements: Vec::new(),
            facts: None,
        }
    }

    #[test]
    fn the_guest_must_be_aarch64_and_say_so() {
        let good = Outcome {
            runs: vec![run(Variant::Fixed, "aarch64")],
            elf_machine: Some(ELF_MACHINE_AARCH64),
        };
        assert_eq!(good.assertions(), Vec::<String>::new());

        let x86_userland = Outcome {
            runs: vec![run(Variant::Fixed, "x86_64")],
            elf_machine: Some(62),
        };
        let failures = x86_userland.assertions();
        assert_eq!(failures.len(), 2, "{failures:#?}");
        assert!(failures[0].contains("ELF machine Some(62)"));
        assert!(failures[1].contains("aarch64/erofs/fixed: the guest's `uname -m` printed"));

        // Not selected: nothing to assert.
        assert!(Outcome::default().assertions().is_empty());
    }

    #[test]
    fn scenario_selection_separates_the_aarch64_guest() {
        let none: Vec<String> = Vec::new();
        assert!(selected(&none) && !only_aarch64(&none));
        let arm = vec!["aarch64".to_owned()];
        assert!(selected(&arm) && only_aarch64(&arm));
        assert!(x86_64_scenarios(&arm).is_empty());
        let both = vec!["minimal".to_owned(), "aarch64".to_owned()];
        assert!(selected(&both) && !only_aarch64(&both));
        assert_eq!(x86_64_scenarios(&both), ["minimal"]);
        let x86 = vec!["minimal".to_owned()];
        assert!(!selected(&x86));
    }
}
