//! The layered scenario (vm-tests/default.nix `layered`, ARCHITECTURE.md "Layered store
//! disks"): the large guest and its updates and fleet, each with every fix, once with one store
//! disk (`single`) and once with a layered one, deployed with real `nix copy` into `file://`
//! binary caches (image bytes included, as a host receives them):
//! - a first deployment of `large`;
//! - an update of `large` to `large-update` (hello, a small package, changed) and to
//!   `large-update-big` (one 704 KiB payload changed): what the second copy adds;
//! - a fleet: `fleet-a`, `fleet-b`, `fleet-c` (the large guest plus an application each) copied
//!   to one host, against one guest's deployment.
//!
//! `large` boots both ways (the guest checks every file of its closure through the stacked
//! layers), every layered store disk is verified as a set (`storedisk verify LAYER...`), and
//! the targets of the issue are hard assertions. `golden/layered-<disk>.snap` pins what is
//! machine-independent: the layer plan and which images each step copies.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use storedisk_verifier::ImageFormat;

use super::boot::{self, Accel, BootOutcome};
use super::transfer::{self, CachedPath};
use super::verify::{self, Verdict};
use super::{Harness, Phases, VmTestArgs};
use crate::tools::Toolchain;

/// The scenario name (`--scenario layered`, snapshot names).
pub const SCENARIO: &str = "layered";

/// The guest whose first deployment and boots are measured, and its updates.
const BASE: &str = "large";
const UPDATE_SMALL: &str = "large-update";
const UPDATE_BIG: &str = "large-update-big";
const FLEET: [&str; 3] = ["fleet-a", "fleet-b", "fleet-c"];

/// The targets (bytes as `nix copy` reports them, images included).
const MAX_UPDATE_RATIO: f64 = 0.15;
const MAX_FLEET_RATIO: f64 = 1.5;
const MAX_FIRST_RATIO: f64 = 1.05;
/// A single-disk fleet copies about one image per guest; less means the measurement is broken.
const MIN_SINGLE_FLEET_RATIO: f64 = 2.5;

/// One store disk per guest, or a layered one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Single,
    Layered,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Single => "single",
            Layout::Layered => "layered",
        }
    }
}

/// One runner of vm-tests/default.nix's `layeredPlan`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub format: ImageFormat,
    pub layout: Layout,
    pub guest: String,
    pub runner: String,
    pub toplevel: String,
    pub reg_info: Option<String>,
    /// The store disk's images: one, or one per layer.
    pub disks: Vec<String>,
    /// Per layer: its name and its store paths (empty for `single`).
    #[serde(default)]
    pub layers: Vec<PlannedLayer>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PlannedLayer {
    pub name: String,
    pub paths: Vec<String>,
}

impl Entry {
    fn label(&self) -> String {
        format!(
            "{SCENARIO}/{}/{}/{}",
            self.guest,
            self.format,
            self.layout.name()
        )
    }

    fn attr(&self, leaf: &str) -> String {
        format!(
            "layered.{}.{}.{}.{leaf}",
            self.format,
            self.guest,
            self.layout.name()
        )
    }

    /// The toplevel and the closure info: what the store disk packs.
    fn guest_roots(&self) -> Vec<&str> {
        std::iter::once(self.toplevel.as_str())
            .chain(self.reg_info.as_deref())
            .collect()
    }

    /// Which layer a copied image is: its plan name, or the store path's name.
    fn image_name(&self, store_path: &str) -> Option<String> {
        let at = self.disks.iter().position(|d| d == store_path)?;
        Some(match self.layers.get(at) {
            Some(layer) => layer.name.clone(),
            None => transfer::redact(store_path),
        })
    }
}

/// What one `nix copy` added to a cache.
#[derive(Debug, Clone, Serialize)]
pub struct Copy {
    pub guest: String,
    pub paths: usize,
    pub nar_bytes: u64,
    /// The store disk images among them (layer names for a layered disk).
    pub images: Vec<String>,
    pub image_bytes: u64,
}

/// The measurements of one layout on one disk format.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub format: ImageFormat,
    pub layout: Layout,
    pub first: Copy,
    pub update: Copy,
    pub update_big: Copy,
    /// fleet-a, fleet-b, fleet-c, in that order, into one cache.
    pub fleet: Vec<Copy>,
    pub boot: Option<BootOutcome>,
    /// `storedisk verify` of each guest's store disk with its runner, by guest.
    pub verify: BTreeMap<String, Verdict>,
}

