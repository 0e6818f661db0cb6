//! `cargo xtask vm-test`: the differential microVM harness. It builds the fixtures of vm-tests/
//! with real Nix (every scenario x store disk format x variant of the five fixes),
//! boots each distinct machine with the runner's own `bin/microvm-run` in QEMU, runs
//! `storedisk verify` on every store disk with its runner, measures what a real `nix copy` of
//! each runner transfers, and compares the result with the reviewed snapshots in golden/.
//! The aarch64 guest (an emulated MicroVM, `aarch64.rs`) goes through the same steps.

mod aarch64;
mod boot;
mod classify;
mod host;
mod layered;
mod microvm_list;
mod oracle;
mod plan;
mod report;
mod shutdown;
mod transfer;
mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cmd::Cmd;
use crate::tools::{self, Toolchain};
use classify::PathClass;
use plan::{PlanEntry, RunKind, Selection, REALISTIC};
use storedisk_verifier::ImageFormat;

/// `cargo xtask vm-test`
#[derive(Debug, clap::Args)]
pub struct VmTestArgs {
    /// Only this scenario (minimal, nix-db, no-reginfo, large, aarch64, layered); repeatable.
    /// Default: all of these. `realistic` (a generated closure of NixOS size, about 26 minutes more) runs only
    /// when named.
    #[arg(long, value_name = "S")]
    pub scenario: Vec<String>,
    /// Only this store disk format (squashfs, erofs); repeatable. Default: both.
    #[arg(long, value_name = "D")]
    pub disk: Vec<String>,
    /// Only this variant (unfixed, upstream, fixed, fix-image, fix-symlink, fix-init,
    /// fix-reginfo, fix-kernel, leak-image, leak-symlink, leak-init, leak-reginfo, leak-kernel);
    /// repeatable. Default: all. Snapshots cover every variant, so they are not compared then.
    #[arg(long, value_name = "V")]
    pub variant: Vec<String>,
    /// Hardware acceleration for the boots.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: boot::AccelChoice,
    /// Boot every variant, even those whose machine is byte-identical to one already booted.
    #[arg(long)]
    pub boot_all: bool,
    /// Seconds before a boot counts as hung and QEMU is killed.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout: u64,
    /// How many boots run at once (default: the number of CPUs).
    #[arg(long)]
    pub jobs: Option<usize>,
}

/// File bytes of its generated closure (its NAR is a little larger).
const REALISTIC_FILE_BYTES: u64 = 1_100_000_000;
const REALISTIC_SEED: u64 = 1;
/// Boots of the realistic guest check the sha256 of over a gigabyte under emulation.
const REALISTIC_BOOT_TIMEOUT: Duration = Duration::from_secs(1800);

/// A boot as recorded for a run: its own, or shared with a byte-identical machine.
#[derive(Debug, Clone, Serialize)]
pub struct BootRecord {
    #[serde(flatten)]
    pub outcome: boot::BootOutcome,
    /// The variant whose boot this is, when the machine is identical to that one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_with: Option<String>,
}

/// One copied store path, hash-redacted.
#[derive(Debug, Clone, Serialize)]
pub struct CopiedPath {
    pub name: String,
    /// The store path itself, for the oracles; report.json keeps the redacted name only.
    #[serde(skip)]
    pub store_path: String,
    pub nar_size: u64,
    pub compressed_size: u64,
    /// Provided by the host (busybox, kernel, initrd with host modules, the QEMU wrapper, the
    /// image holding them): its size differs between machines, so snapshots leave it out.
    pub host_provided: bool,
    /// The same store path is packed in the store disk: its bytes are copied twice.
    pub in_image: bool,
    /// The verifier's class (`leaked`, `shared`, `runner`); absent where no verifier ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<PathClass>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Transfer {
    pub paths: usize,
    pub nar_bytes: u64,
    /// NAR bytes of the copied paths the store disk also holds (host-provided ones included):
    /// what this deployment copies twice.
    pub in_image_bytes: u64,
    pub compressed_bytes: u64,
    /// Copied paths the verifier calls leaked; absent where no verifier ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaked_paths: Option<usize>,
    pub copied: Vec<CopiedPath>,
}

