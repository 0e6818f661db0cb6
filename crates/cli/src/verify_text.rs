//! The readable `storedisk verify` report: the verifier's [`Report`] laid out for a terminal,
//! causes and sizes first (each way into the guest closure, with what it drags and the fix),
//! lists cut to their first few entries unless `--verbose` asks for them whole, and the flags
//! that would enable each check that did not run. The JSON form is the report's own serde
//! shape; this is the only place that knows the text layout.

use std::fmt::Write as _;

use storedisk_verifier::locate::Location;
use storedisk_verifier::report::{human_bytes, CheckName, MissingInput, Report};
use storedisk_verifier::WayIn;

/// Lists up to this long are shown whole.
const WHOLE_LIST: usize = 8;
/// How many entries of a longer list are shown without `--verbose`.
const LIST_HEAD: usize = 5;

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

/// Writes `items` with `item`, all of them when `verbose` or when there are few, else the first
/// [`LIST_HEAD`] and how many more there are.
fn list<T>(out: &mut String, items: &[T], verbose: bool, item: impl Fn(&mut String, &T)) {
    let shown = if verbose || items.len() <= WHOLE_LIST {
        items.len()
    } else {
        LIST_HEAD
    };
    for x in &items[..shown] {
        item(out, x);
    }
    more(out, items.len() - shown);
}

/// `  ... and N more`, pointing at the flags that list them.
fn more(out: &mut String, hidden: usize) {
    if hidden > 0 {
        let _ = writeln!(
            out,
            "  ... and {hidden} more (--verbose lists them all, --json too)"
        );
    }
}

/// The readable report: `OK`, `nothing checked` (every check lacked its inputs) or
/// `N findings` first, then a section per failing check, then a short summary of what was
/// checked and, for each check that did not run, why and the flag that would enable it.
/// `ways_in` are the causes of a failed `runner_overlap` ([`storedisk_verifier::ways_in`]).
pub fn render(report: &Report, ways_in: &[WayIn], verbose: bool) -> String {
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
    if c.runner_overlap.ok == Some(false) {
        runner_overlap(&mut out, report, ways_in, verbose);
    }
    if c.complete.ok == Some(false) {
        let _ = writeln!(
            out,
            "\ncomplete: {} of {} closure paths are missing from the image",
            c.complete.missing.len(),
            c.complete.closure_paths
        );
        list(&mut out, &c.complete.missing, verbose, |out, m| {
            let _ = match &m.needed_by {
                Some(by) => writeln!(out, "  {}\n    needed by {by}", m.path),
                None => writeln!(out, "  {} (a root of the closure)", m.path),
            };
        });
    }
    if c.integrity.ok == Some(false) {
        let _ = writeln!(
            out,
            "\nintegrity: {} path(s) differ from what Nix recorded",
            c.integrity.mismatched.len()
        );
        list(&mut out, &c.integrity.mismatched, verbose, |out, m| {
            let _ = writeln!(
                out,
                "  {}{}\n    expected {}\n    actual   {}",
                m.path,
                in_layer(report, m.layer),
                m.expected,
                m.actual
            );
        });
        list(&mut out, &c.integrity.invalid_entries, verbose, |out, e| {
            let _ = writeln!(
                out,
                "  invalid root entry {:?}{}: {}",
                e.name,
                in_layer(report, e.layer),
                e.why
            );
        });
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
        let _ = writeln!(out, "  fix: {IMAGE_FIX}");
        list(&mut out, &c.self_contained.references, verbose, |out, r| {
            let _ = writeln!(out, "  {r}");
        });
    }
    if c.policy.ok == Some(false) {
        let _ = writeln!(
            out,
            "\npolicy: {} runner closure path(s) match no --allow pattern",
            c.policy.violations.len()
        );
        list(&mut out, &c.policy.violations, verbose, |out, v| {
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
        });
    }
    if c.disjoint.ok == Some(false) {
        let _ = writeln!(
            out,
            "\ndisjoint: {} store path(s) are at the root of more than one layer",
            c.disjoint.duplicates.len()
        );
        list(&mut out, &c.disjoint.duplicates, verbose, |out, d| {
            let _ = writeln!(out, "  {}\n    in {}", d.path, d.images.join(" and "));
        });
    }
    summary(&mut out, report);
    out
}

/// How to build an image that Nix records no references for.
const IMAGE_FIX: &str =
    "build the image with __structuredAttrs = true; unsafeDiscardReferences.out = true;";

