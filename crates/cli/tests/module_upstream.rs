//! What users import is what the gate proves: storedisk's NixOS modules (`nixosModules.default`
//! and `.host` of storedisk's flake.nix) evaluated with nixpkgs' real `lib.evalModules` over
//! microvm.nix's real guest and host modules (its flake's `nixosModules`), at pinned revisions,
//! for every hypervisor microvm.nix ships x erofs/squashfs x one disk/layered and the
//! configurations around them (tests/module_upstream/cases.nix lists them). NixOS's own options
//! come from tests/module_upstream/nixpkgs/nixos/stub.nix, its packages from busybox-built
//! stand-ins (nixpkgs/pkgs.nix); nothing microvm.nix or storedisk declares is stood in for.
//!
//! Asserted from the instantiated derivations: no runner and no host system can reference the
//! guest's toplevel, closure info or kernel package except through a derivation whose output
//! cannot (a store disk with its references discarded, an image copied out of the kernel);
//! init= and regInfo= carry no string context; every runner boots a kernel-image-only path;
//! layered disks declare their volumes and mounts from N alone; microvm.nix's documented flags
//! take effect or warn; what the module makes of the real runner matches the harness's model
//! (vm-tests/lib.nix). A few configurations are also built, and their real closures
//! (`nix-store -qR`) and `microvm.storeDiskCheck` (`storedisk verify`) checked. README.md's
//! example flake is evaluated as printed and its hypervisor table must be what this test finds.
//!
//! The upstream trees: `STOREDISK_MICROVM_SRC` and `STOREDISK_NIXPKGS_LIB_SRC`, or
//! `../shared/upstream/` beside the repository (both checked against the pinned revisions), or,
//! with network, the flake's own inputs; without any the test fails saying what to set.

#![allow(clippy::unwrap_used)] // Tests: a failed setup should panic loudly.

use std::fs;
use std::path::Path;

#[path = "module_upstream/cases.rs"]
mod cases;
mod common;
#[path = "module_upstream/drvs.rs"]
mod drvs;

use cases::{cases, expected_error, last_lines, repo_root, Cases, Facts, Guest, Host, Volume};
use drvs::{build, closure, outputs_of, Drv, Graph};

