//! The harness's verdict: `target/vm-test/report.json`, a Markdown summary for CI, one insta
//! snapshot per scenario x store disk format in golden/ (readable tables, hashes redacted,
//! host-provided sizes left out), and the hard assertions a careless re-accept cannot hide.
//! The aarch64 guest's runs (aarch64.rs) join each of these: `"arch": "aarch64"` entries in
//! report.json's `runs`, their own table, `golden/aarch64-<disk>.snap`, the same assertions.

use super::aarch64;
use super::layered;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use storedisk_verifier::report::human_bytes;
use storedisk_verifier::ImageFormat;

use anyhow::{bail, Result};
use serde_json::json;

use super::classify::PathClass;
use super::microvm_list::ListCheck;
use super::plan::{Arch, RunKind, Selection, Variant};
use super::shutdown::ShutdownOutcome;
use super::{boot::Accel, Phases, Run};
use crate::setup::write_atomically;

/// Everything a vm-test run measured.
pub struct Outcome<'a> {
    pub runs: &'a [Run],
    pub list_checks: &'a [ListCheck],
    pub shutdown: Option<&'a ShutdownOutcome>,
    pub aarch64: &'a aarch64::Outcome,
    pub layered: &'a layered::Outcome,
    pub phases: &'a Phases,
    pub total_seconds: f64,
    pub accel: Accel,
    /// `--boot-all`: every variant booted itself, so the snapshots' boot column (which records
    /// the boots a byte-identical machine shared) is not comparable.
    pub boot_all: bool,
}