/// The `runner_overlap` section: the total, each way into the guest closure with what it drags
/// and its fix, then the largest leaked paths (every one, with its chain, when `verbose`).
fn runner_overlap(out: &mut String, report: &Report, ways_in: &[WayIn], verbose: bool) {
    let overlap = &report.checks.runner_overlap;
    let _ = writeln!(
        out,
        "\nrunner_overlap: {} path(s) leak into the runner's closure, {} copied twice",
        overlap.paths.len(),
        human_bytes(overlap.duplicated_bytes)
    );
    if !ways_in.is_empty() {
        let _ = writeln!(
            out,
            "  {} way(s) into the guest closure, each with what it brings in by itself:",
            ways_in.len()
        );
    }
    for way in ways_in {
        let drags = format!("{} path(s), {}", way.drags, human_bytes(way.drags_bytes));
        if way.image {
            let _ = writeln!(
                out,
                "  - the image {}, through {} reference(s) Nix recorded for it: {drags}",
                way.from,
                way.to.len()
            );
        } else {
            let _ = writeln!(out, "  - {} -> {}: {drags}", way.from, way.to.join(", "));
        }
        if let Some(at) = &way.location {
            let names = way.to.first().map(String::as_str);
            let _ = writeln!(out, "      at {}", location_text(at, names));
        }
        let _ = writeln!(out, "      fix: {}", fix_for(way));
    }
    if verbose {
        let _ = writeln!(out, "  every leaked path, with its reference chain:");
        for leak in &overlap.paths {
            let _ = writeln!(out, "  {} ({})", leak.path, human_bytes(leak.nar_size));
            let _ = writeln!(out, "    chain: {}", leak.chain.join(" -> "));
            if let Some(at) = &leak.location {
                let _ = writeln!(out, "    where: {}", location_text(at, None));
            }
        }
        return;
    }
    let mut largest: Vec<_> = overlap.paths.iter().collect();
    largest.sort_by(|a, b| b.nar_size.cmp(&a.nar_size).then(a.path.cmp(&b.path)));
    let shown = if largest.len() <= WHOLE_LIST {
        largest.len()
    } else {
        LIST_HEAD
    };
    let _ = writeln!(
        out,
        "  {}:",
        if shown == largest.len() {
            "the leaked paths, largest first"
        } else {
            "the largest leaked paths"
        }
    );
    for leak in &largest[..shown] {
        let _ = writeln!(out, "  {} ({})", leak.path, human_bytes(leak.nar_size));
    }
    more(out, largest.len() - shown);
    let _ = writeln!(out, "  (each path's reference chain: --verbose, or --json)");
}

/// Where a reference sits: `symlink FILE -> TARGET`, or `FILE line N: EXCERPT` (`line N` when
/// the store path is the file itself). With `names`, the store path referenced, the excerpt is
/// cut to the word that holds it (`regInfo=/nix/store/...-closure-info/registration`): the
/// excerpt is a window of the line, which may start and end inside other words.
fn location_text(at: &Location, names: Option<&str>) -> String {
    let file = if at.file.is_empty() { "." } else { &at.file };
    match (&at.symlink_target, at.line) {
        (Some(target), _) => format!("symlink {file} -> {target}"),
        (None, Some(line)) => {
            let place = if at.file.is_empty() {
                format!("line {line}")
            } else {
                format!("{file} line {line}")
            };
            let excerpt = at.excerpt.as_deref().map(|excerpt| {
                names
                    .and_then(|path| word_holding(excerpt, path))
                    .unwrap_or(excerpt)
            });
            match excerpt {
                Some(excerpt) => format!("{place}: {excerpt}"),
                None => place,
            }
        }
        (None, None) => file.to_owned(),
    }
}

/// The whitespace-separated word of `text` that holds `path`, without quotes around it.
fn word_holding<'a>(text: &'a str, path: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find(|word| word.contains(path))
        .map(|word| word.trim_matches(|c| c == '"' || c == '\''))
}

/// What closes `way`: read from where the reference sits (a kernel parameter on the runner's
/// command line, microvm.nix's `share/microvm/system` symlink) or what holds it (an image).
fn fix_for(way: &WayIn) -> String {
    if way.image {
        return IMAGE_FIX.to_owned();
    }
    let to = way.to.first().map(String::as_str).unwrap_or_default();
    match &way.location {
        Some(Location {
            file,
            symlink_target: Some(_),
            ..
        }) if file == "share/microvm/system" => "set microvm.systemSymlink = false, or write the \
            symlink without string context (storedisk's NixOS module does, \
            storedisk.systemSymlink)"
            .to_owned(),
        Some(Location {
            excerpt: Some(excerpt),
            ..
        }) => match parameter_naming(excerpt, to) {
            Some(name) => format!(
                "pass {name}= without string context (builtins.unsafeDiscardStringContext): \
                 the store disk holds what it names"
            ),
            None => drop_reference(),
        },
        _ => drop_reference(),
    }
}

fn drop_reference() -> String {
    "remove this reference, or its string context where the store disk holds what it names"
        .to_owned()
}

/// `NAME` when `excerpt` holds `NAME=<store path>` for the store path `to` (a kernel parameter
/// such as `regInfo=` or `init=`).
fn parameter_naming(excerpt: &str, to: &str) -> Option<String> {
    let (store_dir, base) = to.rsplit_once('/')?;
    let hash = base.get(..32)?;
    let at = excerpt.find(&format!("{store_dir}/{hash}"))?;
    let before = excerpt[..at].strip_suffix('=')?;
    let name_start = before
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'))
        .map_or(0, |i| i + 1);
    let name = &before[name_start..];
    (!name.is_empty()).then(|| name.to_owned())
}

/// The image (or layers) and every check's status, with why a check did not run.
fn summary(out: &mut String, report: &Report) {
    let c = &report.checks;
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
}

/// ` (in LABEL)` naming layer `index` of a set; empty for a single image.
fn in_layer(report: &Report, index: usize) -> String {
    match report.images.get(index) {
        Some(layer) if report.images.len() > 1 => format!(" (in {})", layer.image),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests;
