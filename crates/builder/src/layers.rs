//! Layered store disks: one closure split into exactly N disjoint images ("layers"), each a
//! complete image of whole store paths, which the guest stacks (overlayfs lower layers) as its
//! store. An update then copies only the layers whose contents changed, and guests built from
//! the same base share the layers that hold it byte for byte.
//!
//! [`plan_layers`] decides which path goes where, from the closure alone (no file is read);
//! [`build_layers`] writes every layer with the ordinary image writer and a `layers.json`
//! manifest into a directory that appears only complete. The algorithm and its trade-offs are
//! described in ARCHITECTURE.md ("Layered store disks").
//!
//! The assignment, for N layers (always all N, in this order; a layer may be empty, so the number
//! of images, hence of the guest's disks and mounts, follows from N alone and never from the
//! closure: a NixOS configuration can declare them before the closure exists):
//! - **top** (always the last): the roots and the *spine*, every path whose closure holds more
//!   than half of the closure's paths (the toplevel, the closure info, manifests and other
//!   aggregates): they change with any change below them, so they are kept together and small.
//! - **small** (N >= 3): every other path under [`SMALL_PATH_BYTES`] of NAR: configuration files,
//!   scripts, wrappers, units, the paths a configuration change rewrites most often.
//! - **layer-00 .. layer-(N-3)** (N - 2 buckets; with N = 2 one bucket that also takes the small
//!   paths): every other path, in the bucket chosen by a hash of its name *without its version*
//!   (`builtins.parseDrvName`), so a path keeps its layer as long as it exists and even across a
//!   version bump; only when two paths of the closure share a name without version does the
//!   full name decide. A bucket's contents therefore depend only on which paths hash to it, not
//!   on the rest of the closure: guests with a common base differ only in the buckets their own
//!   paths fall into.
//!
//! Every choice depends on the reference graph, the names and the NAR sizes only: the same
//! closure gives the same layers on every machine.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use storedisk_nix::{Closure, StorePath};

use crate::output::{self, StagingDir};
use crate::{build_image_checked, BuildError, BuildOptions, BuildReport, ProgressSink};

/// The fewest layers `--layers` accepts: one for the top, one for the rest.
pub const MIN_LAYERS: usize = 2;
/// The most: each layer is one virtio disk, and QEMU's `microvm` machine has 24 virtio-mmio
/// transports (fewer would be left for the guest's other devices).
pub const MAX_LAYERS: usize = 20;
/// Paths with a NAR smaller than this (and not in the spine) go to the `small` layer.
pub const SMALL_PATH_BYTES: u64 = 64 * 1024;
/// The manifest a layered build writes beside its images.
pub const MANIFEST_NAME: &str = "layers.json";

/// Which rule put a path in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// Paths hashed by name into bucket `n`.
    Bucket,
    /// Small paths.
    Small,
    /// The roots and the spine.
    Top,
}

/// One layer of a plan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Layer {
    /// `layer-NN`, `small` or `top`: stable across closures, so it can name the image.
    pub name: String,
    pub kind: LayerKind,
    /// NAR bytes of the layer's paths.
    pub nar_bytes: u64,
    /// Full store paths, sorted.
    pub paths: Vec<String>,
    #[serde(skip)]
    pub store_paths: BTreeSet<StorePath>,
}

/// Where each path of a closure goes: exactly N layers, buckets first, `top` last.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerPlan {
    /// The N asked for: the number of layers (some may be empty).
    pub requested: usize,
    pub layers: Vec<Layer>,
}

/// Why a closure could not be split.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{count} layers asked for: give between {MIN_LAYERS} and {MAX_LAYERS}")]
    Count { count: usize },
    #[error("the closure records no NAR size for {path}, which the layer assignment needs")]
    UnknownSize { path: String },
    #[error("root {path} is not in the closure")]
    RootNotInClosure { path: String },
}