/// Writes report.json and summary.md, compares the snapshots, checks the hard assertions and
/// prints the closing line; an error when anything failed.
pub fn finish(
    outcome: &Outcome<'_>,
    work: &Path,
    golden: &Path,
    selection: &Selection<'_>,
) -> Result<()> {
    let &Outcome {
        runs,
        list_checks,
        shutdown,
        aarch64,
        layered,
        phases,
        total_seconds,
        accel,
        boot_all,
    } = outcome;
    let every_run: Vec<&Run> = runs.iter().chain(&aarch64.runs).collect();
    let report = json!({
        "accel": accel,
        "total_seconds": (total_seconds * 10.0).round() / 10.0,
        "phases": phases.0.iter().map(|(n, s)| json!({"phase": n, "seconds": s})).collect::<Vec<_>>(),
        "shutdown": shutdown,
        "microvm_list": list_checks,
        "aarch64_elf_machine": aarch64.elf_machine,
        "layered": layered,
        "runs": every_run.iter().map(|r| json!({
            "kind": r.plan.kind,
            "arch": r.plan.arch,
            "scenario": r.plan.scenario,
            "disk": r.plan.format,
            "variant": r.plan.variant,
            "fixes": r.plan.fixes,
            "runner": r.plan.runner,
            "host_system": (r.plan.kind == RunKind::Host).then_some(&r.plan.host_system),
            "store_disk": r.plan.store_disk,
            "toplevel": r.plan.toplevel,
            "reg_info": r.plan.reg_info,
            "kernel": r.plan.kernel,
            "boot": r.boot,
            "transfer": r.transfer,
            "verify": r.verify,
            "runner_kernel_modules": r.runner_kernel_modules,
            "verify_disagreements": r.verify_disagreements,
        })).collect::<Vec<_>>(),
    });
    write_atomically(
        &work.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let (mut compared_snapshots, mut changed_snapshots) = if boot_all {
        (Vec::new(), Vec::new())
    } else {
        check_snapshots(&every_run, list_checks, golden)
    };
    for (name, description, text) in layered.snapshots() {
        if snapshot_differs(golden, &name, description, text) {
            changed_snapshots.push(name.clone());
        }
        compared_snapshots.push(name);
    }
    let not_compared =
        uncompared_snapshots(&every_run, golden, &compared_snapshots, selection, boot_all);
    for n in &not_compared {
        let not = if n.fails { "NOT" } else { "not" };
        eprintln!("snapshot {}: {not} compared: {}", n.name, n.why);
    }

    let mut markdown = markdown_summary(&every_run, phases, total_seconds, accel);
    markdown.push_str(&layered.markdown());
    if let Some(s) = shutdown {
        let _ = writeln!(
            markdown,
            "\nmicrovm-shutdown (minimal/erofs/fixed, guest held up): {} (result line after {:.1} s, QEMU ended {} after the shutdown)",
            if s.ok { "ok" } else { "FAILED" },
            s.boot_seconds,
            s.stop_seconds.map_or("-".to_owned(), |t| format!("{t:.1} s")),
        );
    }
    markdown.push_str(&snapshots_markdown(
        &compared_snapshots,
        &changed_snapshots,
        &not_compared,
    ));
    write_atomically(&work.join("summary.md"), markdown.as_bytes())?;
    eprintln!("\n{markdown}");
    eprintln!(
        "wrote {} and {}",
        work.join("report.json").display(),
        work.join("summary.md").display()
    );

    let mut failed_snapshots = changed_snapshots.clone();
    failed_snapshots.extend(not_compared.into_iter().filter(|n| n.fails).map(|n| n.name));
    let mut failed_assertions = hard_assertions(runs);
    failed_assertions.extend(list_assertions(list_checks));
    if let Some(error) = shutdown.and_then(|s| s.error.as_ref()) {
        failed_assertions.push(format!("microvm-shutdown: {error}"));
    }
    failed_assertions.extend(hard_assertions(&aarch64.runs));
    failed_assertions.extend(aarch64.assertions());
    failed_assertions.extend(layered.assertions());
    for failure in &failed_assertions {
        eprintln!("ASSERTION FAILED: {failure}");
    }
    if !changed_snapshots.is_empty() {
        eprintln!(
            "snapshots changed: {} (review with `cargo insta review`, or see the diff above)",
            changed_snapshots.join(", ")
        );
    }
    // The closing line CI reads: one count per run (booted and verified) and per snapshot
    // compared, plus each failed cross-variant assertion.
    let measured: Vec<&Run> = runs
        .iter()
        .chain(&aarch64.runs)
        .filter(|r| r.plan.kind == RunKind::Run)
        .collect();
    let runs_ok = measured
        .iter()
        .filter(|r| {
            r.boot.as_ref().is_some_and(|b| b.outcome.ok)
                && r.verify.as_ref().is_some_and(|v| v.unavailable.is_none())
                && r.verify_disagreements.is_empty()
        })
        .count();
    let shutdown_ok = usize::from(shutdown.is_some_and(|s| s.ok));
    let failed = (measured.len() - runs_ok) + failed_snapshots.len() + failed_assertions.len();
    let passed = runs_ok + shutdown_ok + compared_snapshots.len() - changed_snapshots.len()
        + layered.checks_passed();
    if failed == 0 {
        eprintln!("vm-test: all assertions hold and every snapshot matches");
    }
    println!("vm-test: {passed} passed, {failed} failed");
    if !failed_assertions.is_empty() || !failed_snapshots.is_empty() {
        bail!(
            "{} assertion(s) failed, {} snapshot(s) changed or not compared",
            failed_assertions.len(),
            failed_snapshots.len()
        );
    }
    Ok(())
}

/// The boot cell: the run's own result, or `= VARIANT` when its machine is byte-identical to
/// that variant's and that boot was reused (`shared_with`).
fn boot_text(run: &Run) -> String {
    match &run.boot {
        None => "not booted".to_owned(),
        Some(b) if b.shared_with.is_some() => {
            format!("= {}", b.shared_with.as_deref().unwrap_or_default())
        }
        Some(b) if !b.outcome.ok => "FAILED".to_owned(),
        Some(b) => {
            let r = b.outcome.result.as_ref();
            let n = |k: &str| {
                r.and_then(|r| r.get(k))
                    .and_then(|v| v.as_u64())
                    .map_or("?".to_owned(), |v| v.to_string())
            };
            format!(
                "ok: {} reg, {} files",
                n("registered_paths"),
                n("files_checked")
            )
        }
    }
}

fn fixes_text(run: &Run) -> String {
    let f = run.plan.fixes;
    let flag = |on: bool, name: &str| {
        if on {
            name.to_owned()
        } else {
            "-".repeat(name.len())
        }
    };
    // Upstream closes leak 2 by dropping the symlink (and with it `microvm -l`).
    let symlink = if f.drop_symlink {
        "nolink ".to_owned()
    } else {
        flag(f.symlink, "symlink")
    };
    format!(
        "{} {} {} {} {}",
        flag(f.image, "image"),
        symlink,
        flag(f.init, "init"),
        flag(f.reg_info, "regInfo"),
        flag(f.kernel, "kernel")
    )
}

/// NAR bytes of the copied paths (matching `keep`) whose size is the same on every machine.
fn guest_side_bytes(run: &Run, keep: impl Fn(&super::CopiedPath) -> bool) -> Option<u64> {
    run.transfer.as_ref().map(|t| {
        t.copied
            .iter()
            .filter(|c| !c.host_provided && keep(c))
            .map(|c| c.nar_size)
            .sum()
    })
}

/// `N (B)`: how many copied paths are also in the image, and the guest-side bytes of those;
/// `N (B+host)` when host-provided paths are among them.
fn duplicated_text(run: &Run) -> String {
    match run.transfer.as_ref() {
        None => "?".to_owned(),
        Some(t) => {
            let n = t.copied.iter().filter(|c| c.in_image).count();
            let bytes = guest_side_bytes(run, |c| c.in_image).unwrap_or(0);
            let host = t.copied.iter().any(|c| c.in_image && c.host_provided);
            format!("{n} ({bytes}{})", if host { "+host" } else { "" })
        }
    }
}

/// A snapshot cell that differs between machines: the number is in summary.md.
const VARIES: &str = "~";

/// Whether the store disk's own references (what Nix finds scanning its bytes at build time)
/// can differ between machines. Without fix 1 Nix records them; erofs stores every name
/// uncompressed, so its image names every packed path on any machine, but a zstd squashfs image
/// names only the paths whose hash zstd kept as raw literals, which depends on the bytes
/// compressed in the same blocks: host-provided files (the kernel package and its modules,
/// busybox, the initrd; small files and file tails share fragment blocks) and the store hashes
/// themselves, which follow those inputs. With fix 1 there are none.
fn image_references_vary(run: &Run) -> bool {
    run.plan.format == ImageFormat::Squashfs && !run.plan.fixes.image
}

/// Whether what the run copies can differ between machines: its image's references vary and
/// some guest path is reached only through them (or not at all), e.g. `leak-image` (nothing
/// else reaches the guest) and `fix-reginfo` (nothing else reaches the closure info). Where the
/// runner reaches the whole guest closure anyway (regInfo=), the copy is the same everywhere.
fn copy_varies(run: &Run) -> bool {
    image_references_vary(run)
        && run
            .facts
            .as_ref()
            .is_none_or(|f| !f.guest_only_via_image.is_empty())
}

/// Whether the run copying the path named `name` can differ between machines (see
/// [`copy_varies`]).
fn copied_path_varies(run: &Run, name: &str) -> bool {
    image_references_vary(run)
        && run.facts.as_ref().is_none_or(|f| {
            f.guest_only_via_image
                .iter()
                .any(|p| super::transfer::redact(p) == name)
        })
}

/// `text`, or `~` when `varies`.
fn cell(varies: bool, text: String) -> String {
    if varies {
        VARIES.to_owned()
    } else {
        text
    }
}

/// One cell of the copied-paths matrix: `.` not copied, `L` leaked, `S` shared (in the image and
/// needed by the runner), `x` runner side; `d` copied and in the image where no verifier ran.
fn matrix_cell(run: &Run, name: &str) -> &'static str {
    if copied_path_varies(run, name) {
        return VARIES;
    }
    let copied = run
        .transfer
        .as_ref()
        .and_then(|t| t.copied.iter().find(|c| c.name == name));
    match copied {
        None => ".",
        Some(c) => match (c.class, c.in_image) {
            (Some(PathClass::Leaked), _) => "L",
            (Some(PathClass::Shared), _) => "S",
            (_, true) => "d",
            _ => "x",
        },
    }
}

/// What one snapshot shows: a scenario and disk's first deployments, its updates, its host
/// deployments and `microvm -l` checks.
struct SnapshotGroup<'a> {
    runs: &'a [&'a Run],
    updates: &'a [&'a Run],
    hosts: &'a [&'a Run],
    lists: &'a [&'a ListCheck],
}