impl Measured {
    fn fleet_bytes(&self) -> u64 {
        self.fleet.iter().map(|c| c.nar_bytes).sum()
    }
}

/// What the layered phase did.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    pub measured: Vec<Measured>,
    /// Per disk format, the layered plan of every guest (for the snapshot and the assertions).
    #[serde(skip)]
    pub entries: Vec<Entry>,
}

/// Whether `--scenario` asks for the layered scenario (no `--scenario` asks for everything).
pub fn selected(scenarios: &[String]) -> bool {
    scenarios.is_empty() || scenarios.iter().any(|s| s == SCENARIO)
}

/// Evaluates (import from derivation: the layer plans are computed then), builds, boots,
/// verifies and copies the layered scenario's runners, each step a phase.
pub fn run_all(harness: &Harness<'_>, accel: Accel, phases: &mut Phases) -> Result<Outcome> {
    if !selected(&harness.args.scenario) {
        eprintln!("layered scenario: not selected (--scenario)");
        return Ok(Outcome::default());
    }
    let entries: Vec<Entry> = phases.time("layered evaluate", || {
        // `nix eval`, not `nix-instantiate --eval`: the latter opens the store read-only,
        // and the layer plans are built while evaluating.
        let cmd = harness
            .nix_args
            .apply(
                harness
                    .toolchain
                    .nix
                    .cmd("nix")
                    .args(["eval", "--json", "--file"]),
            )
            .arg("layeredPlan");
        let json = cmd.timeout(Duration::from_secs(3600)).read()?;
        serde_json::from_str(&json)
            .context("vm-tests/default.nix's layeredPlan is not the expected JSON")
    })?;
    let entries: Vec<Entry> = entries
        .into_iter()
        .filter(|e| {
            harness.args.disk.is_empty()
                || harness.args.disk.iter().any(|d| *d == e.format.to_string())
        })
        .collect();
    if entries.is_empty() {
        eprintln!("layered scenario: no disk selected (--disk)");
        return Ok(Outcome::default());
    }
    phases.time("layered nix build", || {
        let mut attrs = Vec::new();
        for e in &entries {
            attrs.push(e.attr("runner"));
            attrs.push(e.attr("toplevel"));
            if e.reg_info.is_some() {
                attrs.push(e.attr("regInfo"));
            }
        }
        let attrs: Vec<&str> = attrs.iter().map(String::as_str).collect();
        super::nix_build_attrs(
            harness.toolchain,
            harness.nix_args,
            &attrs,
            &harness.logs.join("nix-build-layered.log"),
        )
        .map(drop)
    })?;
    let boots = phases.time("layered boot", || {
        boot_base(&entries, accel, harness.args, harness.logs)
    })?;
    let verdicts = phases.time("layered verify", || {
        verify_all(&entries, harness.toolchain, harness.storedisk, harness.work)
    })?;
    let mut measured = phases.time("layered transfer", || {
        transfer_all(&entries, harness.toolchain, harness.work)
    })?;
    for m in &mut measured {
        m.boot = boots.get(&(m.format, m.layout)).cloned();
        m.verify = verdicts
            .iter()
            .filter(|((f, l, _), _)| *f == m.format && *l == m.layout)
            .map(|((_, _, g), v)| (g.clone(), v.clone()))
            .collect();
    }
    Ok(Outcome { measured, entries })
}

fn find<'a>(
    entries: &'a [Entry],
    format: ImageFormat,
    layout: Layout,
    guest: &str,
) -> Result<&'a Entry> {
    entries
        .iter()
        .find(|e| e.format == format && e.layout == layout && e.guest == guest)
        .with_context(|| format!("layeredPlan has no {guest} on {format} ({})", layout.name()))
}

/// The (format, layout) pairs of the plan, sorted.
fn layouts(entries: &[Entry]) -> BTreeSet<(ImageFormat, Layout)> {
    entries.iter().map(|e| (e.format, e.layout)).collect()
}

/// How many times each of `large`'s machines boots: its boot time is the fastest of these
/// (a shared 2-core machine makes single boots noisy; the layouts alternate).
const BOOTS_EACH: usize = 2;

