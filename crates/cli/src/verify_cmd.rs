//! `storedisk verify`: gathers the inputs (the image or the layers of a set, closures, Nix
//! database answers), runs the verifier library and prints its report, readable or `--json`.
//! Exit 0 when every check that ran is ok (the text report says `nothing checked` instead of
//! `OK` when none ran), 1 on findings (a `--require`d check that did not run is one), 2 when it
//! could not run (a missing or corrupt image, named).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use storedisk_nix::{Closure, StoreDir, StorePath};
use storedisk_verifier::checks::{ClosureSource, GuestClosure, Runner};
use storedisk_verifier::{
    open_image, CheckName, ImageFile, ImageReader, Layer, Limits, VerifyInputs,
};

use crate::closure_file::{self, NIX};
use crate::nix_db;
use crate::progress::TerminalProgress;
use crate::verify_text;
use crate::EXIT_FINDINGS;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Checks: complete (the closure is in the image), integrity (NAR hashes match), \
self_contained (the image's store path has no references), runner_overlap (the runner does not drag \
guest paths along), policy (runner closure paths match --allow), disjoint (no store path is in two \
layers). A check without its inputs is \
reported as null (not checked), with the flag that would enable it; when no check ran, the report \
says `nothing checked` instead of `OK`. --require makes a check that did not run a finding.\n\n\
Exit status: 0 every check that ran is ok (also when none ran: use --require to fail then), \
1 findings, 2 could not run.\n\n\
Report: the readable one leads with causes: each way into the guest closure (a reference from \
the runner's side, or the image's own references) with the paths and bytes it drags and the fix, \
then the largest leaked paths; --verbose lists every path, --json gives everything.\n\n\
Layers: several IMAGEs are the layers of one store disk (each a squashfs or erofs image of whole \
store paths, all of one format, stacked by the guest with overlayfs). They are checked as one: \
complete, integrity, runner_overlap and policy over the union of their store paths, self_contained \
for each image, disjoint across them. Give --image-path once per IMAGE, in order, or not at all."
)]
pub struct VerifyArgs {
    /// The squashfs or erofs store disk image; several: the layers of one store disk.
    #[arg(value_name = "IMAGE", required = true, num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// The guest closure the image must hold: exportReferencesGraph or `nix path-info --json`
    /// output. Without it, the closure-info registration packed in the image is used, if any.
    #[arg(long, value_name = "FILE")]
    pub closure: Option<PathBuf>,
    /// A directory holding the store paths' files (to show where a runner references a guest
    /// path). Default: the store directory itself when it exists.
    #[arg(long, value_name = "DIR")]
    pub store_dir: Option<PathBuf>,
    /// The image's own store path (default: IMAGE itself when it lies in the Nix store). With
    /// layers, repeat it: one per IMAGE, in order.
    #[arg(long, value_name = "STOREPATH")]
    pub image_path: Vec<String>,
    /// The runner (microvm.nix's `microvm.declaredRunner`); its closure is read from Nix unless
    /// --runner-closure is given.
    #[arg(long, value_name = "STOREPATH")]
    pub runner: Option<String>,
    /// The runner's closure as JSON (exportReferencesGraph, `nix path-info --json -r`); the
    /// runner is its single root unless --runner names it.
    #[arg(long, value_name = "FILE")]
    pub runner_closure: Option<PathBuf>,
    /// A glob over store path names (`glibc-*`) that the runner closure may hold outside the
    /// image; repeatable. Enables the policy check.
    #[arg(long = "allow", value_name = "GLOB")]
    pub allow: Vec<String>,
    /// Checks that must run: a required check whose inputs are missing becomes a finding
    /// (exit 1) instead of `not checked`. Comma-separated or repeated; `all` is every check.
    #[arg(long, value_name = "CHECK", value_enum, value_delimiter = ',')]
    pub require: Vec<RequiredCheck>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// List every path in the readable report (each leaked path with its reference chain):
    /// without it, long lists show their first few entries and how many more there are.
    #[arg(long, short)]
    pub verbose: bool,
}

/// A `--require` value: a check's name as in the report, or `all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RequiredCheck {
    Complete,
    Integrity,
    #[value(name = "self_contained", alias = "self-contained")]
    SelfContained,
    #[value(name = "runner_overlap", alias = "runner-overlap")]
    RunnerOverlap,
    Policy,
    Disjoint,
    All,
}

impl RequiredCheck {
    fn checks(self) -> &'static [CheckName] {
        match self {
            RequiredCheck::Complete => &[CheckName::Complete],
            RequiredCheck::Integrity => &[CheckName::Integrity],
            RequiredCheck::SelfContained => &[CheckName::SelfContained],
            RequiredCheck::RunnerOverlap => &[CheckName::RunnerOverlap],
            RequiredCheck::Policy => &[CheckName::Policy],
            RequiredCheck::Disjoint => &[CheckName::Disjoint],
            RequiredCheck::All => &CheckName::ALL,
        }
    }
}