fn snapshot_for(group: &SnapshotGroup<'_>) -> String {
    let (runs, updates) = (group.runs, group.updates);
    let mut out = String::new();
    let first = runs[0];
    let _ = writeln!(
        out,
        "{} on {}: what `nix copy` of each variant's runner transfers",
        first.plan.scenario, first.plan.format
    );
    for line in [
        "Sizes are NAR bytes. Host-provided paths (busybox, the kernel package, initrd, kernel image,",
        "QEMU and socat wrappers, the store disk) differ between machines: listed, but their sizes are",
        "left out of every number here. `guest-side` = the other copied paths; `vs unfixed` =",
        "guest-side bytes minus unfixed's; `in image` = copied paths the store disk also holds",
        "(count, guest-side bytes): copied twice; `leaked` = of those, the ones the runner does not",
        "need by itself (the verifier's runner_overlap, checked against nix copy path by path).",
        "boot `= V`: the machine is byte-identical to variant V's, whose boot stands for it.",
    ] {
        let _ = writeln!(out, "{line}");
    }
    let varies = runs.iter().chain(updates).chain(group.hosts);
    if varies.into_iter().any(|r| image_references_vary(r)) {
        for line in [
            "`~`: differs between machines (squashfs without fix 1: the image's references are the",
            "store hashes zstd kept literal, which follows the host's kernel, modules and busybox",
            "compressed beside them); the numbers are in summary.md.",
        ] {
            let _ = writeln!(out, "{line}");
        }
    }
    let _ = writeln!(out);
    let unfixed = runs
        .iter()
        .find(|r| r.plan.variant == Variant::Unfixed)
        .and_then(|r| guest_side_bytes(r, |_| true));
    let _ = writeln!(
        out,
        "{:<13} {:<35} {:<24} {:>5} {:>10} {:>10} {:>16} {:>6}  verify",
        "variant", "fixes", "boot", "paths", "guest-side", "vs unfixed", "in image", "leaked"
    );
    for run in runs {
        let t = run.transfer.as_ref();
        let bytes = guest_side_bytes(run, |_| true);
        let delta = match (bytes, unfixed) {
            (Some(b), Some(u)) => format!("{:+}", b as i128 - u as i128),
            _ => "?".to_owned(),
        };
        let copy = copy_varies(run);
        let _ = writeln!(
            out,
            "{:<13} {:<35} {:<24} {:>5} {:>10} {:>10} {:>16} {:>6}  {}",
            run.plan.variant.name(),
            fixes_text(run),
            boot_text(run),
            cell(copy, t.map_or("?".to_owned(), |t| t.paths.to_string())),
            cell(copy, bytes.map_or("?".to_owned(), |b| b.to_string())),
            cell(copy, delta),
            cell(copy, duplicated_text(run)),
            cell(
                copy,
                t.and_then(|t| t.leaked_paths)
                    .map_or("?".to_owned(), |n| n.to_string())
            ),
            cell(
                image_references_vary(run),
                run.verify
                    .as_ref()
                    .map_or("not run".to_owned(), |v| v.summary())
            ),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "copied paths (. not copied, L leaked, S shared: in the image and needed by the runner,"
    );
    let _ = writeln!(
        out,
        "x runner side; NAR bytes, `host` = host-provided; img = packed in the store disk):"
    );
    // A path of the same name can differ per variant (the runner): show the range.
    let mut ranges: BTreeMap<String, (Option<(u64, u64)>, bool)> = BTreeMap::new();
    for run in runs {
        for c in run.transfer.iter().flat_map(|t| &t.copied) {
            let entry = ranges
                .entry(c.name.clone())
                .or_insert((Some((c.nar_size, c.nar_size)), c.in_image));
            entry.0 = if c.host_provided {
                None
            } else {
                entry
                    .0
                    .map(|(lo, hi)| (lo.min(c.nar_size), hi.max(c.nar_size)))
            };
            entry.1 |= c.in_image;
        }
    }
    let _ = write!(out, "{:<38} {:>14} {:>3}", "path", "NAR bytes", "img");
    for run in runs {
        let _ = write!(out, " {:>2}", run.plan.variant.short());
    }
    let _ = writeln!(out);
    let rows: Vec<MatrixRow> = ranges
        .iter()
        .map(|(name, (range, in_image))| MatrixRow {
            names: vec![name.clone()],
            range: *range,
            in_image: *in_image,
            cells: runs.iter().map(|run| matrix_cell(run, name)).collect(),
        })
        .collect();
    for row in collapse_numbered_rows(rows) {
        let name = match row.names.as_slice() {
            [one] => one.clone(),
            [first, .., last] => format!("{first} .. {last} ({})", row.names.len()),
            [] => String::new(),
        };
        let size = match row.range {
            None => "host".to_owned(),
            Some((lo, hi)) if lo == hi => lo.to_string(),
            Some((lo, hi)) => format!("{lo}..{hi}"),
        };
        let img = if row.in_image { "yes" } else { "" };
        let _ = write!(out, "{name:<38} {size:>14} {img:>3}");
        for cell in &row.cells {
            let _ = write!(out, " {cell:>2}");
        }
        let _ = writeln!(out);
    }
    let _ = write!(out, "columns:");
    for run in runs {
        let _ = write!(out, " {}={}", run.plan.variant.short(), run.plan.variant);
    }
    let _ = writeln!(out);
    if !updates.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "update: version 2 (one package changed) copied into the cache holding version 1:"
        );
        let _ = writeln!(
            out,
            "{:<13} {:>5} {:>10}  new paths",
            "variant", "paths", "guest-side"
        );
        for run in updates {
            let t = run.transfer.as_ref();
            let copy = copy_varies(run);
            // The paths copied whatever the image names, then `~` for the others.
            let mut names: Vec<String> = t
                .map(|t| {
                    t.copied
                        .iter()
                        .filter(|c| !copied_path_varies(run, &c.name))
                        .map(|c| {
                            if c.host_provided {
                                format!("{} (host)", c.name)
                            } else {
                                c.name.clone()
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            if copy {
                names.push(VARIES.to_owned());
            }
            let _ = writeln!(
                out,
                "{:<13} {:>5} {:>10}  {}",
                run.plan.variant.name(),
                cell(copy, t.map_or("?".to_owned(), |t| t.paths.to_string())),
                cell(
                    copy,
                    guest_side_bytes(run, |_| true).map_or("?".to_owned(), |b| b.to_string())
                ),
                names.join(", ")
            );
        }
    }
    if !group.hosts.is_empty() {
        host_section(&mut out, group.hosts, group.lists);
    }
    out
}

/// The host deployments and what `microvm -l` says through an update.
fn host_section(out: &mut String, hosts: &[&Run], lists: &[&ListCheck]) {
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "host: `nix copy` of a NixOS host system declaring the VM (nixos-modules/host: install"
    );
    let _ = writeln!(
        out,
        "script linking current/toplevel, microvm@ restart trigger); microvm -l after v1 installed /"
    );
    let _ = writeln!(out, "v2 built / v2 installed:");
    let _ = writeln!(
        out,
        "{:<13} {:>5} {:>10} {:>16} {:>6}  {:<8}  microvm -l",
        "variant", "paths", "guest-side", "in image", "leaked", "toplevel"
    );
    for run in hosts {
        let t = run.transfer.as_ref();
        let toplevel = super::transfer::redact(&run.plan.toplevel);
        let copies_toplevel = t.is_some_and(|t| t.copied.iter().any(|c| c.name == toplevel));
        let list = lists
            .iter()
            .find(|c| c.variant == run.plan.variant)
            .map_or("not checked".to_owned(), |c| c.text());
        let copy = copy_varies(run);
        let _ = writeln!(
            out,
            "{:<13} {:>5} {:>10} {:>16} {:>6}  {:<8}  {}",
            run.plan.variant.name(),
            cell(copy, t.map_or("?".to_owned(), |t| t.paths.to_string())),
            cell(
                copy,
                guest_side_bytes(run, |_| true).map_or("?".to_owned(), |b| b.to_string())
            ),
            cell(copy, duplicated_text(run)),
            cell(
                copy,
                t.and_then(|t| t.leaked_paths)
                    .map_or("?".to_owned(), |n| n.to_string())
            ),
            cell(
                copied_path_varies(run, &toplevel),
                if copies_toplevel { "copied" } else { "-" }.to_owned()
            ),
            list
        );
    }
}

/// `microvm -l` must work where the runner keeps its system symlink: current, outdated,
/// current. Upstream's runner has none, so it never says current (shown, not asserted).
fn list_assertions(checks: &[ListCheck]) -> Vec<String> {
    checks
        .iter()
        .filter(|c| matches!(c.variant, Variant::Fixed | Variant::Unfixed))
        .filter(|c| !c.works())
        .map(|c| {
            format!(
                "microvm -l on {}/{}/{}: {} (want current / outdated / current)",
                c.scenario,
                c.format,
                c.variant,
                c.text()
            )
        })
        .collect()
}

/// One row of the copied-paths matrix: one path, or a run of numbered paths alike.
#[derive(Debug, Clone, PartialEq)]
struct MatrixRow {
    names: Vec<String>,
    /// NAR size range, `None` for host-provided paths.
    range: Option<(u64, u64)>,
    in_image: bool,
    cells: Vec<&'static str>,
}

/// Merges consecutive rows whose names differ only in a trailing number (`payload-000`,
/// `payload-001`, ...) and whose cells are the same, so a hundred alike paths read as one row.
fn collapse_numbered_rows(rows: Vec<MatrixRow>) -> Vec<MatrixRow> {
    let stem = |name: &str| {
        name.trim_end_matches(|c: char| c.is_ascii_digit())
            .to_owned()
    };
    let mut out: Vec<MatrixRow> = Vec::new();
    for row in rows {
        let numbered = stem(&row.names[0]) != row.names[0];
        if let Some(last) = out.last_mut() {
            let same_stem = stem(&last.names[0]) == stem(&row.names[0]);
            if numbered && same_stem && last.cells == row.cells && last.in_image == row.in_image {
                last.range = match (last.range, row.range) {
                    (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
                    _ => None,
                };
                last.names.extend(row.names);
                continue;
            }
        }
        out.push(row);
    }
    out
}

/// The first-deployment runs by (scenario, format).
fn snapshot_groups<'a>(
    runs: impl IntoIterator<Item = &'a Run>,
) -> BTreeMap<(String, ImageFormat), Vec<&'a Run>> {
    let mut groups: BTreeMap<(String, ImageFormat), Vec<&Run>> = BTreeMap::new();
    for run in runs.into_iter().filter(|r| r.plan.kind == RunKind::Run) {
        groups
            .entry((run.plan.scenario.clone(), run.plan.format))
            .or_default()
            .push(run);
    }
    groups
}

fn snapshot_name(scenario: &str, format: ImageFormat) -> String {
    format!("{scenario}-{format}")
}

/// The variants a scenario's snapshot shows: all of them, but for the emulated aarch64 guest.
fn snapshot_variants(scenario: &str) -> &'static [Variant] {
    if scenario == aarch64::SCENARIO {
        &AARCH64_VARIANTS
    } else {
        &Variant::ALL
    }
}

/// Whether a group holds every variant its snapshot shows (only then can it be compared).
fn has_every_variant(members: &[&Run]) -> bool {
    let present: BTreeSet<Variant> = members.iter().map(|r| r.plan.variant).collect();
    members.first().is_none_or(|first| {
        snapshot_variants(&first.plan.scenario)
            .iter()
            .all(|v| present.contains(v))
    })
}

/// Compares `text` with golden/<name>.snap through insta; true when they differ. insta reports
/// a mismatch by printing the diff and panicking: the diff is kept, the panic message and
/// backtrace dropped, so the other snapshots are still compared.
fn snapshot_differs(golden: &Path, name: &str, description: String, text: String) -> bool {
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        insta::with_settings!({
            snapshot_path => golden,
            prepend_module_to_snapshot => false,
            omit_expression => true,
            description => description,
        }, {
            insta::assert_snapshot!(name.to_owned(), text);
        });
    }));
    std::panic::set_hook(previous_hook);
    outcome.is_err()
}

