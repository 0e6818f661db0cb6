//! The readable `storedisk verify` report: the verifier's [`Report`] laid out for a terminal,
//! with the flags that would enable each check that did not run. The JSON form is the report's
//! own serde shape; this is the only place that knows the text layout.

use std::fmt::Write as _;

use storedisk_verifier::report::{human_bytes, CheckName, MissingInput, Report};

/// How to give an input a check lacked, in this command's flags.
pub fn flag_hint(missing: MissingInput) -> &'static str {
    match missing {
        MissingInput::GuestClosure => {
            "give --closure FILE, or pack a closure-info registration in the image"
        }
        MissingInput::RecordedHashes => {
            "give a --closure that records them (exportReferencesGraph, nix path-info --json)"
        }
        MissingInput::ImagePath => "give --image-path STOREPATH",
        MissingInput::Runner => "give --runner STOREPATH or --runner-closure FILE",
        MissingInput::AllowGlobs => "give --allow GLOB",
        MissingInput::SecondLayer => "give every layer of a layered store disk as an IMAGE",
    }
}

/// Why a check did not run, with the flag that would give what it lacked.
fn not_run_text(report: &Report, name: CheckName, why: Option<&str>) -> String {
    let why = why.unwrap_or("its inputs were not given");
    match report.checks.missing_input(name) {
        Some(missing) => format!("{why}: {}", flag_hint(missing)),
        None => why.to_owned(),
    }
}

/// The readable report: `OK`, `nothing checked` (every check lacked its inputs) or
/// `N findings` first, then a section per failing check, then a short summary of what was
/// checked and, for each check that did not run, why and the flag that would enable it.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    if report.ok && report.nothing_checked() {
        out.push_str("nothing checked\n");
    } else if report.ok {
        out.push_str("OK\n");
    } else {
        let _ = writeln!(
            out,
            "{} finding{}",
            report.findings,
            if report.findings == 1 { "" } else { "s" }
        );
    }
    let c = &report.checks;
    if !report.required_not_run.is_empty() {
        let _ = writeln!(
            out,
            "\n{} required check(s) did not run",
            report.required_not_run.len()
        );
        for n in &report.required_not_run {
            let _ = writeln!(
                out,
                "  {}: {}",
                n.check,
                not_run_text(report, n.check, Some(&n.why))
            );
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
                in_layer(report, m.layer),
                m.expected,
                m.actual
            );
        }
        for e in &c.integrity.invalid_entries {
            let _ = writeln!(
                out,
                "  invalid root entry {:?}{}: {}",
                e.name,
                in_layer(report, e.layer),
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
    let total: u64 = report.paths.iter().map(|p| p.nar_size).sum();
    if report.images.len() > 1 {
        let _ = writeln!(
            out,
            "\n{} store disk of {} layers: {} store paths, {} of NAR content",
            report.format,
            report.images.len(),
            report.paths.len(),
            human_bytes(total)
        );
        for (i, layer) in report.images.iter().enumerate() {
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
            report.format,
            report.image,
            report.paths.len(),
            human_bytes(total)
        );
    }
    for (name, ok, why) in c.statuses() {
        let required = report.required_not_run.iter().any(|n| n.check == name);
        let state = match ok {
            Some(true) => "ok".to_owned(),
            Some(false) => "FAILED".to_owned(),
            None if required => {
                format!("REQUIRED, not checked: {}", not_run_text(report, name, why))
            }
            None => format!("not checked: {}", not_run_text(report, name, why)),
        };
        let _ = writeln!(out, "  {name}: {state}");
    }
    let _ = writeln!(
        out,
        "  without unsafeDiscardReferences Nix would record {} reference(s) from {}",
        c.self_contained.would_reference_count,
        if report.images.len() > 1 {
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

/// ` (in LABEL)` naming layer `index` of a set; empty for a single image.
fn in_layer(report: &Report, index: usize) -> String {
    match report.images.get(index) {
        Some(layer) if report.images.len() > 1 => format!(" (in {})", layer.image),
        _ => String::new(),
    }
}