/// Boots `large` single and layered on every disk, one after the other and alternating (their
/// times are compared, so they do not share the cores with each other), [`BOOTS_EACH`] times
/// each; keeps a failed boot if there is one, else the fastest.
fn boot_base(
    entries: &[Entry],
    accel: Accel,
    args: &VmTestArgs,
    logs: &Path,
) -> Result<BTreeMap<(ImageFormat, Layout), BootOutcome>> {
    let mut out: BTreeMap<(ImageFormat, Layout), BootOutcome> = BTreeMap::new();
    let pairs = layouts(entries);
    let total = pairs.len() * BOOTS_EACH;
    let mut n = 0;
    for round in 1..=BOOTS_EACH {
        for &(format, layout) in &pairs {
            n += 1;
            let entry = find(entries, format, layout, BASE)?;
            let label = entry.label();
            eprintln!("[boot {n}/{total}] {label} (round {round})");
            let name = format!("{}-{round}", label.replace('/', "-"));
            let outcome = boot::boot(
                Path::new(&entry.runner),
                accel,
                &logs.join(format!("boot-{name}.log")),
                &logs.join("state").join(&name),
                Duration::from_secs(args.boot_timeout),
            );
            eprintln!(
                "[boot {n}/{total}] {label}: {} in {:.1}s",
                if outcome.ok { "ok" } else { "FAILED" },
                outcome.seconds
            );
            let keep = match out.get(&(format, layout)) {
                None => true,
                Some(kept) => kept.ok && (!outcome.ok || outcome.seconds < kept.seconds),
            };
            if keep {
                out.insert((format, layout), outcome);
            }
        }
    }
    Ok(out)
}

type VerdictKey = (ImageFormat, Layout, String);

/// `storedisk verify` of every store disk (all its layers) with its runner.
fn verify_all(
    entries: &[Entry],
    toolchain: &Toolchain,
    storedisk: &Path,
    work: &Path,
) -> Result<BTreeMap<VerdictKey, Verdict>> {
    let dir = work.join("closures");
    std::fs::create_dir_all(&dir)?;
    let mut out = BTreeMap::new();
    for (n, entry) in entries.iter().enumerate() {
        eprintln!("[verify {}/{}] {}", n + 1, entries.len(), entry.label());
        // Named by the toplevel's base name, hash included: the guests share names.
        let base = entry.toplevel.rsplit('/').next().unwrap_or(&entry.toplevel);
        let closure_file = dir.join(format!("layered-{base}.json"));
        let json = super::closure_json(toolchain, &entry.guest_roots())?;
        crate::setup::write_atomically(&closure_file, json.as_bytes())?;
        let verdict = verify::verdict(&verify::VerifyCommand {
            storedisk,
            nix: &toolchain.nix,
            images: &entry.disks,
            closure_file: &closure_file,
            runner: Some(&entry.runner),
        })?;
        out.insert((entry.format, entry.layout, entry.guest.clone()), verdict);
    }
    Ok(out)
}

/// Copies `guests` in order into a fresh cache; what each copy added.
fn copy_sequence(
    entries: &[Entry],
    toolchain: &Toolchain,
    cache: &Path,
    format: ImageFormat,
    layout: Layout,
    guests: &[&str],
) -> Result<Vec<Copy>> {
    if cache.exists() {
        std::fs::remove_dir_all(cache).with_context(|| format!("clearing {}", cache.display()))?;
    }
    let mut out = Vec::new();
    for guest in guests {
        let entry = find(entries, format, layout, guest)?;
        let added = transfer::copy(&toolchain.nix, &[&entry.runner], cache, "none")?;
        out.push(copy_of(entry, &added));
    }
    Ok(out)
}

fn copy_of(entry: &Entry, added: &[CachedPath]) -> Copy {
    let mut images = Vec::new();
    let mut image_bytes = 0;
    for c in added {
        if let Some(name) = entry.image_name(&c.store_path) {
            images.push(name);
            image_bytes += c.nar_size;
        }
    }
    images.sort();
    Copy {
        guest: entry.guest.clone(),
        paths: added.len(),
        nar_bytes: added.iter().map(|c| c.nar_size).sum(),
        images,
        image_bytes,
    }
}