/// Compares every complete (scenario, format) table with golden/; returns the names compared
/// and, of those, the ones that differ.
fn check_snapshots(
    runs: &[&Run],
    list_checks: &[ListCheck],
    golden: &Path,
) -> (Vec<String>, Vec<String>) {
    let mut compared = Vec::new();
    let mut changed = Vec::new();
    for ((scenario, format), mut members) in snapshot_groups(runs.iter().copied()) {
        if !has_every_variant(&members) {
            continue;
        }
        members.sort_by_key(|r| r.plan.variant);
        let of_kind = |kind: RunKind| {
            let mut found: Vec<&Run> = runs
                .iter()
                .copied()
                .filter(|r| {
                    r.plan.kind == kind && r.plan.scenario == scenario && r.plan.format == format
                })
                .collect();
            found.sort_by_key(|r| r.plan.variant);
            found
        };
        let lists: Vec<&ListCheck> = list_checks
            .iter()
            .filter(|c| c.scenario == scenario && c.format == format)
            .collect();
        let text = snapshot_for(&SnapshotGroup {
            runs: &members,
            updates: &of_kind(RunKind::Update),
            hosts: &of_kind(RunKind::Host),
            lists: &lists,
        });
        let name = snapshot_name(&scenario, format);
        let description = if scenario == aarch64::SCENARIO {
            format!("cargo xtask vm-test: the aarch64 guest (emulated, TCG) on {format}")
        } else {
            format!("cargo xtask vm-test: {scenario} on {format}")
        };
        compared.push(name.clone());
        if snapshot_differs(golden, &name, description, text) {
            changed.push(name);
        }
    }
    (compared, changed)
}

/// The variants the aarch64 guest is measured with: its snapshot per disk needs all three.
const AARCH64_VARIANTS: [Variant; 3] = [Variant::Unfixed, Variant::Upstream, Variant::Fixed];

/// A snapshot this run did not compare, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NotCompared {
    name: String,
    why: String,
    /// The run should have compared it: the run fails.
    fails: bool,
}