/// What the harness learns about a runner from Nix itself, before and independent of the
/// verifier: its closure, the part it reaches without the guest, and the guest's closure.
#[derive(Debug, Clone, Default)]
pub struct RunnerFacts {
    /// The guest's closure (toplevel and closure info): what the store disk packs.
    pub guest_closure: BTreeSet<String>,
    /// The runner's closure paths it reaches by itself (see [`classify::RunnerClosure`]).
    pub runner_own: BTreeSet<String>,
    /// The guest paths the runner reaches only through the store disk's references, or not
    /// at all: whether a copy takes them depends on what the image's bytes name.
    pub guest_only_via_image: BTreeSet<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    #[serde(flatten)]
    pub plan: PlanEntry,
    pub boot: Option<BootRecord>,
    pub transfer: Option<Transfer>,
    pub verify: Option<verify::Verdict>,
    /// Runner closure paths with a `lib/modules` directory, hash-redacted.
    pub runner_kernel_modules: Vec<String>,
    /// Where the verifier's leaked/shared sets differ from what `nix copy` copied.
    pub verify_disagreements: Vec<String>,
    #[serde(skip)]
    pub facts: Option<RunnerFacts>,
}

impl Run {
    /// A run of `plan`, nothing measured yet.
    pub fn new(plan: PlanEntry) -> Run {
        Run {
            plan,
            boot: None,
            transfer: None,
            verify: None,
            runner_kernel_modules: Vec::new(),
            verify_disagreements: Vec::new(),
            facts: None,
        }
    }

    pub fn label(&self) -> String {
        self.plan.label()
    }
}

/// Store path names whose bytes come from the host (or embed a host path).
pub fn is_host_provided(name: &str) -> bool {
    matches!(
        name,
        "busybox"
            | "linux-host"
            | "microvm-initrd"
            | "microvm-kernel-image"
            | "qemu-host"
            | "socat-host"
            | "busybox-aarch64"
            | "linux-host-aarch64"
    ) || name.starts_with("microvm-store-disk.")
}

/// Wall-clock time per phase, printed at the end and kept in report.json.
#[derive(Debug, Default, Serialize)]
pub struct Phases(Vec<(String, f64)>);

impl Phases {
    fn time<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        eprintln!("\n=== {name} ===");
        let start = Instant::now();
        let out = f();
        let secs = start.elapsed().as_secs_f64();
        eprintln!("=== {name}: {secs:.1}s ===");
        self.0.push((name.to_owned(), (secs * 10.0).round() / 10.0));
        out
    }
}

