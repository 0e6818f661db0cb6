//! `cargo xtask bench`: `storedisk build` against the image tools microvm.nix uses (gensquashfs,
//! mksquashfs, mkfs.erofs) on the same closure — wall time, CPU time, peak RSS and image size,
//! median of several runs, ratio ours/peer from the same run — and `storedisk verify`
//! throughput on every image. Writes a JSON report, a Markdown table and an SVG plot.
//!
//! The closure is generated (NixOS-like, deterministic per size and seed: `closure_gen`) or,
//! with `--store-dir DIR --closure FILE`, one of your own (`corpus`).
//!
//! erofs: storedisk's own writer (the default, `--erofs-writer native`) against mkfs.erofs run
//! twice per closure, with microvm.nix's flags (`-Efragments` included) and with the flags of
//! the native writer's format (`-zlz4hc -Eztailpacking`, what `storedisk build --erofs-writer
//! mkfs` passes it), the like-for-like comparison; and `storedisk build --erofs-writer mkfs`
//! itself (the tar stream to that mkfs.erofs).
//!
//! Every tool is run under `/usr/bin/time` (Debian package `time`), which reports the child's
//! own CPU time and peak RSS from `wait4`. The page cache is warm for every tool alike: the
//! generator has just written (or a first pass has read) the closure.

pub use storedisk_testkit::closure_gen;
mod corpus;
mod report;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::Cmd;
use crate::tools;

/// Sizes of the full run: enough to show how cost grows, and the largest in a NixOS range.
const FULL_SIZES: &[u64] = &[150_000_000, 500_000_000, 1_500_000_000];
/// The `--quick` size: the whole run stays under a minute on 2 cores.
const QUICK_SIZE: u64 = 40_000_000;
/// Fewest runs of `storedisk verify` per image: at 150M one takes about 0.1 s, so the
/// machine's noise (a few ms) is as large as the differences measured. 27 runs on one 150M
/// erofs image, idle machine: medians of 9 consecutive runs were within 0.9% of each other,
/// medians of 3 within 6%.
const MIN_VERIFY_RUNS: usize = 9;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// One small closure, one run each (under a minute on 2 cores).
    #[arg(long)]
    quick: bool,
    /// Closure size to benchmark (bytes of file data: 100M, 1.5G, 800MiB); repeatable.
    /// Default: 150M, 500M, 1.5G (--quick: 40M).
    #[arg(long = "size", value_name = "SIZE", value_parser = parse_size)]
    sizes: Vec<u64>,
    /// Runs of each tool per size; the median is reported. Default 3 (--quick: 1).
    /// `storedisk verify` runs at least 9 times per image (a run is short).
    #[arg(long, value_name = "N")]
    runs: Option<usize>,
    /// Seed of the generated closure.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the JSON report (bench.md and bench.svg go beside it).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Skip rebuilding `storedisk` in release mode (use target/release/storedisk as it is).
    #[arg(long)]
    no_build: bool,
    /// Keep each tool's image in target/bench/work (removed once verified by default: at 1.5G
    /// they take about 6 GB).
    #[arg(long)]
    keep_images: bool,
    /// Bench on your own closure instead of a generated one: the directory holding exactly its
    /// store paths (with --closure).
    #[arg(
        long,
        value_name = "DIR",
        requires = "closure",
        conflicts_with = "sizes"
    )]
    store_dir: Option<PathBuf>,
    /// The closure of --store-dir: exportReferencesGraph or `nix path-info --json` output, or
    /// registration text.
    #[arg(long, value_name = "FILE", requires = "store_dir")]
    closure: Option<PathBuf>,
}

/// Parses `100M`, `1.5G`, `800MiB`, `5000000` into bytes (K, M, G decimal; KiB, MiB, GiB binary).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    // Whole and fractional parts in integers: no float rounding in closure names.
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let whole: u64 = whole
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let mut bytes = whole * factor;
    let mut scale = factor;
    for digit in frac.chars() {
        let d = digit
            .to_digit(10)
            .ok_or(format!("{text:?} is not a size"))? as u64;
        scale /= 10;
        bytes += d * scale;
    }
    if bytes == 0 {
        return Err(format!("{text:?}: the size must be more than 0"));
    }
    Ok(bytes)
}

pub use storedisk_testkit::closure_gen::size_label;

/// What one run of one tool cost.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RunStats {
    pub wall_s: f64,
    pub user_s: f64,
    pub sys_s: f64,
    pub cpu_s: f64,
    pub max_rss_mb: f64,
    pub image_bytes: u64,
}

