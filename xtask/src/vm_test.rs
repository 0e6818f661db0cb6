//! `cargo xtask vm-test`: the differential microVM harness. It builds the fixtures of vm-tests/
//! with real Nix (every scenario x store disk format x variant of the four store-disk fixes),
//! boots each distinct machine with the runner's own `bin/microvm-run` in QEMU, runs
//! `storedisk verify` on every store disk with its runner, measures what a real `nix copy` of
//! each runner transfers, and compares the result with the reviewed snapshots in golden/.

mod boot;
mod cross;
mod host;
mod report;
mod transfer;
mod verify;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cmd::Cmd;
use crate::tools::{self, Toolchain};

/// `cargo xtask vm-test`
#[derive(Debug, clap::Args)]
pub struct VmTestArgs {
    /// Only this scenario (minimal, nix-db, large); repeatable. Default: all.
    #[arg(long, value_name = "S")]
    pub scenario: Vec<String>,
    /// Only this store disk format (squashfs, erofs); repeatable. Default: both.
    #[arg(long, value_name = "D")]
    pub disk: Vec<String>,
    /// Only this variant (unfixed, upstream, fixed, fix-image, fix-symlink, fix-init,
    /// fix-reginfo, leak-image, leak-symlink, leak-init); repeatable. Default: all.
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

/// One entry of vm-tests/default.nix's `plan`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanEntry {
    pub kind: String,
    pub scenario: String,
    pub format: String,
    pub variant: String,
    pub fixes: Fixes,
    pub runner: String,
    pub store_disk: String,
    pub toplevel: String,
    pub reg_info: String,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Fixes {
    pub image: bool,
    pub symlink: bool,
    pub init: bool,
    pub reg_info: bool,
}

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
    pub nar_size: u64,
    pub compressed_size: u64,
    /// Provided by the host (busybox, kernel, initrd with host modules, the image holding
    /// them): its size differs between machines, so snapshots leave it out.
    pub host_provided: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Transfer {
    pub paths: usize,
    pub nar_bytes: u64,
    pub compressed_bytes: u64,
    /// From the verifier's runner_overlap; absent while `storedisk verify` cannot say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaked_paths: Option<usize>,
    pub copied: Vec<CopiedPath>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    #[serde(flatten)]
    pub plan: PlanEntry,
    pub boot: Option<BootRecord>,
    pub transfer: Option<Transfer>,
    pub verify: Option<verify::Verdict>,
}

impl Run {
    pub fn label(&self) -> String {
        format!(
            "{}/{}/{}",
            self.plan.scenario, self.plan.format, self.plan.variant
        )
    }
}

/// Store path names whose bytes come from the host.
pub fn is_host_provided(name: &str) -> bool {
    name == "busybox"
        || name.starts_with("linux-kernel-host")
        || name.starts_with("linux-modules-host")
        || name == "microvm-initrd"
        || name.starts_with("microvm-store-disk.")
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
    let mkfs_erofs = tools::mkfs_erofs_with_fragments()
        .context("no mkfs.erofs 1.6+ (erofs-utils): run `cargo xtask setup`")?;
    let nix_args = NixArgs {
        file: root.join("vm-tests/default.nix"),
        host_dir,
        qemu: toolchain.qemu.clone(),
        mkfs_erofs,
    };

    let plan = phases.time("evaluate", || evaluate(&toolchain, &nix_args))?;
    let plan = select(plan, &args)?;
    eprintln!("{} runs selected", plan.len());
    phases.time("nix build", || build(&toolchain, &nix_args, &plan, &logs))?;

    let mut runs: Vec<Run> = plan
        .into_iter()
        .map(|plan| Run {
            plan,
            boot: None,
            transfer: None,
            verify: None,
        })
        .collect();
    let accel = boot::choose_accel(
        args.accel,
        &toolchain.qemu,
        &toolchain.kernel.vmlinuz,
        &logs,
    )?;
    phases.time("boot", || boot_all(&mut runs, accel, &args, &logs))?;
    phases.time("verify", || {
        verify_all(&mut runs, &toolchain, &storedisk, &work)
    })?;
    phases.time("transfer", || transfer_all(&mut runs, &toolchain, &work))?;
    let cross = phases.time("aarch64 guest", || {
        let nix_build = |attrs: &[&str]| nix_build_attrs(&toolchain, &nix_args, attrs, &logs);
        cross::check(&toolchain, nix_build, &storedisk, &work)
    })?;

    let total = started.elapsed().as_secs_f64();
    eprintln!("\nphases:");
    for (name, secs) in &phases.0 {
        eprintln!("  {name:<16} {secs:>7.1}s");
    }
    eprintln!("  {:<16} {total:>7.1}s", "total");
    report::finish(
        &runs,
        &cross,
        &phases,
        total,
        accel,
        &work,
        &root.join("golden"),
    )
}

/// Builds the `storedisk` binary the fixtures use (the dev profile, like `cargo test`).
fn build_storedisk() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Cmd::new(cargo)
        .args(["build", "--quiet", "-p", "storedisk", "--bin", "storedisk"])
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

struct NixArgs {
    file: PathBuf,
    host_dir: PathBuf,
    qemu: PathBuf,
    mkfs_erofs: PathBuf,
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
            .arg(&self.qemu);
        if self.mkfs_erofs.exists() {
            cmd = cmd.arg("--argstr").arg("mkfsErofs").arg(&self.mkfs_erofs);
        }
        cmd
    }
}

