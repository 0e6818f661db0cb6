//! `storedisk closure-info`: writes nixpkgs closureInfo's three files (`registration`,
//! `store-paths`, `total-nar-size`) from a closure file, so fixture derivations need neither jq
//! nor nixpkgs. The output directory appears complete or not at all.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use storedisk_nix::registration::closure_info;
use storedisk_nix::StoreDir;

use crate::closure_file;

/// Write closureInfo's files (registration, store-paths, total-nar-size) for a closure, exactly
/// as nixpkgs' `closureInfo` renders them from exportReferencesGraph.
#[derive(Debug, clap::Args)]
pub struct ClosureInfoArgs {
    /// The closure: exportReferencesGraph / `nix path-info --json` JSON or registration text.
    #[arg(long, value_name = "FILE")]
    closure: PathBuf,

    /// The attribute of a structured-attrs JSON file that holds the closure.
    #[arg(long, value_name = "KEY")]
    closure_key: Option<String>,

    /// The directory to create (it may exist only if empty).
    #[arg(long, short, value_name = "DIR")]
    output: PathBuf,
}

pub fn run(args: ClosureInfoArgs) -> anyhow::Result<ExitCode> {
    let closure = closure_file::load(
        &args.closure,
        args.closure_key.as_deref(),
        &StoreDir::default(),
    )?;
    let files = closure_info(&closure)
        .with_context(|| format!("closure file {}", args.closure.display()))?;

    let output = &args.output;
    if let Ok(meta) = fs::symlink_metadata(output) {
        if !meta.is_dir() {
            bail!("{} exists and is not a directory", output.display());
        }
        let mut entries = fs::read_dir(output)
            .with_context(|| format!("cannot read the directory {}", output.display()))?;
        if entries.next().is_some() {
            bail!("{} exists and is not empty", output.display());
        }
    }
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
    for (file, contents) in [
        ("registration", &files.registration),
        ("store-paths", &files.store_paths),
        ("total-nar-size", &files.total_nar_size),
    ] {
        let path = temp.path().join(file);
        fs::write(&path, contents)
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o644)))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot set the mode of {}", temp.path().display()))?;
    // Renaming over an empty directory replaces it; the temp dir is removed if this fails.
    fs::rename(temp.path(), output)
        .with_context(|| format!("cannot move the result to {}", output.display()))?;
    let _ = temp.keep();
    println!(
        "wrote closure info for {} store paths to {}",
        closure.len(),
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}
