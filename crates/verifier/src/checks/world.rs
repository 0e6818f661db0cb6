//! The small world the checks' data-driven tests are written in (`tests.rs`, `ways_in`'s
//! tests): a reference graph and what the image, the guest and the runner are, as text,
//! turned into the inventory, closures and inputs the checks take.
//!
//! The input, one directive per line (`#` starts a comment):
//!
//! - `a -> b c`: a references b and c. Every name is a store path `<hash>-<name>` whose hash
//!   part sorts like the names, so "ties broken by base name" read alphabetically.
//! - `packed: a b`: the image holds a and b.
//! - `layer: a b`: the store disk is a set of layers, and this one (the next, counting from 0)
//!   holds a and b; the packed paths are every layer's.
//! - `guest: a b`: the guest closure is everything a and b reach. Without it there is no guest
//!   closure, and the packed paths' references are the ones the image's bytes show (as the
//!   verifier scans them then).
//! - `runner: r`: the runner; its closure is everything r reaches.
//! - `image: d`: the image's own store path; its edges are what Nix recorded for it. `image: d
//!   e` names a store path per layer.
//! - `registration: c`: the closure-info packed in the image.
//! - `allow: glob...`: `--allow` patterns.
//! - `size: a=4096`: NAR sizes (100 bytes by default).
//! - `corrupt: a`: the image's copy of a hashes differently from what the closure records;
//!   `resized: a`: same hash, one byte more; `unhashed: a`: the closure records neither.
//! - `invalid: name`: a root entry of the image that is not a store path.

use std::collections::{BTreeMap, BTreeSet};

use storedisk_nix::{Closure, NarHash, PathInfo, StoreDir, StorePath};

use super::{check_runner_overlap, ClosureSource, GuestClosure, Runner};
use crate::error::VerifyError;
use crate::inventory::{InvalidEntry, Inventory, PackedPath};
use crate::report::RunnerOverlap;

const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// The guest most tests start from: a toplevel with an app and busybox, and the closure-info
/// microvm.nix packs next to the toplevel.
pub(super) const GUEST: &str = "
    toplevel -> app busybox
    app -> lib
    closure-info -> toplevel app lib busybox
    packed: toplevel app lib busybox closure-info
    guest: toplevel closure-info
    registration: closure-info
";

#[derive(Debug, Default)]
pub(super) struct World {
    /// Every name mentioned, with its references.
    pub(super) edges: BTreeMap<String, BTreeSet<String>>,
    pub(super) packed: BTreeSet<String>,
    pub(super) layers: Vec<BTreeSet<String>>,
    pub(super) guest: Option<Vec<String>>,
    pub(super) runner: Option<String>,
    pub(super) images: Vec<String>,
    pub(super) registration: Option<String>,
    pub(super) allow: Vec<String>,
    pub(super) sizes: BTreeMap<String, u64>,
    pub(super) corrupt: BTreeSet<String>,
    pub(super) resized: BTreeSet<String>,
    pub(super) unhashed: BTreeSet<String>,
    pub(super) invalid: Vec<String>,
}