fn evaluate(toolchain: &Toolchain, nix_args: &NixArgs) -> Result<Vec<PlanEntry>> {
    let cmd = nix_args.apply(
        toolchain
            .nix
            .cmd("nix-instantiate")
            .args(["--eval", "--strict", "--json", "-A", "plan"]),
    );
    let json = cmd.read()?;
    serde_json::from_str(&json).context("vm-tests/default.nix's plan is not the expected JSON")
}

/// Applies --scenario/--disk/--variant; an unknown name is an error, not an empty run.
fn select(plan: Vec<PlanEntry>, args: &VmTestArgs) -> Result<Vec<PlanEntry>> {
    let check = |wanted: &[String], known: Vec<&str>, what: &str| -> Result<()> {
        for w in wanted {
            if !known.contains(&w.as_str()) {
                let mut known = known.clone();
                known.sort();
                known.dedup();
                bail!("unknown {what} {w:?}; known: {}", known.join(", "));
            }
        }
        Ok(())
    };
    check(
        &args.scenario,
        plan.iter().map(|p| p.scenario.as_str()).collect(),
        "scenario",
    )?;
    check(
        &args.disk,
        plan.iter().map(|p| p.format.as_str()).collect(),
        "disk",
    )?;
    check(
        &args.variant,
        plan.iter().map(|p| p.variant.as_str()).collect(),
        "variant",
    )?;
    let keep = |wanted: &[String], v: &str| wanted.is_empty() || wanted.iter().any(|w| w == v);
    let mut selected: Vec<PlanEntry> = plan
        .into_iter()
        .filter(|p| {
            keep(&args.scenario, &p.scenario)
                && keep(&args.disk, &p.format)
                && keep(&args.variant, &p.variant)
        })
        .collect();
    let order = |p: &PlanEntry| {
        (
            p.kind.clone(),
            scenario_rank(&p.scenario),
            p.format.clone(),
            variant_rank(&p.variant),
        )
    };
    selected.sort_by_key(order);
    Ok(selected)
}

fn scenario_rank(s: &str) -> usize {
    ["minimal", "nix-db", "large"]
        .iter()
        .position(|x| *x == s)
        .unwrap_or(usize::MAX)
}