/// Splits `closure` (the closure of `roots`) into exactly `count` layers (see the module
/// documentation for the rules), named by [`layer_names`].
pub fn plan_layers(
    closure: &Closure,
    roots: &BTreeSet<StorePath>,
    count: usize,
) -> Result<LayerPlan, LayerError> {
    if !(MIN_LAYERS..=MAX_LAYERS).contains(&count) {
        return Err(LayerError::Count { count });
    }
    if let Some(root) = roots.iter().find(|r| !closure.contains(r)) {
        return Err(LayerError::RootNotInClosure {
            path: closure.display(root),
        });
    }
    let size_of = |p: &StorePath| {
        closure
            .get(p)
            .and_then(|i| i.nar_size)
            .ok_or_else(|| LayerError::UnknownSize {
                path: closure.display(p),
            })
    };
    let requisites = closure.requisite_counts();
    let total = closure.len();
    let in_top = |p: &StorePath| roots.contains(p) || 2 * requisites[p] > total;
    let buckets = if count == MIN_LAYERS { 1 } else { count - 2 };

    let mut top = BTreeSet::new();
    let mut small = BTreeSet::new();
    let mut bucketed = Vec::new();
    for info in closure.iter() {
        let path = &info.path;
        if in_top(path) {
            top.insert(path.clone());
        } else if count > MIN_LAYERS && size_of(path)? < SMALL_PATH_BYTES {
            small.insert(path.clone());
        } else {
            bucketed.push(path.clone());
        }
    }
    // The name without version decides, unless two bucketed paths share it.
    let mut pname_users: BTreeMap<&str, usize> = BTreeMap::new();
    for path in &bucketed {
        *pname_users.entry(path.pname()).or_default() += 1;
    }
    let mut by_bucket: BTreeMap<u64, BTreeSet<StorePath>> = BTreeMap::new();
    for path in &bucketed {
        let key = if pname_users[path.pname()] > 1 {
            path.name()
        } else {
            path.pname()
        };
        by_bucket
            .entry(bucket_of(key, buckets as u64))
            .or_default()
            .insert(path.clone());
    }

    let mut layers = Vec::new();
    let mut push = |name: String, kind: LayerKind, paths: BTreeSet<StorePath>| {
        let nar_bytes = paths.iter().map(size_of).sum::<Result<u64, LayerError>>()?;
        layers.push(Layer {
            name,
            kind,
            nar_bytes,
            paths: paths.iter().map(|p| closure.display(p)).collect(),
            store_paths: paths,
        });
        Ok(())
    };
    for bucket in 0..buckets as u64 {
        let paths = by_bucket.remove(&bucket).unwrap_or_default();
        push(bucket_name(bucket), LayerKind::Bucket, paths)?;
    }
    if count > MIN_LAYERS {
        push("small".to_owned(), LayerKind::Small, small)?;
    }
    push("top".to_owned(), LayerKind::Top, top)?;
    debug_assert_eq!(
        layers.iter().map(|l| l.name.clone()).collect::<Vec<_>>(),
        layer_names(count)
    );
    Ok(LayerPlan {
        requested: count,
        layers,
    })
}

/// The names of the `count` layers of a plan, in order: `layer-00` .. `layer-(N-3)`, `small`,
/// `top` (with N = 2: `layer-00`, `top`). They depend on N alone, which is what lets a guest
/// configuration name its disks before the closure is known (nix/lib.nix computes the same).
pub fn layer_names(count: usize) -> Vec<String> {
    let buckets = if count <= MIN_LAYERS { 1 } else { count - 2 };
    let mut names: Vec<String> = (0..buckets as u64).map(bucket_name).collect();
    if count > MIN_LAYERS {
        names.push("small".to_owned());
    }
    names.push("top".to_owned());
    names
}

fn bucket_name(bucket: u64) -> String {
    format!("layer-{bucket:02}")
}

/// The bucket of a name: the first 8 bytes of its SHA-256, modulo the bucket count (the same
/// on every machine, unlike the standard library's hasher).
fn bucket_of(key: &str, buckets: u64) -> u64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) % buckets
}

/// One built layer: its plan entry, the image's file name in the output directory, and what
/// the image writer reported.
#[derive(Debug, Clone)]
pub struct BuiltLayer {
    pub layer: Layer,
    pub image: String,
    pub report: BuildReport,
}