fn transfer_all(entries: &[Entry], toolchain: &Toolchain, work: &Path) -> Result<Vec<Measured>> {
    let caches = work.join("caches-layered");
    let mut out = Vec::new();
    for (format, layout) in layouts(entries) {
        let name = format!("{format}-{}", layout.name());
        eprintln!("[copy] layered scenario, {name}");
        let dir = |step: &str| caches.join(format!("{name}-{step}"));
        let seq = |step: &str, guests: &[&str]| {
            copy_sequence(entries, toolchain, &dir(step), format, layout, guests)
        };
        let first = seq("first", &[BASE])?.remove(0);
        let update = seq("update", &[BASE, UPDATE_SMALL])?.remove(1);
        let update_big = seq("update-big", &[BASE, UPDATE_BIG])?.remove(1);
        let fleet = seq("fleet", &FLEET)?;
        out.push(Measured {
            format,
            layout,
            first,
            update,
            update_big,
            fleet,
            boot: None,
            verify: BTreeMap::new(),
        });
    }
    if caches.exists() {
        std::fs::remove_dir_all(&caches)?;
    }
    Ok(out)
}

impl Outcome {
    fn get(&self, format: ImageFormat, layout: Layout) -> Option<&Measured> {
        self.measured
            .iter()
            .find(|m| m.format == format && m.layout == layout)
    }

    fn formats(&self) -> BTreeSet<ImageFormat> {
        self.measured.iter().map(|m| m.format).collect()
    }

    /// Per disk format measured both ways: the single disk's measurements and the layered one's.
    fn side_by_side(&self) -> Vec<(ImageFormat, &Measured, &Measured)> {
        self.formats()
            .into_iter()
            .filter_map(|format| {
                Some((
                    format,
                    self.get(format, Layout::Single)?,
                    self.get(format, Layout::Layered)?,
                ))
            })
            .collect()
    }

    /// The layers whose image differs between two guests' layered store disks (by name: a
    /// layer that exists in only one of them counts as differing).
    fn changed_layers(&self, format: ImageFormat, from: &str, to: &str) -> Option<Vec<String>> {
        let of = |guest: &str| {
            find(&self.entries, format, Layout::Layered, guest)
                .ok()
                .map(|e| {
                    e.layers
                        .iter()
                        .map(|l| l.name.clone())
                        .zip(e.disks.iter().cloned())
                        .collect::<BTreeMap<String, String>>()
                })
        };
        let (a, b) = (of(from)?, of(to)?);
        let mut changed: Vec<String> = b
            .iter()
            .filter(|(name, disk)| a.get(*name) != Some(*disk))
            .map(|(name, _)| name.clone())
            .collect();
        changed.sort();
        Some(changed)
    }

    /// The targets and the facts that must hold.
    pub fn assertions(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for m in &self.measured {
            let label = format!("{SCENARIO}/{}/{}", m.format, m.layout.name());
            match &m.boot {
                Some(b) if b.ok => {}
                Some(b) => failures.push(format!(
                    "{label}: the {BASE} guest did not boot: {}",
                    b.error.as_deref().unwrap_or("?")
                )),
                None => failures.push(format!("{label}: the {BASE} guest was not booted")),
            }
            for (guest, verdict) in &m.verify {
                if verdict.ok != Some(true) {
                    failures.push(format!(
                        "{label}: storedisk verify of {guest}: {}",
                        verdict.summary()
                    ));
                }
                // Every check that can run here must have run: a layer set is complete, intact,
                // disjoint and leaks nothing through the runner.
                let wanted: &[&str] = match m.layout {
                    Layout::Single => &["complete", "integrity", "runner_overlap"],
                    Layout::Layered => &["complete", "integrity", "runner_overlap", "disjoint"],
                };
                for check in wanted {
                    let ok = verdict.checks.get(check).copied().flatten();
                    if ok != Some(true) {
                        failures.push(format!(
                            "{label}: storedisk verify of {guest}: {check} is {ok:?}, not ok"
                        ));
                    }
                }
            }
        }
        for (format, single, layered) in self.side_by_side() {
            let label = format!("{SCENARIO}/{format}");
            let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
            let first = ratio(layered.first.nar_bytes, single.first.nar_bytes);
            if first > MAX_FIRST_RATIO {
                failures.push(format!(
                    "{label}: a layered first deployment copies {first:.3}x the single disk's bytes (target <= {MAX_FIRST_RATIO})"
                ));
            }
            let update = ratio(layered.update.nar_bytes, single.update.nar_bytes);
            if update > MAX_UPDATE_RATIO {
                failures.push(format!(
                    "{label}: a layered one-package update copies {:.1}% of the single disk's (target <= {:.0}%)",
                    update * 100.0,
                    MAX_UPDATE_RATIO * 100.0
                ));
            }
            if layered.update_big.nar_bytes >= single.update_big.nar_bytes {
                failures.push(format!(
                    "{label}: the layered update of a large package copies no less than the single disk's"
                ));
            }
            let fleet = ratio(layered.fleet_bytes(), layered.fleet[0].nar_bytes);
            if fleet > MAX_FLEET_RATIO {
                failures.push(format!(
                    "{label}: a layered fleet of three copies {fleet:.2}x one guest (target <= {MAX_FLEET_RATIO})"
                ));
            }
            let single_fleet = ratio(single.fleet_bytes(), single.fleet[0].nar_bytes);
            if single_fleet < MIN_SINGLE_FLEET_RATIO {
                failures.push(format!(
                    "{label}: a single-disk fleet of three copies only {single_fleet:.2}x one guest: the measurement does not see one image per guest"
                ));
            }
            // (a): an update copies exactly the layers whose contents changed.
            for (copy, to) in [
                (&layered.update, UPDATE_SMALL),
                (&layered.update_big, UPDATE_BIG),
            ] {
                if let Some(changed) = self.changed_layers(format, BASE, to) {
                    if copy.images != changed {
                        failures.push(format!(
                            "{label}: the update to {to} copied layers {:?}, but the layers that changed are {changed:?}",
                            copy.images
                        ));
                    }
                    if changed.len() == self.layer_count(format, to) {
                        failures.push(format!(
                            "{label}: every layer changed in the update to {to}"
                        ));
                    }
                }
            }
            // The first deployment carries every layer.
            if let Ok(entry) = find(&self.entries, format, Layout::Layered, BASE) {
                if layered.first.images.len() != entry.disks.len() || entry.disks.len() < 2 {
                    failures.push(format!(
                        "{label}: the first deployment copied {} of {} layer images",
                        layered.first.images.len(),
                        entry.disks.len()
                    ));
                }
            }
        }
        failures
    }

