# A small microvm.nix guest with the store on a disk and storedisk's module, for the flake's
# checks. buildSystem builds it (and its store disk); guestSystem is the CPU it runs on: when
# they differ, the guest is cross-compiled and its disk and check are still built on buildSystem.
{ nixpkgs, microvmModule, storediskModule }:

{ buildSystem, guestSystem ? buildSystem, extraConfig ? { } }:

nixpkgs.lib.nixosSystem {
  modules = [
    microvmModule
    storediskModule
    extraConfig
    {
      nixpkgs.buildPlatform = buildSystem;
      nixpkgs.hostPlatform = guestSystem;
      networking.hostName = "storedisk-example";
      system.stateVersion = "25.05";
      microvm.hypervisor = "qemu";
      # No share of the host's /nix/store: the store is on the disk (microvm.storeOnDisk).
      microvm.shares = [ ];
      users.users.root.password = "";
    }
  ];
}