/// Variants in the order tables show them.
pub const VARIANT_ORDER: &[&str] = &[
    "unfixed",
    "upstream",
    "fixed",
    "fix-image",
    "fix-symlink",
    "fix-init",
    "fix-reginfo",
    "leak-image",
    "leak-symlink",
    "leak-init",
];

pub fn variant_rank(v: &str) -> usize {
    VARIANT_ORDER
        .iter()
        .position(|x| *x == v)
        .unwrap_or(usize::MAX)
}

fn attr_path(p: &PlanEntry) -> String {
    let set = if p.kind == "update" {
        "updates"
    } else {
        "runs"
    };
    format!("{set}.{}.{}.{}.runner", p.scenario, p.format, p.variant)
}

fn build(toolchain: &Toolchain, nix_args: &NixArgs, plan: &[PlanEntry], logs: &Path) -> Result<()> {
    let mut cmd = nix_args.apply(
        toolchain
            .nix
            .cmd("nix-build")
            .args(["--no-out-link", "--keep-going"]),
    );
    for p in plan {
        cmd = cmd.arg("-A").arg(attr_path(p));
        // The runner of a variant that discards the context of init= does not depend on the
        // toplevel; build the guest side explicitly so the verifier and the image have it.
        cmd = cmd
            .arg("-A")
            .arg(attr_path(p).replace(".runner", ".storeDisk"));
    }
    let log = logs.join("nix-build.log");
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

/// `nix-build` of `attrs` of vm-tests/default.nix; their out paths, in order.
fn nix_build_attrs(
    toolchain: &Toolchain,
    nix_args: &NixArgs,
    attrs: &[&str],
    logs: &Path,
) -> Result<Vec<String>> {
    let mut cmd = nix_args.apply(toolchain.nix.cmd("nix-build").arg("--no-out-link"));
    for attr in attrs {
        cmd = cmd.arg("-A").arg(attr);
    }
    let finished = cmd.timeout(Duration::from_secs(1800)).run_unchecked()?;
    std::fs::write(logs.join("nix-build-aarch64.log"), &finished.stderr)?;
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
    let mut disk_hash_cache: BTreeMap<String, String> = BTreeMap::new();
    for (i, run) in runs.iter().enumerate() {
        if run.plan.kind != "run" && !args.boot_all {
            continue; // updates are booted as their own scenario only with --boot-all
        }
        let key = if args.boot_all {
            format!("{i}")
        } else {
            let key = boot_key(&run.plan)?;
            disk_hash_cache.insert(run.plan.store_disk.clone(), key.clone());
            key
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
                let log = logs.join(format!("boot-{}.log", label.replace('/', "-")));
                let outcome = boot::boot(Path::new(&runners[*first]), accel, &log, timeout)
                    .unwrap_or_else(|e| boot::BootOutcome {
                        ok: false,
                        seconds: 0.0,
                        result: None,
                        error: Some(format!("{e:#}")),
                        log: log.display().to_string(),
                        attempts: 1,
                    });
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
                shared_with: (member != first).then(|| runs[first].plan.variant.clone()),
            });
        }
    }
    Ok(())
}