    /// Boots and verifications that succeeded: what the closing line counts as passed.
    pub fn checks_passed(&self) -> usize {
        self.measured
            .iter()
            .map(|m| {
                usize::from(m.boot.as_ref().is_some_and(|b| b.ok))
                    + m.verify.values().filter(|v| v.ok == Some(true)).count()
            })
            .sum()
    }

    fn layer_count(&self, format: ImageFormat, guest: &str) -> usize {
        find(&self.entries, format, Layout::Layered, guest).map_or(0, |e| e.disks.len())
    }

    /// The markdown section of summary.md: bytes and ratios (machine-dependent: the kernel and
    /// busybox are the host's).
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        if self.measured.is_empty() {
            return out;
        }
        let _ = writeln!(
            out,
            "\n## Layered store disks (bytes `nix copy` transfers, images included)\n"
        );
        let _ = writeln!(
            out,
            "| disk | measurement | single disk | layered | layered / single |\n|---|---|---:|---:|---:|"
        );
        for (format, s, l) in self.side_by_side() {
            let row = |out: &mut String, what: &str, a: u64, b: u64| {
                let _ = writeln!(
                    out,
                    "| {format} | {what} | {a} | {b} | {:.3} |",
                    b as f64 / a.max(1) as f64
                );
            };
            row(
                &mut out,
                "first deployment",
                s.first.nar_bytes,
                l.first.nar_bytes,
            );
            row(
                &mut out,
                "update: hello",
                s.update.nar_bytes,
                l.update.nar_bytes,
            );
            row(
                &mut out,
                "update: payload-017",
                s.update_big.nar_bytes,
                l.update_big.nar_bytes,
            );
            row(
                &mut out,
                "fleet of 3 (total)",
                s.fleet_bytes(),
                l.fleet_bytes(),
            );
            let _ = writeln!(
                out,
                "| {format} | fleet / one guest | {:.2}x | {:.2}x | |",
                s.fleet_bytes() as f64 / s.fleet[0].nar_bytes.max(1) as f64,
                l.fleet_bytes() as f64 / l.fleet[0].nar_bytes.max(1) as f64
            );
            if let (Some(a), Some(b)) = (&s.boot, &l.boot) {
                let _ = writeln!(
                    out,
                    "| {format} | boot of {BASE} (s, fastest of {BOOTS_EACH}) | {:.1} | {:.1} | {:.2} |",
                    a.seconds,
                    b.seconds,
                    b.seconds / a.seconds.max(0.1)
                );
            }
        }
        out
    }

    /// `golden/layered-<disk>.snap` per disk format: the layer plan of `large` and which
    /// images each deployment step copies. No byte counts: images hold the host's kernel and
    /// busybox.
    pub fn snapshots(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for (format, single, layered) in self.side_by_side() {
            let Ok(base) = find(&self.entries, format, Layout::Layered, BASE) else {
                continue;
            };
            let mut text = String::new();
            let _ = writeln!(
                text,
                "The layered scenario on {format}: the large guest with every fix, its store disk\n\
                 one image (single) or split by `storedisk layers` (layered). Which layer holds what,\n\
                 and which images each `nix copy` adds to a host that has the previous step.\n"
            );
            let _ = writeln!(text, "layer plan of {BASE} ({} images):", base.layers.len());
            for layer in &base.layers {
                let mut names: Vec<String> =
                    layer.paths.iter().map(|p| transfer::redact(p)).collect();
                names.sort();
                let shown = names.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
                let more = if names.len() > 4 {
                    format!(", +{} more", names.len() - 4)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    text,
                    "  {:<9} {:>3} paths: {shown}{more}",
                    layer.name,
                    names.len()
                );
            }
            let _ = writeln!(
                text,
                "\nstep                          layout    paths  images copied"
            );
            let mut step = |what: &str, s: &Copy, l: &Copy| {
                let _ = writeln!(
                    text,
                    "{what:<29} single  {:>7}  {}",
                    s.paths,
                    images_text(&s.images)
                );
                let _ = writeln!(
                    text,
                    "{:<29} layered {:>7}  {}",
                    "",
                    l.paths,
                    images_text(&l.images)
                );
            };
            step("first deployment (large)", &single.first, &layered.first);
            step("update: hello v1 -> v2", &single.update, &layered.update);
            step(
                "update: payload-017 changed",
                &single.update_big,
                &layered.update_big,
            );
            for (n, guest) in FLEET.iter().enumerate() {
                step(
                    &format!("fleet: {guest}"),
                    &single.fleet[n],
                    &layered.fleet[n],
                );
            }
            out.push((
                format!("{SCENARIO}-{format}"),
                format!("cargo xtask vm-test: layered store disks on {format}"),
                text,
            ));
        }
        out
    }
}

