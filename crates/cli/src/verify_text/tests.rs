//! Data-driven tests of the readable report: a report (and its ways in) built from a few lines
//! of data, the text pinned in an insta inline snapshot. After a layout change on purpose, read
//! the diff and update the snapshots (`cargo insta review`, or `INSTA_UPDATE=always`).

use insta::assert_snapshot;
use storedisk_verifier::locate::Location;
use storedisk_verifier::report::{
    Checks, Complete, Integrity, Leak, Missing, Policy, RunnerOverlap, SelfContained,
};
use storedisk_verifier::{ImageFormat, Report, WayIn};

use super::{parameter_naming, render};

/// `/nix/store/<hash>-<name>`: a hash part made from the name, so a name is one path.
fn path(name: &str) -> String {
    let mut hash = [b'0'; 32];
    for (i, b) in name.bytes().enumerate() {
        let at = i % 32;
        hash[at] = b"0123456789abcdfghijklmnpqrsvwxyz"[usize::from(hash[at] ^ b) % 32];
    }
    format!("/nix/store/{}-{name}", String::from_utf8_lossy(&hash))
}

/// A report on `image.erofs` whose checks all ran and passed; each test breaks what it needs.
fn passing() -> Report {
    let ran = || Some(true);
    Report {
        ok: true,
        findings: 0,
        format: ImageFormat::Erofs,
        image: "image.erofs".to_owned(),
        images: Vec::new(),
        paths: Vec::new(),
        checks: Checks {
            complete: Complete {
                ok: ran(),
                ..Complete::default()
            },
            integrity: Integrity {
                ok: ran(),
                ..Integrity::default()
            },
            self_contained: SelfContained {
                ok: ran(),
                ..SelfContained::default()
            },
            runner_overlap: RunnerOverlap {
                ok: ran(),
                ..RunnerOverlap::default()
            },
            policy: Policy::default(),
            disjoint: Default::default(),
        },
        checked: Vec::new(),
        required_not_run: Vec::new(),
    }
}

/// The report without its closing summary of the image and the checks' statuses, which
/// [`an_unfixed_runner_leads_with_its_ways_in_and_their_fixes`] pins once.
fn sections(report: &Report, ways: &[WayIn], verbose: bool) -> String {
    let text = render(report, ways, verbose);
    let summary = text
        .find("\nerofs image image.erofs: ")
        .expect("the summary of image.erofs");
    text[..=summary].to_owned()
}

fn leak(chain: &[&str], nar_size: u64) -> Leak {
    Leak {
        path: path(chain.last().expect("a chain ends at the leaked path")),
        nar_size,
        chain: chain.iter().map(|n| path(n)).collect(),
        location: None,
    }
}

fn way(from: &str, to: &str, drags: usize, drags_bytes: u64, location: Option<Location>) -> WayIn {
    WayIn {
        from: path(from),
        to: vec![path(to)],
        image: false,
        drags,
        drags_bytes,
        location,
    }
}

fn line_of(file: &str, line: u64, excerpt: &str) -> Option<Location> {
    Some(Location {
        file: file.to_owned(),
        line: Some(line),
        symlink_target: None,
        excerpt: Some(excerpt.to_owned()),
    })
}

/// microvm.nix's runner with every leak open, over a guest of 42 paths: the toplevel, the
/// closure-info and 40 packages of 1 to 40 MiB. Nix recorded every guest path as a reference
/// of the image.
fn unfixed_runner() -> (Report, Vec<WayIn>) {
    const MIB: u64 = 1 << 20;
    let mut report = passing();
    let packages: Vec<String> = (1..=40).map(|i| format!("package-{i:02}")).collect();
    let overlap = &mut report.checks.runner_overlap;
    overlap.ok = Some(false);
    overlap.runner = Some(path("microvm-vm"));
    overlap
        .paths
        .push(leak(&["microvm-vm", "microvm-run", "closure-info"], 10_000));
    overlap
        .paths
        .push(leak(&["microvm-vm", "nixos-system-vm"], 4_000));
    for (i, p) in packages.iter().enumerate() {
        let size = (i as u64 + 1) * MIB;
        overlap
            .paths
            .push(leak(&["microvm-vm", "nixos-system-vm", p], size));
    }
    overlap.paths.sort_by(|a, b| a.path.cmp(&b.path));
    overlap.duplicated_bytes = overlap.paths.iter().map(|l| l.nar_size).sum();
    overlap.shared = vec![path("busybox")];
    overlap.shared_bytes = 900_000;
    let guest: Vec<String> = overlap.paths.iter().map(|l| l.path.clone()).collect();
    let self_contained = &mut report.checks.self_contained;
    self_contained.ok = Some(false);
    self_contained.image_path = Some(path("store-disk.erofs"));
    self_contained.image_paths = vec![path("store-disk.erofs")];
    self_contained.references = guest.clone();
    self_contained.references.push(path("busybox"));
    self_contained.references.sort();
    self_contained.would_reference_count = 43;
    report.ok = false;
    report.findings = 43 + 42;
    let all = report.checks.runner_overlap.duplicated_bytes;
    let toplevel_side = all - 10_000;
    let ways = vec![
        WayIn {
            from: path("store-disk.erofs"),
            to: guest,
            image: true,
            drags: 42,
            drags_bytes: all,
            location: None,
        },
        way(
            "microvm-run",
            "closure-info",
            42,
            all,
            line_of(
                "bin/microvm-run",
                9,
                &format!(
                    "-append 'console=ttyS0 regInfo={}/registration'",
                    path("closure-info")
                ),
            ),
        ),
        way(
            "microvm-run",
            "nixos-system-vm",
            41,
            toplevel_side,
            line_of(
                "bin/microvm-run",
                9,
                &format!("init={}/init", path("nixos-system-vm")),
            ),
        ),
        way(
            "microvm-vm",
            "nixos-system-vm",
            41,
            toplevel_side,
            Some(Location {
                file: "share/microvm/system".to_owned(),
                line: None,
                symlink_target: Some(path("nixos-system-vm")),
                excerpt: None,
            }),
        ),
    ];
    (report, ways)
}