fn verify_all(
    runs: &mut [Run],
    toolchain: &Toolchain,
    storedisk: &Path,
    work: &Path,
) -> Result<()> {
    let closures = work.join("closures");
    std::fs::create_dir_all(&closures)?;
    let mut closure_files: BTreeMap<(String, String), PathBuf> = BTreeMap::new();
    let count = runs.iter().filter(|r| r.plan.kind == "run").count();
    let mut done = 0;
    for run in runs.iter_mut().filter(|r| r.plan.kind == "run") {
        let key = (run.plan.toplevel.clone(), run.plan.reg_info.clone());
        let closure_file = match closure_files.get(&key) {
            Some(f) => f.clone(),
            None => {
                let json = toolchain
                    .nix
                    .cmd("nix")
                    .args([
                        "path-info",
                        "--json",
                        "--recursive",
                        &run.plan.toplevel,
                        &run.plan.reg_info,
                    ])
                    .quiet()
                    .read()?;
                let file = closures.join(format!("{}.json", transfer::redact(&run.plan.toplevel)));
                crate::setup::write_atomically(&file, json.as_bytes())?;
                closure_files.insert(key, file.clone());
                file
            }
        };
        done += 1;
        eprintln!("[verify {done}/{count}] {}", run.label());
        let verdict = verify::verify(&verify::VerifyInputs {
            storedisk,
            nix: &toolchain.nix,
            image: &run.plan.store_disk,
            closure_file: &closure_file,
            runner: &run.plan.runner,
        })?;
        if verdict.not_implemented() && done == 1 {
            eprintln!("verify: `storedisk verify` is not implemented yet; leaked_paths stays out of the report");
        }
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
    let v1_runner: BTreeMap<(String, String), String> = runs
        .iter()
        .filter(|r| r.plan.kind == "run" && r.plan.scenario == "minimal")
        .map(|r| {
            (
                (r.plan.format.clone(), r.plan.variant.clone()),
                r.plan.runner.clone(),
            )
        })
        .collect();
    for (n, run) in runs.iter_mut().enumerate() {
        eprintln!("[copy {}/{count}] {} {}", n + 1, run.plan.kind, run.label());
        let name = format!(
            "{}-{}-{}-{}",
            run.plan.kind, run.plan.scenario, run.plan.format, run.plan.variant
        );
        let (none_copied, zstd_copied) = if run.plan.kind == "update" {
            let Some(v1) = v1_runner.get(&(run.plan.format.clone(), run.plan.variant.clone()))
            else {
                eprintln!("  skipped: minimal version 1 of this variant is not selected");
                continue;
            };
            let none_dir = caches.join(format!("{name}-none"));
            let zstd_dir = caches.join(format!("{name}-zstd"));
            transfer::copy(&toolchain.nix, &[v1], &none_dir, "none")?;
            transfer::copy(&toolchain.nix, &[v1], &zstd_dir, "zstd")?;
            (
                transfer::copy(&toolchain.nix, &[&run.plan.runner], &none_dir, "none")?,
                transfer::copy(&toolchain.nix, &[&run.plan.runner], &zstd_dir, "zstd")?,
            )
        } else {
            (
                transfer::copy(
                    &toolchain.nix,
                    &[&run.plan.runner],
                    &caches.join(format!("{name}-none")),
                    "none",
                )?,
                transfer::copy(
                    &toolchain.nix,
                    &[&run.plan.runner],
                    &caches.join(format!("{name}-zstd")),
                    "zstd",
                )?,
            )
        };
        let zstd: BTreeMap<&str, &transfer::CachedPath> = zstd_copied
            .iter()
            .map(|c| (c.store_path.as_str(), c))
            .collect();
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
            copied.push(CopiedPath {
                host_provided: is_host_provided(&name),
                name,
                nar_size: c.nar_size,
                compressed_size: z.file_size,
            });
        }
        anyhow::ensure!(
            zstd.len() == none_copied.len(),
            "{}: the zstd and uncompressed copies differ in paths",
            run.label()
        );
        copied.sort_by(|a, b| a.name.cmp(&b.name));
        let leaked_paths = run
            .verify
            .as_ref()
            .and_then(|v| v.leaked.as_ref())
            .map(Vec::len);
        run.transfer = Some(Transfer {
            paths: copied.len(),
            nar_bytes: copied.iter().map(|c| c.nar_size).sum(),
            compressed_bytes: copied.iter().map(|c| c.compressed_size).sum(),
            leaked_paths: if run.plan.kind == "run" {
                leaked_paths
            } else {
                None
            },
            copied,
        });
        // The caches are large (the leaking variants of `large` hold the closure twice); only
        // their numbers matter once read.
        for dir in [
            caches.join(format!("{name}-none")),
            caches.join(format!("{name}-zstd")),
        ] {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    Ok(())
}
