# NixOS module for microvm.nix guests whose store is on a disk image (`microvm.storeOnDisk`).
# Import it next to microvm.nix's guest module (tested against microvm.nix 71beea0 by
# `cargo xtask test`, xtask/tests/module_upstream.rs). Every fix is applied by nix/lib.nix, the
# functions the harness's fixtures call too (README "The five fixes"):
#   1. the store disk is built by `storedisk build` with its references discarded;
#   2. `microvm.systemSymlink` defaults to off (a user may still turn it on), and the runner
#      gets the symlink without string context instead (storedisk.systemSymlink), so
#      `microvm -l` still tells current from outdated;
#   3./4. `init=` and `regInfo=` on microvm.kernelParams lose their string context: the guest
#      reads them from its own store, the disk, so the runner must not reference them;
#   5. `microvm.kernel`, which every runner boots from, becomes store paths holding only the
#      kernel image (and vmlinux, for the runners that boot it), not the kernel package whose
#      lib/modules the store disk already holds.
# `storedisk.layers = N` makes it a layered store disk (opt-in). `microvm.storeDiskCheck` is a
# derivation that runs `storedisk verify` on the disk and the runner and fails on any finding.
{ config, lib, pkgs, ... }:

let
  cfg = config.storedisk;
  inherit (config.microvm) hypervisor writableStoreOverlay;
  inherit (config.networking) hostName;
  storeOnDisk = config.microvm.guest.enable && config.microvm.storeOnDisk;
  enabled = cfg.enable && storeOnDisk;

  # Built on the build machine, whatever the guest's CPU (nix/with-pkgs.nix).
  storediskLib = import ./with-pkgs.nix { inherit pkgs; storedisk = cfg.package; };

  toplevel = config.system.build.toplevel;
  # The same expression as microvm.nix's store-disk.nix:4-6, hence the same store path as the
  # regInfo= it puts on the kernel command line (store-disk.nix:98-100): the path the disk holds.
  regInfo = if config.nix.enable then pkgs.closureInfo { rootPaths = [ toplevel ]; } else null;

  # microvm.nix's mkfs options, read as `storedisk build` flags (nix/flags.nix).
  flags = import ./flags.nix;
  translatedFlags =
    if config.microvm.storeDiskType == "erofs"
    then flags.erofs config.microvm.storeDiskErofsFlags
    else flags.squashfs config.microvm.storeDiskSquashfsFlags;
  kernelAtLeast = lib.versionAtLeast config.boot.kernelPackages.kernel.version;

  layered = cfg.layers != null;
  noLayersMessage = "storedisk.layers: the ${hypervisor} runner cannot attach read-only disks (microvm.nix lib/runners/${hypervisor}.nix), so it cannot boot a layered store disk; set storedisk.layers = null for one store disk.";
  disk =
    let common = {
      inherit toplevel regInfo;
      format = config.microvm.storeDiskType;
      buildFlags = translatedFlags.args;
    };
    in if !layered then storediskLib.storeDisk common
      # Refused before the layer plan is built (the toplevel's assertion says the same).
      else if builtins.elem hypervisor noReadOnlyVolumes then throw noLayersMessage
      else storediskLib.layeredStoreDisk (common // { inherit (cfg) layers; });

  # The runner as microvm.nix declares it (options.nix:1010-1015, lib/runner.nix), plus the
  # system symlink without context (lib/runner.nix:230-232 writes it with context).
  upstreamRunner = config.microvm.runner.${hypervisor};
  runnerWithSymlink = upstreamRunner.overrideAttrs (old: {
    buildCommand = old.buildCommand + ''
      mkdir -p $out/share/microvm
      ln -sfn ${storediskLib.toplevelText toplevel} $out/share/microvm/system
    '';
  });

  # The kernel file a runner boots, as microvm.nix's runner finds it (lib/runner.nix:15).
  linuxTarget = pkgs.linux.target or pkgs.stdenv.hostPlatform.linux-kernel.target;

  # Layered: the N-1 volumes (layer 0 is microvm.storeDisk) and the guest's mounts are
  # declared from N and the host name alone (nix/lib.nix layerVolumes, layerDevices): the
  # toplevel depends on the volumes (microvm.nix asserts.nix:8-16, mounts.nix:103-117) and the
  # mounts, so neither may depend on the layer plan, which is read from the toplevel's closure.
  # Only the runner's preStart (which links each volume's image to its layer) and the store disk
  # depend on the plan.
  layerVolumes = storediskLib.layerVolumes { inherit hostName; inherit (cfg) layers; };
  layerNames = storediskLib.layerNames cfg.layers;
  volumesBefore =
    let first = (builtins.head layerVolumes).image;
    in lib.lists.findFirstIndex (v: v.image == first) 0 config.microvm.volumes;
  layerDevices = storediskLib.layerDevices { inherit (cfg) layers; inherit volumesBefore; };
  # Layer 0 where microvm.nix mounts the store disk under a writable overlay (mounts.nix:67-79),
  # the others beside it; /nix/store (or, with a writable overlay, its lower layer) stacks them.
  layerMount = i: if i == 0 then "/nix/.ro-store" else "/nix/.ro-layers/${builtins.elemAt layerNames i}";
  layerMounts = builtins.genList layerMount cfg.layers;
  # Hypervisors that cannot attach read-only disks: vfkit passes neither read-only nor a serial
  # for volumes (microvm.nix lib/runners/vfkit.nix:51) and runs no preStart of ours (:99).
  noReadOnlyVolumes = [ "vfkit" ];
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
        Split the store disk into this many read-only images (layers; a layer may be empty) that
        the guest stacks with overlayfs, so that an update copies only the layers whose contents
        changed and guests built from one base share the layers holding it (storedisk's
        ARCHITECTURE.md, "Layered store disks"). Layer 0 is `microvm.storeDisk`, the others
        read-only `microvm.volumes`; the guest finds them by device order, as microvm.nix finds
        its volumes. The layer plan is computed at evaluation time (import from derivation) for
        the runner only, never for the toplevel. Needs a hypervisor that attaches read-only disks
        (all but vfkit) and, without `microvm.writableStoreOverlay`, systemd in stage 1 (set by
        default: NixOS mounts a read-only overlay only there). null: one store disk.
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
    kernelImageOnly = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Boot the runner from store paths that hold only the kernel image (and vmlinux, for the
        runners that boot it) instead of the kernel package, whose `lib/modules` the store disk
        already holds (microvm.nix's runners boot `''${kernel.out}/''${target}` or
        `''${kernel.dev}/vmlinux`, which copies the modules, or a kernel build tree, with every
        deployment).
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
      Runs `storedisk verify` on `microvm.storeDisk` (every layer, with `storedisk.layers`) and
      `microvm.declaredRunner`, both closures taken from exportReferencesGraph. Fails on any
      finding; build it in CI (`nix build .#nixosConfigurations.NAME.config.microvm.storeDiskCheck`,
      or from checks). It cannot be a `system.checks` entry: the runner depends on the toplevel.
      Without a store disk to check (storedisk disabled, or the store shared from the host) it
      builds a report saying so.
    '';
  };

  # Second declarations of microvm.nix's options, adding only `apply` (the module system merges
  # declarations that do not both set it, and microvm.nix's set none): the fixes apply to the
  # final value whoever defined it.
  # Fixes 3/4: init= (system.nix:35-43) and regInfo= (store-disk.nix:98-100) without context.
  options.microvm.kernelParams = lib.mkOption {
    apply = params: if enabled then storediskLib.kernelParams { } params else params;
  };
  # Fix 5: microvm.kernel (options.nix:90-95) is only what the runners boot; the guest's own
  # kernel is boot.kernelPackages.kernel, which its toplevel and the store disk keep.
  options.microvm.kernel = lib.mkOption {
    apply = kernel:
      if enabled && cfg.kernelImageOnly
      then storediskLib.bootKernel { inherit kernel; target = linuxTarget; }
      else kernel;
  };

  config = lib.mkMerge [
    {
      microvm.storeDiskCheck =
        if enabled then storediskLib.checkRunner {
          runner = config.microvm.declaredRunner;
          storeDisk = disk;
          inherit (cfg.check) allowLeaks allow;
        }
        else storediskLib.nothingToCheck (
          if !storeOnDisk then "the guest's store is not on a disk (microvm.storeOnDisk is false)"
          else "storedisk.enable is false: the store disk is microvm.nix's own");
    }

    (lib.mkIf enabled {
      microvm.storeDisk = lib.mkForce (builtins.head disk.layers);
      microvm.declaredRunner = lib.mkIf (cfg.systemSymlink && !config.microvm.systemSymlink)
        (lib.mkDefault runnerWithSymlink);
      # microvm.nix's own default (options.nix:1061-1063, `!storeOnDisk`); stated here so the
      # check's expectations do not depend on it. A definition by the user (`= true`) wins.
      microvm.systemSymlink = lib.mkDefault false;
      # microvm.nix's default (options.nix:1042-1047) without -Efragments, as before storedisk's
      # own erofs writer packed fragments (the vm-test snapshots pin the images this default
      # makes; switching it is a change of its own). A user's own list, -Efragments included, is
      # honoured as written (nix/flags.nix; fragments by storedisk's own writer, not by
      # mkfs.erofs, whose -Efragments with -Eztailpacking writes wrong file data for some
      # inputs in erofs-utils 1.8.6 and 1.9.4).
      microvm.storeDiskErofsFlags = lib.mkDefault
        ([ "-zlz4hc" ] ++ lib.optional (kernelAtLeast "5.16") "-Eztailpacking");
      warnings = translatedFlags.warnings;
    })

    (lib.mkIf (enabled && layered) {
      assertions = [
        {
          assertion = !(builtins.elem hypervisor noReadOnlyVolumes);
          message = noLayersMessage;
        }
        {
          assertion = builtins.length config.microvm.volumes < 26;
          message = "storedisk.layers: ${toString cfg.layers} layers and the other microvm.volumes make ${toString (builtins.length config.microvm.volumes + 1)} disks; the guest names at most 26 (vda to vdz): use fewer layers.";
        }
      ];
      microvm.volumes = layerVolumes;
      microvm.preStart = storediskLib.layerLinks { inherit hostName disk; };
      # NixOS mounts an overlay without upperdir in stage 1 only with systemd there (nixpkgs
      # nixos/modules/tasks/filesystems/overlayfs.nix asserts it); above microvm.nix's own
      # mkDefault (optimization.nix:21-30), below a user's choice.
      boot.initrd.systemd.enable = lib.mkIf (writableStoreOverlay == null) (lib.mkOverride 900 true);
      fileSystems = builtins.listToAttrs (lib.imap0 (i: device: {
        name = layerMount i;
        value = lib.mkForce {
          inherit device;
          fsType = config.microvm.storeDiskType;
          options = [ "ro" "x-systemd.after=systemd-modules-load.service" ];
          neededForBoot = true;
          noCheck = true;
        };
      }) layerDevices) // {
        # Without a writable overlay: replaces microvm.nix's /nix/store on the store disk
        # (mounts.nix:38-50); with one, only the lower layers of its overlay (mounts.nix:81-91).
        "/nix/store" =
          if writableStoreOverlay == null
          then lib.mkForce { overlay.lowerdir = layerMounts; neededForBoot = true; }
          else { overlay.lowerdir = lib.mkForce layerMounts; };
      };
    })
  ];
}
