//! `storedisk build`: parses flags, finds the closure of the ROOTs (from `--closure` or by
//! asking Nix), hands it to `storedisk_builder::build_image` and prints the one-line summary (or
//! JSON).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use storedisk_builder::layers::{build_layers, manifest_json, plan_layers, MANIFEST_NAME};
use storedisk_builder::{
    build_image_checked, BuildOptions, BuildReport, Compression, ErofsWriter, ImageFormat,
};
use storedisk_nix::{Closure, PathInfo, StoreDir, StorePath};
use storedisk_verifier::report::human_bytes;
use storedisk_verifier::{ReadBackDiff, ReadBackError};

use crate::closure_file;
use crate::progress::TerminalProgress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    Squashfs,
    Erofs,
}

impl From<FormatArg> for ImageFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Squashfs => ImageFormat::Squashfs,
            FormatArg::Erofs => ImageFormat::Erofs,
        }
    }
}

/// Which program writes erofs images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ErofsWriterArg {
    /// storedisk's own writer: lz4hc, lz4 or none, tail packing, fragments, identical files
    /// stored once.
    Native,
    /// erofs-utils' mkfs.erofs: also zstd, lzma and deflate.
    Mkfs,
}

impl From<ErofsWriterArg> for ErofsWriter {
    fn from(w: ErofsWriterArg) -> Self {
        match w {
            ErofsWriterArg::Native => ErofsWriter::Native,
            ErofsWriterArg::Mkfs => ErofsWriter::Mkfs,
        }
    }
}

/// Pack the closure of ROOTs into one store disk image: each store path at the image root under
/// its base name, root:root, fixed times, the store's permissions, byte-identical on every run.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Image format.
    #[arg(long, value_enum)]
    format: FormatArg,

    /// Compression. squashfs: zstd (default), xz, gzip, lz4. erofs: lz4hc (default), lz4,
    /// none, and with --erofs-writer mkfs zstd, lzma, deflate when the installed mkfs.erofs
    /// has them.
    #[arg(long, value_parser = parse_compression)]
    compression: Option<Compression>,

    /// Compression level (default: zstd 15, xz 6, gzip 9 for squashfs; lz4hc 9 for erofs,
    /// mkfs.erofs's default with --erofs-writer mkfs).
    #[arg(long)]
    compression_level: Option<u32>,

    #[command(flatten)]
    source: ClosureArgs,

    /// Who writes erofs images: storedisk itself (native), or mkfs.erofs (mkfs), which also
    /// does zstd, lzma and deflate.
    #[arg(long, value_enum, value_name = "WRITER", default_value = "native")]
    erofs_writer: ErofsWriterArg,

    /// The mkfs.erofs to run for erofs images with --erofs-writer mkfs.
    #[arg(long, value_name = "PATH", env = "STOREDISK_MKFS_EROFS")]
    mkfs_erofs: Option<PathBuf>,

    /// The image file to write (replaced atomically when the build succeeds); with --layers, the
    /// directory to write the layers and their layers.json into.
    #[arg(long, short, value_name = "FILE")]
    output: PathBuf,

    /// Split the closure into exactly N images (layers, some possibly empty) that together hold
    /// it, each a complete image of whole store paths, assigned so that unchanged paths keep
    /// their layer across updates (see `storedisk layers --help`). --output is then a directory.
    #[arg(long, value_name = "N", conflicts_with = "exact")]
    layers: Option<usize>,

    /// Pack exactly the ROOTs, not their closure: one layer of a layered store disk built on
    /// its own (their references may lie in other layers). With --closure, the ROOTs' NAR hashes
    /// come from it.
    #[arg(long)]
    exact: bool,

    /// Pack the tails of compressed files inline (-Eztailpacking; default true, with mkfs.erofs
    /// when the installed one has it); false for guest kernels older than 5.16, which cannot
    /// mount tail-packed images (microvm.nix passes the flag only for 5.16 and newer).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    erofs_ztailpacking: bool,

    /// Pack the ends of compressed files together into erofs's packed inode (-Efragments, as
    /// microvm.nix does for guest kernels 6.1 and newer, which can mount such images): smaller
    /// images. The native writer does it itself; with --erofs-writer mkfs it passes
    /// -Efragments, which with -Eztailpacking makes erofs-utils 1.8.6 and 1.9.4 write wrong
    /// file data for some inputs (the read-back check catches it). Off by default.
    #[arg(long)]
    erofs_fragments: bool,

    /// Compression threads for squashfs and native erofs (default: one per core); the image is
    /// the same for any number.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    /// Skip reading the finished image back (NAR hash of every store path compared with the
    /// closure) before it replaces FILE.
    #[arg(long)]
    no_read_back: bool,

    /// Print the build report as JSON on stdout instead of the summary line.
    #[arg(long)]
    json: bool,
}

/// Where a closure comes from: shared by `build` and `layers`.
#[derive(Debug, clap::Args)]
pub struct ClosureArgs {
    /// The closure, as exportReferencesGraph / `nix path-info --json` JSON or registration text.
    /// Without it, Nix is asked (`nix path-info --json --recursive`).
    #[arg(long, value_name = "FILE")]
    closure: Option<PathBuf>,