impl RunStats {
    /// The median of each field over `runs` (each field on its own).
    fn median(runs: &[RunStats]) -> RunStats {
        let med = |f: fn(&RunStats) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            match v.len() {
                0 => 0.0,
                n if n % 2 == 1 => v[n / 2],
                n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
            }
        };
        RunStats {
            wall_s: med(|r| r.wall_s),
            user_s: med(|r| r.user_s),
            sys_s: med(|r| r.sys_s),
            cpu_s: med(|r| r.cpu_s),
            max_rss_mb: med(|r| r.max_rss_mb),
            image_bytes: med(|r| r.image_bytes as f64) as u64,
        }
    }
}

/// One image tool as benchmarked.
#[derive(Debug, Clone)]
struct ImageTool {
    /// Name in tables: `storedisk`, `gensquashfs`, ...
    name: &'static str,
    format: &'static str,
    ours: bool,
    program: PathBuf,
    /// How its command line is shaped (see [`ImageTool::argv`]).
    kind: ToolKind,
}

#[derive(Debug, Clone, Copy)]
enum ToolKind {
    Storedisk,
    /// `storedisk build --no-read-back`: what the read-back (a full NAR hash of the image)
    /// costs, shown as the ratio against it.
    StorediskNoReadBack,
    /// `storedisk build --erofs-writer mkfs`: the tar stream to mkfs.erofs.
    StorediskMkfs,
    Gensquashfs,
    Mksquashfs,
    /// microvm.nix's flags.
    MkfsErofs,
    /// The flags `storedisk build` passes (no `-Efragments`).
    MkfsErofsOurFlags,
}

impl ImageTool {
    /// The command line (program first) that packs `closure` into `out`.
    fn argv(
        &self,
        bench: &Bench,
        closure: &closure_gen::GeneratedClosure,
        out: &Path,
    ) -> Vec<OsString> {
        let jobs = bench.cores.to_string();
        let store = closure.store_dir.as_os_str();
        let out = out.as_os_str();
        let mut argv: Vec<OsString> = vec![self.program.clone().into()];
        let mut push = |args: &[&OsStr]| argv.extend(args.iter().map(|a| a.to_os_string()));
        let s = |text: &'static str| OsStr::new(text);
        match self.kind {
            ToolKind::Storedisk | ToolKind::StorediskNoReadBack | ToolKind::StorediskMkfs => {
                push(&[s("build"), s("--format"), s(self.format)]);
                if matches!(self.kind, ToolKind::StorediskNoReadBack) {
                    push(&[s("--no-read-back")]);
                }
                push(&[s("--closure"), closure.closure_json.as_os_str()]);
                push(&[s("--store-dir"), store, s("--output"), out]);
                match (self.format, self.kind) {
                    ("erofs", ToolKind::StorediskMkfs) => push(&[
                        s("--erofs-writer"),
                        s("mkfs"),
                        s("--mkfs-erofs"),
                        bench.mkfs_erofs.as_os_str(),
                    ]),
                    ("erofs", _) => push(&[s("--erofs-writer"), s("native")]),
                    _ => {}
                }
                for root in &closure.roots {
                    push(&[OsStr::new(root)]);
                }
            }
            ToolKind::Gensquashfs => {
                push(&[s("-c"), s("zstd"), s("-j"), OsStr::new(&jobs)]);
                push(&[s("--all-root"), s("-q"), s("-D"), store, out]);
            }
            ToolKind::Mksquashfs => {
                push(&[
                    store,
                    out,
                    s("-comp"),
                    s("zstd"),
                    s("-all-root"),
                    s("-noappend"),
                ]);
                push(&[s("-no-progress"), s("-processors"), OsStr::new(&jobs)]);
            }
            ToolKind::MkfsErofs => {
                push(&[
                    s("-zlz4hc"),
                    s("-Eztailpacking"),
                    s("-Efragments"),
                    s("-T0"),
                ]);
                push(&[s("--all-root"), s("--quiet"), out, store]);
            }
            ToolKind::MkfsErofsOurFlags => {
                push(&[s("-zlz4hc"), s("-Eztailpacking"), s("-T"), s("0")]);
                push(&[s("--all-root"), s("-x"), s("-1"), s("-L"), s("nix-store")]);
                push(&[s("--quiet"), out, store]);
            }
        }
        argv
    }
}