pub fn run(args: VmTestArgs) -> Result<()> {
    let started = Instant::now();
    let root = tools::workspace_root();
    let work = tools::target_dir().join("vm-test");
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut phases = Phases::default();

    let toolchain = phases.time("setup", crate::setup::ensure)?;
    let storedisk = phases.time("build storedisk", build_storedisk)?;
    let host_dir = phases.time("host inputs", || {
        host::prepare(&toolchain, &storedisk, &work.join("host"))
    })?;
    // The store disks are storedisk's own erofs; mkfs.erofs runs only for a build that asks
    // for it (`--erofs-writer mkfs`, nix/lib.nix), as microvm.nix's -Efragments does.
    let mkfs_erofs = tools::mkfs_erofs_with_fragments()
        .context("no mkfs.erofs 1.6+ (erofs-utils): run `cargo xtask setup`")?;
    let realistic_dir = if args.scenario.iter().any(|s| s == REALISTIC) {
        Some(phases.time("generate realistic closure", || generate_realistic(&work))?)
    } else {
        None
    };
    let nix_args = NixArgs {
        file: root.join("vm-tests/default.nix"),
        host_dir,
        qemu: toolchain.qemu.clone(),
        qemu_aarch64: toolchain.qemu_aarch64.clone(),
        socat: toolchain.socat.clone(),
        realistic_dir,
        mkfs_erofs,
    };

    let plan = phases.time("evaluate", || evaluate(&toolchain, &nix_args, "plan"))?;
    let selection = Selection {
        scenarios: &args.scenario,
        disks: &args.disk,
        variants: &args.variant,
    };
    let plan = x86_64_plan(plan, &args)?;
    eprintln!("{} runs selected", plan.len());
    phases.time("nix build", || {
        build(&toolchain, &nix_args, &plan, &logs, "nix-build.log")
    })?;

    let mut runs: Vec<Run> = plan.into_iter().map(Run::new).collect();
    let accel = boot::choose_accel(
        args.accel,
        &toolchain.qemu,
        &toolchain.kernel.vmlinuz,
        &logs,
    )?;
    phases.time("boot", || boot_all(&mut runs, accel, &args, &logs))?;
    // microvm-shutdown belongs to the minimal guest on erofs: tried when that is selected.
    let shutdown = if runs
        .iter()
        .any(|r| r.plan.scenario == "minimal" && r.plan.format == ImageFormat::Erofs)
    {
        Some(phases.time("microvm-shutdown", || {
            let runner = nix_build_one(&toolchain, &nix_args, "shutdown", &logs)?;
            let timeout = Duration::from_secs(args.boot_timeout);
            shutdown::check(Path::new(&runner), accel, &logs, timeout)
        })?)
    } else {
        eprintln!("microvm-shutdown: not tried (the minimal guest on erofs is not selected)");
        None
    };
    phases.time("runner closures", || {
        runner_facts_all(&mut runs, &toolchain, &work)
    })?;
    phases.time("verify", || {
        verify_all(&mut runs, &toolchain, &storedisk, &work)
    })?;
    phases.time("transfer", || transfer_all(&mut runs, &toolchain, &work))?;
    let list_checks = if runs.iter().any(|r| r.plan.kind == RunKind::Host) {
        phases.time("microvm -l", || {
            let script = nix_build_one(&toolchain, &nix_args, "microvmList", &logs)?;
            microvm_list::check_all(&runs, Path::new(&script), &work)
        })?
    } else {
        Vec::new()
    };
    let harness = Harness {
        toolchain: &toolchain,
        nix_args: &nix_args,
        args: &args,
        storedisk: &storedisk,
        work: &work,
        logs: &logs,
    };
    let layered = layered::run_all(&harness, accel, &mut phases)?;
    let aarch64 = aarch64::run_all(&harness, &mut phases)?;

    let total = started.elapsed().as_secs_f64();
    eprintln!("\nphases:");
    for (name, secs) in &phases.0 {
        eprintln!("  {name:<16} {secs:>7.1}s");
    }
    eprintln!("  {:<16} {total:>7.1}s", "total");
    report::finish(
        &report::Outcome {
            runs: &runs,
            list_checks: &list_checks,
            shutdown: shutdown.as_ref(),
            aarch64: &aarch64,
            layered: &layered,
            phases: &phases,
            total_seconds: total,
            accel,
            boot_all: args.boot_all,
        },
        &work,
        &root.join("golden"),
        &selection,
    )
}

/// Generates the `realistic` scenario's closure (once per generator version) and returns the
/// directory vm-tests/realistic.nix reads.
fn generate_realistic(work: &Path) -> Result<PathBuf> {
    let generated = crate::bench::closure_gen::generate_cached(
        REALISTIC_FILE_BYTES,
        REALISTIC_SEED,
        &work.join("realistic"),
    )?;
    eprintln!(
        "realistic closure: {} store paths, {} files, {} symlinks, {} of NAR",
        generated.store_paths,
        generated.files,
        generated.symlinks,
        crate::bench::size_label(generated.nar_bytes)
    );
    generated
        .store_dir
        .parent()
        .map(Path::to_owned)
        .context("the generated store has no parent directory")
}

/// Builds the `storedisk` binary the fixtures use (the dev profile, like `cargo test`), never
/// incrementally: its bytes are an input of every store disk derivation (see Cargo.toml's
/// `[profile.dev]`), so a `CARGO_INCREMENTAL=1` in the environment must not rebuild them all.
fn build_storedisk() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Cmd::new(cargo)
        .args(["build", "--quiet", "-p", "storedisk", "--bin", "storedisk"])
        .env("CARGO_INCREMENTAL", "0")
        .current_dir(tools::workspace_root())
        .timeout(Duration::from_secs(3600))
        .run()?;
    let bin = tools::target_dir().join("debug/storedisk");
    anyhow::ensure!(
        bin.exists(),
        "cargo built storedisk but {} does not exist",
        bin.display()
    );
    Ok(bin)
}