impl World {
    pub(super) fn parse(input: &str) -> World {
        let mut w = World::default();
        for line in input.lines() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            if let Some((from, to)) = line.split_once("->") {
                let from = w.node(from.trim());
                for to in to.split_whitespace() {
                    let to = w.node(to);
                    w.edges.entry(from.clone()).or_default().insert(to);
                }
                continue;
            }
            let (key, rest) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("not a directive: {line:?}"));
            let words: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
            let one = || {
                assert_eq!(words.len(), 1, "{key}: takes one name: {line:?}");
                words[0].clone()
            };
            match key.trim() {
                "packed" => w
                    .packed
                    .extend(words.iter().map(|x| w_node(&mut w.edges, x))),
                "layer" => {
                    let layer: BTreeSet<String> =
                        words.iter().map(|x| w_node(&mut w.edges, x)).collect();
                    w.packed.extend(layer.iter().cloned());
                    w.layers.push(layer);
                }
                "guest" => w.guest = Some(words.iter().map(|x| w_node(&mut w.edges, x)).collect()),
                "runner" => w.runner = Some(w_node(&mut w.edges, &one())),
                "image" => w
                    .images
                    .extend(words.iter().map(|x| w_node(&mut w.edges, x))),
                "registration" => w.registration = Some(w_node(&mut w.edges, &one())),
                "allow" => w.allow.extend(words),
                "size" => {
                    for word in &words {
                        let (name, size) = word
                            .split_once('=')
                            .unwrap_or_else(|| panic!("size: NAME=BYTES, not {word:?}"));
                        let name = w_node(&mut w.edges, name);
                        w.sizes.insert(name, size.parse().unwrap());
                    }
                }
                "corrupt" => w.corrupt.extend(words),
                "resized" => w.resized.extend(words),
                "unhashed" => w.unhashed.extend(words),
                "invalid" => w.invalid.extend(words),
                other => panic!("unknown directive {other:?} in {line:?}"),
            }
        }
        w
    }

    fn node(&mut self, name: &str) -> String {
        w_node(&mut self.edges, name)
    }

    /// `<hash>-name`, the hash part being the name's rank among all names, so that store
    /// paths sort like their names.
    pub(super) fn path(&self, name: &str) -> StorePath {
        let rank = self
            .edges
            .keys()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} is not in the world"));
        assert!(rank < 32 * 32, "too many names");
        let hash = format!(
            "{}{}{}",
            "0".repeat(30),
            char::from(NIX32[rank / 32]),
            char::from(NIX32[rank % 32])
        );
        StorePath::from_base_name(&format!("{hash}-{name}")).unwrap()
    }

    pub(super) fn size(&self, name: &str) -> u64 {
        self.sizes.get(name).copied().unwrap_or(100)
    }

    /// What Nix would record as `name`'s NAR hash.
    fn recorded_hash(name: &str) -> NarHash {
        let mut h = [0u8; 32];
        for (i, b) in name.bytes().enumerate() {
            h[i % 32] = h[i % 32].wrapping_mul(31).wrapping_add(b);
        }
        NarHash(h)
    }

    /// Everything `roots` reach.
    fn reach(&self, roots: &[String]) -> BTreeSet<String> {
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut todo: Vec<String> = roots.to_vec();
        while let Some(n) = todo.pop() {
            if seen.insert(n.clone()) {
                todo.extend(self.edges[&n].iter().cloned());
            }
        }
        seen
    }

    pub(super) fn closure(&self, roots: &[String]) -> Closure {
        let infos = self
            .reach(roots)
            .iter()
            .map(|name| {
                let mut info = PathInfo::new(self.path(name));
                if !self.unhashed.contains(name) {
                    info.nar_hash = Some(Self::recorded_hash(name));
                    info.nar_size = Some(self.size(name));
                }
                info.references = self.edges[name].iter().map(|r| self.path(r)).collect();
                info
            })
            .collect();
        Closure::new(StoreDir::default(), infos).unwrap()
    }

    pub(super) fn guest(&self) -> Option<GuestClosure> {
        self.guest.as_ref().map(|roots| GuestClosure {
            closure: self.closure(roots),
            source: ClosureSource::File,
        })
    }

    pub(super) fn runner(&self) -> Option<Runner> {
        self.runner.as_ref().map(|r| {
            Runner::from_closure(self.closure(std::slice::from_ref(r)), Some(self.path(r))).unwrap()
        })
    }

    pub(super) fn image_paths(&self) -> Vec<StorePath> {
        self.images.iter().map(|n| self.path(n)).collect()
    }

    /// How the layers are named in reports: `layer0.img`, `layer1.img`... (one image without
    /// `layer:` lines).
    pub(super) fn labels(&self) -> Vec<String> {
        (0..self.layers.len().max(1))
            .map(|i| format!("layer{i}.img"))
            .collect()
    }

    /// `runner_overlap` over this world.
    pub(super) fn runner_overlap(&self) -> Result<RunnerOverlap, VerifyError> {
        check_runner_overlap(
            &self.inventory(),
            self.guest().as_ref(),
            self.runner().as_ref(),
            &self.image_paths(),
            self.registration_path().as_ref(),
            &StoreDir::default(),
        )
    }

    pub(super) fn registration_path(&self) -> Option<StorePath> {
        self.registration.as_deref().map(|n| self.path(n))
    }

    /// The image's inventory, or the merged inventories of the layers.
    pub(super) fn inventory(&self) -> Inventory {
        if self.layers.is_empty() {
            return self.inventory_of(&self.packed, true);
        }
        // `invalid:` entries are the first layer's.
        let layers = self.layers.iter().enumerate();
        Inventory::merge(layers.map(|(i, l)| self.inventory_of(l, i == 0)).collect())
    }

    fn inventory_of(&self, packed: &BTreeSet<String>, with_invalid: bool) -> Inventory {
        let mut paths: Vec<PackedPath> = packed
            .iter()
            .map(|name| {
                let mut nar_hash = Self::recorded_hash(name);
                if self.corrupt.contains(name) {
                    nar_hash.0[31] ^= 0xff;
                }
                // The verifier scans the image for references only without a guest closure.
                let references = match self.guest {
                    Some(_) => BTreeSet::new(),
                    None => self.edges[name]
                        .iter()
                        .filter(|r| self.packed.contains(*r))
                        .map(|r| self.path(r))
                        .collect(),
                };
                PackedPath {
                    path: self.path(name),
                    nar_hash,
                    nar_size: self.size(name) + u64::from(self.resized.contains(name)),
                    references,
                    layer: 0,
                }
            })
            .collect();
        paths.sort_by(|a, b| a.path.cmp(&b.path));
        Inventory {
            paths,
            invalid: self
                .invalid
                .iter()
                .filter(|_| with_invalid)
                .map(|name| InvalidEntry {
                    name: name.clone(),
                    why: "not a store path name".to_owned(),
                    layer: 0,
                })
                .collect(),
        }
    }
}

fn w_node(edges: &mut BTreeMap<String, BTreeSet<String>>, name: &str) -> String {
    edges.entry(name.to_owned()).or_default();
    name.to_owned()
}

/// `/nix/store/<hash>-name` as `name`; anything else as it is.
pub(super) fn short(full: &str) -> String {
    let base = full.strip_prefix("/nix/store/").unwrap_or(full);
    match base.get(32..33) {
        Some("-") => base[33..].to_owned(),
        _ => full.to_owned(),
    }
}

pub(super) fn names<'a>(list: impl IntoIterator<Item = &'a String>) -> String {
    list.into_iter()
        .map(|p| short(p))
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn chain(list: &[String]) -> String {
    list.iter()
        .map(|p| short(p))
        .collect::<Vec<_>>()
        .join(" -> ")
}