/// Everything located before measuring.
struct Bench {
    storedisk: PathBuf,
    mkfs_erofs: PathBuf,
    time: PathBuf,
    cores: usize,
    work: PathBuf,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let sizes = match (&args.sizes[..], args.quick) {
        ([], true) => vec![QUICK_SIZE],
        ([], false) => FULL_SIZES.to_vec(),
        (given, _) => given.to_vec(),
    };
    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let json_path = args
        .json
        .clone()
        .unwrap_or_else(|| tools::target_dir().join("bench/bench.json"));
    let bench_dir = tools::target_dir().join("bench");
    std::fs::create_dir_all(&bench_dir)?;

    let time = PathBuf::from("/usr/bin/time");
    if !time.is_file() {
        bail!("/usr/bin/time is missing: install the Debian package `time` (apt-get install time)");
    }
    if !args.no_build {
        Cmd::new("cargo")
            .args(["build", "--release", "--quiet", "-p", "storedisk"])
            .current_dir(tools::workspace_root())
            .timeout(Duration::from_secs(1800))
            .run()?;
    }
    let storedisk = tools::target_dir().join("release/storedisk");
    if !storedisk.is_file() {
        bail!(
            "{} is missing (run without --no-build)",
            storedisk.display()
        );
    }
    let mkfs_erofs = locate_mkfs_erofs()?;
    let need = |name: &str, package: &str| {
        tools::which(name).with_context(|| {
            format!("{name} is not installed (apt package {package}, or `cargo xtask setup`)")
        })
    };
    let bench = Bench {
        storedisk: storedisk.clone(),
        mkfs_erofs: mkfs_erofs.clone(),
        time,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        work: bench_dir.join("work"),
    };
    std::fs::create_dir_all(&bench.work)?;
    let image_tools = vec![
        ImageTool {
            name: "storedisk",
            format: "squashfs",
            ours: true,
            program: storedisk.clone(),
            kind: ToolKind::Storedisk,
        },
        ImageTool {
            name: "gensquashfs",
            format: "squashfs",
            ours: false,
            program: need("gensquashfs", "squashfs-tools-ng")?,
            kind: ToolKind::Gensquashfs,
        },
        ImageTool {
            name: "mksquashfs",
            format: "squashfs",
            ours: false,
            program: need("mksquashfs", "squashfs-tools")?,
            kind: ToolKind::Mksquashfs,
        },
        ImageTool {
            name: "storedisk --erofs-writer native",
            format: "erofs",
            ours: true,
            program: storedisk.clone(),
            kind: ToolKind::Storedisk,
        },
        ImageTool {
            name: "storedisk --no-read-back",
            format: "erofs",
            ours: false,
            program: storedisk.clone(),
            kind: ToolKind::StorediskNoReadBack,
        },
        ImageTool {
            name: "storedisk --erofs-writer mkfs",
            format: "erofs",
            ours: false,
            program: storedisk.clone(),
            kind: ToolKind::StorediskMkfs,
        },
        ImageTool {
            name: "mkfs.erofs",
            format: "erofs",
            ours: false,
            program: mkfs_erofs.clone(),
            kind: ToolKind::MkfsErofs,
        },
        ImageTool {
            name: "mkfs.erofs (our flags)",
            format: "erofs",
            ours: false,
            program: mkfs_erofs.clone(),
            kind: ToolKind::MkfsErofsOurFlags,
        },
    ];

