# The opt-in `realistic` scenario's packages: a closure of NixOS size (over 1 GB of NAR, over 500
# store paths: ELF-like libraries and programs with their symlinks, Python-like trees of small
# text files, man pages, data packages, a few large files, a symlink farm), generated
# deterministically by `cargo xtask vm-test --scenario realistic` (crates/testkit/src/closure_gen.rs,
# the benchmarks' generator) into `dir`: `dir/closure.json` (exportReferencesGraph form) and
# `dir/store/<base name>`. Each generated path is rebuilt here as a derivation with the same
# references (their real store paths, in nix-support/references), so Nix sees the same graph.
# `dir` is a host path read without string context (the harness builds with the sandbox off, as
# for mkfsErofs); each path's narHash is an input, so other bytes give other derivations.
{ lib, dir }:

let
  infos = builtins.fromJSON (builtins.readFile (/. + dir + "/closure.json"));

  package = info:
    let
      base = baseNameOf info.path;
      name = builtins.substring 33 (builtins.stringLength base) base;
    in
    lib.runCommand name {
      deps = map (r: packages.${r}) (builtins.filter (r: r != info.path) info.references);
      inherit (info) narHash;
      src = "${dir}/store/${base}";
    } ''
      cp -a "$src" $out
      chmod -R u+w $out
      if [ -d $out ]; then
        mkdir -p $out/nix-support
        for d in $deps; do echo $d; done > $out/nix-support/references
      fi
    '';

  packages = builtins.listToAttrs (map (info: { name = info.path; value = package info; }) infos);

  # The generator lists dependencies first: the last path is its toplevel.
  root = packages.${(builtins.elemAt infos (builtins.length infos - 1)).path};
in
{
  inherit root;
  count = builtins.length infos;
}