/// Every snapshot this run did not compare (of its groups and of golden/), with why: a group
/// missing variants fails the run unless `--variant` left them out; a group under `--boot-all`
/// is not compared (its rows booted themselves, the snapshots record which boots are shared);
/// a golden/*.snap no run produced is fine when `--scenario`/`--disk`/`--variant` left it out
/// or its scenario is opt-in and was not asked for, and fails the run otherwise (a renamed or
/// dropped scenario).
fn uncompared_snapshots(
    runs: &[&Run],
    golden: &Path,
    compared: &[String],
    selection: &Selection<'_>,
    boot_all: bool,
) -> Vec<NotCompared> {
    const VARIANT: &str = "--variant leaves variants out; snapshots show them all";
    let mut out: Vec<NotCompared> = Vec::new();
    for ((scenario, format), members) in snapshot_groups(runs.iter().copied()) {
        let name = snapshot_name(&scenario, format);
        if compared.contains(&name) {
            continue;
        }
        let (why, fails) = if selection.filters_variants() {
            (VARIANT.to_owned(), false)
        } else if boot_all {
            (
                "--boot-all boots every variant itself; the boot column records shared boots"
                    .to_owned(),
                false,
            )
        } else {
            (
                format!(
                    "only {} of {} variants ran",
                    members.len(),
                    snapshot_variants(&scenario).len()
                ),
                true,
            )
        };
        out.push(NotCompared { name, why, fails });
    }
    let on_disk: BTreeSet<String> = std::fs::read_dir(golden)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".snap"))
                .map(str::to_owned)
        })
        .collect();
    for name in on_disk {
        if compared.contains(&name) || out.iter().any(|n| n.name == name) {
            continue;
        }
        let (scenario, disk) = name.rsplit_once('-').unwrap_or((name.as_str(), ""));
        let left_out =
            |wanted: &[String], v: &str| !wanted.is_empty() && !wanted.iter().any(|w| w == v);
        let (why, fails) = if super::plan::OPT_IN_SCENARIOS.contains(&scenario)
            && !selection.scenarios.iter().any(|s| s == scenario)
        {
            (
                format!("opt-in scenario, not run (`--scenario {scenario}` runs it)"),
                false,
            )
        } else if left_out(selection.scenarios, scenario) {
            ("--scenario leaves it out".to_owned(), false)
        } else if left_out(selection.disks, disk) {
            ("--disk leaves it out".to_owned(), false)
        } else if selection.filters_variants() {
            (VARIANT.to_owned(), false)
        } else {
            (
                "golden/ holds this snapshot but no run produced it (delete it if the scenario is gone)"
                    .to_owned(),
                true,
            )
        };
        out.push(NotCompared { name, why, fails });
    }
    out
}

/// summary.md's account of the snapshots: how many were compared, which changed, which were
/// not compared and why, and where the numbers of the `~` cells are.
fn snapshots_markdown(
    compared: &[String],
    changed: &[String],
    not_compared: &[NotCompared],
) -> String {
    let mut out = String::from("\n## Snapshots\n\n");
    let _ = writeln!(
        out,
        "Compared: {} ({}).",
        compared.len(),
        if changed.is_empty() {
            "none changed".to_owned()
        } else {
            format!("changed: {}", changed.join(", "))
        }
    );
    if not_compared.is_empty() {
        let _ = writeln!(
            out,
            "Every snapshot in golden/ and of this run was compared."
        );
    } else {
        let _ = writeln!(out, "\nNot compared:\n");
        for n in not_compared {
            let fails = if n.fails { " (fails the run)" } else { "" };
            let _ = writeln!(out, "- `{}`: {}{fails}", n.name, n.why);
        }
    }
    let _ = writeln!(
        out,
        "\nA snapshot cell shown as `~` differs between machines (squashfs without fix 1); its number is in the table above."
    );
    out
}

/// Facts that must hold whatever the snapshots say.
fn hard_assertions(runs: &[Run]) -> Vec<String> {
    let mut failures = Vec::new();
    for run in runs {
        let label = run.label();
        match &run.boot {
            Some(b) if !b.outcome.ok => failures.push(format!(
                "{label} ({:?}) did not boot: {}",
                run.plan.kind,
                b.outcome.error.as_deref().unwrap_or("?")
            )),
            None if run.plan.kind == RunKind::Run => {
                failures.push(format!("{label} was not booted"))
            }
            _ => {}
        }
        if run.plan.kind == RunKind::Update {
            continue;
        }
        match &run.verify {
            None => failures.push(format!("storedisk verify did not run on {label}")),
            Some(v) if v.unavailable.is_some() => failures.push(format!(
                "storedisk verify could not run on {label}: {}",
                v.summary()
            )),
            Some(_) => {}
        }
        failures.extend(run.verify_disagreements.iter().cloned());
        let Some(t) = &run.transfer else {
            failures.push(format!(
                "{label}: nothing was copied (no transfer measured)"
            ));
            continue;
        };
        let copied = |path: &str| {
            let name = super::transfer::redact(path);
            t.copied.iter().any(|c| c.name == name)
        };
        if run.plan.kind == RunKind::Host {
            failures.extend(host_assertions(run, t));
            continue;
        }
        match run.plan.variant {
            Variant::Fixed => {
                for root in run.plan.guest_roots() {
                    if copied(root) {
                        failures.push(format!("{label} copies the guest root {root}"));
                    }
                }
                let leaked: Vec<&str> = t
                    .copied
                    .iter()
                    .filter(|c| c.class == Some(PathClass::Leaked))
                    .map(|c| c.name.as_str())
                    .collect();
                if !leaked.is_empty() {
                    failures.push(format!(
                        "{label} copies leaked paths: {}",
                        leaked.join(", ")
                    ));
                }
                if let Some(v) = run.verify.as_ref().filter(|v| v.ok == Some(false)) {
                    failures.push(format!("{label}: storedisk verify says {}", v.summary()));
                }
                if !run.runner_kernel_modules.is_empty() {
                    failures.push(format!(
                        "{label}: the runner's closure holds lib/modules in {}",
                        run.runner_kernel_modules.join(", ")
                    ));
                }
            }
            Variant::Upstream => {
                if let Some(reg_info) = &run.plan.reg_info {
                    if !copied(reg_info) {
                        failures.push(format!(
                            "{label} does not copy the closure info {reg_info} (the regInfo= leak)"
                        ));
                    }
                }
                if run.runner_kernel_modules.is_empty() {
                    failures.push(format!(
                        "{label}: the runner's closure holds no lib/modules (upstream boots the kernel package)"
                    ));
                }
            }
            _ => {}
        }
    }
    failures.extend(cross_variant_assertions(runs));
    failures
}

