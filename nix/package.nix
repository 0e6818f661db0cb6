# The `storedisk` command, built with nixpkgs' Rust tooling from the workspace's Cargo.lock.
# Used by flake.nix (packages, overlay) and by the module's default `storedisk.package`.
{ lib, rustPlatform }:

let
  cargoToml = lib.importTOML ../Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = "storedisk";
  version = cargoToml.workspace.package.version;

  # Only what cargo needs: editing the flake, the fixtures or the docs does not rebuild it.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [ ../Cargo.toml ../Cargo.lock ../.cargo ../crates ../xtask ];
  };
  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [ "--package" "storedisk" ];
  # Only the tests that need no external tool (no Nix, no mksquashfs/mkfs.erofs, no QEMU): the
  # unit tests of the store model and of the verifier. The rest, with the peers' tools as
  # oracles, runs with `nix develop -c cargo xtask test`.
  cargoTestFlags = [ "--package" "storedisk-nix" "--package" "storedisk-verifier" "--lib" ];

  meta = {
    description = "Build Nix store disk images for MicroVMs and prove they are self-contained";
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = "storedisk";
    platforms = lib.platforms.linux;
  };
}