    let load = load_average();
    if load > 0.5 {
        eprintln!(
            "bench: warning: the 1-minute load average is {load:.2}; other work on this machine \
             will distort the numbers"
        );
    }
    let mut results = report::Report::new(bench.cores, runs, args.seed, load, &mkfs_erofs);
    let verify_runs = runs.max(MIN_VERIFY_RUNS);
    results.set_verify_runs(verify_runs);
    let corpus = match (&args.store_dir, &args.closure) {
        (Some(dir), Some(file)) => {
            eprintln!(
                "bench: reading the closure {} in {}",
                file.display(),
                dir.display()
            );
            let closure = corpus::load(dir, file, &bench.work)?;
            results.set_corpus(format!("{} ({})", file.display(), dir.display()));
            Some(closure)
        }
        _ => None,
    };
    let inputs: Vec<u64> = match &corpus {
        Some(closure) => vec![closure.file_bytes],
        None => sizes,
    };
    for &size in &inputs {
        let closure = match &corpus {
            Some(closure) => closure.clone(),
            None => {
                eprintln!(
                    "bench: generating a {} closure (seed {})",
                    size_label(size),
                    args.seed
                );
                closure_gen::generate_cached(size, args.seed, &bench_dir)?
            }
        };
        eprintln!(
            "bench: {} store paths, {} files, {} symlinks, {} of file data, {} of NAR",
            closure.store_paths,
            closure.files,
            closure.symlinks,
            size_label(closure.file_bytes),
            size_label(closure.nar_bytes)
        );
        results.add_closure(size, &closure);
        let mut per_tool: Vec<Vec<RunStats>> = vec![Vec::new(); image_tools.len()];
        for run in 0..runs {
            for (tool, stats) in image_tools.iter().zip(per_tool.iter_mut()) {
                let out = image_path(&bench, tool, size);
                let measured = measure(&bench, tool.argv(&bench, &closure, &out), &out)
                    .with_context(|| format!("{} {} run {}", tool.name, tool.format, run + 1))?;
                eprintln!(
                    "bench: {} {}: {:.2} s wall, {:.2} s CPU, {:.0} MB RSS, {}",
                    tool.name,
                    tool.format,
                    measured.wall_s,
                    measured.cpu_s,
                    measured.max_rss_mb,
                    size_label(measured.image_bytes)
                );
                stats.push(measured);
            }
        }
        let medians: Vec<RunStats> = per_tool.iter().map(|r| RunStats::median(r)).collect();
        for (i, tool) in image_tools.iter().enumerate() {
            results.add_tool(size, tool.name, tool.format, tool.ours, medians[i]);
        }
        for (i, ours) in image_tools.iter().enumerate().filter(|(_, t)| t.ours) {
            for (j, peer) in image_tools.iter().enumerate() {
                if !peer.ours && peer.format == ours.format {
                    results.add_comparison(size, ours.format, peer.name, medians[i], medians[j]);
                }
            }
        }
        verify_images(
            &bench,
            &image_tools,
            size,
            &closure,
            verify_runs,
            &mut results,
        )?;
        if !args.keep_images {
            for tool in &image_tools {
                let image = image_path(&bench, tool, size);
                match std::fs::remove_file(&image) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("removing {}", image.display()));
                    }
                    _ => {}
                }
            }
        }
    }

    results.write(&json_path)?;
    println!("{}", results.table());
    eprintln!(
        "bench: wrote {}, {} and {}",
        json_path.display(),
        json_path.with_extension("md").display(),
        json_path.with_extension("svg").display()
    );
    Ok(())
}

fn image_path(bench: &Bench, tool: &ImageTool, size: u64) -> PathBuf {
    let name: String = tool
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    bench
        .work
        .join(format!("{}-{name}-{}.img", size_label(size), tool.format))
}

/// `storedisk verify --closure` on the image each tool wrote (the last run's), `runs` times.
fn verify_images(
    bench: &Bench,
    image_tools: &[ImageTool],
    size: u64,
    closure: &closure_gen::GeneratedClosure,
    runs: usize,
    results: &mut report::Report,
) -> Result<()> {
    // The image built without the read-back is the same as with it.
    for tool in image_tools
        .iter()
        .filter(|t| !matches!(t.kind, ToolKind::StorediskNoReadBack))
    {
        let image = image_path(bench, tool, size);
        let mut stats = Vec::new();
        'runs: for _ in 0..runs {
            let argv: Vec<OsString> = vec![
                bench.storedisk.clone().into(),
                "verify".into(),
                image.clone().into(),
                "--closure".into(),
                closure.closure_json.clone().into(),
                "--json".into(),
            ];
            match measure_verify(bench, argv) {
                Ok(run) => stats.push(run),
                Err(reason) => {
                    eprintln!(
                        "bench: skipping verify throughput on {} {}: {reason}",
                        tool.name, tool.format
                    );
                    results
                        .verify_skipped(format!("{} {} image: {reason}", tool.name, tool.format));
                    stats.clear();
                    break 'runs;
                }
            }
        }
        if stats.is_empty() {
            continue;
        }
        let median = RunStats::median(&stats);
        let mb_per_s = closure.nar_bytes as f64 / 1e6 / median.wall_s.max(1e-9);
        eprintln!(
            "bench: verify {} {} image: {:.2} s, {mb_per_s:.0} MB/s of NAR, {:.0} MB RSS",
            tool.name, tool.format, median.wall_s, median.max_rss_mb
        );
        results.add_verify(
            size,
            tool.name,
            tool.format,
            closure.nar_bytes,
            median,
            mb_per_s,
        );
    }
    Ok(())
}

