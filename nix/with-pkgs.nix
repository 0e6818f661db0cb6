# nix/lib.nix instantiated from nixpkgs: busybox and erofs-utils of the build machine, the
# storedisk package. What the NixOS modules use and what the flake exports as `lib.withPkgs`.
{ pkgs, storedisk ? pkgs.buildPackages.callPackage ./package.nix { } }:

import ./lib.nix {
  busybox = pkgs.buildPackages.busybox;
  inherit storedisk;
  mkfsErofs = "${pkgs.buildPackages.erofs-utils}/bin/mkfs.erofs";
  # The build machine, never the guest's CPU: a store disk holds files, not code to run, so
  # an aarch64 guest's disk is built wherever its packages are built.
  system = pkgs.stdenv.buildPlatform.system;
}