/// Builds every layer of `plan` into `output` (a directory: `<name>.<format>` per layer and
/// [`MANIFEST_NAME`]). The directory is assembled beside `output` and renamed into place when
/// every image is written and read back (`read_back` gets each image and the closure of that
/// layer's paths); an existing `output` is replaced only when it is an earlier layered build
/// (it holds a `layers.json`), so no other directory is ever deleted. The staging directory
/// (`.NAME.XXXX.tmp`) holds a locked marker; a build killed before its end leaves it, and the
/// next build into the same parent removes it ([`output::sweep_stale`]): only directories so
/// named with a marker whose lock is free, never a user's or a live concurrent build's.
pub fn build_layers(
    closure: &Closure,
    plan: &LayerPlan,
    options: &BuildOptions,
    output: &Path,
    progress: &dyn ProgressSink,
    read_back: &dyn Fn(&Path, &Closure) -> Result<(), String>,
) -> Result<Vec<BuiltLayer>, BuildError> {
    let write_err = |path: &Path, source| BuildError::Write {
        path: path.to_owned(),
        cause: source,
    };
    if output.exists() && !output.join(MANIFEST_NAME).is_file() {
        return Err(write_err(
            output,
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "it exists and is not an earlier layered build (no {MANIFEST_NAME} in it); \
                     give a new directory"
                ),
            ),
        ));
    }
    let parent = match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A killed earlier build left its staging directory: remove it (only ours, only dead ones).
    let (prefix, suffix) = (format!(".{name}."), ".tmp");
    output::sweep_stale(&parent, &prefix, suffix);
    // `.NAME.XXXX.tmp/` holds the marker and `NAME/`, the directory that becomes `output`; the
    // whole staging directory is removed on error, and after the swap with the old output.
    let staging = StagingDir::create(&parent, &prefix, suffix).map_err(|e| write_err(output, e))?;
    let staged = staging.path().join(&name);
    fs::create_dir(&staged).map_err(|e| write_err(&staged, e))?;

    let mut built = Vec::new();
    for layer in &plan.layers {
        let image = format!("{}.{}", layer.name, options.format);
        let subset = closure
            .subset(&layer.store_paths)
            .map_err(|e| BuildError::Tool {
                tool: "layer plan".to_owned(),
                message: e.to_string(),
            })?;
        progress.phase(&format!("layer {}", layer.name), 0);
        let report =
            build_image_checked(&subset, options, &staged.join(&image), progress, &|path| {
                read_back(path, &subset)
            })?;
        built.push(BuiltLayer {
            layer: layer.clone(),
            image,
            report,
        });
    }
    let manifest = manifest_json(plan, options, &built);
    let manifest_path = staged.join(MANIFEST_NAME);
    fs::write(&manifest_path, format!("{manifest:#}\n"))
        .map_err(|e| write_err(&manifest_path, e))?;
    set_dir_mode(&staged).map_err(|e| write_err(&staged, e))?;
    replace_dir(&staged, output).map_err(|e| write_err(output, e))?;
    // Removes the marker and, after a swap, the previous build.
    drop(staging);
    Ok(built)
}

/// Moves the complete directory `staged` to `output`. An existing `output` is swapped with it in
/// one `renameat2(RENAME_EXCHANGE)`, so `output` is at every moment the old build or the new
/// one, and the old one ends up at `staged`. Where the file system cannot swap, the old build
/// is first moved to `staged`'s sibling `NAME.previous` (a SIGKILL between the two renames then
/// leaves no `output`, and the old build in the staging directory).
fn replace_dir(staged: &Path, output: &Path) -> io::Result<()> {
    if fs::symlink_metadata(output).is_err() {
        match fs::rename(staged, output) {
            // A concurrent build got there first: its build is replaced like an earlier one.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::AlreadyExists
                ) => {}
            done => return done,
        }
    }
    // Checked again here: `output` may have appeared since the build began.
    if !output.join(MANIFEST_NAME).is_file() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("it is not an earlier layered build (no {MANIFEST_NAME} in it)"),
        ));
    }
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        match renameat_with(CWD, staged, CWD, output, RenameFlags::EXCHANGE) {
            Ok(()) => return Ok(()),
            Err(e)
                if e == rustix::io::Errno::INVAL
                    || e == rustix::io::Errno::NOSYS
                    || e == rustix::io::Errno::OPNOTSUPP => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut previous = staged.as_os_str().to_owned();
    previous.push(".previous");
    let previous = PathBuf::from(previous);
    fs::rename(output, &previous)?;
    fs::rename(staged, output)
}

fn set_dir_mode(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
}

/// The `layers.json` of a build: the plan, with each layer's image file and size.
#[derive(serde::Serialize)]
struct Manifest<'a> {
    requested: usize,
    format: &'static str,
    layers: Vec<ManifestLayer<'a>>,
}

#[derive(serde::Serialize)]
struct ManifestLayer<'a> {
    #[serde(flatten)]
    layer: &'a Layer,
    image: &'a str,
    image_bytes: u64,
}

