# The module test's model of nixpkgs' nixos/lib/eval-config.nix, which microvm.nix's host module
# calls for guests given by `config` (nixos-modules/host/options.nix:47-68) with `pkgs` and
# `lib` set, and which the model's `lib.nixosSystem` calls (../../default.nix). NixOS's own
# module list is nixos/stub.nix, the few options the test needs. Without `pkgs`, the package set
# is made from `nixpkgs.hostPlatform`/`buildPlatform` by `modelPkgs`, as nixos/modules/misc/
# nixpkgs.nix imports nixpkgs for them.
{ lib ? pkgs.lib
, pkgs ? null
, modelPkgs ? null
, system ? null
, modules
, specialArgs ? { }
, prefix ? [ ]
, extraModules ? [ ]
, ...
}:

lib.evalModules {
  inherit prefix;
  class = "nixos";
  specialArgs = { modulesPath = ../modules; } // specialArgs;
  modules = [
    ../stub.nix
    ({ config, ... }: {
      _module.args.pkgs =
        if pkgs != null then lib.mkForce pkgs
        else modelPkgs {
          hostSystem = config.nixpkgs.hostPlatform.system;
          buildSystem = config.nixpkgs.buildPlatform.system;
        };
    })
  ] ++ lib.optional (pkgs != null) { nixpkgs.hostPlatform = lib.mkDefault pkgs.stdenv.hostPlatform.system; }
    ++ lib.optional (system != null) { nixpkgs.hostPlatform = lib.mkDefault system; }
    ++ modules ++ extraModules;
}
