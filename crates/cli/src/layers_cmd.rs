//! `storedisk layers`: the layer plan of a closure (which store path goes to which layer of a
//! layered store disk) as a table or `--json`, without building anything. The Nix side
//! (nix/lib.nix) reads the JSON to make each layer its own derivation.

use std::process::ExitCode;

use anyhow::Context as _;
use storedisk_builder::layers::{plan_layers, SMALL_PATH_BYTES};
use storedisk_verifier::report::human_bytes;

use crate::build_cmd::{with_nar_sizes, ClosureArgs};

/// Split a closure into exactly N layers (a layer may be empty: the layers, hence a guest's
/// disks, depend on N alone). The last layer, `top`, holds the ROOTs and every
/// path whose closure holds more than half of the closure's paths (the toplevel and its
/// aggregates, which change with any update); `small` holds the other paths under 64 KiB of NAR
/// (configuration, scripts, wrappers); every other path goes to one of N-2 buckets `layer-NN`
/// picked by a hash of its name without version, so a path keeps its layer across updates and
/// guests with a common base share the buckets their own paths do not fall into.
#[derive(Debug, clap::Args)]
pub struct LayersArgs {
    /// How many layers to make (2 to 20).
    #[arg(long, value_name = "N")]
    layers: usize,

    #[command(flatten)]
    source: ClosureArgs,

    /// Print the plan as JSON (`requested`, and per layer `name`, `kind`, `nar_bytes`, `paths`).
    #[arg(long)]
    json: bool,
}

pub fn run(args: LayersArgs) -> anyhow::Result<ExitCode> {
    let (roots, closure) = args.source.load(false)?;
    let closure = with_nar_sizes(closure, &args.source.store_dir)?;
    let plan = plan_layers(&closure, &roots.into_iter().collect(), args.layers)
        .context("planning the layers")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<10} {:>6} {:>12}  kind", "layer", "paths", "NAR bytes");
    for layer in &plan.layers {
        println!(
            "{:<10} {:>6} {:>12}  {}",
            layer.name,
            layer.paths.len(),
            human_bytes(layer.nar_bytes),
            match layer.kind {
                storedisk_builder::layers::LayerKind::Bucket => "bucket (by name)".to_owned(),
                storedisk_builder::layers::LayerKind::Small =>
                    format!("small (< {})", human_bytes(SMALL_PATH_BYTES)),
                storedisk_builder::layers::LayerKind::Top => "top (roots and spine)".to_owned(),
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