/// A fixed host deployment copies no guest path; an unfixed one copies the guest toplevel (the
/// host module's references, nixos-modules/host/default.nix:137,156).
fn host_assertions(run: &Run, t: &super::Transfer) -> Vec<String> {
    let label = format!("host {}", run.label());
    let copied = |path: &str| {
        let name = super::transfer::redact(path);
        t.copied.iter().any(|c| c.name == name)
    };
    let mut failures = Vec::new();
    match run.plan.variant {
        Variant::Fixed => {
            for root in run.plan.guest_roots() {
                if copied(root) {
                    failures.push(format!("{label} copies the guest root {root}"));
                }
            }
            let leaked = t.leaked_paths.unwrap_or(0);
            if leaked != 0 {
                failures.push(format!("{label} copies {leaked} leaked paths"));
            }
        }
        Variant::Unfixed if !copied(&run.plan.toplevel) => failures.push(format!(
            "{label} does not copy the guest toplevel (the host module's restart trigger)"
        )),
        _ => {}
    }
    failures
}

/// Byte comparisons between the variants of one scenario and format.
fn cross_variant_assertions(runs: &[Run]) -> Vec<String> {
    let mut failures = Vec::new();
    for ((scenario, format), members) in snapshot_groups(runs) {
        let bytes = |v: Variant| {
            members
                .iter()
                .find(|r| r.plan.variant == v)
                .and_then(|r| r.transfer.as_ref())
                .map(|t| t.nar_bytes)
        };
        let (Some(unfixed), Some(fixed)) = (bytes(Variant::Unfixed), bytes(Variant::Fixed)) else {
            continue;
        };
        if unfixed <= fixed {
            failures.push(format!(
                "{scenario}/{format}: unfixed copies {unfixed} bytes, not more than fixed ({fixed})"
            ));
        }
        let registers = members.first().is_some_and(|r| r.plan.reg_info.is_some());
        for run in &members {
            let v = run.plan.variant;
            let Some(b) = bytes(v) else { continue };
            // Fix 5 alone adds the kernel image's store path while the leaks still bring the
            // kernel package: it pays off only with leaks 1-4 fixed (leak-kernel vs fixed).
            if v.is_single_fix() && v != Variant::FixKernel && b > unfixed {
                failures.push(format!(
                    "{scenario}/{format}/{v} copies more than unfixed ({b} > {unfixed})"
                ));
            }
            // Each leak alone (leave-one-out) drags paths back in. The image's own references
            // are certain only for erofs, whose metadata (every file name) is stored
            // uncompressed; squashfs's depend on what its compressor leaves literal. Without a
            // closure info there is no regInfo= to leak.
            let lone_leak = v.is_leave_one_out() || v == Variant::Upstream;
            let certain = match v {
                Variant::LeakImage => format == ImageFormat::Erofs,
                Variant::LeakReginfo => registers,
                _ => true,
            };
            if lone_leak && certain && b <= fixed {
                failures.push(format!(
                    "{scenario}/{format}/{v} copies {b} bytes, not more than fixed ({fixed})"
                ));
            }
        }
    }
    failures
}

