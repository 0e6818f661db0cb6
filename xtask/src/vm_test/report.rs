//! The harness's verdict: `target/vm-test/report.json`, a Markdown summary for CI, one insta
//! snapshot per scenario x store disk format in golden/ (readable tables, hashes redacted,
//! host-provided sizes left out), and the hard assertions a careless re-accept cannot hide.

use super::cross::CrossRun;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use storedisk_verifier::report::human_bytes;

use anyhow::{bail, Result};
use serde_json::json;

use super::{boot::Accel, variant_rank, Phases, Run};
use crate::setup::write_atomically;

pub fn finish(
    runs: &[Run],
    cross: &[CrossRun],
    phases: &Phases,
    total_seconds: f64,
    accel: Accel,
    work: &Path,
    golden: &Path,
) -> Result<()> {
    let report = json!({
        "accel": accel,
        "total_seconds": (total_seconds * 10.0).round() / 10.0,
        "phases": phases.0.iter().map(|(n, s)| json!({"phase": n, "seconds": s})).collect::<Vec<_>>(),
        "cross": cross,
        "runs": runs.iter().map(|r| json!({
            "kind": r.plan.kind,
            "scenario": r.plan.scenario,
            "disk": r.plan.format,
            "variant": r.plan.variant,
            "fixes": r.plan.fixes,
            "runner": r.plan.runner,
            "store_disk": r.plan.store_disk,
            "boot": r.boot,
            "transfer": r.transfer,
            "verify": r.verify,
        })).collect::<Vec<_>>(),
    });
    write_atomically(
        &work.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let mut markdown = markdown_summary(runs, phases, total_seconds, accel);
    markdown.push_str(&cross_summary(cross));
    write_atomically(&work.join("summary.md"), markdown.as_bytes())?;
    eprintln!("\n{markdown}");
    eprintln!(
        "wrote {} and {}",
        work.join("report.json").display(),
        work.join("summary.md").display()
    );

    let failed_snapshots = check_snapshots(runs, golden);
    let mut failed_assertions = hard_assertions(runs);
    failed_assertions.extend(cross.iter().filter(|c| !c.ok()).map(|c| {
        format!(
            "the aarch64 guest's {} store disk: verify {}, busybox ELF machine {} (want {})",
            c.disk,
            c.verify.summary(),
            c.elf_machine,
            crate::tools::ELF_MACHINE_AARCH64
        )
    }));
    for failure in &failed_assertions {
        eprintln!("ASSERTION FAILED: {failure}");
    }
    if !failed_snapshots.is_empty() {
        eprintln!(
            "snapshots changed: {} (review with `cargo insta review`, or see the diff above)",
            failed_snapshots.join(", ")
        );
    }
    // The closing line CI reads: one count per run (booted and verified) and per snapshot
    // compared, plus each failed cross-variant assertion.
    let measured: Vec<&Run> = runs.iter().filter(|r| r.plan.kind == "run").collect();
    let runs_ok = measured
        .iter()
        .filter(|r| {
            r.boot.as_ref().is_some_and(|b| b.outcome.ok)
                && r.verify.as_ref().is_some_and(|v| v.unavailable.is_none())
        })
        .count();
    let snapshots_compared = compared_snapshot_groups(runs);
    let cross_ok = cross.iter().filter(|c| c.ok()).count();
    let failed = (measured.len() - runs_ok) + failed_snapshots.len() + failed_assertions.len();
    let passed = runs_ok + cross_ok + snapshots_compared.saturating_sub(failed_snapshots.len());
    if failed == 0 {
        eprintln!("vm-test: all assertions hold and every snapshot matches");
    }
    println!("vm-test: {passed} passed, {failed} failed");
    if !failed_assertions.is_empty() || !failed_snapshots.is_empty() {
        bail!(
            "{} assertion(s) failed, {} snapshot(s) changed",
            failed_assertions.len(),
            failed_snapshots.len()
        );
    }
    Ok(())
}

fn boot_text(run: &Run) -> String {
    match &run.boot {
        None => "not booted".to_owned(),
        Some(b) if !b.outcome.ok => "FAILED".to_owned(),
        Some(b) => {
            let r = b.outcome.result.as_ref();
            let n = |k: &str| {
                r.and_then(|r| r.get(k))
                    .and_then(|v| v.as_u64())
                    .map_or("?".to_owned(), |v| v.to_string())
            };
            format!(
                "ok: {} registered, {} files",
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
    format!(
        "{} {} {} {}",
        flag(f.image, "image"),
        flag(f.symlink, "symlink"),
        flag(f.init, "init"),
        flag(f.reg_info, "regInfo")
    )
}

/// NAR bytes of the copied paths whose size is the same on every machine.
fn guest_side_bytes(run: &Run) -> Option<u64> {
    run.transfer.as_ref().map(|t| {
        t.copied
            .iter()
            .filter(|c| !c.host_provided)
            .map(|c| c.nar_size)
            .sum()
    })
}

fn snapshot_for(runs: &[&Run], updates: &[&Run]) -> String {
    let mut out = String::new();
    let first = runs[0];
    let _ = writeln!(
        out,
        "{} on {}: what `nix copy` of each variant's runner transfers",
        first.plan.scenario, first.plan.format
    );
    let _ = writeln!(
        out,
        "Sizes are NAR bytes. Host-provided paths (busybox, kernel, initrd, the store disk image)"
    );
    let _ = writeln!(
        out,
        "differ between machines: listed, but their sizes are left out of every number here."
    );
    let _ = writeln!(
        out,
        "`guest-side` = the other copied paths; `vs unfixed` = guest-side bytes minus unfixed's."
    );
    let _ = writeln!(out);
    let unfixed = runs
        .iter()
        .find(|r| r.plan.variant == "unfixed")
        .and_then(|r| guest_side_bytes(r));
    let _ = writeln!(
        out,
        "{:<13} {:<28} {:<33} {:>5} {:>11} {:>11}  verify",
        "variant", "fixes", "boot", "paths", "guest-side", "vs unfixed"
    );
    for run in runs {
        let t = run.transfer.as_ref();
        let bytes = guest_side_bytes(run);
        let delta = match (bytes, unfixed) {
            (Some(b), Some(u)) => format!("{:+}", b as i128 - u as i128),
            _ => "?".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<13} {:<28} {:<33} {:>5} {:>11} {:>11}  {}",
            run.plan.variant,
            fixes_text(run),
            boot_text(run),
            t.map_or("?".to_owned(), |t| t.paths.to_string()),
            bytes.map_or("?".to_owned(), |b| b.to_string()),
            delta,
            run.verify
                .as_ref()
                .map_or("not run".to_owned(), |v| v.summary()),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "copied paths (x = copied by that variant; NAR bytes, `host` = host-provided):"
    );
    // A path of the same name can differ per variant (the runner): show the range.
    let mut ranges: BTreeMap<String, Option<(u64, u64)>> = BTreeMap::new();
    for run in runs {
        for c in run.transfer.iter().flat_map(|t| &t.copied) {
            let entry = ranges
                .entry(c.name.clone())
                .or_insert(Some((c.nar_size, c.nar_size)));
            *entry = if c.host_provided {
                None
            } else {
                entry.map(|(lo, hi)| (lo.min(c.nar_size), hi.max(c.nar_size)))
            };
        }
    }
    let sizes: BTreeMap<String, String> = ranges
        .into_iter()
        .map(|(name, range)| {
            let text = match range {
                None => "host".to_owned(),
                Some((lo, hi)) if lo == hi => lo.to_string(),
                Some((lo, hi)) => format!("{lo}..{hi}"),
            };
            (name, text)
        })
        .collect();
    let _ = write!(out, "{:<30} {:>11}", "path", "NAR bytes");
    for run in runs {
        let _ = write!(out, " {:>3}", short_variant(&run.plan.variant));
    }
    let _ = writeln!(out);
    for (name, size) in &sizes {
        let _ = write!(out, "{name:<30} {size:>11}");
        for run in runs {
            let copied = run
                .transfer
                .as_ref()
                .is_some_and(|t| t.copied.iter().any(|c| &c.name == name));
            let _ = write!(out, " {:>3}", if copied { "x" } else { "." });
        }
        let _ = writeln!(out);
    }
    let _ = write!(out, "columns:");
    for run in runs {
        let _ = write!(
            out,
            " {}={}",
            short_variant(&run.plan.variant),
            run.plan.variant
        );
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
            "{:<13} {:>5} {:>11}  new paths",
            "variant", "paths", "guest-side"
        );
        for run in updates {
            let t = run.transfer.as_ref();
            let names: Vec<String> = t
                .map(|t| {
                    t.copied
                        .iter()
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
            let _ = writeln!(
                out,
                "{:<13} {:>5} {:>11}  {}",
                run.plan.variant,
                t.map_or("?".to_owned(), |t| t.paths.to_string()),
                guest_side_bytes(run).map_or("?".to_owned(), |b| b.to_string()),
                names.join(", ")
            );
        }
    }
    out
}

fn short_variant(v: &str) -> &'static str {
    match v {
        "unfixed" => "U",
        "upstream" => "up",
        "fixed" => "F",
        "fix-image" => "fI",
        "fix-symlink" => "fS",
        "fix-init" => "fN",
        "fix-reginfo" => "fR",
        "leak-image" => "lI",
        "leak-symlink" => "lS",
        "leak-init" => "lN",
        _ => "?",
    }
}

/// The runs by (scenario, format), and whether every variant ran (snapshots cover them all,
/// so they are compared only then).
fn snapshot_groups(runs: &[Run]) -> (BTreeMap<(String, String), Vec<&Run>>, bool) {
    let mut groups: BTreeMap<(String, String), Vec<&Run>> = BTreeMap::new();
    for run in runs.iter().filter(|r| r.plan.kind == "run") {
        groups
            .entry((run.plan.scenario.clone(), run.plan.format.clone()))
            .or_default()
            .push(run);
    }
    let all_variants = runs
        .iter()
        .map(|r| r.plan.variant.as_str())
        .collect::<BTreeSet<_>>()
        .len()
        == super::VARIANT_ORDER.len();
    (groups, all_variants)
}

/// How many snapshots [`check_snapshots`] compares for these runs.
fn compared_snapshot_groups(runs: &[Run]) -> usize {
    match snapshot_groups(runs) {
        (groups, true) => groups.len(),
        (_, false) => 0,
    }
}

/// Compares every (scenario, format) table with golden/; returns the names that differ.
fn check_snapshots(runs: &[Run], golden: &Path) -> Vec<String> {
    let (groups, all_variants) = snapshot_groups(runs);
    if !all_variants {
        eprintln!(
            "snapshots: not compared (a --variant filter is active; snapshots cover every variant)"
        );
        return Vec::new();
    }
    let mut failed = Vec::new();
    for ((scenario, format), mut members) in groups {
        members.sort_by_key(|r| variant_rank(&r.plan.variant));
        let mut updates: Vec<&Run> = runs
            .iter()
            .filter(|r| {
                r.plan.kind == "update" && r.plan.scenario == scenario && r.plan.format == format
            })
            .collect();
        updates.sort_by_key(|r| variant_rank(&r.plan.variant));
        let text = snapshot_for(&members, &updates);
        let name = format!("{scenario}-{format}");
        // insta reports a mismatch by printing the diff and panicking; keep the diff, drop the
        // panic message and backtrace, and go on comparing the other snapshots.
        let previous_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            insta::with_settings!({
                snapshot_path => golden,
                prepend_module_to_snapshot => false,
                omit_expression => true,
                description => format!("cargo xtask vm-test: {scenario} on {format}"),
            }, {
                insta::assert_snapshot!(name.clone(), text);
            });
        }));
        std::panic::set_hook(previous_hook);
        if outcome.is_err() {
            failed.push(name);
        }
    }
    failed
}

/// Facts that must hold whatever the snapshots say.
fn hard_assertions(runs: &[Run]) -> Vec<String> {
    let mut failures = Vec::new();
    let find = |s: &str, f: &str, v: &str| {
        runs.iter().find(|r| {
            r.plan.kind == "run"
                && r.plan.scenario == s
                && r.plan.format == f
                && r.plan.variant == v
        })
    };
    for run in runs {
        if let Some(b) = &run.boot {
            if !b.outcome.ok {
                failures.push(format!(
                    "{} ({}) did not boot: {}",
                    run.label(),
                    run.plan.kind,
                    b.outcome.error.as_deref().unwrap_or("?")
                ));
            }
        } else if run.plan.kind == "run" {
            failures.push(format!("{} was not booted", run.label()));
        }
        if let Some(v) = &run.verify {
            if v.unavailable.is_some() && !v.not_implemented() {
                failures.push(format!(
                    "storedisk verify could not run on {}: {}",
                    run.label(),
                    v.summary()
                ));
            }
        }
    }
    let groups: BTreeSet<(String, String)> = runs
        .iter()
        .map(|r| (r.plan.scenario.clone(), r.plan.format.clone()))
        .collect();
    for (s, f) in &groups {
        let bytes = |v: &str| {
            find(s, f, v)
                .and_then(|r| r.transfer.as_ref())
                .map(|t| t.nar_bytes)
        };
        let names = |v: &str| -> Vec<String> {
            find(s, f, v)
                .and_then(|r| r.transfer.as_ref())
                .map(|t| t.copied.iter().map(|c| c.name.clone()).collect())
                .unwrap_or_default()
        };
        let guest_root = |n: &String| {
            n.starts_with("nixos-system-") || n == "closure-info" || n.ends_with("-manifest")
        };
        if let Some(fixed) = find(s, f, "fixed") {
            let leaked: Vec<String> = names("fixed").into_iter().filter(guest_root).collect();
            if !leaked.is_empty() {
                failures.push(format!(
                    "{s}/{f}/fixed copies guest paths: {}",
                    leaked.join(", ")
                ));
            }
            if let Some(n) = fixed.transfer.as_ref().and_then(|t| t.leaked_paths) {
                if n != 0 {
                    failures.push(format!(
                        "{s}/{f}/fixed: the verifier finds {n} leaked paths"
                    ));
                }
            }
            if let Some(v) = &fixed.verify {
                if v.ok == Some(false) {
                    failures.push(format!(
                        "{s}/{f}/fixed: storedisk verify says {}",
                        v.summary()
                    ));
                }
            }
        }
        if let (Some(unfixed), Some(fixed)) = (bytes("unfixed"), bytes("fixed")) {
            if unfixed <= fixed {
                failures.push(format!(
                    "{s}/{f}: unfixed copies {unfixed} bytes, not more than fixed ({fixed})"
                ));
            }
            for single in ["fix-image", "fix-symlink", "fix-init", "fix-reginfo"] {
                if let Some(b) = bytes(single) {
                    if b > unfixed {
                        failures.push(format!(
                            "{s}/{f}/{single} copies more than unfixed ({b} > {unfixed})"
                        ));
                    }
                }
            }
            // Each leak alone (leave-one-out) drags guest paths back in. The image's own
            // references are certain only for erofs, whose metadata (every file name) is stored
            // uncompressed; squashfs's depend on what its compressor leaves literal.
            let mut lone_leaks = vec!["leak-symlink", "leak-init", "upstream"];
            if f == "erofs" {
                lone_leaks.push("leak-image");
            }
            for leak in lone_leaks {
                if let Some(b) = bytes(leak) {
                    if b <= fixed {
                        failures.push(format!(
                            "{s}/{f}/{leak} copies {b} bytes, not more than fixed ({fixed})"
                        ));
                    }
                }
            }
        }
        if find(s, f, "upstream").is_some()
            && !names("upstream").iter().any(|n| n == "closure-info")
        {
            failures.push(format!(
                "{s}/{f}/upstream does not copy the closure-info (the regInfo= leak)"
            ));
        }
    }
    failures
}

/// The aarch64 guest's lines of the Markdown summary.
fn cross_summary(cross: &[CrossRun]) -> String {
    let mut out = String::from(
        "\n| cross-arch guest | disk | packed paths | busybox ELF machine | verify |\n|---|---|---|---|---|\n",
    );
    for c in cross {
        let _ = writeln!(
            out,
            "| {} (built and verified, not booted) | {} | {} | {} | {} |",
            c.arch,
            c.disk,
            c.packed_paths,
            c.elf_machine,
            c.verify.summary()
        );
    }
    out
}

fn markdown_summary(runs: &[Run], phases: &Phases, total: f64, accel: Accel) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## storedisk vm-test ({accel:?}, {total:.0} s)\n");
    let _ = writeln!(
        out,
        "| kind | scenario | disk | variant | boot | s | paths | NAR | zstd | leaked | verify |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
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
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.plan.kind,
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