/// What the harness's later phases (aarch64.rs, layered.rs) work with.
pub struct Harness<'a> {
    pub toolchain: &'a Toolchain,
    nix_args: &'a NixArgs,
    pub args: &'a VmTestArgs,
    /// The `storedisk` binary the verify steps run.
    pub storedisk: &'a Path,
    /// target/vm-test
    pub work: &'a Path,
    pub logs: &'a Path,
}

struct NixArgs {
    file: PathBuf,
    host_dir: PathBuf,
    qemu: PathBuf,
    qemu_aarch64: PathBuf,
    socat: PathBuf,
    mkfs_erofs: PathBuf,
    /// The generated closure of the `realistic` scenario, when it is asked for.
    realistic_dir: Option<PathBuf>,
}

impl NixArgs {
    fn apply(&self, cmd: Cmd) -> Cmd {
        let mut cmd = cmd
            .arg(&self.file)
            .arg("--argstr")
            .arg("hostDir")
            .arg(&self.host_dir)
            .arg("--argstr")
            .arg("qemu")
            .arg(&self.qemu)
            .arg("--argstr")
            .arg("qemuAarch64")
            .arg(&self.qemu_aarch64)
            .arg("--argstr")
            .arg("socat")
            .arg(&self.socat);
        if self.mkfs_erofs.exists() {
            cmd = cmd.arg("--argstr").arg("mkfsErofs").arg(&self.mkfs_erofs);
        }
        if let Some(dir) = &self.realistic_dir {
            cmd = cmd.arg("--argstr").arg("realisticDir").arg(dir);
        }
        cmd
    }
}

/// Evaluates `attr` of vm-tests/default.nix (`plan`, or `aarch64.plan`) into plan entries.
fn evaluate(toolchain: &Toolchain, nix_args: &NixArgs, attr: &str) -> Result<Vec<PlanEntry>> {
    let cmd = nix_args.apply(
        toolchain
            .nix
            .cmd("nix-instantiate")
            .args(["--eval", "--strict", "--json", "-A", attr]),
    );
    let json = cmd.read()?;
    serde_json::from_str(&json)
        .with_context(|| format!("vm-tests/default.nix's {attr} is not the expected JSON"))
}

/// Builds what `plan` needs (log: `logs/<log_name>`).
fn build(
    toolchain: &Toolchain,
    nix_args: &NixArgs,
    plan: &[PlanEntry],
    logs: &Path,
    log_name: &str,
) -> Result<()> {
    if plan.is_empty() {
        return Ok(()); // without -A, nix-build would build every top-level attribute
    }
    let mut cmd = nix_args.apply(
        toolchain
            .nix
            .cmd("nix-build")
            .args(["--no-out-link", "--keep-going"]),
    );
    // The runner of a variant that discards the context of init= does not depend on the
    // toplevel; build the guest side explicitly so the verifier and the image have it. Variants
    // share their guest side: name each out path once.
    let mut named = BTreeSet::new();
    // `microvm -l` installs version 2's host system over version 1's.
    let hosts: BTreeSet<_> = plan
        .iter()
        .filter(|p| p.kind == RunKind::Host)
        .map(|p| (p.format, p.variant))
        .collect();
    for p in plan {
        let host_system_needed = p.kind == RunKind::Host
            || (p.kind == RunKind::Update && hosts.contains(&(p.format, p.variant)));
        let attrs = [
            ("runner", Some(&p.runner)),
            ("storeDisk", Some(&p.store_disk)),
            ("toplevel", Some(&p.toplevel)),
            ("regInfo", p.reg_info.as_ref()),
            (
                "hostSystem",
                Some(&p.host_system).filter(|_| host_system_needed),
            ),
        ];
        for (attr, out) in attrs {
            if out.is_some_and(|out| named.insert(out.clone())) {
                cmd = cmd.arg("-A").arg(p.attr_path(attr));
            }
        }
    }
    let log = logs.join(log_name);
    let finished = cmd
        .log_file(&log)
        .timeout(Duration::from_secs(3600))
        .run_unchecked()?;
    if !finished.success() {
        bail!(
            "nix-build {} (full log {})\n{}",
            finished.outcome(),
            log.display(),
            finished.tail()
        );
    }
    Ok(())
}

