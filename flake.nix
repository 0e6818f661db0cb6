# storedisk for Nix users: the `storedisk` package, a dev shell with everything
# `cargo xtask test`/`vm-test` use, the NixOS modules for microvm.nix guests with the store on a
# disk and their hosts (nix/module.nix, nix/host-module.nix), the Nix functions they share with
# the harness (nix/lib.nix), and checks that build an example MicroVM with the module and verify
# it. `cargo xtask test` evaluates these outputs offline against microvm.nix at the revision
# pinned below (crates/cli/tests/module_upstream.rs).
# No flake.lock is committed (it cannot be made offline): run `nix flake lock` first.
{
  description = "Self-contained Nix store disk images for microvm.nix MicroVMs, verified";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    microvm = {
      # The revision crates/cli/tests/module_upstream.rs tests the modules against.
      url = "github:microvm-nix/microvm.nix/71beea0076cd46dafcee97a5a2e7d00cbba5bd2f";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs = { self, nixpkgs, microvm }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      exampleGuest = import ./nix/example-guest.nix {
        inherit nixpkgs;
        microvmModule = microvm.nixosModules.microvm;
        storediskModule = self.nixosModules.default;
      };
    in
    {
      overlays.default = final: _prev: {
        storedisk = final.callPackage ./nix/package.nix { };
      };

      packages = forAllSystems (pkgs: rec {
        storedisk = pkgs.callPackage ./nix/package.nix { };
        default = storedisk;
      });

      nixosModules.default = ./nix/module.nix;
      # For hosts that declare MicroVMs (microvm.vms): the host fix (nix/host-module.nix).
      nixosModules.host = ./nix/host-module.nix;

      lib = {
        # nix/lib.nix (closureInfo, storeDisk, layeredStoreDisk, the fixes, checkRunner, ...)
        # built from nixpkgs' busybox and erofs-utils.
        withPkgs = pkgs: import ./nix/with-pkgs.nix { inherit pkgs; };
        # The same functions from a busybox and a storedisk store directory, as the harness
        # calls them: { busybox, storedisk, mkfsErofs ? null, system }.
        withTools = import ./nix/lib.nix;
      };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo rustc rustfmt clippy cargo-insta
            nix qemu
            erofs-utils squashfs-tools-ng squashfsTools
            # Static: it is the fixtures' builder and the guest's userland in the initrd.
            pkgsStatic.busybox
            cpio xz zstd gzip patchelf
          ];
          # The guest kernel for `cargo xtask vm-test` (NixOS has no /boot/vmlinuz-* or
          # /lib/modules); xtask/src/tools.rs reads these.
          STOREDISK_VM_KERNEL = "${pkgs.linuxPackages.kernel}/bzImage";
          STOREDISK_VM_MODULES =
            "${pkgs.linuxPackages.kernel}/lib/modules/${pkgs.linuxPackages.kernel.modDirVersion}";
        };
      });

      checks = forAllSystems (pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          guest = exampleGuest { buildSystem = system; };
          # Backward compatibility: the symlink is back on request and the check reports it.
          withSymlink = exampleGuest {
            buildSystem = system;
            extraConfig = {
              microvm.systemSymlink = true;
              storedisk.check.allowLeaks = true;
            };
          };
          symlinkCheck = withSymlink.config.microvm.storeDiskCheck;
          # storedisk.layers: the store disk as layers, checked as one disk. These checks need
          # nixpkgs; offline, crates/cli/tests/module_upstream.rs evaluates the same modules
          # against microvm.nix with stand-in packages, and the harness's layered scenario boots
          # nix/lib.nix's layers.
          layered = exampleGuest {
            buildSystem = system;
            extraConfig.storedisk.layers = 6;
          };
        in
        {
          storedisk = self.packages.${system}.storedisk;
          example-runner = guest.config.microvm.declaredRunner;
          example-store-disk-check = guest.config.microvm.storeDiskCheck;
          example-layered-store-disk-check = layered.config.microvm.storeDiskCheck;
          example-layered-runner = layered.config.microvm.declaredRunner;
          example-system-symlink-reported = pkgs.runCommand "system-symlink-leak-reported" { } ''
            grep '^runner_overlap: ' ${symlinkCheck}/report.txt
            grep -- '-nixos-system-storedisk-example-' ${symlinkCheck}/report.txt
            touch $out
          '';
        } // nixpkgs.lib.optionalAttrs (system == "x86_64-linux") {
          # An aarch64 guest cross-compiled here: its store disk and check build on x86_64.
          aarch64-guest-store-disk-check = (exampleGuest {
            buildSystem = system;
            guestSystem = "aarch64-linux";
          }).config.microvm.storeDiskCheck;
        });
    };
}