    /// The attribute of a structured-attrs JSON file that holds the closure.
    #[arg(long, value_name = "KEY", requires = "closure")]
    closure_key: Option<String>,

    /// Where the store paths physically are; names in the image keep /nix/store.
    #[arg(long, value_name = "DIR", default_value = "/nix/store")]
    pub store_dir: PathBuf,

    /// Store paths whose closure to pack: `/nix/store/<hash>-<name>` or `<hash>-<name>`. At
    /// least one, except with `build --exact`, where none gives an empty image (an empty layer).
    #[arg(value_name = "ROOT")]
    roots: Vec<String>,
}

impl ClosureArgs {
    /// The roots and their closure. `exact`: the roots alone (references leaving them
    /// dropped); without --closure the paths are then taken as they are, without asking Nix.
    pub fn load(&self, exact: bool) -> anyhow::Result<(Vec<StorePath>, Closure)> {
        if self.roots.is_empty() && !exact {
            anyhow::bail!(
                "no ROOT given: name the store paths whose closure to pack (only `build --exact` \
                 takes none, for an empty image)"
            );
        }
        let logical = StoreDir::default();
        let roots = self
            .roots
            .iter()
            .map(|r| parse_root(r, &logical, &self.store_dir))
            .collect::<anyhow::Result<Vec<StorePath>>>()?;
        let from_file = || match &self.closure {
            Some(file) => closure_file::load(file, self.closure_key.as_deref(), &logical),
            None => closure_file::from_nix(&roots, &logical),
        };
        let not_in = || match &self.closure {
            Some(file) => format!("a ROOT is not in the closure in {}", file.display()),
            None => "a ROOT is not in the closure Nix reported".to_owned(),
        };
        let closure = if exact {
            let wanted: BTreeSet<StorePath> = roots.iter().cloned().collect();
            match &self.closure {
                Some(_) => from_file()?.subset(&wanted).with_context(not_in)?,
                None => Closure::new(
                    logical.clone(),
                    wanted.into_iter().map(PathInfo::new).collect(),
                )?,
            }
        } else {
            from_file()?
                .restrict_to(roots.iter().cloned())
                .with_context(not_in)?
        };
        Ok((roots, closure))
    }
}

fn parse_compression(text: &str) -> Result<Compression, String> {
    text.parse()
}

pub fn run(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let (roots, closure) = args.source.load(args.exact)?;
    let store_dir = &args.source.store_dir;
    let mut options = BuildOptions::new(args.format.into());
    options.compression = args.compression;
    options.compression_level = args.compression_level;
    options.store_dir = store_dir.clone();
    options.erofs_ztailpacking = args.erofs_ztailpacking;
    options.erofs_fragments = args.erofs_fragments;
    options.erofs_writer = args.erofs_writer.into();
    options.threads = args.threads;
    if let Some(mkfs) = &args.mkfs_erofs {
        options.mkfs_erofs = mkfs.clone();
    }

    let progress = TerminalProgress::stderr();
    // The read-back's full difference, kept for --json; the error message names the first few.
    let differs: RefCell<Option<ReadBackDiff>> = RefCell::new(None);
    let read_back = |image: &Path, closure: &Closure| {
        if args.no_read_back {
            return Ok(());
        }
        let check = TerminalProgress::stderr();
        check.phase(
            "read-back",
            closure.nar_size_of(closure.iter().map(|i| &i.path)),
        );
        let advance = |n| check.advance(n);
        let result = storedisk_verifier::read_back(image, closure, store_dir, &advance);
        check.finish();
        match result {
            Ok(()) => Ok(()),
            Err(ReadBackError::Unreadable(why)) => Err(why),
            Err(ReadBackError::Differs(diff)) => {
                let text = read_back_text(&diff);
                *differs.borrow_mut() = Some(diff);
                Err(text)
            }
        }
    };
    let built = build(&args, roots, closure, &options, &progress, &read_back);
    if let (Err(err), true, Some(diff)) = (&built, args.json, differs.take()) {
        let failure = serde_json::json!({ "error": format!("{err:#}"), "read_back": diff });
        println!("{failure:#}");
    }
    built
}