/// `nix-build` of `attrs` of vm-tests/default.nix; their out paths, in order. Nix's build log
/// goes to `log`.
fn nix_build_attrs(
    toolchain: &Toolchain,
    nix_args: &NixArgs,
    attrs: &[&str],
    log: &Path,
) -> Result<Vec<String>> {
    let mut cmd = nix_args.apply(toolchain.nix.cmd("nix-build").arg("--no-out-link"));
    for attr in attrs {
        cmd = cmd.arg("-A").arg(attr);
    }
    let finished = cmd.timeout(Duration::from_secs(1800)).run_unchecked()?;
    std::fs::write(log, &finished.stderr)?;
    if !finished.success() {
        bail!(
            "`{}` {}\n{}",
            finished.display,
            finished.outcome(),
            finished.tail()
        );
    }
    Ok(finished.stdout.lines().map(str::to_owned).collect())
}

/// The x86_64 runs the selection asks for: none when `--scenario` names only the aarch64 guest,
/// whose runs have a plan of their own (aarch64.rs).
fn x86_64_plan(plan: Vec<PlanEntry>, args: &VmTestArgs) -> Result<Vec<PlanEntry>> {
    let scenarios: Vec<String> = aarch64::x86_64_scenarios(&args.scenario)
        .into_iter()
        .filter(|s| s != layered::SCENARIO)
        .collect();
    if !args.scenario.is_empty() && scenarios.is_empty() {
        return Ok(Vec::new()); // only the aarch64 guest or the layered scenario: own plans
    }
    plan::select(
        plan,
        &Selection {
            scenarios: &scenarios,
            disks: &args.disk,
            variants: &args.variant,
        },
    )
}

/// `nix-build` of one attribute of vm-tests/default.nix (log: `nix-build-<attr>.log`); its out
/// path.
fn nix_build_one(
    toolchain: &Toolchain,
    nix_args: &NixArgs,
    attr: &str,
    logs: &Path,
) -> Result<String> {
    let log = logs.join(format!("nix-build-{attr}.log"));
    let built = nix_build_attrs(toolchain, nix_args, &[attr], &log)?;
    built
        .into_iter()
        .next()
        .with_context(|| format!("nix-build printed no path for `{attr}`"))
}

/// Identifies what a boot exercises: the runner script's text with the store disk's path
/// replaced by the sha256 of the disk's bytes. Variants only differ in string context and
/// references, not in this text, so equal keys mean QEMU gets byte-identical inputs (same
/// command line, kernel, initrd and disk bytes) and one boot stands for all of them.
fn boot_key(run: &PlanEntry) -> Result<String> {
    let script_path = Path::new(&run.runner).join("bin/microvm-run");
    let script = std::fs::read_to_string(&script_path)
        .with_context(|| format!("reading {}", script_path.display()))?;
    let disk_hash = sha256_file(Path::new(&run.store_disk))?;
    let text = script.replace(&run.store_disk, &format!("<disk sha256 {disk_hash}>"));
    Ok(format!("{:x}", Sha256::digest(text.as_bytes())))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

fn boot_all(runs: &mut [Run], accel: boot::Accel, args: &VmTestArgs, logs: &Path) -> Result<()> {
    // Group runs by boot key; boot the first of each group (the `fixed` variant sorts early
    // enough that a group's representative is usually a plain variant).
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, run) in runs.iter().enumerate() {
        if run.plan.kind != RunKind::Run && !args.boot_all {
            continue; // updates are booted as their own scenario only with --boot-all
        }
        let key = if args.boot_all {
            format!("{i}")
        } else {
            boot_key(&run.plan)?
        };
        groups.entry(key).or_default().push(i);
    }
    let work: Vec<(usize, Vec<usize>)> = groups
        .into_values()
        .map(|members| (members[0], members))
        .collect();
    let total = work.len();
    eprintln!(
        "{total} distinct machines to boot ({} runs, accel {accel:?})",
        runs.len()
    );
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let queue = Mutex::new(work.iter().enumerate().collect::<Vec<_>>());
    let results: Mutex<Vec<(usize, boot::BootOutcome)>> = Mutex::new(Vec::new());
    let timeout = Duration::from_secs(args.boot_timeout);
    let labels: Vec<String> = runs.iter().map(Run::label).collect();
    let runners: Vec<String> = runs.iter().map(|r| r.plan.runner.clone()).collect();
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(total.max(1)) {
            scope.spawn(|| loop {
                let next = queue.lock().map(|mut q| q.pop()).ok().flatten();
                let Some((n, (first, _))) = next else { break };
                let label = &labels[*first];
                eprintln!("[boot {}/{total}] {label}", n + 1);
                let name = label.replace('/', "-");
                let log = logs.join(format!("boot-{name}.log"));
                let state_dir = logs.join("state").join(&name);
                let timeout = if label.starts_with(&format!("{REALISTIC}/")) {
                    timeout.max(REALISTIC_BOOT_TIMEOUT)
                } else {
                    timeout
                };
                let outcome = boot::boot(
                    Path::new(&runners[*first]),
                    accel,
                    &log,
                    &state_dir,
                    timeout,
                );
                eprintln!(
                    "[boot {}/{total}] {label}: {} in {:.1}s",
                    n + 1,
                    if outcome.ok { "ok" } else { "FAILED" },
                    outcome.seconds
                );
                if let Ok(mut r) = results.lock() {
                    r.push((*first, outcome));
                }
            });
        }
    });
    let results = results
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a boot thread panicked"))?;
    for (first, outcome) in results {
        let members = &work
            .iter()
            .find(|(f, _)| *f == first)
            .context("boot group")?
            .1;
        for &member in members {
            runs[member].boot = Some(BootRecord {
                outcome: outcome.clone(),
                shared_with: (member != first).then(|| runs[first].plan.variant.to_string()),
            });
        }
    }
    Ok(())
}

