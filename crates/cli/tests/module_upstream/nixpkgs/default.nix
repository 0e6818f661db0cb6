# The module test's stand-in for the nixpkgs flake (crates/cli/tests/module_upstream.rs): what a
# flake's `nixpkgs` input gives storedisk's flake, microvm.nix's and the README's example: `lib`
# (the real nixpkgs lib, from the pinned tree) with `nixosSystem`, and `legacyPackages`. Built
# from busybox (./pkgs.nix); NixOS is nixos/stub.nix.
{ lib, busybox }:

let
  modelPkgs = { hostSystem, buildSystem ? hostSystem }:
    import ./pkgs.nix { inherit lib busybox hostSystem buildSystem; };
in
{
  outPath = ./.;
  # lib/default.nix + flake.nix `lib.nixosSystem`.
  lib = lib // {
    nixosSystem = args: import ./nixos/lib/eval-config.nix ({ inherit lib modelPkgs; } // args);
  };
  legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" "aarch64-darwin" ] (system: modelPkgs { hostSystem = system; });
}
