//! Derivation graphs read from the store (`nix derivation show --recursive`), and the one
//! question the module test asks of them: can a built output reference a given derivation's
//! output, or does every way there pass a derivation whose output cannot?

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::Value;

use crate::cases::last_lines;
use crate::common::nix;

/// One derivation: its name, the derivations it takes as inputs, and its attributes.
#[derive(Debug)]
pub struct Drv {
    pub name: String,
    /// The system it builds on.
    pub system: String,
    pub inputs: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub args: Vec<String>,
}

impl Drv {
    /// Whether Nix records no references for its `out` (`unsafeDiscardReferences.out`, which
    /// only a structured-attrs derivation can set).
    pub fn discards_references(&self) -> bool {
        self.env
            .get("__json")
            .and_then(|json| serde_json::from_str::<Value>(json).ok())
            .is_some_and(|attrs| attrs["unsafeDiscardReferences"]["out"] == Value::Bool(true))
    }

    /// Every text the derivation's build sees: its environment and arguments.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.env
            .values()
            .map(String::as_str)
            .chain(self.args.iter().map(String::as_str))
    }
}

/// A derivation and every derivation it depends on, by .drv path.
#[derive(Debug)]
pub struct Graph {
    pub drvs: BTreeMap<String, Drv>,
}

impl Graph {
    /// `nix derivation show --recursive ROOT`.
    pub fn load(root: &str) -> Graph {
        let out = nix("nix")
            .args(["derivation", "show", "--recursive", root])
            .output()
            .expect("running nix derivation show");
        assert!(
            out.status.success(),
            "nix derivation show {root}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: BTreeMap<String, Value> =
            serde_json::from_slice(&out.stdout).expect("nix derivation show prints JSON");
        let drvs = json
            .into_iter()
            .map(|(path, d)| {
                let strings = |v: &Value| -> BTreeMap<String, String> {
                    v.as_object()
                        .map(|o| {
                            o.iter()
                                .map(|(k, v)| {
                                    (k.clone(), v.as_str().unwrap_or_default().to_owned())
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                };
                let drv = Drv {
                    name: d["name"].as_str().unwrap_or_default().to_owned(),
                    system: d["system"].as_str().unwrap_or_default().to_owned(),
                    inputs: d["inputDrvs"]
                        .as_object()
                        .map(|o| o.keys().cloned().collect())
                        .unwrap_or_default(),
                    env: strings(&d["env"]),
                    args: d["args"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|s| s.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                (normalize(&path), drv)
            })
            .collect();
        Graph { drvs }
    }

    pub fn get(&self, path: &str) -> &Drv {
        self.drvs
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not in the graph"))
    }

    /// The derivations named `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a String, &'a Drv)> {
        self.drvs.iter().filter(move |(_, d)| d.name == name)
    }

    /// A chain of derivation names from `root` to `target` that passes no barrier (a
    /// derivation whose output cannot reference its inputs' outputs), or None. A built output
    /// references only outputs of its build's inputs, so without such a chain `root`'s closure
    /// cannot hold `target`'s output.
    pub fn chain(
        &self,
        root: &str,
        target: &str,
        barrier: &dyn Fn(&str, &Drv) -> bool,
    ) -> Option<Vec<String>> {
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut seen = BTreeSet::from([root]);
        let mut queue = VecDeque::from([root]);
        while let Some(at) = queue.pop_front() {
            if at == target {
                let mut names = vec![self.get(at).name.clone()];
                let mut cur = at;
                while let Some(p) = parent.get(cur) {
                    names.push(self.get(p).name.clone());
                    cur = p;
                }
                names.reverse();
                return Some(names);
            }
            let drv = self.get(at);
            if at != root && barrier(at, drv) {
                continue;
            }
            for input in &drv.inputs {
                if seen.insert(input) {
                    parent.insert(input, at);
                    queue.push_back(input);
                }
            }
        }
        None
    }
}

impl Graph {
    /// The derivations reachable from `root` without passing a barrier (barriers left out):
    /// the ones whose outputs `root`'s output may reference and whose text it may carry.
    pub fn reachable(&self, root: &str, barrier: &dyn Fn(&str, &Drv) -> bool) -> Vec<&Drv> {
        let mut seen = BTreeSet::from([root]);
        let mut queue = VecDeque::from([root]);
        let mut found = Vec::new();
        while let Some(at) = queue.pop_front() {
            let drv = self.get(at);
            if at != root && barrier(at, drv) {
                continue;
            }
            found.push(drv);
            for input in &drv.inputs {
                if seen.insert(input) {
                    queue.push_back(input);
                }
            }
        }
        found
    }
}

/// `nix derivation show` names .drv files by full path in some versions and by base name in
/// others: always the full path here.
pub fn normalize(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/nix/store/{path}")
    }
}

/// Builds `drv`; its output path.
pub fn build(drv: &str) -> String {
    let out = nix("nix-build")
        .args(["--no-out-link", drv])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix-build {drv}:\n{}",
        last_lines(&String::from_utf8_lossy(&out.stderr), 30)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The closure of a built store path (`nix-store -qR`): what `nix copy` of it transfers.
pub fn closure(path: &str) -> Vec<String> {
    let q = nix("nix-store").args(["-qR", path]).output().unwrap();
    String::from_utf8_lossy(&q.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn outputs_of(drv: &str) -> Vec<String> {
    let q = nix("nix-store")
        .args(["-q", "--outputs", drv])
        .output()
        .unwrap();
    String::from_utf8_lossy(&q.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}