/// `nix path-info --json --recursive PATHS`, the closure as JSON.
fn closure_json(toolchain: &Toolchain, paths: &[&str]) -> Result<String> {
    toolchain
        .nix
        .cmd("nix")
        .args(["path-info", "--json", "--recursive"])
        .args(paths)
        .quiet()
        .read()
}

/// The store paths of a `nix path-info --json` closure.
fn closure_paths(json: &str) -> Result<BTreeSet<String>> {
    let closure = storedisk_nix::Closure::from_json(json, None, &Default::default())?;
    Ok(closure.iter().map(|i| closure.display(&i.path)).collect())
}

/// The fixtures' closure info is written by busybox awk (vm-tests/closure-info.awk, so that its
/// store path does not follow the storedisk binary); its oracle is `storedisk closure-info`'s
/// rendering (unit-tested against nixpkgs' format) of Nix's own account of the closure.
fn check_closure_info(toolchain: &Toolchain, toplevel: &str, reg_info: &str) -> Result<()> {
    let json = closure_json(toolchain, &[toplevel])?;
    let closure = storedisk_nix::Closure::from_json(&json, None, &Default::default())?;
    let expected = storedisk_nix::registration::closure_info(&closure)?;
    for (file, want) in [
        ("registration", &expected.registration),
        ("store-paths", &expected.store_paths),
        ("total-nar-size", &expected.total_nar_size),
    ] {
        let path = Path::new(reg_info).join(file);
        let got = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the closure info's {}", path.display()))?;
        if let Some((line, want_line, got_line)) = first_different_line(want, &got) {
            anyhow::bail!(
                "{} is not what nixpkgs' closureInfo writes for the closure of {toplevel}: \
                 line {line} is {:?}, `storedisk closure-info` renders {:?} \
                 (vm-tests/closure-info.awk wrote it)",
                path.display(),
                got_line.unwrap_or("(the end)"),
                want_line.unwrap_or("(the end)"),
            );
        }
    }
    Ok(())
}

/// The first line (1-based) where two texts differ, and that line in each (`None` past its
/// end); `None` when they are equal.
fn first_different_line<'t>(
    a: &'t str,
    b: &'t str,
) -> Option<(usize, Option<&'t str>, Option<&'t str>)> {
    let (a_lines, b_lines): (Vec<_>, Vec<_>) = (a.split('\n').collect(), b.split('\n').collect());
    (0..a_lines.len().max(b_lines.len()))
        .find(|&n| a_lines.get(n) != b_lines.get(n))
        .map(|n| (n + 1, a_lines.get(n).copied(), b_lines.get(n).copied()))
}

/// Where each guest's closure JSON is written (one file per toplevel), for `--closure`.
fn guest_closure_file(work: &Path, plan: &PlanEntry) -> PathBuf {
    work.join("closures")
        .join(format!("{}.json", transfer::redact(&plan.toplevel)))
}