/// One verify run, or why verify cannot be measured (not implemented, or findings).
fn measure_verify(bench: &Bench, argv: Vec<OsString>) -> Result<RunStats, String> {
    let stats_file = bench.work.join("verify.time");
    let timed = time_wrapped(bench, argv, &stats_file);
    let finished = timed.run_unchecked().map_err(|e| format!("{e:#}"))?;
    if !finished.success() {
        let said = format!("{}{}", finished.stderr, finished.stdout);
        let line = said
            .lines()
            .find(|l| !l.trim().is_empty() && !l.starts_with("Command exited"))
            .unwrap_or("")
            .trim()
            .to_owned();
        return Err(format!("`storedisk verify` {}: {line}", finished.outcome()));
    }
    parse_time_file(&stats_file, finished.elapsed).map_err(|e| format!("{e:#}"))
}

/// Runs `cmd` under /usr/bin/time; the image it writes at `out` gives the size.
fn measure(bench: &Bench, argv: Vec<OsString>, out: &Path) -> Result<RunStats> {
    let _ = std::fs::remove_file(out);
    let stats_file = bench.work.join("build.time");
    let finished = time_wrapped(bench, argv, &stats_file).run()?;
    let mut stats = parse_time_file(&stats_file, finished.elapsed)?;
    stats.image_bytes = std::fs::metadata(out)
        .with_context(|| format!("{} was not written", out.display()))?
        .len();
    Ok(stats)
}

fn time_wrapped(bench: &Bench, argv: Vec<OsString>, stats_file: &Path) -> Cmd {
    Cmd::new(&bench.time)
        .args(["-f", "%e %U %S %M", "-o"])
        .arg(stats_file)
        .arg("--")
        .args(argv)
        .timeout(Duration::from_secs(3600))
}

/// Reads `/usr/bin/time -f "%e %U %S %M"`'s last line; wall time from our own clock (finer).
fn parse_time_file(path: &Path, elapsed: Duration) -> Result<RunStats> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let line = text.lines().last().unwrap_or("");
    let fields: Vec<f64> = line
        .split_whitespace()
        .map(|f| f.parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("unexpected /usr/bin/time output {line:?}"))?;
    let [_, user_s, sys_s, rss_kb] = fields[..] else {
        bail!("unexpected /usr/bin/time output {line:?}");
    };
    Ok(RunStats {
        wall_s: elapsed.as_secs_f64(),
        user_s,
        sys_s,
        cpu_s: user_s + sys_s,
        max_rss_mb: rss_kb / 1024.0,
        image_bytes: 0,
    })
}

/// mkfs.erofs with `-Efragments` (1.6+): the provisioned one first, then the system's.
fn locate_mkfs_erofs() -> Result<PathBuf> {
    let candidates = [
        tools::tools_dir().join("bin/mkfs.erofs"),
        PathBuf::from("/tmp/prov/bin/mkfs.erofs"),
    ];
    if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
        return Ok(found);
    }
    tools::which("mkfs.erofs").context(
        "mkfs.erofs is not installed: run `cargo xtask setup` (erofs-utils 1.8 for -Efragments)",
    )
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|f| f.parse().ok()))
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_decimal_and_binary_units() {
        assert_eq!(parse_size("100M"), Ok(100_000_000));
        assert_eq!(parse_size("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("0M").is_err());
        assert_eq!(size_label(1_500_000_000), "1.5G");
        assert_eq!(size_label(40_000_000), "40M");
    }

    #[test]
    fn median_takes_the_middle_of_each_field() {
        let run = |wall_s, image_bytes| RunStats {
            wall_s,
            image_bytes,
            ..RunStats::default()
        };
        let m = RunStats::median(&[run(3.0, 10), run(1.0, 30), run(2.0, 20)]);
        assert_eq!((m.wall_s, m.image_bytes), (2.0, 20));
        let m = RunStats::median(&[run(1.0, 10), run(2.0, 20)]);
        assert_eq!(m.wall_s, 1.5);
    }

    #[test]
    fn time_output_is_parsed() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t");
        std::fs::write(
            &file,
            "Command exited with non-zero status 1\n1.50 2.25 0.25 20480\n",
        )
        .unwrap();
        let s = parse_time_file(&file, Duration::from_millis(1500)).unwrap();
        assert_eq!((s.cpu_s, s.max_rss_mb), (2.5, 20.0));
        std::fs::write(&file, "garbage\n").unwrap();
        assert!(parse_time_file(&file, Duration::ZERO).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
