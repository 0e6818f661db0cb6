# The module test's cases (crates/cli/tests/module_upstream.rs): storedisk's NixOS modules,
# taken from storedisk's own flake.nix, evaluated with nixpkgs' real lib.evalModules over
# microvm.nix's real guest and host modules (its flake.nix outputs), with NixOS's options from
# nixpkgs/nixos/stub.nix and packages from nixpkgs/pkgs.nix (busybox-built stand-ins).
#
# `cases.<name>` evaluates one configuration to facts the test asserts on: derivation paths
# (evaluated with --read-write-mode, so the .drv files exist and the test reads their inputs and
# scripts), the kernel parameters with whether each has string context, the volumes and file
# systems, warnings. An evaluation error (a failed assertion, a refused flag, an infinite
# recursion) is the case's outcome; the test says which cases must fail and with what message.
# `names`: every case.
{ microvm, nixpkgsLib, busybox, storedisk, readmeFlake ? null }:

let
  lib = import "${nixpkgsLib}/lib";
  nixpkgs = import ./nixpkgs { inherit lib busybox; };
  # microvm.nix's and storedisk's flakes, their `outputs` called with these inputs (the way Nix
  # calls a flake's outputs, without fetching anything).
  microvmFlake = (import "${microvm}/flake.nix").outputs {
    self = microvmFlake // { outPath = microvm; };
    inherit nixpkgs;
    spectrum = throw "microvm.nix's spectrum input is not needed by its NixOS modules";
  };
  repo = ../../../..;
  storediskFlake = (import (repo + "/flake.nix")).outputs {
    self = storediskFlake // { outPath = repo; };
    inherit nixpkgs;
    microvm = microvmFlake;
  };
  inherit (import "${microvm}/lib" { inherit lib; }) hypervisors;
  # The harness's model of microvm.nix's runner, to compare with what the module makes of the
  # real one (the same toplevel, closure info, disk and kernel in, the same fixes out), with the
  # tools nix/with-pkgs.nix gives the module.
  harnessFor = pkgs: import (repo + "/vm-tests/lib.nix") {
    inherit busybox storedisk;
    mkfsErofs = "${pkgs.buildPackages.erofs-utils}/bin/mkfs.erofs";
  };

  guest = { hostSystem ? "x86_64-linux", buildSystem ? hostSystem, config ? { } }:
    nixpkgs.lib.nixosSystem {
      modules = [
        microvmFlake.nixosModules.microvm
        storediskFlake.nixosModules.default
        {
          nixpkgs.hostPlatform = hostSystem;
          nixpkgs.buildPlatform = buildSystem;
          networking.hostName = lib.mkDefault "guest";
          storedisk.package = storedisk;
        }
        config
      ];
    };

  ctx = s: { text = builtins.unsafeDiscardStringContext s; context = builtins.hasContext s; };
  drvOf = d: if d == null then null else d.drvPath;

  # What the test asserts on, from one guest.
  guestFacts = sys:
    let
      c = sys.config;
      pkgs = sys._module.args.pkgs;
      toplevel = c.system.build.toplevel;
      layered = c.storedisk.layers != null;
      harness = harnessFor pkgs;
      fixture = harness.runner {
        hostName = c.networking.hostName;
        inherit toplevel;
        regInfo = if c.nix.enable then pkgs.closureInfo { rootPaths = [ toplevel ]; } else null;
        storeDisk = if layered
          then harness.layeredStoreDisk {
            inherit toplevel; inherit (c.storedisk) layers;
            regInfo = if c.nix.enable then pkgs.closureInfo { rootPaths = [ toplevel ]; } else null;
            format = c.microvm.storeDiskType;
            buildFlags = ((import (repo + "/nix/flags.nix")).${c.microvm.storeDiskType}
              c.microvm."storeDisk${if c.microvm.storeDiskType == "erofs" then "Erofs" else "Squashfs"}Flags").args;
          }
          else c.microvm.storeDisk;
        kernel = c.boot.kernelPackages.kernel;
        initrd = c.system.build.initialRamdisk;
        hypervisor = c.microvm.qemu.package;
        arch = if lib.hasPrefix "aarch64" c.nixpkgs.hostPlatform.system then "aarch64" else "x86_64";
        systemSymlink = true;
        systemSymlinkContext = false;
        discardInitContext = true;
        discardRegInfoContext = true;
        bootFromKernelImage = true;
      };
    in
    {
      inherit (c.microvm) hypervisor storeOnDisk;
      storeDiskType = if c.microvm.storeOnDisk then c.microvm.storeDiskType else null;
      hostName = c.networking.hostName;
      layers = c.storedisk.layers;
      enabled = c.storedisk.enable;
      # Forces the assertions and every part of the toplevel.
      toplevel = toplevel.drvPath;
      runner = c.microvm.declaredRunner.drvPath;
      check = c.microvm.storeDiskCheck.drvPath;
      regInfo = (pkgs.closureInfo { rootPaths = [ toplevel ]; }).drvPath;
      kernelPackage = c.boot.kernelPackages.kernel.drvPath;
      initrd = c.system.build.initialRamdisk.drvPath;
      kernelParams = map ctx c.microvm.kernelParams;
      volumes = map (v: { inherit (v) image readOnly serial; }) c.microvm.volumes;
      fileSystems = lib.mapAttrs (_: fs: {
        inherit (fs) device fsType options neededForBoot;
        lowerdir = fs.overlay.lowerdir;
      }) c.fileSystems;
      initrdSystemd = c.boot.initrd.systemd.enable;
      inherit (c) warnings;
      buildSystem = c.nixpkgs.buildPlatform.system;
      # The harness's model of the qemu runner, with every fix (qemu guests only).
      fixture = if c.microvm.hypervisor == "qemu" && c.storedisk.enable && c.microvm.storeOnDisk
        then fixture.drvPath else null;
    };

  matrix = builtins.listToAttrs (lib.concatMap (hypervisor: lib.concatMap (format:
    map (layers: {
      name = "${hypervisor}-${format}-${if layers == null then "single" else "layered"}";
      value = guestFacts (guest {
        # vfkit runs on macOS only (lib/runners/vfkit.nix:103-106), for a guest of the host's CPU.
        hostSystem = if hypervisor == "vfkit" then "aarch64-linux" else "x86_64-linux";
        config = {
          microvm.hypervisor = hypervisor;
          microvm.storeDiskType = format;
          storedisk.layers = layers;
          # firecracker refuses to run without an API socket (firecracker.nix:99-103).
          microvm.socket = "guest.sock";
          microvm.vmHostPackages = lib.mkIf (hypervisor == "vfkit") nixpkgs.legacyPackages.aarch64-darwin;
        };
      });
    }) [ null 4 ]) [ "erofs" "squashfs" ]) hypervisors);

  qemu = config: guestFacts (guest { inherit config; });
  upstreamErofsFlags = kernel: [ "-zlz4hc" ] ++ lib.optional (kernel >= 516) "-Eztailpacking"
    ++ lib.optional (kernel >= 601) "-Efragments";

  extra = {
    nix-disabled = qemu { nix.enable = false; };
    nix-disabled-layered = qemu { nix.enable = false; storedisk.layers = 3; };
    system-symlink = qemu { microvm.systemSymlink = true; };
    writable-overlay = qemu { microvm.writableStoreOverlay = "/nix/.rw-store"; };
    writable-overlay-layered = qemu { microvm.writableStoreOverlay = "/nix/.rw-store"; storedisk.layers = 5; };
    tap-interface = qemu {
      microvm.interfaces = [ { type = "tap"; id = "vm-guest"; mac = "02:00:00:00:00:01"; } ];
    };
    user-volume-layered = qemu {
      storedisk.layers = 3;
      microvm.volumes = [ { image = "var.img"; mountPoint = "/var"; size = 256; } ];
    };
    storedisk-disabled = qemu { storedisk.enable = false; };
    store-shared = qemu {
      microvm.shares = [ { tag = "ro-store"; source = "/nix/store"; mountPoint = "/nix/.ro-store"; proto = "9p"; } ];
    };
    # microvm.nix's documented flag lists (options.nix:1034-1058, its CHANGELOG on -Ededupe).
    erofs-flags-kernel-5-15 = qemu { microvm.storeDiskErofsFlags = upstreamErofsFlags 515; };
    erofs-flags-kernel-6-0 = qemu { microvm.storeDiskErofsFlags = upstreamErofsFlags 600; };
    erofs-flags-kernel-6-1 = qemu { microvm.storeDiskErofsFlags = upstreamErofsFlags 601; };
    erofs-flags-dedupe = qemu { microvm.storeDiskErofsFlags = upstreamErofsFlags 601 ++ [ "-Ededupe" ]; };
    squashfs-flags-default = qemu {
      microvm.storeDiskType = "squashfs";
      microvm.storeDiskSquashfsFlags = [ "-c" "zstd" "-j" "$NIX_BUILD_CORES" ];
    };
    erofs-flag-refused = qemu { microvm.storeDiskErofsFlags = [ "-zlz4hc" "-C65536" ]; };
    # An aarch64 guest evaluated on an x86_64 build machine: its disk and check build there.
    aarch64-guest = guestFacts (guest { hostSystem = "aarch64-linux"; buildSystem = "x86_64-linux"; });
    aarch64-guest-layered = guestFacts (guest {
      hostSystem = "aarch64-linux"; buildSystem = "x86_64-linux";
      config.storedisk.layers = 4;
    });
  };

  # Hosts declaring the guest, in each of the three ways microvm.nix's host module takes one
  # (nixos-modules/host/options.nix: config, evaluatedConfig, flake).
  hostOf = { vm, hostFix ? true }:
    let
      sys = nixpkgs.lib.nixosSystem {
        modules = [
          microvmFlake.nixosModules.host
          storediskFlake.nixosModules.host
          {
            nixpkgs.hostPlatform = "x86_64-linux";
            networking.hostName = "host";
            microvm.vms.guest = vm;
            storedisk.host.enable = hostFix;
          }
        ];
      };
      guestConfig = if vm ? flake then vm.flake.nixosConfigurations.guest.config
        else if vm ? evaluatedConfig then vm.evaluatedConfig.config
        else sys.config.microvm.vms.guest.config.config;
    in
    {
      host = sys.config.system.build.toplevel.drvPath;
      guestToplevel = guestConfig.system.build.toplevel.drvPath;
      guestRunner = guestConfig.microvm.declaredRunner.drvPath;
    };
  guestModules = {
    imports = [ storediskFlake.nixosModules.default ];
    storedisk.package = storedisk;
    # Built by the test (tests/module_upstream.rs), and the stand-in erofs-utils has no mkfs.erofs.
    microvm.storeDiskType = "squashfs";
  };
  guestSystem = guest { };
  hosts = {
    host-config = hostOf { vm.config = guestModules; };
    host-config-unfixed = hostOf { vm.config = guestModules; hostFix = false; };
    host-evaluated = hostOf { vm.evaluatedConfig = guestSystem; };
    host-flake = hostOf {
      vm.flake = { outPath = "/etc/microvm-flake"; nixosConfigurations.guest = guestSystem; };
    };
  };

  # README.md's example flake (README "Using storedisk with Nix and microvm.nix"), its outputs
  # called exactly as printed, with these inputs.
  readme = lib.optionalAttrs (readmeFlake != null) (
    let
      outputs = (import readmeFlake).outputs {
        self = outputs;
        inherit nixpkgs;
        microvm = microvmFlake;
        storedisk = storediskFlake;
      };
      guestSys = outputs.nixosConfigurations.my-guest.extendModules {
        modules = [ { storedisk.package = lib.mkForce storedisk; } ];
      };
      hostSys = outputs.nixosConfigurations.my-host.extendModules {
        modules = [ { microvm.vms.my-guest.evaluatedConfig = lib.mkForce guestSys; } ];
      };
    in {
      readme-flake-guest = guestFacts guestSys;
      readme-flake-host = {
        host = hostSys.config.system.build.toplevel.drvPath;
        guestToplevel = guestSys.config.system.build.toplevel.drvPath;
        guestRunner = guestSys.config.microvm.declaredRunner.drvPath;
      };
    });
in
rec {
  cases = matrix // extra // hosts // readme;
  names = builtins.attrNames cases;
}
