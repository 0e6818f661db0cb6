//! The module test's cases (tests/module_upstream.rs): where the pinned upstream trees come
//! from, how each case of cases.nix is evaluated (one process each, two at a time), and the
//! facts each gives.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::common::{self, nix, store_inputs};

/// microvm.nix 71beea0 (2026-08-09) and nixpkgs.lib de42d44 (2026-06-14), as hashes of every
/// file of their trees: the module's comments cite these revisions' files and lines.
const MICROVM_PIN: (&str, &str) = (
    "microvm.nix 71beea0076cd46dafcee97a5a2e7d00cbba5bd2f",
    "bcddd2043f1b1fa5fd7d5539cb123d112db012ede4516bf80cc149a49f123bd0",
);
const NIXPKGS_LIB_PIN: (&str, &str) = (
    "nixpkgs.lib de42d44212d207476489bce163375d8306a26d59",
    "2c19b7c671ec0bdf868f1540deb2e271f7f4ba6469d921ce23de2322c3638dea",
);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cases_nix() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/module_upstream/cases.nix")
}

/// A pinned upstream tree: from `var`, else `../shared/upstream/<dir>` (both checked against
/// the pin), else the flake's input `input` (pinned by flake.nix and its lock; needs network the
/// first time).
fn upstream(var: &str, dir: &str, input: &str, pin: (&str, &str)) -> PathBuf {
    let shared = repo_root().join("../shared/upstream").join(dir);
    let path = match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None if shared.is_dir() => shared,
        None => {
            return flake_input(input).unwrap_or_else(|why| {
                panic!(
                    "the module test needs a plain source tree of {}: set {var} to one (this \
                 project's CI has it at ../shared/upstream/{dir}, beside the repository); \
                 the flake's `{input}` input could not be used either: {why}",
                    pin.0
                )
            })
        }
    };
    let found = tree_hash(&path);
    assert_eq!(
        found,
        pin.1,
        "{} is not {}: its files differ from the pinned revision's (the module and its comments \
         cite that revision's files and lines); point {var} at that revision",
        path.display(),
        pin.0
    );
    path
}

/// The store path of one of storedisk's flake inputs (`nix eval`, which fetches it if needed).
fn flake_input(input: &str) -> Result<PathBuf, String> {
    let expr = format!(
        "(builtins.getFlake (toString {})).inputs.{input}.outPath",
        repo_root()
            .canonicalize()
            .map_err(|e| e.to_string())?
            .display()
    );
    let out = nix("nix")
        .env(
            "NIX_CONFIG",
            format!(
                "{}\nextra-experimental-features = flakes",
                common::NIX_CONFIG
            ),
        )
        .args(["eval", "--raw", "--impure", "--expr", &expr])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(last_lines(&String::from_utf8_lossy(&out.stderr), 3));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// SHA-256 over every file of a tree: its path, then its contents' SHA-256, in path order.
fn tree_hash(root: &Path) -> String {
    fn walk(dir: &Path, root: &Path, files: &mut Vec<(String, PathBuf)>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, files);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.push((rel, path));
            }
        }
    }
    let mut files = Vec::new();
    walk(root, root, &mut files);
    files.sort();
    let mut hash = Sha256::new();
    for (rel, path) in files {
        hash.update(rel.as_bytes());
        hash.update([0]);
        hash.update(Sha256::digest(fs::read(&path).unwrap()));
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Deserialize)]
pub struct Param {
    pub text: String,
    pub context: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub image: String,
    pub read_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileSystem {
    pub device: Option<String>,
    pub fs_type: String,
    pub lowerdir: Option<Vec<String>>,
}

/// What cases.nix's `guestFacts` gives for a guest.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Guest {
    pub hypervisor: String,
    pub store_on_disk: bool,
    pub store_disk_type: Option<String>,
    pub layers: Option<usize>,
    pub enabled: bool,
    pub toplevel: String,
    pub runner: String,
    pub check: String,
    pub reg_info: String,
    pub kernel_package: String,
    pub initrd: String,
    pub kernel_params: Vec<Param>,
    pub volumes: Vec<Volume>,
    pub file_systems: BTreeMap<String, FileSystem>,
    pub initrd_systemd: bool,
    pub warnings: Vec<String>,
    pub build_system: String,
    pub fixture: Option<String>,
}

/// A host system declaring the guest.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Host {
    pub host: String,
    pub guest_toplevel: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Facts {
    Guest(Box<Guest>),
    Host(Host),
}

/// Every case's outcome: its facts, or the evaluation's error.
pub struct Cases {
    pub outcomes: BTreeMap<String, Result<Facts, String>>,
}

impl Cases {
    pub fn guest(&self, name: &str) -> &Guest {
        match self.outcomes.get(name) {
            Some(Ok(Facts::Guest(g))) => g,
            Some(Ok(Facts::Host(_))) => panic!("{name}: a host case, not a guest"),
            Some(Err(e)) => panic!("{name} does not evaluate:\n{e}"),
            None => panic!("no case {name}"),
        }
    }

