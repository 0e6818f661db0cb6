# NixOS module for microvm.nix guests whose store is on a disk image (`microvm.storeOnDisk`).
# Import it next to microvm.nix's guest module. It closes the four ways a runner drags the
# guest's uncompressed closure into a deployment (README "Nix users", DESIGN.md section 1):
#   1. the store disk is built by `storedisk build` with its references discarded;
#   2. `microvm.systemSymlink` defaults to off (a user may still turn it on);
#   3./4. `init=` and `regInfo=` (every microvm.kernelParams entry) lose their string context:
#      the guest reads them from its own store, the disk, so the runner must not reference them;
# and adds `config.microvm.storeDiskCheck`, a derivation that runs `storedisk verify` on the disk
# and the runner and fails on any finding. The derivations come from vm-tests/lib.nix (through
# nix/lib.nix), the file `cargo xtask vm-test` builds with real Nix.
{ config, lib, pkgs, ... }:

let
  cfg = config.storedisk;
  enabled = cfg.enable && config.microvm.guest.enable && config.microvm.storeOnDisk;

  # Built on the build machine, whatever the guest's CPU (see nix/lib.nix).
  storediskLib = import ./lib.nix { inherit pkgs; storedisk = cfg.package; };

  toplevel = config.system.build.toplevel;
  # The same expression as microvm.nix's store-disk.nix, hence the same store path as the
  # regInfo= it puts on the kernel command line: that is the path the disk must hold.
  regInfo = pkgs.closureInfo { rootPaths = [ toplevel ]; };

  storeDisk = storediskLib.storeDisk {
    inherit toplevel;
    regInfo = if config.nix.enable then regInfo else null;
    format = config.microvm.storeDiskType;
    discardReferences = true;
  };
in
{
  options.storedisk = {
    enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Build the store disk with storedisk and keep the runner from referencing the guest
        (applies to microvm.nix guests with `microvm.storeOnDisk`; others are left as they are).
      '';
    };
    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.buildPackages.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.buildPackages.callPackage <storedisk>/nix/package.nix { }";
      description = "The storedisk package (for the build machine) that builds and verifies the disk.";
    };
    check.allowLeaks = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Let `microvm.storeDiskCheck` succeed when its only findings are paths the runner leaks
        (for example the toplevel, after `microvm.systemSymlink = true`). They are still listed,
        with their sizes, in the build log and in the check's report.txt.
      '';
    };
    check.allow = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "glibc-*" "qemu-*" ];
      description = ''
        Globs over store path names the runner's closure may hold outside the image (enables
        storedisk verify's policy check; empty: not checked).
      '';
    };
  };

  options.microvm.storeDiskCheck = lib.mkOption {
    type = lib.types.package;
    readOnly = true;
    description = ''
      Runs `storedisk verify` on `microvm.storeDisk` with `microvm.declaredRunner`, both
      closures taken from exportReferencesGraph. Fails on any finding; build it in CI
      (`nix build .#nixosConfigurations.NAME.config.microvm.storeDiskCheck`, or from checks).
    '';
  };

  # A second declaration of microvm.nix's option, adding only `apply` (the module system merges
  # declarations that do not both set it): every definition, microvm.nix's init= and regInfo=
  # included, reaches the runner without string context when the store is on a disk.
  options.microvm.kernelParams = lib.mkOption {
    apply = params:
      if enabled then map builtins.unsafeDiscardStringContext params else params;
  };

  config = lib.mkIf enabled {
    microvm.storeDisk = lib.mkForce storeDisk;
    # microvm.nix's own default (options.nix:1061-1063, `!storeOnDisk`); stated here so the
    # check's expectations do not depend on it. A definition by the user (`= true`) wins.
    microvm.systemSymlink = lib.mkDefault false;
    microvm.storeDiskCheck = storediskLib.checkRunner {
      runner = config.microvm.declaredRunner;
      inherit storeDisk;
      inherit (cfg.check) allowLeaks allow;
    };
  };
}