/// Builds the image, or the layers, and prints the summary (or JSON).
fn build(
    args: &BuildArgs,
    roots: Vec<StorePath>,
    closure: Closure,
    options: &BuildOptions,
    progress: &TerminalProgress,
    read_back: &dyn Fn(&Path, &Closure) -> Result<(), String>,
) -> anyhow::Result<ExitCode> {
    let store_dir = &args.source.store_dir;
    if let Some(count) = args.layers {
        let closure = with_nar_sizes(closure, store_dir)?;
        let roots = roots.into_iter().collect();
        let plan = plan_layers(&closure, &roots, count)?;
        let built = build_layers(&closure, &plan, options, &args.output, progress, read_back)
            .with_context(|| format!("building the layers in {}", args.output.display()))?;
        if args.json {
            println!("{:#}", manifest_json(&plan, options, &built));
        } else {
            for layer in &built {
                let path = args.output.join(&layer.image);
                println!("{}", summary_line(&layer.report, &path));
            }
            println!(
                "{} layers in {} ({} total), manifest {}",
                built.len(),
                args.output.display(),
                human_bytes(built.iter().map(|b| b.report.image_bytes).sum()),
                args.output.join(MANIFEST_NAME).display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let report = build_image_checked(&closure, options, &args.output, progress, &|image| {
        read_back(image, &closure)
    })
    .with_context(|| format!("building {}", args.output.display()))?;

    if args.json {
        println!("{}", report_json(&report, &args.output));
    } else {
        println!("{}", summary_line(&report, &args.output));
    }
    Ok(ExitCode::SUCCESS)
}

/// How many paths read back wrong, of which kind, and the first few of them: a closure of
/// thousands of paths read back against the wrong store would otherwise be one line per path.
fn read_back_text(diff: &ReadBackDiff) -> String {
    const SHOWN: usize = 3;
    let kinds = [
        (diff.missing.len(), "missing"),
        (diff.extra.len(), "not in the closure"),
        (diff.mismatched.len(), "with other contents"),
        (diff.invalid_entries.len(), "not store paths"),
    ];
    let counts: Vec<String> = kinds
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, kind)| format!("{n} {kind}"))
        .collect();
    let problems = diff
        .missing
        .iter()
        .map(|p| format!("{p} is missing"))
        .chain(
            diff.extra
                .iter()
                .map(|p| format!("{p} is not in the closure")),
        )
        .chain(diff.mismatched.iter().map(|m| {
            format!(
                "{} reads back with NAR hash {} ({} bytes), not {} ({} bytes)",
                m.path,
                m.actual,
                m.actual_size,
                m.expected,
                m.expected_size.map_or("?".to_owned(), |s| s.to_string())
            )
        }))
        .chain(
            diff.invalid_entries
                .iter()
                .map(|e| format!("root entry {:?}: {}", e.name, e.why)),
        );
    let mut text = format!(
        "{} path(s) differ from the closure of {} ({}): ",
        diff.count(),
        diff.closure_paths,
        counts.join(", ")
    );
    text.push_str(&problems.take(SHOWN).collect::<Vec<_>>().join("; "));
    if diff.count() > SHOWN {
        text.push_str(&format!(
            "; and {} more (--json lists them all)",
            diff.count() - SHOWN
        ));
    }
    text
}

/// A ROOT as a store path: a full logical path, a base name, or a path under `--store-dir`.
fn parse_root(text: &str, logical: &StoreDir, physical_dir: &Path) -> anyhow::Result<StorePath> {
    let under_physical = Path::new(text)
        .strip_prefix(physical_dir)
        .ok()
        .filter(|rest| rest.components().count() == 1)
        .and_then(|rest| rest.to_str());
    let parsed = match under_physical {
        Some(base) if physical_dir != Path::new(logical.as_str()) => {
            StorePath::from_base_name(base)
        }
        _ => logical.parse_path_or_base_name(text),
    };
    parsed.with_context(|| format!("ROOT {text:?}"))
}

/// `closure` with every missing NAR size (registration text has none) measured from the files
/// under `store_dir`.
pub fn with_nar_sizes(mut closure: Closure, store_dir: &Path) -> anyhow::Result<Closure> {
    let unsized_paths: Vec<StorePath> = closure
        .iter()
        .filter(|i| i.nar_size.is_none())
        .map(|i| i.path.clone())
        .collect();
    for path in unsized_paths {
        let physical = closure.store_dir.physical(store_dir, &path);
        let (hash, size) = storedisk_nix::nar::hash_path(&physical)
            .with_context(|| format!("measuring the NAR of {}", physical.display()))?;
        closure.set_nar_hash(&path, hash, size);
    }
    Ok(closure)
}

fn report_json(report: &BuildReport, output: &Path) -> serde_json::Value {
    serde_json::json!({
        "output": output.display().to_string(),
        "format": report.format.name(),
        "compression": report.compression.name(),
        "compression_level": report.compression_level,
        "store_paths": report.store_paths,
        "directories": report.directories,
        "regular_files": report.regular_files,
        "symlinks": report.symlinks,
        "hard_links": report.hard_links,
        "file_bytes": report.file_bytes,
        "image_bytes": report.image_bytes,
        "tool": report.tool,
    })
}

fn summary_line(report: &BuildReport, output: &Path) -> String {
    let level = report
        .compression_level
        .map(|l| format!(" level {l}"))
        .unwrap_or_default();
    let tool = report
        .tool
        .as_ref()
        .map(|t| format!(", by {t}"))
        .unwrap_or_default();
    format!(
        "built {} ({} {}{level}{tool}): {} store paths, {} files, {} directories, {} symlinks, {} of file data -> {}",
        output.display(),
        report.format,
        report.compression,
        report.store_paths,
        report.regular_files,
        report.directories,
        report.symlinks,
        human_bytes(report.file_bytes),
        human_bytes(report.image_bytes),
    )
}