fn markdown_summary(runs: &[&Run], phases: &Phases, total: f64, accel: Accel) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## storedisk vm-test ({accel:?}, {total:.0} s)\n");
    let _ = writeln!(
        out,
        "| kind | arch | scenario | disk | variant | boot | s | paths | NAR | zstd | in image | leaked | verify |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for run in runs {
        let t = run.transfer.as_ref();
        let boot = run.boot.as_ref().map_or("-".to_owned(), |b| {
            let state = if b.outcome.ok { "ok" } else { "FAILED" };
            match &b.shared_with {
                Some(v) => format!("{state} (= {v})"),
                None => state.to_owned(),
            }
        });
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.plan.kind.name(),
            match run.plan.arch {
                Arch::X86_64 => "x86_64",
                Arch::Aarch64 => "aarch64 (TCG)",
            },
            run.plan.scenario,
            run.plan.format,
            run.plan.variant,
            boot,
            run.boot
                .as_ref()
                .map_or("-".to_owned(), |b| format!("{:.1}", b.outcome.seconds)),
            t.map_or("-".to_owned(), |t| t.paths.to_string()),
            t.map_or("-".to_owned(), |t| human_bytes(t.nar_bytes)),
            t.map_or("-".to_owned(), |t| human_bytes(t.compressed_bytes)),
            t.map_or("-".to_owned(), |t| human_bytes(t.in_image_bytes)),
            t.and_then(|t| t.leaked_paths)
                .map_or("n/a".to_owned(), |n| n.to_string()),
            run.verify.as_ref().map_or("-".to_owned(), |v| v.summary()),
        );
    }
    let _ = writeln!(out, "\n| phase | seconds |\n|---|---|");
    for (name, secs) in &phases.0 {
        let _ = writeln!(out, "| {name} | {secs:.1} |");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_test::boot::BootOutcome;
    use crate::vm_test::microvm_list::ListCheck;
    use crate::vm_test::plan::PlanEntry;
    use crate::vm_test::verify::Verdict;
    use crate::vm_test::{BootRecord, CopiedPath, Transfer};

    /// A booted, verified first deployment of `variant` that copied `copied`: (name, bytes,
    /// in image, class).
    fn run(variant: Variant, format: ImageFormat, copied: &[(&str, u64, bool, PathClass)]) -> Run {
        let copied: Vec<CopiedPath> = copied
            .iter()
            .map(|(name, nar_size, in_image, class)| CopiedPath {
                name: (*name).to_owned(),
                store_path: format!("/nix/store/{:032}-{name}", 0),
                nar_size: *nar_size,
                compressed_size: *nar_size,
                host_provided: false,
                in_image: *in_image,
                class: Some(*class),
            })
            .collect();
        let leaked = copied
            .iter()
            .filter(|c| c.class == Some(PathClass::Leaked))
            .count();
        Run {
            plan: PlanEntry::example("s", format, variant),
            boot: Some(BootRecord {
                outcome: BootOutcome {
                    ok: true,
                    seconds: 1.0,
                    result: None,
                    error: None,
                    log: String::new(),
                    attempts: 1,
                },
                shared_with: None,
            }),
            transfer: Some(Transfer {
                paths: copied.len(),
                nar_bytes: copied.iter().map(|c| c.nar_size).sum(),
                in_image_bytes: 0,
                compressed_bytes: 0,
                leaked_paths: Some(leaked),
                copied,
            }),
            verify: Some(Verdict {
                ok: Some(leaked == 0),
                checks: BTreeMap::new(),
                leaked: Vec::new(),
                shared: Vec::new(),
                packed_paths: 0,
                duplicated_bytes: 0,
                unavailable: None,
            }),
            runner_kernel_modules: if variant == Variant::Fixed {
                vec![]
            } else {
                vec!["linux-host".to_owned()]
            },
            verify_disagreements: Vec::new(),
            facts: None,
        }
    }

    const RUNNER: (&str, u64, bool, PathClass) = ("microvm-qemu-s", 100, false, PathClass::Runner);
    const KERNEL: (&str, u64, bool, PathClass) = ("linux-host", 5000, true, PathClass::Shared);
    const IMAGE: (&str, u64, bool, PathClass) =
        ("microvm-kernel-image", 3000, false, PathClass::Runner);
    const TOPLEVEL: (&str, u64, bool, PathClass) = ("nixos-system-s", 200, true, PathClass::Leaked);
    const REGINFO: (&str, u64, bool, PathClass) = ("closure-info", 300, true, PathClass::Leaked);

    /// Every variant of one group: the leaky ones copy the guest, fix 5 swaps the kernel.
    fn group(format: ImageFormat) -> Vec<Run> {
        Variant::ALL
            .iter()
            .map(|&v| match v {
                Variant::Fixed | Variant::LeakImage if format == ImageFormat::Squashfs => {
                    run(v, format, &[RUNNER, IMAGE])
                }
                Variant::Fixed => run(v, format, &[RUNNER, IMAGE]),
                Variant::LeakKernel => run(v, format, &[RUNNER, KERNEL]),
                Variant::Upstream => run(v, format, &[RUNNER, KERNEL, TOPLEVEL, REGINFO]),
                _ => run(v, format, &[RUNNER, KERNEL, TOPLEVEL, REGINFO]),
            })
            .collect()
    }

    #[test]
    fn numbered_rows_that_read_alike_collapse_into_one() {
        let row = |name: &str, size: u64, cells: &[&'static str]| MatrixRow {
            names: vec![name.to_owned()],
            range: Some((size, size)),
            in_image: true,
            cells: cells.to_vec(),
        };
        let rows = vec![
            row("lib-00", 10, &["L", "."]),
            row("lib-01", 12, &["L", "."]),
            row("lib-02", 11, &["L", "S"]),
            row("lib-03", 9, &["L", "S"]),
            row("words", 5, &["L", "S"]),
        ];
        let merged = collapse_numbered_rows(rows);
        let names: Vec<Vec<String>> = merged.iter().map(|r| r.names.clone()).collect();
        assert_eq!(
            names,
            [
                vec!["lib-00".to_owned(), "lib-01".to_owned()],
                vec!["lib-02".to_owned(), "lib-03".to_owned()],
                vec!["words".to_owned()]
            ]
        );
        assert_eq!(merged[0].range, Some((10, 12)));
        assert_eq!(merged[1].range, Some((9, 11)));
    }

    #[test]
    fn a_consistent_matrix_passes() {
        assert_eq!(
            hard_assertions(&group(ImageFormat::Erofs)),
            Vec::<String>::new()
        );
        assert_eq!(
            hard_assertions(&group(ImageFormat::Squashfs)),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_fixed_runner_that_copies_the_guest_or_the_modules_fails() {
        let mut runs = group(ImageFormat::Erofs);
        let fixed = runs
            .iter_mut()
            .find(|r| r.plan.variant == Variant::Fixed)
            .unwrap();
        *fixed = run(
            Variant::Fixed,
            ImageFormat::Erofs,
            &[RUNNER, IMAGE, TOPLEVEL],
        );
        fixed.runner_kernel_modules = vec!["linux-host".to_owned()];
        let failures = hard_assertions(&runs);
        assert!(
            failures.iter().any(|f| f.contains("copies the guest root")),
            "{failures:#?}"
        );
        assert!(failures
            .iter()
            .any(|f| f.contains("copies leaked paths: nixos-system-s")));
        assert!(failures
            .iter()
            .any(|f| f.contains("holds lib/modules in linux-host")));
    }

    #[test]
    fn upstream_must_show_the_reginfo_leak_and_the_kernel_package() {
        let mut runs = group(ImageFormat::Erofs);
        let upstream = runs
            .iter_mut()
            .find(|r| r.plan.variant == Variant::Upstream)
            .unwrap();
        *upstream = run(
            Variant::Upstream,
            ImageFormat::Erofs,
            &[RUNNER, KERNEL, TOPLEVEL],
        );
        upstream.runner_kernel_modules.clear();
        let failures = hard_assertions(&runs);
        assert!(failures
            .iter()
            .any(|f| f.contains("does not copy the closure info")));
        assert!(failures.iter().any(|f| f.contains("holds no lib/modules")));
    }

    #[test]
    fn a_leave_one_out_variant_that_copies_no_more_than_fixed_fails() {
        let mut runs = group(ImageFormat::Erofs);
        let leak = runs
            .iter_mut()
            .find(|r| r.plan.variant == Variant::LeakInit)
            .unwrap();
        *leak = run(Variant::LeakInit, ImageFormat::Erofs, &[RUNNER, IMAGE]);
        let failures = hard_assertions(&runs);
        assert_eq!(
            failures,
            ["s/erofs/leak-init copies 3100 bytes, not more than fixed (3100)"]
        );
        // On squashfs the image's own references are not certain: leak-image may equal fixed.
        assert!(hard_assertions(&group(ImageFormat::Squashfs)).is_empty());
    }

    #[test]
    fn failed_boots_missing_verdicts_and_disagreements_fail() {
        let mut runs = group(ImageFormat::Erofs);
        runs[0].boot.as_mut().unwrap().outcome.ok = false;
        runs[1].verify = None;
        runs[2].verify_disagreements =
            vec!["s/erofs/fixed: the verifier calls 1 leaked".to_owned()];
        let failures = hard_assertions(&runs);
        assert!(failures[0].contains("s/erofs/unfixed (Run) did not boot"));
        assert!(failures
            .iter()
            .any(|f| f == "storedisk verify did not run on s/erofs/upstream"));
        assert!(failures
            .iter()
            .any(|f| f.contains("the verifier calls 1 leaked")));
    }

    #[test]
    fn host_deployments_fixed_copies_no_guest_unfixed_copies_the_toplevel() {
        let host = |variant, copied: &[(&str, u64, bool, PathClass)]| {
            let mut r = run(variant, ImageFormat::Erofs, copied);
            r.plan.kind = RunKind::Host;
            r
        };
        let good = [
            host(Variant::Unfixed, &[RUNNER, TOPLEVEL, REGINFO]),
            host(Variant::Fixed, &[RUNNER, IMAGE]),
        ];
        assert_eq!(hard_assertions(&good), Vec::<String>::new());
        let bad = [
            host(Variant::Unfixed, &[RUNNER]),
            host(Variant::Fixed, &[RUNNER, IMAGE, TOPLEVEL]),
        ];
        let failures = hard_assertions(&bad);
        assert_eq!(failures.len(), 3, "{failures:#?}");
        assert!(failures[0].contains("does not copy the guest toplevel"));
        assert!(failures[1].contains("copies the guest root /nix/store/"));
        assert!(failures[2].contains("copies 1 leaked paths"));
    }

    #[test]
    fn microvm_list_must_say_current_outdated_current_where_the_symlink_is_kept() {
        use crate::vm_test::microvm_list::ListState::{Current, Outdated};
        let check = |variant, states: [_; 3]| ListCheck {
            scenario: "s".to_owned(),
            format: ImageFormat::Erofs,
            variant,
            v1_installed: states[0],
            v2_built: states[1],
            v2_installed: states[2],
        };
        let checks = [
            check(Variant::Fixed, [Current, Outdated, Current]),
            // Upstream has no symlink: always outdated, shown but not a failure.
            check(Variant::Upstream, [Outdated, Outdated, Outdated]),
            check(Variant::Unfixed, [Current, Current, Current]),
        ];
        assert_eq!(
            list_assertions(&checks),
            ["microvm -l on s/erofs/unfixed: current / current / current (want current / outdated / current)"]
        );
    }

    #[test]
    fn shared_boots_and_cells_that_differ_between_machines_are_marked() {
        use crate::vm_test::RunnerFacts;
        let facts = |only_via_image: &[&str]| RunnerFacts {
            guest_closure: BTreeSet::new(),
            runner_own: BTreeSet::new(),
            guest_only_via_image: only_via_image
                .iter()
                .map(|name| format!("/nix/store/{:032}-{name}", 0))
                .collect(),
        };
        let squashfs = ImageFormat::Squashfs;
        // unfixed: no fix 1, but regInfo= reaches the whole guest: only its verdict (does the
        // image name a packed path?) differs between machines.
        let mut unfixed = run(
            Variant::Unfixed,
            squashfs,
            &[RUNNER, KERNEL, TOPLEVEL, REGINFO],
        );
        unfixed.facts = Some(facts(&[]));
        let mut fixed = run(Variant::Fixed, squashfs, &[RUNNER, IMAGE]);
        fixed.plan.fixes.image = true;
        fixed.facts = Some(facts(&["nixos-system-s", "closure-info", "linux-host"]));
        // leak-image: only the image's references reach the guest; its machine is fixed's.
        let mut leak = run(Variant::LeakImage, squashfs, &[RUNNER, IMAGE]);
        leak.facts = Some(facts(&["nixos-system-s", "closure-info", "linux-host"]));
        leak.boot.as_mut().unwrap().shared_with = Some("fixed".to_owned());
        let text = snapshot_for(&SnapshotGroup {
            runs: &[&unfixed, &fixed, &leak],
            updates: &[],
            hosts: &[],
            lists: &[],
        });
        insta::assert_snapshot!(text, @r"
        s on squashfs: what `nix copy` of each variant's runner transfers
        Sizes are NAR bytes. Host-provided paths (busybox, the kernel package, initrd, kernel image,
        QEMU and socat wrappers, the store disk) differ between machines: listed, but their sizes are
        left out of every number here. `guest-side` = the other copied paths; `vs unfixed` =
        guest-side bytes minus unfixed's; `in image` = copied paths the store disk also holds
        (count, guest-side bytes): copied twice; `leaked` = of those, the ones the runner does not
        need by itself (the verifier's runner_overlap, checked against nix copy path by path).
        boot `= V`: the machine is byte-identical to variant V's, whose boot stands for it.
        `~`: differs between machines (squashfs without fix 1: the image's references are the
        store hashes zstd kept literal, which follows the host's kernel, modules and busybox
        compressed beside them); the numbers are in summary.md.

        variant       fixes                               boot                     paths guest-side vs unfixed         in image leaked  verify
        unfixed       ----- ------- ---- ------- ------   ok: ? reg, ? files           4       5600         +0         3 (5500)      2  ~
        fixed         image ------- ---- ------- ------   ok: ? reg, ? files           2       3100      -2500            0 (0)      0  ok
        leak-image    ----- ------- ---- ------- ------   = fixed                      ~          ~          ~                ~      ~  ~

        copied paths (. not copied, L leaked, S shared: in the image and needed by the runner,
        x runner side; NAR bytes, `host` = host-provided; img = packed in the store disk):
        path                                        NAR bytes img  U  F lI
        closure-info                                      300 yes  L  .  ~
        linux-host                                       5000 yes  S  .  ~
        microvm-kernel-image                             3000      .  x  x
        microvm-qemu-s                                    100      x  x  x
        nixos-system-s                                    200 yes  L  .  ~
        columns: U=unfixed F=fixed lI=leak-image
        ");
    }

    #[test]
    fn an_incomplete_group_or_a_stale_snapshot_is_not_silently_skipped() {
        let golden = tempfile::tempdir().unwrap();
        for name in ["s-erofs", "gone-erofs", "s-squashfs", "realistic-erofs"] {
            std::fs::write(golden.path().join(format!("{name}.snap")), "").unwrap();
        }
        let mut runs = group(ImageFormat::Erofs);
        runs.retain(|r| r.plan.variant != Variant::FixKernel);
        let refs: Vec<&Run> = runs.iter().collect();
        let render = |compared: &[String], selection: &Selection<'_>, boot_all: bool| {
            uncompared_snapshots(&refs, golden.path(), compared, selection, boot_all)
                .iter()
                .map(|n| {
                    format!(
                        "{}{}: {}\n",
                        if n.fails { "FAILS " } else { "" },
                        n.name,
                        n.why
                    )
                })
                .collect::<String>()
        };
        // A default run: the incomplete group and the stale snapshots fail; the opt-in
        // scenario's is said, not failed.
        insta::assert_snapshot!(render(&[], &Selection::default(), false), @r"
        FAILS s-erofs: only 12 of 13 variants ran
        FAILS gone-erofs: golden/ holds this snapshot but no run produced it (delete it if the scenario is gone)
        realistic-erofs: opt-in scenario, not run (`--scenario realistic` runs it)
        FAILS s-squashfs: golden/ holds this snapshot but no run produced it (delete it if the scenario is gone)
        ");
        // What the user left out is said, not failed.
        let variants = ["fixed".to_owned()];
        let scenarios = ["s".to_owned()];
        let disks = ["erofs".to_owned()];
        let selected = Selection {
            scenarios: &scenarios,
            disks: &disks,
            ..Selection::default()
        };
        insta::assert_snapshot!(render(&[], &selected, true), @r"
        s-erofs: --boot-all boots every variant itself; the boot column records shared boots
        gone-erofs: --scenario leaves it out
        realistic-erofs: opt-in scenario, not run (`--scenario realistic` runs it)
        s-squashfs: --disk leaves it out
        ");
        let partial = Selection {
            variants: &variants,
            ..Selection::default()
        };
        let compared = ["s-erofs".to_owned()];
        insta::assert_snapshot!(render(&compared, &partial, false), @r"
        gone-erofs: --variant leaves variants out; snapshots show them all
        realistic-erofs: opt-in scenario, not run (`--scenario realistic` runs it)
        s-squashfs: --variant leaves variants out; snapshots show them all
        ");
    }
}