/// Asks Nix, for every run, what the guest's closure is (written for the verifier) and what
/// the runner reaches by itself, and which runner closure paths hold kernel modules
/// (`lib/modules`).
fn runner_facts_all(runs: &mut [Run], toolchain: &Toolchain, work: &Path) -> Result<()> {
    std::fs::create_dir_all(work.join("closures"))?;
    let closure_infos: BTreeSet<(&str, &str)> = runs
        .iter()
        .filter_map(|r| Some((r.plan.toplevel.as_str(), r.plan.reg_info.as_deref()?)))
        .collect();
    for (toplevel, reg_info) in closure_infos {
        check_closure_info(toolchain, toplevel, reg_info)?;
    }
    let mut guest_closures: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let count = runs.len();
    for (n, run) in runs.iter_mut().enumerate() {
        let roots = run.plan.guest_roots();
        let guest_closure = match guest_closures.get(&run.plan.toplevel) {
            Some(c) => c.clone(),
            None => {
                let json = closure_json(toolchain, &roots)?;
                let file = guest_closure_file(work, &run.plan);
                crate::setup::write_atomically(&file, json.as_bytes())?;
                let paths = closure_paths(&json)?;
                guest_closures.insert(run.plan.toplevel.clone(), paths.clone());
                paths
            }
        };
        let runner_json = closure_json(toolchain, &[run.plan.deployed()])?;
        let runner_closure = classify::RunnerClosure::read(&runner_json, &run.plan)?;
        let with_kernel_modules: Vec<String> = runner_closure
            .all
            .iter()
            .filter(|p| Path::new(p).join("lib/modules").is_dir())
            .cloned()
            .collect();
        let runner_own = runner_closure.own;
        let guest_only_via_image = guest_closure
            .difference(&runner_closure.without_image)
            .cloned()
            .collect();
        if n == 0 || (n + 1) % 20 == 0 || n + 1 == count {
            eprintln!("[closures {}/{count}] {}", n + 1, run.label());
        }
        run.runner_kernel_modules = with_kernel_modules
            .iter()
            .map(|p| transfer::redact(p))
            .collect();
        run.facts = Some(RunnerFacts {
            guest_closure,
            runner_own,
            guest_only_via_image,
        });
    }
    Ok(())
}

fn verify_all(
    runs: &mut [Run],
    toolchain: &Toolchain,
    storedisk: &Path,
    work: &Path,
) -> Result<()> {
    // Updates are version 2 of runs verified already; a host system is verified like a runner.
    let verified = |r: &Run| r.plan.kind != RunKind::Update;
    let count = runs.iter().filter(|r| verified(r)).count();
    let mut done = 0;
    for run in runs.iter_mut().filter(|r| verified(r)) {
        done += 1;
        eprintln!("[verify {done}/{count}] {}", run.label());
        let closure_file = guest_closure_file(work, &run.plan);
        let verdict = verify::verdict(&verify::VerifyCommand {
            storedisk,
            nix: &toolchain.nix,
            images: std::slice::from_ref(&run.plan.store_disk),
            closure_file: &closure_file,
            runner: Some(run.plan.deployed()),
        })?;
        run.verify = Some(verdict);
    }
    Ok(())
}