#[test]
fn every_case_evaluates_or_fails_with_the_modules_own_message() {
    let cases = cases();
    assert!(cases.outcomes.len() >= 50, "{} cases", cases.outcomes.len());
    let mut problems = Vec::new();
    for (name, outcome) in &cases.outcomes {
        match (outcome, expected_error(name)) {
            (Ok(_), None) => {}
            (Err(e), Some(wanted)) if e.contains(wanted) => {}
            (Err(e), Some(wanted)) => {
                problems.push(format!("{name}: fails, but not with `{wanted}`:\n{e}"))
            }
            (Ok(_), Some(wanted)) => {
                problems.push(format!("{name}: evaluates, but must fail with `{wanted}`"))
            }
            (Err(e), None) => {
                problems.push(format!("{name}: does not evaluate:\n{}", last_lines(e, 12)))
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// A derivation whose output cannot reference what its build read: a store disk or layer
/// (references discarded), a kernel image copied out of the kernel package (fix 5), the initrd
/// (it holds copies of the modules, as NixOS's makeModulesClosure makes it). The builds below
/// check the last two against real closures.
fn barrier(guest: &Guest) -> impl Fn(&str, &Drv) -> bool + '_ {
    move |path: &str, drv: &Drv| {
        drv.discards_references()
            || drv.name == "microvm-kernel-image"
            || drv.name == "microvm-kernel-vmlinux"
            || path == guest.initrd
    }
}

/// The guest derivations a deployment must not copy a second time.
fn guest_side(guest: &Guest) -> [(&'static str, &str); 3] {
    [
        ("the guest toplevel", guest.toplevel.as_str()),
        ("the closure info", guest.reg_info.as_str()),
        ("the kernel package", guest.kernel_package.as_str()),
    ]
}

#[test]
fn no_runner_with_the_module_can_reference_the_guest() {
    let cases = cases();
    let mut problems = Vec::new();
    let mut checked = 0;
    for (name, guest) in cases.guests() {
        if !(guest.enabled && guest.store_on_disk) {
            continue;
        }
        let graph = Graph::load(&guest.runner);
        for (what, target) in guest_side(guest) {
            let chain = graph.chain(&guest.runner, target, &barrier(guest));
            if name == "system-symlink" {
                // Asked for: the symlink references the toplevel and so its closure (the check
                // reports it).
                if what == "the guest toplevel" && chain.is_none() {
                    problems.push(format!(
                        "{name}: microvm.systemSymlink = true must reference the toplevel"
                    ));
                }
            } else if let Some(chain) = chain {
                problems.push(format!(
                    "{name}: the runner reaches {what}: {}",
                    chain.join(" -> ")
                ));
            }
        }
        for param in &guest.kernel_params {
            if (param.text.starts_with("init=") || param.text.starts_with("regInfo="))
                && param.context
            {
                problems.push(format!("{name}: `{}` keeps its string context", param.text));
            }
        }
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} guests checked");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_analysis_finds_what_upstream_leaks_without_the_module() {
    // storedisk.enable = false: microvm.nix's own runner, whose regInfo= keeps its context
    // (store-disk.nix:98-100) and which boots the kernel package (qemu.nix:116). The analysis
    // that passes every module case must find both here, or it proves nothing.
    let guest = cases().guest("storedisk-disabled");
    let graph = Graph::load(&guest.runner);
    let barrier = barrier(guest);
    for (what, target) in [
        ("closure info", guest.reg_info.as_str()),
        ("kernel package", guest.kernel_package.as_str()),
    ] {
        assert!(
            graph.chain(&guest.runner, target, &barrier).is_some(),
            "upstream's runner does not reach the {what}: the analysis misses a leak"
        );
    }
    assert!(guest
        .kernel_params
        .iter()
        .any(|p| p.text.starts_with("regInfo=") && p.context));
}

/// The file each runner boots, from its scripts and configuration (fix 5: a kernel-image-only
/// path, never the kernel package): the kernel paths named by the derivations the runner's
/// output may reference.
fn booted_kernel(graph: &Graph, guest: &Guest) -> String {
    let mut found = Vec::new();
    for drv in graph.reachable(&guest.runner, &barrier(guest)) {
        for text in drv.texts() {
            for word in text.split(|c: char| c.is_whitespace() || "'\",=".contains(c)) {
                if word.starts_with("/nix/store/")
                    && (word.contains("-microvm-kernel-") || word.contains("-linux-6.12.1/"))
                    && !word.contains("-initrd-")
                    && !word.ends_with(".drv")
                    && !word.contains("/lib/modules")
                {
                    found.push(word.to_owned());
                }
            }
        }
    }
    found.sort();
    found.dedup();
    assert_eq!(
        found.len(),
        1,
        "{}: the runner names {found:#?}",
        guest.hypervisor
    );
    found.remove(0)
}

#[test]
fn every_runner_boots_a_kernel_image_only_path() {
    let cases = cases();
    let mut problems = Vec::new();
    for (name, guest) in cases.guests() {
        // (system-symlink references the toplevel on purpose, and through it the kernel package.)
        if !(guest.enabled && guest.store_on_disk) || name == "system-symlink" {
            continue;
        }
        let kernel = booted_kernel(&Graph::load(&guest.runner), guest);
        let file = kernel.rsplit('/').next().unwrap();
        let ok = (kernel.contains("-microvm-kernel-image/")
            && ["bzImage", "Image"].contains(&file))
            || (kernel.contains("-microvm-kernel-vmlinux/") && file == "vmlinux");
        if !ok {
            problems.push(format!("{name}: the runner boots {kernel}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Without the module: the kernel package itself (the leak fix 5 closes).
    let upstream = cases.guest("storedisk-disabled");
    let kernel = booted_kernel(&Graph::load(&upstream.runner), upstream);
    assert!(kernel.contains("-linux-6.12.1/bzImage"), "{kernel}");
}

#[test]
fn layered_disks_are_declared_from_n_alone() {
    let cases = cases();
    let mut layered = 0;
    for (name, guest) in cases.guests() {
        let Some(n) = guest.layers.filter(|_| guest.enabled) else {
            continue;
        };
        layered += 1;
        let ours: Vec<&Volume> = guest
            .volumes
            .iter()
            .filter(|v| v.image.starts_with("storedisk-guest-layer-"))
            .collect();
        let images: Vec<String> = ours.iter().map(|v| v.image.clone()).collect();
        let wanted: Vec<String> = (1..n)
            .map(|i| format!("storedisk-guest-layer-{i}.img"))
            .collect();
        assert_eq!(images, wanted, "{name}: the layer volumes");
        assert!(ours.iter().all(|v| v.read_only), "{name}: a writable layer");
        // The devices, as microvm.nix letters its disks: the store disk vda, volumes in order.
        let before = guest
            .volumes
            .iter()
            .position(|v| v.image == wanted[0])
            .unwrap();
        let mounts = &guest.file_systems;
        let mut devices = vec![mounts["/nix/.ro-store"].device.clone().unwrap()];
        let store = if mounts["/nix/store"]
            .lowerdir
            .as_ref()
            .is_some_and(|l| l.len() == n)
        {
            &mounts["/nix/store"]
        } else {
            panic!("{name}: /nix/store does not stack {n} layers: {mounts:#?}")
        };
        for lower in &store.lowerdir.as_ref().unwrap()[1..] {
            devices.push(mounts[lower].device.clone().unwrap());
            assert_eq!(
                Some(&mounts[lower].fs_type),
                guest.store_disk_type.as_ref(),
                "{name}"
            );
        }
        let letters: Vec<String> = std::iter::once("/dev/vda".to_owned())
            .chain((0..n - 1).map(|i| format!("/dev/vd{}", (b'b' + (before + i) as u8) as char)))
            .collect();
        assert_eq!(devices, letters, "{name}: the layers' devices");
        // NixOS mounts an overlay without upperdir only with systemd in stage 1.
        let writable =
            guest.file_systems.contains_key("/nix/.rw-store") || name.contains("writable-overlay");
        assert!(
            writable || guest.initrd_systemd,
            "{name}: a read-only overlay needs systemd in stage 1"
        );
    }
    assert!(layered >= 18, "only {layered} layered guests");
    let user = cases.guest("user-volume-layered");
    assert_eq!(
        user.volumes[0].image, "var.img",
        "the user's volume keeps its place"
    );
}

#[test]
fn microvm_nix_documented_flags_take_effect_or_warn() {
    let cases = cases();
    let disk_args = |name: &str| -> String {
        let guest = cases.guest(name);
        let graph = Graph::load(&guest.runner);
        let disk = graph
            .drvs
            .values()
            .find(|d| d.name.starts_with("microvm-store-disk."))
            .unwrap_or_else(|| panic!("{name}: no store disk among the runner's inputs"));
        disk.texts().collect::<Vec<_>>().join(" ")
    };
    let expect = |name: &str, has: &[&str], lacks: &[&str]| {
        let args = disk_args(name);
        for word in has {
            assert!(
                args.contains(word),
                "{name}: `{word}` missing from the build: {args}"
            );
        }
        for word in lacks {
            assert!(
                !args.contains(word),
                "{name}: `{word}` in the build: {args}"
            );
        }
        assert!(
            cases.guest(name).warnings.is_empty(),
            "{name}: {:?}",
            cases.guest(name).warnings
        );
    };
    // storedisk writes erofs itself, -Efragments included.
    expect(
        "erofs-flags-kernel-5-15",
        &["--compression lz4hc", "--erofs-ztailpacking false"],
        &["--erofs-fragments", "--erofs-writer mkfs", "--mkfs-erofs"],
    );
    expect(
        "erofs-flags-kernel-6-0",
        &["--erofs-ztailpacking true"],
        &["--erofs-fragments", "--erofs-writer mkfs", "--mkfs-erofs"],
    );
    expect(
        "erofs-flags-kernel-6-1",
        &["--erofs-ztailpacking true", "--erofs-fragments"],
        &["--erofs-writer mkfs", "--mkfs-erofs"],
    );
    expect(
        "squashfs-flags-default",
        &["--format squashfs", "--compression zstd"],
        &[],
    );
    let dedupe = cases.guest("erofs-flags-dedupe");
    assert_eq!(dedupe.warnings.len(), 1, "{:?}", dedupe.warnings);
    assert!(
        dedupe.warnings[0].contains("-Ededupe, which is dropped"),
        "{:?}",
        dedupe.warnings
    );
}

#[test]
fn the_module_and_the_harness_model_make_the_same_runner() {
    let cases = cases();
    let mut compared = 0;
    for (name, guest) in cases.guests() {
        let Some(fixture) = &guest.fixture else {
            continue;
        };
        let ours = runner_facts(&Graph::load(&guest.runner), &guest.runner);
        let model = runner_facts(&Graph::load(fixture), fixture);
        assert_eq!(
            ours, model,
            "{name}: the module's runner (left) and vm-tests/lib.nix's (right)"
        );
        compared += 1;
    }
    assert!(compared >= 8, "only {compared} compared");
}

/// What the fixes decide in a runner: the kernel it boots, init= and regInfo=, the system
/// symlink's target and the layers' links.
#[derive(Debug, PartialEq)]
struct RunnerFacts {
    kernel: Option<String>,
    init: Option<String>,
    reg_info: Option<String>,
    symlink: Option<String>,
    layer_links: Vec<String>,
}

fn runner_facts(graph: &Graph, root: &str) -> RunnerFacts {
    let run = graph
        .drvs
        .values()
        .find(|d| d.name.ends_with("-microvm-run"))
        .expect("a microvm-run script");
    let script = run.env.get("text").cloned().unwrap_or_default();
    let word_after = |text: &str, key: &str| {
        text.split(|c: char| c.is_whitespace() || c == '\'' || c == '"')
            .find_map(|w| w.strip_prefix(key).map(str::to_owned))
    };
    let kernel = script
        .split_whitespace()
        .skip_while(|w| *w != "-kernel")
        .nth(1)
        .map(|w| w.trim_matches('\'').to_owned());
    let build = graph.get(root).texts().collect::<Vec<_>>().join("\n");
    let symlink = build.lines().find_map(|l| {
        let l = l.trim();
        (l.starts_with("ln -s") && l.ends_with("$out/share/microvm/system")).then(|| {
            l.split_whitespace()
                .rev()
                .nth(1)
                .unwrap_or_default()
                .to_owned()
        })
    });
    let mut layer_links: Vec<String> = script
        .lines()
        .filter(|l| l.trim_start().starts_with("ln -sfn") && l.contains("-layer-"))
        .map(|l| l.trim().to_owned())
        .collect();
    layer_links.sort();
    RunnerFacts {
        kernel,
        init: word_after(&script, "init="),
        reg_info: word_after(&script, "regInfo="),
        symlink,
        layer_links,
    }
}

#[test]
fn hosts_declaring_the_guest_do_not_reference_it() {
    let cases = cases();
    for name in [
        "host-config",
        "host-evaluated",
        "host-flake",
        "readme-flake-host",
    ] {
        let host = cases.host(name);
        let graph = Graph::load(&host.host);
        let through_disk = |_: &str, d: &Drv| d.discards_references();
        if let Some(chain) = graph.chain(&host.host, &host.guest_toplevel, &through_disk) {
            panic!(
                "{name}: the host system reaches the guest toplevel: {}",
                chain.join(" -> ")
            );
        }
    }
    // Without the host fix: upstream's install script and restart trigger each reference it.
    let unfixed = cases.host("host-config-unfixed");
    let graph = Graph::load(&unfixed.host);
    for unit in [
        "unit-script-install-microvm-guest-start",
        "unit-microvm-guest.service",
    ] {
        let (path, _) = graph
            .named(unit)
            .next()
            .unwrap_or_else(|| panic!("no {unit}"));
        assert!(
            graph
                .chain(path, &unfixed.guest_toplevel, &|_, d| d
                    .discards_references())
                .is_some(),
            "upstream's {unit} does not reference the guest toplevel: the analysis misses a leak"
        );
    }
    // The fix changes the context only: the install script's text is upstream's.
    let script = |host: &Host| -> String {
        let graph = Graph::load(&host.host);
        let (_, drv) = graph
            .named("unit-script-install-microvm-guest-start")
            .next()
            .expect("the install-microvm-guest script");
        drv.env["text"].clone()
    };
    assert_eq!(script(cases.host("host-config")), script(unfixed));
}

#[test]
fn built_runners_and_hosts_copy_no_guest_path_and_their_checks_pass() {
    let cases = cases();
    for name in ["qemu-squashfs-single", "qemu-squashfs-layered"] {
        let guest = cases.guest(name);
        let copied = closure(&build(&guest.runner));
        for (what, drv) in guest_side(guest) {
            for out in outputs_of(drv) {
                assert!(
                    !copied.contains(&out),
                    "{name}: the built runner's closure holds {what} {out}"
                );
            }
        }
        assert!(
            copied.iter().any(|p| p.ends_with("-microvm-kernel-image")),
            "{name}: no kernel image in {copied:#?}"
        );
        // microvm.storeDiskCheck: storedisk verify of the disk (every layer) and the runner.
        let report =
            fs::read_to_string(Path::new(&build(&guest.check)).join("report.txt")).unwrap();
        assert_eq!(report.lines().next(), Some("OK"), "{name}: {report}");
    }
    let host = cases.host("host-config");
    let copied = closure(&build(&host.host));
    for out in outputs_of(&host.guest_toplevel) {
        assert!(
            !copied.contains(&out),
            "the built host system holds the guest toplevel {out}"
        );
    }
}

/// README.md's table of hypervisors x features, as the cases fill it.
fn hypervisor_table(cases: &Cases) -> String {
    let mut hypervisors: Vec<&str> = cases
        .outcomes
        .keys()
        .filter_map(|n| n.strip_suffix("-erofs-single"))
        .collect();
    hypervisors.sort_by_key(|h| (*h != "qemu", *h));
    let mut table = String::from(
        "| hypervisor | one store disk | layered (`storedisk.layers`) | fix 5: the runner boots |\n|---|---|---|---|\n",
    );
    for h in hypervisors {
        let state = |layout: &str| -> String {
            let all: Vec<&Result<Facts, String>> = ["erofs", "squashfs"]
                .iter()
                .map(|f| &cases.outcomes[&format!("{h}-{f}-{layout}")])
                .collect();
            if all.iter().all(|o| o.is_ok()) {
                "evaluates (erofs, squashfs)".to_owned()
            } else if let Some(Err(e)) = all.iter().find(|o| o.is_err()) {
                match expected_error(&format!("{h}-erofs-{layout}")) {
                    Some(_) if e.contains("cannot attach read-only disks") => {
                        "refused: no read-only disks".to_owned()
                    }
                    _ => "fails".to_owned(),
                }
            } else {
                unreachable!()
            }
        };
        let guest = cases.guest(&format!("{h}-erofs-single"));
        let kernel = booted_kernel(&Graph::load(&guest.runner), guest);
        let kernel = kernel.splitn(4, '/').nth(3).unwrap_or(&kernel).to_owned();
        let kernel = kernel
            .split_once('-')
            .map(|(_, rest)| rest.to_owned())
            .unwrap_or(kernel);
        table.push_str(&format!(
            "| {h} | {} | {} | `{kernel}` |\n",
            state("single"),
            state("layered")
        ));
    }
    table
}

#[test]
fn readme_table_is_what_the_cases_find() {
    let table = hypervisor_table(cases());
    let path = repo_root().join("README.md");
    let readme = fs::read_to_string(&path).unwrap();
    let (start, end) = (
        "<!-- module-test: table start -->\n",
        "<!-- module-test: table end -->",
    );
    let (head, rest) = readme
        .split_once(start)
        .expect("README.md has the table's start marker");
    let (current, tail) = rest
        .split_once(end)
        .expect("README.md has the table's end marker");
    if current != table {
        if std::env::var_os("STOREDISK_UPDATE_README").is_some() {
            fs::write(&path, format!("{head}{start}{table}{end}{tail}")).unwrap();
        } else {
            panic!(
                "README.md's hypervisor table is not what the module test finds \
                 (STOREDISK_UPDATE_README=1 rewrites it):\n{table}"
            );
        }
    }
}

#[test]
fn the_readme_flake_guest_is_fixed() {
    let guest = cases().guest("readme-flake-guest");
    assert!(guest.enabled && guest.store_on_disk);
    let graph = Graph::load(&guest.runner);
    for (what, target) in guest_side(guest) {
        assert!(
            graph
                .chain(&guest.runner, target, &barrier(guest))
                .is_none(),
            "the README guest's runner reaches {what}"
        );
    }
}

#[test]
fn an_aarch64_guest_builds_its_disk_on_the_build_machine() {
    for name in ["aarch64-guest", "aarch64-guest-layered"] {
        let guest = cases().guest(name);
        assert_eq!(guest.build_system, "x86_64-linux", "{name}");
        let graph = Graph::load(&guest.runner);
        let disks: Vec<&Drv> = graph
            .drvs
            .values()
            .filter(|d| {
                d.name.starts_with("microvm-store-disk.") || d.name.starts_with("storedisk-layer-")
            })
            .collect();
        assert!(!disks.is_empty(), "{name}: no store disk");
        for disk in disks {
            assert_eq!(
                disk.system, "x86_64-linux",
                "{name}: {} builds on {}",
                disk.name, disk.system
            );
        }
        // The runner is the guest host's (microvm.vmHostPackages defaults to the guest's pkgs).
        assert!(
            graph
                .drvs
                .values()
                .any(|d| d.name.starts_with("qemu-kvm-host-aarch64-linux")),
            "{name}: the runner's hypervisor is not the aarch64 host's"
        );
        let kernel = booted_kernel(&graph, guest);
        assert!(
            kernel.ends_with("-microvm-kernel-image/Image"),
            "{name}: {kernel}"
        );
    }
}
