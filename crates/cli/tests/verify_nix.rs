//! The reference scanner's prediction against real Nix: an image built in a derivation
//! without `unsafeDiscardReferences` gets exactly the references `would_reference` predicts,
//! and with `__structuredAttrs = true; unsafeDiscardReferences.out = true;` none, so
//! `self_contained` is ok. Needs Nix >= 2.14 (`cargo xtask setup` provisions it).

#![allow(clippy::unwrap_used)] // Tests: a failed setup should panic loudly.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use assert_cmd::Command as Cmd;
use serde_json::Value;
use storedisk_testkit::{nix_command as nix, pseudo_random_bytes, tool, NIX_CONFIG};

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn add_to_store(path: &Path) -> String {
    output(nix("nix-store").arg("--add").arg(path))
}

/// busybox in a store path with applet symlinks, usable as a builder (argv[0] picks the applet).
fn busybox_store_path(scratch: &Path) -> String {
    let dir = scratch.join("busybox");
    fs::create_dir_all(dir.join("bin")).unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| tool("busybox"));
    fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    for applet in ["sh", "cp", "sed", "cat"] {
        symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    add_to_store(&dir)
}

/// Three store paths with distinct contents, so every run is independent of the last.
fn payload_paths(scratch: &Path, salt: u64) -> Vec<String> {
    (0..3)
        .map(|i| {
            let dir = scratch.join(format!("payload-{i}"));
            fs::create_dir_all(dir.join("share")).unwrap();
            fs::write(
                dir.join("share/data"),
                pseudo_random_bytes(salt * 10 + i, 50_000),
            )
            .unwrap();
            fs::write(dir.join("README"), format!("payload {i} of run {salt}\n")).unwrap();
            add_to_store(&dir)
        })
        .collect()
}

/// Builds a derivation whose output is a copy of `image` (added to the store), with `deps` as
/// inputs so Nix scans the output for their hash parts, as it does for a real store disk.
fn build_image_derivation(
    scratch: &Path,
    bb: &str,
    image: &Path,
    deps: &[String],
    discard: bool,
) -> String {
    let src = add_to_store(image);
    let deps_nix = deps
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect::<Vec<_>>()
        .join(" ");
    let body = if discard {
        format!(
            r#"derivation {{
  name = "store-disk-discarding";
  system = builtins.currentSystem;
  builder = "{bb}/bin/sh";
  __structuredAttrs = true;
  unsafeDiscardReferences.out = true;
  deps = map (p: builtins.storePath p) [ {deps_nix} ];
  args = [ "-c" "out=$(sed -n 's/.*\"out\": *\"\\([^\"]*\\)\".*/\\1/p' $NIX_ATTRS_JSON_FILE); cp ${{builtins.storePath "{src}"}} $out" ];
}}"#
        )
    } else {
        format!(
            r#"derivation {{
  name = "store-disk";
  system = builtins.currentSystem;
  builder = "{bb}/bin/sh";
  deps = map (p: builtins.storePath p) [ {deps_nix} ];
  args = [ "-c" "cp ${{builtins.storePath "{src}"}} $out" ];
}}"#
        )
    };
    let file = scratch.join(if discard { "discard.nix" } else { "plain.nix" });
    fs::write(&file, body).unwrap();
    output(nix("nix-build").arg(&file).arg("--no-out-link"))
}

fn nix_references(path: &str) -> BTreeSet<String> {
    let json: Value =
        serde_json::from_str(&output(nix("nix").args(["path-info", "--json", path]))).unwrap();
    let info = if json.is_array() {
        json[0].clone()
    } else {
        json[path].clone()
    };
    info["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .filter(|r| r != path)
        .collect()
}

fn verify_store_image(image: &str) -> (i32, Value) {
    let nix_dir = tool("nix").parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        nix_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Cmd::cargo_bin("storedisk")
        .unwrap()
        .args(["verify", image, "--json"])
        .env("PATH", path)
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no report: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), report)
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_scanner_predicts_what_nix_records_and_discarding_makes_the_image_self_contained() {
    let scratch = tempfile::tempdir().unwrap();
    let scratch = scratch.path();
    let bb = busybox_store_path(scratch);
    let salt = std::process::id() as u64;
    let deps = payload_paths(scratch, salt);
    // The image holds the payload paths at its root, as a store disk does.
    let tree = scratch.join("tree");
    fs::create_dir_all(&tree).unwrap();
    let mut cp = Command::new("cp");
    cp.arg("-a").args(&deps).arg(&tree);
    output(&mut cp);
    let erofs = scratch.join("image.erofs");
    output(
        Command::new(tool("mkfs.erofs"))
            .arg("-zlz4hc")
            .arg(&erofs)
            .arg(&tree),
    );
    let squashfs = scratch.join("image.squashfs");
    output(
        Command::new(tool("gensquashfs"))
            .args(["-c", "zstd", "--all-root", "-q", "-D"])
            .arg(&tree)
            .arg(&squashfs),
    );

    for image in [&erofs, &squashfs] {
        let built = build_image_derivation(scratch, &bb, image, &deps, false);
        let recorded = nix_references(&built);
        let (code, report) = verify_store_image(&built);
        let sc = &report["checks"]["self_contained"];
        assert_eq!(sc["image_path"], built.as_str());
        assert_eq!(
            strings(&sc["would_reference"]),
            recorded,
            "{}: prediction vs Nix",
            image.display()
        );
        assert_eq!(strings(&sc["references"]), recorded);
        if recorded.is_empty() {
            assert_eq!((code, sc["ok"].clone()), (0, Value::Bool(true)));
        } else {
            assert_eq!((code, sc["ok"].clone()), (1, Value::Bool(false)));
        }
    }
    // erofs keeps names uncompressed: Nix sees every packed path (leak 1 in full).
    let erofs_built = build_image_derivation(scratch, &bb, &erofs, &deps, false);
    assert_eq!(nix_references(&erofs_built), deps.iter().cloned().collect());

    let discarded = build_image_derivation(scratch, &bb, &erofs, &deps, true);
    assert!(nix_references(&discarded).is_empty());
    let (code, report) = verify_store_image(&discarded);
    let sc = &report["checks"]["self_contained"];
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(sc["ok"], true);
    assert_eq!(
        strings(&sc["would_reference"]),
        deps.iter().cloned().collect(),
        "the bytes still name them"
    );
}