pub fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let store_dir = StoreDir::default();
    if !args.image_path.is_empty() && args.image_path.len() != args.images.len() {
        anyhow::bail!(
            "--image-path given {} time(s) for {} IMAGE(s): give it once per IMAGE, in order, \
             or not at all",
            args.image_path.len(),
            args.images.len()
        );
    }
    let files = args
        .images
        .iter()
        .map(|image| ImageFile::open(image))
        .collect::<Result<Vec<_>, _>>()?;
    let readers = files
        .iter()
        .map(|file| {
            open_image(file, &Limits::default())
                .with_context(|| format!("{}", file.path().display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut layers = Vec::with_capacity(files.len());
    for (i, (file, reader)) in files.iter().zip(&readers).enumerate() {
        let image_path = match args.image_path.get(i) {
            Some(text) => Some(
                store_dir
                    .parse_path_or_base_name(text)
                    .with_context(|| format!("--image-path {text:?}"))?,
            ),
            None => store_path_containing(file.path(), &store_dir),
        };
        let image_references = image_path.as_ref().map(|p| {
            nix_db::query_references(NIX, &store_dir.display(p), &store_dir)
                .map_err(|e| format!("{e:#}"))
        });
        let reader: &dyn ImageReader = reader.as_ref();
        layers.push(Layer {
            label: file.path().display().to_string(),
            image: file.source(),
            reader,
            image_path,
            image_references,
        });
    }

    let recorded = storedisk_verifier::recorded_closure(&layers, &store_dir)?;
    let registration_path = recorded.as_ref().map(|(path, _)| path.clone());
    let guest = guest_closure(&args, recorded, &store_dir)?;
    let runner = runner(&args, &store_dir)?;
    let physical_store = args
        .store_dir
        .clone()
        .or_else(|| Some(PathBuf::from(store_dir.as_str())).filter(|d| d.is_dir()));

    let inputs = VerifyInputs {
        store_dir: store_dir.clone(),
        guest,
        registration_path,
        runner,
        allow: args.allow.clone(),
        physical_store,
    };
    let progress = TerminalProgress::stderr();
    progress.phase("verifying", storedisk_verifier::progress_total(&layers));
    let report = storedisk_verifier::verify(&layers, &inputs, &|n| progress.advance(n));
    progress.finish();
    let mut report = report?;
    let required: Vec<CheckName> = args
        .require
        .iter()
        .flat_map(|r| r.checks().iter().copied())
        .collect();
    report.require(&required);

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let ways_in = storedisk_verifier::ways_in(&report, &inputs, &layers);
        print!("{}", verify_text::render(&report, &ways_in, args.verbose));
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FINDINGS)
    })
}

/// `--closure`, else the registration packed in the image (its roots' closure from the Nix
/// database when Nix knows them, else the registration itself).
fn guest_closure(
    args: &VerifyArgs,
    recorded: Option<(StorePath, Closure)>,
    store_dir: &StoreDir,
) -> anyhow::Result<Option<GuestClosure>> {
    if let Some(file) = &args.closure {
        return Ok(Some(GuestClosure {
            closure: closure_file::load(file, None, store_dir)?,
            source: ClosureSource::File,
        }));
    }
    let Some((_, recorded)) = recorded else {
        return Ok(None);
    };
    let roots: Vec<String> = recorded
        .roots()
        .iter()
        .map(|r| store_dir.display(r))
        .collect();
    if let Ok(closure) = nix_db::query_closure(NIX, &roots, store_dir) {
        return Ok(Some(GuestClosure {
            closure,
            source: ClosureSource::NixDb,
        }));
    }
    Ok(Some(GuestClosure {
        closure: recorded,
        source: ClosureSource::ImageRegistration,
    }))
}

fn runner(args: &VerifyArgs, store_dir: &StoreDir) -> anyhow::Result<Option<Runner>> {
    let named = args
        .runner
        .as_deref()
        .map(|r| store_dir.parse_path_or_base_name(r).context("--runner"))
        .transpose()?;
    let closure = match (&args.runner_closure, &named) {
        (Some(file), _) => closure_file::load(file, None, store_dir)?,
        (None, Some(runner)) => {
            nix_db::query_closure(NIX, &[store_dir.display(runner)], store_dir)?
        }
        (None, None) => return Ok(None),
    };
    let runner = Runner::from_closure(closure, named)
        .context("the runner (name it with --runner STOREPATH)")?;
    Ok(Some(runner))
}

/// The store path IMAGE lies in, when it is under the store directory (the image file itself
/// or a file inside a store path directory), symlinks followed: `./result` is a store path.
fn store_path_containing(image: &Path, store_dir: &StoreDir) -> Option<StorePath> {
    let absolute = std::fs::canonicalize(image).ok()?;
    let rest = absolute.strip_prefix(store_dir.as_str()).ok()?;
    let first = rest.components().next()?;
    StorePath::from_base_name(first.as_os_str().to_str()?).ok()
}