#[test]
fn an_unfixed_runner_leads_with_its_ways_in_and_their_fixes() {
    let (report, ways) = unfixed_runner();
    assert_snapshot!(render(&report, &ways, false), @r"
    85 findings

    runner_overlap: 42 path(s) leak into the runner's closure, 820.0 MiB copied twice
      4 way(s) into the guest closure, each with what it brings in by itself:
      - the image /nix/store/34z2mxlr3vym2zn30000000000000000-store-disk.erofs, through 42 reference(s) Nix recorded for it: 42 path(s), 820.0 MiB
          fix: build the image with __structuredAttrs = true; unsafeDiscardReferences.out = true;
      - /nix/store/xrk2z6xx25y000000000000000000000-microvm-run -> /nix/store/kwz352mxrynz00000000000000000000-closure-info: 42 path(s), 820.0 MiB
          at bin/microvm-run line 9: regInfo=/nix/store/kwz352mxrynz00000000000000000000-closure-info/registration
          fix: pass regInfo= without string context (builtins.unsafeDiscardStringContext): the store disk holds what it names
      - /nix/store/xrk2z6xx25y000000000000000000000-microvm-run -> /nix/store/yr8z3x3934mxx6x00000000000000000-nixos-system-vm: 41 path(s), 820.0 MiB
          at bin/microvm-run line 9: init=/nix/store/yr8z3x3934mxx6x00000000000000000-nixos-system-vm/init
          fix: pass init= without string context (builtins.unsafeDiscardStringContext): the store disk holds what it names
      - /nix/store/xrk2z6xx6x0000000000000000000000-microvm-vm -> /nix/store/yr8z3x3934mxx6x00000000000000000-nixos-system-vm: 41 path(s), 820.0 MiB
          at symlink share/microvm/system -> /nix/store/yr8z3x3934mxx6x00000000000000000-nixos-system-vm
          fix: set microvm.systemSymlink = false, or write the symlink without string context (storedisk's NixOS module does, storedisk.systemSymlink)
      the largest leaked paths:
      /nix/store/0ikvipmx400000000000000000000000-package-40 (40.0 MiB)
      /nix/store/0ikvipmx390000000000000000000000-package-39 (39.0 MiB)
      /nix/store/0ikvipmx380000000000000000000000-package-38 (38.0 MiB)
      /nix/store/0ikvipmx370000000000000000000000-package-37 (37.0 MiB)
      /nix/store/0ikvipmx360000000000000000000000-package-36 (36.0 MiB)
      ... and 37 more (--verbose lists them all, --json too)
      (each path's reference chain: --verbose, or --json)

    self_contained: Nix records 43 reference(s) from the image /nix/store/34z2mxlr3vym2zn30000000000000000-store-disk.erofs
      fix: build the image with __structuredAttrs = true; unsafeDiscardReferences.out = true;
      /nix/store/0ikvipmx010000000000000000000000-package-01
      /nix/store/0ikvipmx020000000000000000000000-package-02
      /nix/store/0ikvipmx030000000000000000000000-package-03
      /nix/store/0ikvipmx040000000000000000000000-package-04
      /nix/store/0ikvipmx050000000000000000000000-package-05
      ... and 38 more (--verbose lists them all, --json too)

    erofs image image.erofs: 0 store paths, 0 B of NAR content
      complete: ok
      integrity: ok
      self_contained: FAILED
      runner_overlap: FAILED
      policy: not checked: its inputs were not given
      disjoint: not checked: its inputs were not given
      without unsafeDiscardReferences Nix would record 43 reference(s) from this image
      the runner shares 1 packed path(s) (878.9 KiB) it needs itself
    ");
}

#[test]
fn verbose_lists_every_leaked_path_with_its_chain() {
    let mut report = passing();
    report.ok = false;
    report.findings = 2;
    let overlap = &mut report.checks.runner_overlap;
    overlap.ok = Some(false);
    overlap.paths = vec![
        leak(&["microvm-vm", "nixos-system-vm"], 4_000),
        leak(&["microvm-vm", "nixos-system-vm", "payload"], 70_000),
    ];
    overlap.paths[0].location = Some(Location {
        file: "share/microvm/system".to_owned(),
        line: None,
        symlink_target: Some(path("nixos-system-vm")),
        excerpt: None,
    });
    overlap.paths[1].location = overlap.paths[0].location.clone();
    overlap.duplicated_bytes = 74_000;
    let ways = vec![way("microvm-vm", "nixos-system-vm", 2, 74_000, None)];
    assert_snapshot!(sections(&report, &ways, true), @r"
    2 findings

    runner_overlap: 2 path(s) leak into the runner's closure, 72.3 KiB copied twice
      1 way(s) into the guest closure, each with what it brings in by itself:
      - /nix/store/xrk2z6xx6x0000000000000000000000-microvm-vm -> /nix/store/yr8z3x3934mxx6x00000000000000000-nixos-system-vm: 2 path(s), 72.3 KiB
          fix: remove this reference, or its string context where the store disk holds what it names
      every leaked path, with its reference chain:
      /nix/store/yr8z3x3934mxx6x00000000000000000-nixos-system-vm (3.9 KiB)
        chain: /nix/store/xrk2z6xx6x0000000000000000000000-microvm-vm -> /nix/store/yr8z3x3934mxx6x00000000000000000-nixos-system-vm
        where: symlink share/microvm/system -> /nix/store/yr8z3x3934mxx6x00000000000000000-nixos-system-vm
      /nix/store/0i9wzil0000000000000000000000000-payload (68.4 KiB)
        chain: /nix/store/xrk2z6xx6x0000000000000000000000-microvm-vm -> /nix/store/yr8z3x3934mxx6x00000000000000000-nixos-system-vm -> /nix/store/0i9wzil0000000000000000000000000-payload
        where: symlink share/microvm/system -> /nix/store/yr8z3x3934mxx6x00000000000000000-nixos-system-vm
    ");
    // Without --verbose, two paths are few enough to list whole, largest first.
    assert_snapshot!(sections(&report, &ways, false), @r"
    2 findings

    runner_overlap: 2 path(s) leak into the runner's closure, 72.3 KiB copied twice
      1 way(s) into the guest closure, each with what it brings in by itself:
      - /nix/store/xrk2z6xx6x0000000000000000000000-microvm-vm -> /nix/store/yr8z3x3934mxx6x00000000000000000-nixos-system-vm: 2 path(s), 72.3 KiB
          fix: remove this reference, or its string context where the store disk holds what it names
      the leaked paths, largest first:
      /nix/store/0i9wzil0000000000000000000000000-payload (68.4 KiB)
      /nix/store/yr8z3x3934mxx6x00000000000000000-nixos-system-vm (3.9 KiB)
      (each path's reference chain: --verbose, or --json)
    ");
}

#[test]
fn a_long_list_of_missing_paths_shows_its_first_few_and_a_count() {
    let mut report = passing();
    report.ok = false;
    report.findings = 12;
    report.checks.complete = Complete {
        ok: Some(false),
        closure_source: Some("file".to_owned()),
        closure_paths: 20,
        missing: (1..=12)
            .map(|i| Missing {
                path: path(&format!("lib-{i:02}")),
                needed_by: Some(path("app")),
            })
            .collect(),
        ..Complete::default()
    };
    assert_snapshot!(sections(&report, &[], false), @r"
    12 findings

    complete: 12 of 20 closure paths are missing from the image
      /nix/store/wrjx0100000000000000000000000000-lib-01
        needed by /nix/store/i0000000000000000000000000000000-app
      /nix/store/wrjx0200000000000000000000000000-lib-02
        needed by /nix/store/i0000000000000000000000000000000-app
      /nix/store/wrjx0300000000000000000000000000-lib-03
        needed by /nix/store/i0000000000000000000000000000000-app
      /nix/store/wrjx0400000000000000000000000000-lib-04
        needed by /nix/store/i0000000000000000000000000000000-app
      /nix/store/wrjx0500000000000000000000000000-lib-05
        needed by /nix/store/i0000000000000000000000000000000-app
      ... and 7 more (--verbose lists them all, --json too)
    ");
}

#[test]
fn the_parameter_naming_a_store_path_is_read_from_the_line_holding_it() {
    let info = path("closure-info");
    let at = |excerpt: String| parameter_naming(&excerpt, &info);
    assert_eq!(
        at(format!("-append 'regInfo={info}/registration'")),
        Some("regInfo".to_owned())
    );
    assert_eq!(at(format!("exec {info}/bin/x")), None);
    assert_eq!(at(format!("x={}", path("other"))), None);
}
