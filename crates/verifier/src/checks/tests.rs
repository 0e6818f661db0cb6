//! Data-driven tests of the checks: each test is a small world written as text (a reference
//! graph, what the image packs, the guest closure's roots, the runner) and the check's outcome
//! rendered as a few lines in an insta inline snapshot. After a rule changes on purpose, read
//! the diff and update the snapshots (`cargo insta review`, or `INSTA_UPDATE=always`).
//! The input language is [`super::world`]'s.

use std::fmt::Write as _;

use insta::assert_snapshot;
use storedisk_nix::StoreDir;

use super::world::{chain, names, short, World, GUEST};
use super::*;

/// The first line of every rendering: `ok`, `FAILED`, or `not checked: why`.
fn status(ok: Option<bool>, why: &Option<String>) -> String {
    let mut out = match ok {
        Some(true) => "ok\n".to_owned(),
        Some(false) => "FAILED\n".to_owned(),
        None => "not checked\n".to_owned(),
    };
    if let Some(why) = why {
        let _ = writeln!(out, "why: {why}");
    }
    out
}

fn guest_roots_of(input: &str) -> String {
    let w = World::parse(input);
    let runner = w.runner().map(|r| r.closure).unwrap_or_default();
    let roots = guest_roots(
        &w.inventory(),
        w.guest().map(|g| g.closure).as_ref(),
        &runner,
        w.registration_path().as_ref(),
    );
    roots
        .iter()
        .map(|p| p.name().to_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn complete(input: &str) -> String {
    let w = World::parse(input);
    let c = check_complete(
        &w.inventory(),
        w.guest().as_ref(),
        w.registration_path().as_ref(),
        &StoreDir::default(),
    );
    let mut out = status(c.ok, &c.why);
    if let Some(source) = &c.closure_source {
        let _ = writeln!(out, "closure: {source}, {} paths", c.closure_paths);
    }
    for m in &c.missing {
        match &m.needed_by {
            Some(by) => {
                let _ = writeln!(out, "missing: {} (needed by {})", short(&m.path), short(by));
            }
            None => {
                let _ = writeln!(out, "missing: {} (a root)", short(&m.path));
            }
        }
    }
    if !c.extra.is_empty() {
        let _ = writeln!(out, "extra: {}", names(&c.extra));
    }
    out
}

fn integrity(input: &str) -> String {
    let w = World::parse(input);
    let c = check_integrity(&w.inventory(), w.guest().as_ref(), &StoreDir::default());
    let mut out = status(c.ok, &c.why);
    let _ = writeln!(out, "checked: {}", c.checked);
    for m in &c.mismatched {
        let hash = if m.expected == m.actual {
            "same hash"
        } else {
            "hash differs"
        };
        let expected_size = m
            .expected_size
            .map_or("?".to_owned(), |size| size.to_string());
        let _ = writeln!(
            out,
            "mismatched: {} ({hash}, size {expected_size} recorded, {} in the image)",
            short(&m.path),
            m.actual_size
        );
    }
    if !c.unchecked.is_empty() {
        let _ = writeln!(out, "unchecked: {}", names(&c.unchecked));
    }
    for e in &c.invalid_entries {
        let _ = writeln!(out, "invalid entry: {} ({})", e.name, e.why);
    }
    out
}

fn runner_overlap(input: &str) -> String {
    let r = match World::parse(input).runner_overlap() {
        Ok(r) => r,
        Err(e) => return format!("error: {e}\n"),
    };
    let mut out = status(r.ok, &r.why);
    if r.ok.is_none() {
        return out;
    }
    let _ = writeln!(out, "guest roots: {}", names(&r.guest_roots));
    for leak in &r.paths {
        let _ = writeln!(
            out,
            "leaked: {} ({} B) via {}",
            short(&leak.path),
            leak.nar_size,
            chain(&leak.chain)
        );
    }
    if !r.shared.is_empty() {
        let _ = writeln!(out, "shared: {}", names(&r.shared));
    }
    let _ = writeln!(
        out,
        "runner closure: {} paths, {} B duplicated, {} B shared",
        r.runner_closure_paths, r.duplicated_bytes, r.shared_bytes
    );
    out
}

fn policy(input: &str) -> String {
    let w = World::parse(input);
    let result = check_policy(
        &w.inventory(),
        w.runner().as_ref(),
        &w.allow,
        &StoreDir::default(),
    );
    let p = match result {
        Ok(p) => p,
        Err(e) => return format!("error: {e}\n"),
    };
    let mut out = status(p.ok, &p.why);
    for v in &p.violations {
        let size = v.nar_size.map_or("?".to_owned(), |s| s.to_string());
        let _ = writeln!(
            out,
            "violation: {} ({size} B) via {}",
            short(&v.path),
            chain(&v.chain)
        );
    }
    out
}

fn disjoint(input: &str) -> String {
    let w = World::parse(input);
    let d = check_disjoint(&w.inventory(), &w.labels(), &StoreDir::default());
    let mut out = status(d.ok, &d.why);
    let _ = writeln!(out, "layers: {}", d.layers);
    for dup in &d.duplicates {
        let _ = writeln!(
            out,
            "duplicate: {} in {}",
            short(&dup.path),
            dup.images.join(" ")
        );
    }
    out
}

// ---- guest roots ----

#[test]
fn the_toplevel_and_the_closure_info_are_both_guest_roots() {
    assert_snapshot!(guest_roots_of(GUEST), @"closure-info toplevel");
}

#[test]
fn without_knowing_the_closure_info_its_registration_hides_the_toplevel() {
    let input = GUEST.replace("registration: closure-info", "");
    assert_snapshot!(guest_roots_of(&input), @"closure-info");
}

#[test]
fn without_a_guest_closure_the_images_own_references_give_the_roots() {
    // What the verifier scans from the image bytes: a self-reference does not make a path
    // referenced.
    let input = "
        toplevel -> toplevel app
        app -> lib
        packed: toplevel app lib
    ";
    assert_snapshot!(guest_roots_of(input), @"toplevel");
}

// ---- runner_overlap: leaked and shared ----

#[test]
fn a_runners_own_busybox_is_shared_and_what_only_the_toplevel_reaches_is_leaked() {
    let input = format!(
        "{GUEST}
        runner -> script
        script -> busybox toplevel
        runner: runner
        size: lib=4096"
    );
    assert_snapshot!(runner_overlap(&input), @r"
    FAILED
    guest roots: closure-info toplevel
    leaked: app (100 B) via runner -> script -> toplevel -> app
    leaked: lib (4096 B) via runner -> script -> toplevel -> app -> lib
    leaked: toplevel (100 B) via runner -> script -> toplevel
    shared: busybox
    runner closure: 6 paths, 4296 B duplicated, 100 B shared
    ");
}

#[test]
fn a_runner_that_needs_only_busybox_is_ok() {
    let input = format!(
        "{GUEST}
        runner -> script
        script -> busybox
        runner: runner"
    );
    assert_snapshot!(runner_overlap(&input), @r"
    ok
    guest roots: closure-info toplevel
    shared: busybox
    runner closure: 3 paths, 0 B duplicated, 100 B shared
    ");
}

#[test]
fn a_reginfo_reference_to_the_closure_info_leaks_the_whole_guest() {
    let input = format!(
        "{GUEST}
        runner -> script closure-info
        script -> busybox
        runner: runner"
    );
    assert_snapshot!(runner_overlap(&input), @r"
    FAILED
    guest roots: closure-info toplevel
    leaked: app (100 B) via runner -> closure-info -> app
    leaked: closure-info (100 B) via runner -> closure-info
    leaked: lib (100 B) via runner -> closure-info -> lib
    leaked: toplevel (100 B) via runner -> closure-info -> toplevel
    shared: busybox
    runner closure: 7 paths, 400 B duplicated, 100 B shared
    ");
}

// The image built without unsafeDiscardReferences (leak 1): Nix records every packed path as
// its reference, and the runner references the image.
const LEAKY_DISK: &str = "
    runner -> script disk
    script -> busybox
    disk -> toplevel app lib busybox closure-info
    runner: runner
";

#[test]
fn the_images_own_references_are_cut_as_edges_so_busybox_stays_shared() {
    let input = format!("{GUEST}{LEAKY_DISK}image: disk");
    assert_snapshot!(runner_overlap(&input), @r"
    FAILED
    guest roots: closure-info toplevel
    leaked: app (100 B) via runner -> disk -> app
    leaked: closure-info (100 B) via runner -> disk -> closure-info
    leaked: lib (100 B) via runner -> disk -> lib
    leaked: toplevel (100 B) via runner -> disk -> toplevel
    shared: busybox
    runner closure: 8 paths, 400 B duplicated, 100 B shared
    ");
}

#[test]
fn without_the_image_path_its_references_look_like_runner_needs() {
    // Why --image-path matters: the disk is then an ordinary runner path, and what it
    // references outside the guest roots counts as needed by the runner.
    let input = format!("{GUEST}{LEAKY_DISK}");
    assert_snapshot!(runner_overlap(&input), @r"
    FAILED
    guest roots: closure-info toplevel
    leaked: closure-info (100 B) via runner -> disk -> closure-info
    leaked: toplevel (100 B) via runner -> disk -> toplevel
    shared: app busybox lib
    runner closure: 8 paths, 200 B duplicated, 300 B shared
    ");
}

#[test]
fn a_leak_is_reported_with_its_shortest_chain() {
    // Through the kernel parameters (3 hops) rather than the script's wrapper (4 hops).
    let input = "
        runner -> b-params a-script
        a-script -> wrapper
        wrapper -> toplevel
        b-params -> toplevel
        toplevel -> app
        packed: toplevel app
        guest: toplevel
        runner: runner
    ";
    assert_snapshot!(runner_overlap(input), @r"
    FAILED
    guest roots: toplevel
    leaked: app (100 B) via runner -> b-params -> toplevel -> app
    leaked: toplevel (100 B) via runner -> b-params -> toplevel
    runner closure: 6 paths, 200 B duplicated, 0 B shared
    ");
}

#[test]
fn chains_of_equal_length_are_broken_by_base_name() {
    let input = "
        runner -> z-symlink y-symlink
        z-symlink -> toplevel
        y-symlink -> toplevel
        toplevel -> app
        packed: toplevel app
        guest: toplevel
        runner: runner
    ";
    assert_snapshot!(runner_overlap(input), @r"
    FAILED
    guest roots: toplevel
    leaked: app (100 B) via runner -> y-symlink -> toplevel -> app
    leaked: toplevel (100 B) via runner -> y-symlink -> toplevel
    runner closure: 5 paths, 200 B duplicated, 0 B shared
    ");
}

#[test]
fn a_leaked_path_the_image_lacks_is_leaked_but_not_copied_twice() {
    let input = "
        runner -> toplevel
        toplevel -> app
        app -> lib
        packed: toplevel app
        guest: toplevel
        runner: runner
        size: lib=5000
    ";
    assert_snapshot!(runner_overlap(input), @r"
    FAILED
    guest roots: toplevel
    leaked: app (100 B) via runner -> toplevel -> app
    leaked: lib (5000 B) via runner -> toplevel -> app -> lib
    leaked: toplevel (100 B) via runner -> toplevel
    runner closure: 4 paths, 200 B duplicated, 0 B shared
    ");
}

#[test]
fn runner_overlap_without_a_runner_is_not_checked() {
    assert_snapshot!(runner_overlap(GUEST), @r"
    not checked
    why: no runner closure
    ");
}

// ---- complete ----

#[test]
fn a_missing_path_names_a_packed_path_that_needs_it() {
    // lib: a-helper comes first by name but is missing itself; app is packed and breaks.
    let input = "
        toplevel -> app a-helper
        app -> lib
        a-helper -> lib
        packed: toplevel app closure-info
        guest: toplevel
    ";
    assert_snapshot!(complete(input), @r"
    FAILED
    closure: file, 4 paths
    missing: a-helper (needed by toplevel)
    missing: lib (needed by app)
    extra: closure-info
    ");
}

#[test]
fn the_closure_info_needs_a_missing_path_only_when_nothing_else_does() {
    // Its registration lists every path: busybox is needed by the toplevel (missing too), and
    // the toplevel by the closure-info alone.
    let input = GUEST.replace(
        "packed: toplevel app lib busybox closure-info",
        "packed: app lib closure-info",
    );
    assert_snapshot!(complete(&input), @r"
    FAILED
    closure: file, 5 paths
    missing: busybox (needed by toplevel)
    missing: toplevel (needed by closure-info)
    ");
}

#[test]
fn a_missing_root_is_needed_by_nothing() {
    let input = "
        toplevel -> app
        packed: app
        guest: toplevel
    ";
    assert_snapshot!(complete(input), @r"
    FAILED
    closure: file, 2 paths
    missing: toplevel (a root)
    ");
}

#[test]
fn complete_passes_when_every_closure_path_is_packed() {
    assert_snapshot!(complete(GUEST), @r"
    ok
    closure: file, 5 paths
    ");
}

#[test]
fn complete_without_a_closure_is_not_checked() {
    assert_snapshot!(complete("packed: app"), @r"
    not checked
    why: no guest closure (none given, and no closure-info registration in the image)
    ");
}

// ---- integrity ----

#[test]
fn integrity_reports_mismatches_and_paths_it_could_not_compare() {
    let input = "
        toplevel -> app lib font
        packed: toplevel app lib font extra
        guest: toplevel
        corrupt: app
        resized: lib
        unhashed: font
        invalid: .links
    ";
    assert_snapshot!(integrity(input), @r"
    FAILED
    checked: 3
    mismatched: app (hash differs, size 100 recorded, 100 in the image)
    mismatched: lib (same hash, size 100 recorded, 101 in the image)
    unchecked: font
    invalid entry: .links (not a store path name)
    ");
}

#[test]
fn integrity_with_only_unhashed_paths_is_not_a_pass() {
    let input = "
        toplevel -> app
        packed: toplevel app
        guest: toplevel
        unhashed: app
    ";
    assert_snapshot!(integrity(input), @r"
    not checked
    why: 1 packed path(s) have no recorded narHash to compare with
    checked: 1
    unchecked: app
    ");
}

#[test]
fn integrity_passes_when_every_hash_matches() {
    assert_snapshot!(integrity(GUEST), @r"
    ok
    checked: 5
    ");
}

#[test]
fn integrity_without_a_closure_still_fails_on_invalid_entries() {
    assert_snapshot!(integrity("packed: app\ninvalid: .links"), @r"
    FAILED
    why: no guest closure (none given, and no closure-info registration in the image)
    checked: 0
    invalid entry: .links (not a store path name)
    ");
}

// ---- policy ----

const HOST_RUNNER: &str = "
    runner -> script qemu-9.1 glibc-2.40
    script -> busybox socat-1.8
    qemu-9.1 -> glibc-2.40
    runner: runner
";

#[test]
fn policy_flags_runner_paths_outside_the_image_that_no_glob_allows() {
    // busybox is packed (exempt); runner matches by name, glibc by name, qemu by base name.
    let input = format!("{GUEST}{HOST_RUNNER}allow: runner script glibc-* *-qemu-*");
    assert_snapshot!(policy(&input), @r"
    FAILED
    violation: socat-1.8 (100 B) via runner -> script -> socat-1.8
    ");
}

#[test]
fn policy_passes_when_every_path_outside_the_image_is_allowed() {
    let input = format!("{GUEST}{HOST_RUNNER}allow: runner script glibc-* qemu-* socat-*");
    assert_snapshot!(policy(&input), @"ok");
}

#[test]
fn policy_needs_allow_globs_and_a_runner() {
    let no_globs = policy(&format!("{GUEST}{HOST_RUNNER}"));
    let no_runner = policy(&format!("{GUEST}allow: glibc-*"));
    assert_snapshot!(format!("{no_globs}{no_runner}"), @r"
    not checked
    why: no allowed globs
    not checked
    why: no runner closure
    ");
}

#[test]
fn a_bad_glob_is_an_error_naming_it() {
    let input = format!("{GUEST}{HOST_RUNNER}allow: glibc-[");
    assert_snapshot!(policy(&input), @r#"error: allowed glob "glibc-[": error parsing glob 'glibc-[': unclosed character class; missing ']'"#);
}

// ---- layers: disjoint, and the other checks over the union ----

// GUEST split into two layers that together hold the closure.
const LAYERS: &str = "
    toplevel -> app busybox
    app -> lib
    closure-info -> toplevel app lib busybox
    layer: toplevel app closure-info
    layer: lib busybox
    guest: toplevel closure-info
    registration: closure-info
";

#[test]
fn disjoint_layers_holding_the_closure_are_complete_and_disjoint() {
    assert_snapshot!(disjoint(LAYERS), @r"
    ok
    layers: 2
    ");
    assert_snapshot!(complete(LAYERS), @r"
    ok
    closure: file, 5 paths
    ");
}

#[test]
fn a_path_in_two_layers_names_both() {
    let input = LAYERS.replace("layer: lib busybox", "layer: lib busybox app");
    assert_snapshot!(disjoint(&input), @r"
    FAILED
    layers: 2
    duplicate: app in layer0.img layer1.img
    ");
    // Both copies are compared.
    assert_snapshot!(integrity(&input), @r"
    ok
    checked: 6
    ");
    // A path outside the closure in both layers is one extra path, not two.
    let input = LAYERS
        .replace("layer: lib busybox", "layer: lib busybox outside")
        .replace("layer: toplevel app", "layer: outside toplevel app");
    assert_snapshot!(complete(&input), @r"
    ok
    closure: file, 5 paths
    extra: outside
    ");
}

#[test]
fn a_path_in_three_layers_is_one_duplicate() {
    let input = format!("{LAYERS}\n    layer: lib");
    let input = input.replace(
        "layer: toplevel app closure-info",
        "layer: toplevel app closure-info lib",
    );
    assert_snapshot!(disjoint(&input), @r"
    FAILED
    layers: 3
    duplicate: lib in layer0.img layer1.img layer2.img
    ");
}

#[test]
fn a_single_image_has_nothing_to_compare() {
    assert_snapshot!(disjoint(GUEST), @r"
    not checked
    why: one image: nothing to compare
    layers: 1
    ");
}

#[test]
fn a_missing_layer_leaves_its_paths_missing() {
    let input = LAYERS.replace("layer: lib busybox", "");
    assert_snapshot!(complete(&input), @r"
    FAILED
    closure: file, 5 paths
    missing: busybox (needed by toplevel)
    missing: lib (needed by app)
    ");
}

#[test]
fn guest_roots_see_references_across_layers() {
    // Without a guest closure the packed paths' references come from the layers' bytes; app
    // (layer 0) referencing lib (layer 1) keeps lib from being a root.
    let input = "
        toplevel -> app
        app -> lib
        layer: toplevel app
        layer: lib
    ";
    assert_snapshot!(guest_roots_of(input), @"toplevel");
}

#[test]
fn every_layers_references_are_cut_as_edges() {
    // The runner references both layer images, each recording a reference into the guest
    // (leak 1). Like a single image's, each one's edges are cut: what they reference is
    // leaked, the images themselves are not, and the runner's own busybox stays shared.
    let input = format!(
        "{LAYERS}
        runner -> script disk-a disk-b
        script -> busybox
        disk-a -> toplevel
        disk-b -> lib
        image: disk-a disk-b
        runner: runner"
    );
    assert_snapshot!(runner_overlap(&input), @r"
    FAILED
    guest roots: closure-info toplevel
    leaked: app (100 B) via runner -> disk-a -> toplevel -> app
    leaked: lib (100 B) via runner -> disk-b -> lib
    leaked: toplevel (100 B) via runner -> disk-a -> toplevel
    shared: busybox
    runner closure: 8 paths, 300 B duplicated, 100 B shared
    ");
    // With only the first layer's store path known, the second one is an ordinary runner path:
    // lib looks like a runner need.
    let one = input.replace("image: disk-a disk-b", "image: disk-a");
    assert_snapshot!(runner_overlap(&one), @r"
    FAILED
    guest roots: closure-info toplevel
    leaked: app (100 B) via runner -> disk-a -> toplevel -> app
    leaked: toplevel (100 B) via runner -> disk-a -> toplevel
    shared: busybox lib
    runner closure: 8 paths, 200 B duplicated, 200 B shared
    ");
}

#[test]
fn self_contained_of_layers_fails_on_any_and_passes_on_all() {
    let sc = |ok: Option<bool>, image: &str, refs: &[&str], why: Option<&str>| SelfContained {
        ok,
        why: why.map(str::to_owned),
        image_path: Some(image.to_owned()),
        image_paths: vec![image.to_owned()],
        references: refs.iter().map(|r| (*r).to_owned()).collect(),
        would_reference: refs.iter().map(|r| (*r).to_owned()).collect(),
        would_reference_count: refs.len(),
        missing_input: None,
    };
    let render = |s: SelfContained| {
        let mut out = status(s.ok, &s.why);
        let _ = writeln!(out, "image_path: {}", s.image_path.unwrap_or_default());
        let _ = writeln!(out, "image_paths: {}", s.image_paths.join(" "));
        let _ = writeln!(out, "references: {:?}", s.references);
        let _ = writeln!(out, "would_reference_count: {}", s.would_reference_count);
        out
    };
    let both_ok = merge_self_contained(vec![
        ("a.img".to_owned(), sc(Some(true), "A", &[], None)),
        ("b.img".to_owned(), sc(Some(true), "B", &[], None)),
    ]);
    assert_snapshot!(render(both_ok), @r"
    ok
    image_path: A
    image_paths: A B
    references: []
    would_reference_count: 0
    ");
    let one_bad = merge_self_contained(vec![
        ("a.img".to_owned(), sc(Some(true), "A", &[], None)),
        ("b.img".to_owned(), sc(Some(false), "B", &["X", "Y"], None)),
        ("c.img".to_owned(), sc(None, "C", &["X"], Some("not asked"))),
    ]);
    assert_snapshot!(render(one_bad), @r#"
    FAILED
    image_path: A
    image_paths: A B C
    references: ["X", "Y"]
    would_reference_count: 2
    "#);
    let one_unknown = merge_self_contained(vec![
        ("a.img".to_owned(), sc(Some(true), "A", &[], None)),
        ("b.img".to_owned(), sc(None, "B", &[], Some("Nix said no"))),
    ]);
    assert_snapshot!(render(one_unknown), @r"
    not checked
    why: b.img: Nix said no
    image_path: A
    image_paths: A B
    references: []
    would_reference_count: 0
    ");
}