fn images_text(images: &[String]) -> String {
    if images.is_empty() {
        "none".to_owned()
    } else if images.len() > 6 {
        format!("{} images", images.len())
    } else {
        images.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(layout: Layout, guest: &str, layers: &[(&str, &str)]) -> Entry {
        Entry {
            format: ImageFormat::Erofs,
            layout,
            guest: guest.to_owned(),
            runner: format!("/nix/store/r-{guest}"),
            toplevel: format!("/nix/store/t-{guest}"),
            reg_info: None,
            disks: layers.iter().map(|(_, disk)| (*disk).to_owned()).collect(),
            layers: layers
                .iter()
                .map(|(name, _)| PlannedLayer {
                    name: (*name).to_owned(),
                    paths: Vec::new(),
                })
                .collect(),
        }
    }

    fn copy(guest: &str, nar_bytes: u64, images: &[&str]) -> Copy {
        Copy {
            guest: guest.to_owned(),
            paths: images.len() + 3,
            nar_bytes,
            images: images.iter().map(|i| (*i).to_owned()).collect(),
            image_bytes: nar_bytes,
        }
    }

    fn ok_boot() -> BootOutcome {
        BootOutcome {
            ok: true,
            seconds: 10.0,
            result: None,
            error: None,
            log: String::new(),
            attempts: 1,
        }
    }

    /// A measurement that meets every target: the single disk re-copies its 100 MB image, the
    /// layered one its changed layers only.
    fn outcome() -> Outcome {
        let base = [
            ("layer-00", "/d/0"),
            ("layer-01", "/d/1"),
            ("small", "/d/s"),
            ("top", "/d/t"),
        ];
        let hello = [
            ("layer-00", "/d/0"),
            ("layer-01", "/d/1"),
            ("small", "/d/s2"),
            ("top", "/d/t2"),
        ];
        let big = [
            ("layer-00", "/d/0b"),
            ("layer-01", "/d/1"),
            ("small", "/d/s"),
            ("top", "/d/t3"),
        ];
        let single = Measured {
            format: ImageFormat::Erofs,
            layout: Layout::Single,
            first: copy(BASE, 100_000_000, &["microvm-store-disk.erofs"]),
            update: copy(UPDATE_SMALL, 100_000_000, &["microvm-store-disk.erofs"]),
            update_big: copy(UPDATE_BIG, 100_000_000, &["microvm-store-disk.erofs"]),
            fleet: vec![
                copy("fleet-a", 100_000_000, &["microvm-store-disk.erofs"]),
                copy("fleet-b", 100_000_000, &["microvm-store-disk.erofs"]),
                copy("fleet-c", 100_000_000, &["microvm-store-disk.erofs"]),
            ],
            boot: Some(ok_boot()),
            verify: BTreeMap::new(),
        };
        let layered = Measured {
            layout: Layout::Layered,
            first: copy(BASE, 100_100_000, &["layer-00", "layer-01", "small", "top"]),
            update: copy(UPDATE_SMALL, 200_000, &["small", "top"]),
            update_big: copy(UPDATE_BIG, 10_000_000, &["layer-00", "top"]),
            fleet: vec![
                copy(
                    "fleet-a",
                    100_100_000,
                    &["layer-00", "layer-01", "small", "top"],
                ),
                copy("fleet-b", 8_000_000, &["layer-01", "top"]),
                copy("fleet-c", 8_000_000, &["layer-00", "top"]),
            ],
            ..single.clone()
        };
        Outcome {
            measured: vec![single, layered],
            entries: vec![
                entry(Layout::Layered, BASE, &base),
                entry(Layout::Layered, UPDATE_SMALL, &hello),
                entry(Layout::Layered, UPDATE_BIG, &big),
            ],
        }
    }

    #[test]
    fn targets_met_pass() {
        assert_eq!(outcome().assertions(), Vec::<String>::new());
    }

    #[test]
    fn each_missed_target_fails() {
        let mut o = outcome();
        o.measured[1].update.nar_bytes = 20_000_000; // 20% of the single disk's update
        o.measured[1].fleet[2].nar_bytes = 60_000_000; // 1.68x one guest
        o.measured[1].first.nar_bytes = 110_000_000; // 1.1x
        o.measured[0].fleet[1].nar_bytes = 1_000; // single fleet that does not copy images
        let failures = o.assertions();
        for expected in [
            "one-package update copies 20.0%",
            "fleet of three copies 1.68x",
            "first deployment copies 1.100x",
            "only 2.00x one guest",
        ] {
            assert!(
                failures.iter().any(|f| f.contains(expected)),
                "{expected}: {failures:#?}"
            );
        }
        assert_eq!(failures.len(), 4, "{failures:#?}");
    }

    #[test]
    fn an_update_must_copy_exactly_the_changed_layers() {
        let mut o = outcome();
        // An unchanged layer copied again: an update that would not benefit from layers.
        o.measured[1].update.images = vec!["layer-01".into(), "small".into(), "top".into()];
        let failures = o.assertions();
        assert_eq!(failures.len(), 1, "{failures:#?}");
        assert!(failures[0].contains("the layers that changed are [\"small\", \"top\"]"));
    }

    #[test]
    fn failed_boots_and_verdicts_fail() {
        let mut o = outcome();
        o.measured[1].boot = None;
        let mut verdict = Verdict {
            ok: Some(true),
            checks: BTreeMap::from([
                ("complete", Some(true)),
                ("integrity", Some(true)),
                ("runner_overlap", Some(true)),
                ("disjoint", None),
            ]),
            leaked: Vec::new(),
            shared: Vec::new(),
            packed_paths: 4,
            duplicated_bytes: 0,
            unavailable: None,
        };
        o.measured[1]
            .verify
            .insert(BASE.to_owned(), verdict.clone());
        let failures = o.assertions();
        assert!(
            failures.iter().any(|f| f.contains("was not booted")),
            "{failures:#?}"
        );
        assert!(
            failures.iter().any(|f| f.contains("disjoint is None")),
            "{failures:#?}"
        );
        // The same verdict is enough for a single disk, which has nothing to be disjoint from.
        verdict.checks.remove("disjoint");
        let mut single_only = outcome();
        single_only.measured[0]
            .verify
            .insert(BASE.to_owned(), verdict);
        assert_eq!(single_only.assertions(), Vec::<String>::new());
    }
}
