# NixOS module for microvm.nix guests whose store is on a disk image (`microvm.storeOnDisk`).
# Import it next to microvm.nix's guest module. It closes the four ways a runner drags the
# guest's uncompressed closure into a deployment (README "Using storedisk with Nix and
# microvm.nix", vm-tests/README.md):
#   1. the store disk is built by `storedisk build` with its references discarded;
#   2. `microvm.systemSymlink` defaults to off (a user may still turn it on), and the runner
#      gets the symlink without string context instead (storedisk.systemSymlink), so
#      `microvm -l` still tells current from outdated;
#   3./4. `init=` and `regInfo=` (every microvm.kernelParams entry) lose their string context:
#      the guest reads them from its own store, the disk, so the runner must not reference them;
# `storedisk.layers = N` makes it a layered store disk (opt-in); the module
# adds `config.microvm.storeDiskCheck`, a derivation that runs `storedisk verify` on the disk
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

  # microvm.nix's mkfs options, read as storedisk build flags (nix/flags.nix: what storedisk
  # cannot honour stops the evaluation with an error naming the flag).
  flags = import ./flags.nix;
  buildFlags =
    if config.microvm.storeDiskType == "erofs"
    then flags.erofs config.microvm.storeDiskErofsFlags
    else flags.squashfs config.microvm.storeDiskSquashfsFlags;
  kernelAtLeast = lib.versionAtLeast config.boot.kernelPackages.kernel.version;

  storeDisk = storediskLib.storeDisk {
    inherit toplevel buildFlags;
    regInfo = if config.nix.enable then regInfo else null;
    format = config.microvm.storeDiskType;
    discardReferences = true;
  };

  # storedisk.layers: the closure split into layers (vm-tests/lib.nix layeredStoreDisk; the
  # plan is read at evaluation time, import from derivation). The first layer is
  # microvm.storeDisk, which the runner attaches first (`-drive id=store`, microvm.nix
  # lib/runners/qemu.nix:235), so the guest sees it as /dev/vda (the device upstream mounts for
  # squashfs, nixos-modules/microvm/mounts.nix:21-26); the others are read-only volumes
  # (qemu.nix:275-285) with a serial each, found as /dev/disk/by-id/virtio-<serial>. Every
  # layer is mounted under /nix/.ro-layers and stacked with overlayfs where microvm.nix
  # mounts the store disk (mounts.nix:16-19,38-79: /nix/store, or /nix/.ro-store under a
  # writable overlay); erofs layers all carry the label nix-store, so the by-label mount
  # upstream makes is replaced.
  # The runner as microvm.nix declares it (options.nix:1010-1015, lib/runner.nix), plus the
  # system symlink without context (lib/runner.nix:230-232 writes it with context).
  upstreamRunner = config.microvm.runner.${config.microvm.hypervisor};
  runnerWithSymlink = upstreamRunner.overrideAttrs (old: {
    buildCommand = old.buildCommand + ''
      mkdir -p $out/share/microvm
      ln -sfn ${builtins.unsafeDiscardStringContext "${toplevel}"} $out/share/microvm/system
    '';
  });

  layered = cfg.layers != null;
  layeredDisk = storediskLib.layeredStoreDisk {
    inherit toplevel buildFlags;
    regInfo = if config.nix.enable then regInfo else null;
    format = config.microvm.storeDiskType;
    layers = cfg.layers;
  };
  layerImages = layeredDisk.layers;
  layerSerial = i: "storedisk-layer-${toString i}";
  layerDevice = i: if i == 0 then "/dev/vda" else "/dev/disk/by-id/virtio-${layerSerial i}";
  layerMount = i: "/nix/.ro-layers/${toString i}";
  storeMount =
    if config.microvm.writableStoreOverlay == null then "/nix/store" else "/nix/.ro-store";
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
    layers = lib.mkOption {
      type = lib.types.nullOr (lib.types.ints.between 2 20);
      default = null;
      example = 12;
      description = ''
        Split the store disk into at most this many read-only images (layers) that the guest
        stacks with overlayfs, so that an update copies only the layers whose contents changed
        and guests built from one base share the layers holding it (storedisk's ARCHITECTURE.md,
        "Layered store disks"). The layer plan is computed at evaluation time (import from
        derivation). Each layer is a virtio disk; null: one store disk.
      '';
    };
    systemSymlink = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Write the runner's `share/microvm/system` symlink (what `microvm -l` reads to tell
        current from outdated VMs) without string context, while microvm.nix's own
        `microvm.systemSymlink` (which references the toplevel, so a deployment copies the whole
        guest closure) stays off. Nix records no reference for it: the runner's build does not
        have the toplevel among its inputs. Without effect when `microvm.systemSymlink` is on.
      '';
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
  # declarations that do not both set it): init= and regInfo= (microvm.nix's system.nix and
  # store-disk.nix put them there) reach the runner without string context when the store is
  # on a disk, which holds those paths; every other parameter keeps its context, so a user's
  # own store path is still built and still travels with the runner (nix/flags.nix).
  options.microvm.kernelParams = lib.mkOption {
    apply = params: if enabled then flags.kernelParams params else params;
  };

  config = lib.mkIf enabled (lib.mkMerge [ {
    microvm.storeDisk = lib.mkForce (if layered then builtins.head layerImages else storeDisk);
    microvm.declaredRunner = lib.mkIf (cfg.systemSymlink && !config.microvm.systemSymlink)
      (lib.mkDefault runnerWithSymlink);
    # microvm.nix's own default (options.nix:1061-1063, `!storeOnDisk`); stated here so the
    # check's expectations do not depend on it. A definition by the user (`= true`) wins.
    microvm.systemSymlink = lib.mkDefault false;
    # microvm.nix's default (options.nix:1042-1047) without -Efragments: with -Eztailpacking it
    # makes erofs-utils 1.8.6 and 1.9.4 write wrong file data for some inputs (storedisk's
    # read-back check would then fail the build). A user's own list, -Efragments included, is
    # honoured as written.
    microvm.storeDiskErofsFlags = lib.mkDefault
      ([ "-zlz4hc" ] ++ lib.optional (kernelAtLeast "5.16") "-Eztailpacking");
    microvm.storeDiskCheck = storediskLib.checkRunner {
      runner = config.microvm.declaredRunner;
      storeDisk = if layered then layeredDisk else storeDisk;
      inherit (cfg.check) allowLeaks allow;
    };
  } (lib.mkIf layered {
    microvm.volumes = lib.imap0 (i: image: {
      image = "${image}";
      serial = layerSerial (i + 1);
      readOnly = true;
      autoCreate = false;
      mountPoint = null;
      size = 0;
    }) (builtins.tail layerImages);
    boot.initrd.availableKernelModules = [ "overlay" ];
    fileSystems = builtins.listToAttrs (lib.imap0 (i: _: {
      name = layerMount i;
      value = {
        device = layerDevice i;
        fsType = config.microvm.storeDiskType;
        options = [ "ro" "x-systemd.after=systemd-modules-load.service" ];
        neededForBoot = true;
        noCheck = true;
      };
    }) layerImages) // {
      ${storeMount} = lib.mkForce {
        device = "overlay";
        fsType = "overlay";
        overlay.lowerdir = lib.imap0 (i: _: layerMount i) layerImages;
        options = [ "ro" ];
        neededForBoot = true;
        depends = lib.imap0 (i: _: layerMount i) layerImages;
      };
    };
  }) ]);
}