    pub fn host(&self, name: &str) -> &Host {
        match self.outcomes.get(name) {
            Some(Ok(Facts::Host(h))) => h,
            Some(Ok(Facts::Guest(_))) => panic!("{name}: a guest case, not a host"),
            Some(Err(e)) => panic!("{name} does not evaluate:\n{e}"),
            None => panic!("no case {name}"),
        }
    }

    pub fn guests(&self) -> impl Iterator<Item = (&String, &Guest)> {
        self.outcomes.iter().filter_map(|(n, o)| match o {
            Ok(Facts::Guest(g)) => Some((n, &**g)),
            _ => None,
        })
    }
}

/// README's example flake, as printed (the fenced block after the marker).
fn readme_flake(scratch: &Path) -> PathBuf {
    let readme = fs::read_to_string(repo_root().join("README.md")).unwrap();
    let marker =
        "<!-- module-test: this flake is evaluated by crates/cli/tests/module_upstream.rs -->";
    let after = readme
        .split_once(marker)
        .unwrap_or_else(|| panic!("README.md has no `{marker}`"))
        .1;
    let block = after
        .split_once("```nix\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .expect("a ```nix block after the marker")
        .0;
    let file = scratch.join("readme-flake.nix");
    fs::write(&file, block).unwrap();
    file
}

pub fn cases() -> &'static Cases {
    static CASES: OnceLock<Cases> = OnceLock::new();
    CASES.get_or_init(|| {
        let microvm = upstream(
            "STOREDISK_MICROVM_SRC",
            "microvm.nix",
            "microvm",
            MICROVM_PIN,
        );
        let nixpkgs_lib = upstream(
            "STOREDISK_NIXPKGS_LIB_SRC",
            "nixpkgs.lib",
            "nixpkgs",
            NIXPKGS_LIB_PIN,
        );
        let scratch = tempfile::tempdir().unwrap();
        let (busybox, storedisk) = store_inputs(scratch.path());
        let readme = readme_flake(scratch.path());
        let args = |cmd: &mut std::process::Command| {
            cmd.arg(cases_nix())
                .arg("--arg")
                .arg("microvm")
                .arg(&microvm)
                .arg("--arg")
                .arg("nixpkgsLib")
                .arg(&nixpkgs_lib)
                .arg("--arg")
                .arg("busybox")
                .arg(format!("builtins.storePath \"{busybox}\""))
                .arg("--arg")
                .arg("storedisk")
                .arg(format!("builtins.storePath \"{storedisk}\""))
                .arg("--arg")
                .arg("readmeFlake")
                .arg(&readme);
        };
        // `--read-write-mode`: listing the cases reads the upstream trees, which `--eval` alone
        // would only hash, not add to the store (on a fresh store: "path ... is not valid").
        let mut list = nix("nix-instantiate");
        list.args([
            "--eval",
            "--strict",
            "--json",
            "--read-write-mode",
            "-A",
            "names",
        ]);
        args(&mut list);
        let out = list.output().unwrap();
        assert!(
            out.status.success(),
            "cases.nix does not list its cases: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let names: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
        // Each case in a process of its own: an evaluation error (an infinite recursion
        // included, which Nix cannot catch) is that case's outcome.
        let pending = Mutex::new(names.into_iter());
        let outcomes = Mutex::new(BTreeMap::new());
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| loop {
                    let Some(name) = pending.lock().unwrap().next() else {
                        break;
                    };
                    let mut cmd = nix("nix-instantiate");
                    cmd.args(["--eval", "--strict", "--json", "--read-write-mode", "-A"])
                        .arg(format!("cases.\"{name}\""));
                    args(&mut cmd);
                    let out = cmd.output().unwrap();
                    let outcome = if out.status.success() {
                        Ok(serde_json::from_slice::<Facts>(&out.stdout)
                            .unwrap_or_else(|e| panic!("{name}: unexpected facts ({e})")))
                    } else {
                        Err(String::from_utf8_lossy(&out.stderr).into_owned())
                    };
                    outcomes.lock().unwrap().insert(name, outcome);
                });
            }
        });
        Cases {
            outcomes: outcomes.into_inner().unwrap(),
        }
    })
}

/// The cases that must not evaluate, and what their error must say.
pub fn expected_error(name: &str) -> Option<&'static str> {
    match name {
        "erofs-flag-refused" => {
            Some("microvm.storeDiskErofsFlags holds \"-C65536\", which storedisk cannot honour")
        }
        n if n.starts_with("vfkit-") && n.ends_with("-layered") => {
            Some("storedisk.layers: the vfkit runner cannot attach read-only disks")
        }
        _ => None,
    }
}

pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