fn transfer_all(runs: &mut [Run], toolchain: &Toolchain, work: &Path) -> Result<()> {
    let caches = work.join("caches");
    if caches.exists() {
        std::fs::remove_dir_all(&caches)
            .with_context(|| format!("clearing {}", caches.display()))?;
    }
    let count = runs.len();
    // Version 1 of each (format, variant), for the update measurement.
    let v1_runner: BTreeMap<_, String> = runs
        .iter()
        .filter(|r| r.plan.kind == RunKind::Run && r.plan.scenario == "minimal")
        .map(|r| ((r.plan.format, r.plan.variant), r.plan.runner.clone()))
        .collect();
    for (n, run) in runs.iter_mut().enumerate() {
        let kind = run.plan.kind.name();
        eprintln!("[copy {}/{count}] {kind} {}", n + 1, run.label());
        let name = format!(
            "{kind}-{}-{}-{}",
            run.plan.scenario, run.plan.format, run.plan.variant
        );
        let none_dir = caches.join(format!("{name}-none"));
        let zstd_dir = caches.join(format!("{name}-zstd"));
        if run.plan.kind == RunKind::Update {
            let Some(v1) = v1_runner.get(&(run.plan.format, run.plan.variant)) else {
                eprintln!("  skipped: minimal version 1 of this variant is not selected");
                continue;
            };
            transfer::copy(&toolchain.nix, &[v1], &none_dir, "none")?;
            transfer::copy(&toolchain.nix, &[v1], &zstd_dir, "zstd")?;
        }
        let deployed = run.plan.deployed();
        let none_copied = transfer::copy(&toolchain.nix, &[deployed], &none_dir, "none")?;
        let zstd_copied = transfer::copy(&toolchain.nix, &[deployed], &zstd_dir, "zstd")?;
        let zstd: BTreeMap<&str, &transfer::CachedPath> = zstd_copied
            .iter()
            .map(|c| (c.store_path.as_str(), c))
            .collect();
        anyhow::ensure!(
            zstd.len() == none_copied.len(),
            "{}: the zstd and uncompressed copies differ in paths",
            run.label()
        );
        let empty = BTreeSet::new();
        let guest_closure = run.facts.as_ref().map_or(&empty, |f| &f.guest_closure);
        let verdict = run.verify.as_ref();
        let mut copied = Vec::new();
        for c in &none_copied {
            anyhow::ensure!(
                c.file_size == c.nar_size,
                "{}: uncompressed FileSize {} != NarSize {}",
                c.store_path,
                c.file_size,
                c.nar_size
            );
            let z = zstd.get(c.store_path.as_str()).with_context(|| {
                format!("{} was copied uncompressed but not with zstd", c.store_path)
            })?;
            let name = transfer::redact(&c.store_path);
            let classified = classify::classify(&c.store_path, guest_closure, verdict);
            copied.push(CopiedPath {
                host_provided: is_host_provided(&name),
                name,
                store_path: c.store_path.clone(),
                nar_size: c.nar_size,
                compressed_size: z.file_size,
                in_image: classified.in_image,
                class: classified.class,
            });
        }
        copied.sort_by(|a, b| a.name.cmp(&b.name));
        // A first deployment copies the runner's (or host system's) whole closure: the verifier
        // must agree with it on every path.
        if let (Some(facts), Some(verdict)) = (&run.facts, verdict) {
            if run.plan.kind != RunKind::Update && verdict.unavailable.is_none() {
                let copied_paths: BTreeSet<String> =
                    none_copied.iter().map(|c| c.store_path.clone()).collect();
                let found = classify::disagreements(
                    &run.plan.label(),
                    &copied_paths,
                    &facts.guest_closure,
                    &facts.runner_own,
                    verdict,
                );
                run.verify_disagreements = found;
            }
        }
        run.transfer = Some(Transfer {
            paths: copied.len(),
            nar_bytes: copied.iter().map(|c| c.nar_size).sum(),
            in_image_bytes: copied
                .iter()
                .filter(|c| c.in_image)
                .map(|c| c.nar_size)
                .sum(),
            compressed_bytes: copied.iter().map(|c| c.compressed_size).sum(),
            leaked_paths: verdict
                .filter(|v| v.unavailable.is_none() && run.plan.kind != RunKind::Update)
                .map(|_| {
                    copied
                        .iter()
                        .filter(|c| c.class == Some(PathClass::Leaked))
                        .count()
                }),
            copied,
        });
        // The caches are large (the leaking variants of `large` hold the closure twice); only
        // their numbers matter once read.
        for dir in [none_dir, zstd_dir] {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    // The second oracle needs every variant's copy: it bounds each verdict by what `fixed`
    // copies.
    oracle::check_all(runs);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::first_different_line;

    #[test]
    fn first_different_line_names_the_line_and_both_versions() {
        assert_eq!(first_different_line("a\nb\n", "a\nb\n"), None);
        assert_eq!(
            first_different_line("a\nb\nc\n", "a\nx\nc\n"),
            Some((2, Some("b"), Some("x")))
        );
        // A missing final newline, a missing line.
        assert_eq!(first_different_line("a\n", "a"), Some((2, Some(""), None)));
        assert_eq!(
            first_different_line("a\nb\n", "a\n"),
            Some((2, Some("b"), Some("")))
        );
    }
}