/// `layers.json` of the layers `built` from `plan` (every layer of it, in its order).
pub fn manifest_json(
    plan: &LayerPlan,
    options: &BuildOptions,
    built: &[BuiltLayer],
) -> serde_json::Value {
    let manifest = Manifest {
        requested: plan.requested,
        format: options.format.name(),
        layers: built
            .iter()
            .map(|b| ManifestLayer {
                layer: &b.layer,
                image: &b.image,
                image_bytes: b.report.image_bytes,
            })
            .collect(),
    };
    // Plain strings and numbers: serializing them cannot fail.
    serde_json::to_value(manifest).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use storedisk_nix::{PathInfo, StoreDir};

    fn sp(name: &str) -> StorePath {
        let hash = storedisk_nix::base32::encode(&Sha256::digest(name.as_bytes())[..20]);
        StoreDir::default()
            .parse_path(&format!("/nix/store/{hash}-{name}"))
            .unwrap()
    }

    /// A guest-shaped closure: `toplevel` -> `manifest` -> every package; packages reference
    /// `glibc`; `hello` references `greeting`. Sizes: `(name, nar_size, references)`.
    fn closure(guest: &str, packages: &[(&str, u64, &[&str])]) -> (Closure, BTreeSet<StorePath>) {
        let mut infos = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        for (name, size, refs) in packages {
            let mut info = PathInfo::new(sp(name));
            info.nar_size = Some(*size);
            info.references = refs.iter().map(|r| sp(r)).collect();
            infos.push(info);
            names.push(name);
        }
        let manifest_name = format!("{guest}-manifest");
        let toplevel_name = format!("nixos-system-{guest}");
        let mut manifest = PathInfo::new(sp(&manifest_name));
        manifest.nar_size = Some(100_000);
        manifest.references = names.iter().map(|n| sp(n)).collect();
        let mut toplevel = PathInfo::new(sp(&toplevel_name));
        toplevel.nar_size = Some(5_000);
        toplevel.references = names.iter().map(|n| sp(n)).collect();
        toplevel.references.insert(sp(&manifest_name));
        infos.push(manifest);
        infos.push(toplevel);
        let roots = BTreeSet::from([sp(&toplevel_name)]);
        (Closure::new(StoreDir::default(), infos).unwrap(), roots)
    }

    fn base(app: (&'static str, u64)) -> Vec<(&'static str, u64, &'static [&'static str])> {
        let mut packages: Vec<(&str, u64, &[&str])> = vec![
            ("glibc-2.39", 30_000_000, &[]),
            ("coreutils-9.5", 8_000_000, &["glibc-2.39"]),
            ("linux-6.6.1", 40_000_000, &[]),
            ("bash-5.2", 2_000_000, &["glibc-2.39"]),
            ("greeting-1", 500, &[]),
            ("hello-1", 600, &["greeting-1", "glibc-2.39"]),
            ("etc-hosts", 300, &[]),
        ];
        packages.push((app.0, app.1, &["glibc-2.39"]));
        packages
    }

    fn layer_of(plan: &LayerPlan, name: &str) -> String {
        let path = sp(name);
        plan.layers
            .iter()
            .find(|l| l.store_paths.contains(&path))
            .map(|l| l.name.clone())
            .unwrap_or_else(|| panic!("{name} is in no layer"))
    }

    #[test]
    fn every_path_is_in_exactly_one_layer() {
        let (closure, roots) = closure("a", &base(("app-a-1.0", 3_000_000)));
        for count in MIN_LAYERS..=MAX_LAYERS {
            let plan = plan_layers(&closure, &roots, count).unwrap();
            let names: Vec<String> = plan.layers.iter().map(|l| l.name.clone()).collect();
            assert_eq!(names, layer_names(count), "{count}: {plan:#?}");
            let mut seen = BTreeSet::new();
            for layer in &plan.layers {
                for p in &layer.store_paths {
                    assert!(seen.insert(p.clone()), "{p} twice with {count} layers");
                }
                assert_eq!(
                    layer.nar_bytes,
                    closure.nar_size_of(&layer.store_paths),
                    "{}",
                    layer.name
                );
            }
            assert_eq!(seen.len(), closure.len(), "{count} layers");
            assert_eq!(plan.layers.last().unwrap().name, "top");
        }
    }

    #[test]
    fn a_closure_smaller_than_the_plan_still_gets_every_layer() {
        let (closure, roots) = closure("a", &base(("app-a-1.0", 3_000_000)));
        let plan = plan_layers(&closure, &roots, MAX_LAYERS).unwrap();
        assert_eq!(plan.layers.len(), MAX_LAYERS);
        let empty: Vec<&str> = plan
            .layers
            .iter()
            .filter(|l| l.paths.is_empty())
            .map(|l| l.name.as_str())
            .collect();
        // 18 buckets for 5 bucketed paths (glibc, coreutils, linux, bash, the app): at least 13
        // stay empty, and an empty layer has no bytes.
        assert!(empty.len() >= 13, "{empty:?}");
        assert!(plan
            .layers
            .iter()
            .filter(|l| l.paths.is_empty())
            .all(|l| l.nar_bytes == 0));
        assert_eq!(layer_names(2), ["layer-00", "top"]);
        assert_eq!(layer_names(3), ["layer-00", "small", "top"]);
    }

    #[test]
    fn the_spine_is_on_top_and_small_paths_together() {
        let (closure, roots) = closure("a", &base(("app-a-1.0", 3_000_000)));
        let plan = plan_layers(&closure, &roots, 8).unwrap();
        assert_eq!(layer_of(&plan, "nixos-system-a"), "top");
        assert_eq!(layer_of(&plan, "a-manifest"), "top");
        for small in ["greeting-1", "hello-1", "etc-hosts"] {
            assert_eq!(layer_of(&plan, small), "small", "{small}");
        }
        for big in ["glibc-2.39", "linux-6.6.1", "app-a-1.0"] {
            assert!(layer_of(&plan, big).starts_with("layer-"), "{big}");
        }
        // With two layers there is no small layer: everything but the top shares one.
        let two = plan_layers(&closure, &roots, 2).unwrap();
        assert_eq!(two.layers.len(), 2);
        assert_eq!(layer_of(&two, "hello-1"), layer_of(&two, "glibc-2.39"));
    }

    #[test]
    fn a_version_bump_keeps_the_layer_and_leaves_the_others_alone() {
        let (v1, roots1) = closure("a", &base(("app-a-1.0", 3_000_000)));
        let (v2, roots2) = closure("a2", &base(("app-a-2.0", 3_100_000)));
        let p1 = plan_layers(&v1, &roots1, 8).unwrap();
        let p2 = plan_layers(&v2, &roots2, 8).unwrap();
        assert_eq!(layer_of(&p1, "app-a-1.0"), layer_of(&p2, "app-a-2.0"));
        let changed: Vec<&str> = p1
            .layers
            .iter()
            .filter(|l| !p2.layers.contains(l))
            .map(|l| l.name.as_str())
            .collect();
        let app_layer = layer_of(&p1, "app-a-1.0");
        assert_eq!(changed, [app_layer.as_str(), "top"]);
    }

    #[test]
    fn guests_with_a_common_base_share_every_other_layer() {
        let (a, roots_a) = closure("a", &base(("app-a-1.0", 3_000_000)));
        let (b, roots_b) = closure("b", &base(("app-b-1.0", 3_000_000)));
        let pa = plan_layers(&a, &roots_a, 12).unwrap();
        let pb = plan_layers(&b, &roots_b, 12).unwrap();
        let own = [layer_of(&pa, "app-a-1.0"), layer_of(&pb, "app-b-1.0")];
        for layer in pa.layers.iter().filter(|l| l.kind == LayerKind::Bucket) {
            if !own.contains(&layer.name) {
                assert!(pb.layers.contains(layer), "{} differs", layer.name);
            }
        }
    }

    #[test]
    fn names_shared_without_version_spread_by_full_name() {
        let packages: Vec<(&str, u64, &[&str])> = (0..40)
            .map(|n| {
                let name: &'static str = Box::leak(format!("payload-{n:03}").into_boxed_str());
                (name, 1_000_000u64, &[] as &[&str])
            })
            .collect();
        let (closure, roots) = closure("p", &packages);
        let plan = plan_layers(&closure, &roots, 10).unwrap();
        let buckets = plan
            .layers
            .iter()
            .filter(|l| l.kind == LayerKind::Bucket && !l.paths.is_empty())
            .count();
        assert!(buckets >= 6, "40 payloads in {buckets} of 8 buckets");
    }

    #[test]
    fn refuses_bad_counts_and_unknown_sizes() {
        let (closure, roots) = closure("a", &base(("app-a-1.0", 3_000_000)));
        for bad in [0, 1, MAX_LAYERS + 1] {
            assert!(matches!(
                plan_layers(&closure, &roots, bad),
                Err(LayerError::Count { .. })
            ));
        }
        let mut infos: Vec<PathInfo> = closure.iter().cloned().collect();
        infos[0].nar_size = None;
        let without_size = Closure::new(StoreDir::default(), infos).unwrap();
        let err = plan_layers(&without_size, &roots, 4).unwrap_err();
        assert!(err.to_string().contains("no NAR size"), "{err}");
    }
}
