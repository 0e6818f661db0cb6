# nixosModules.host: the host fix for hosts that declare MicroVMs with microvm.nix's host module
# (`microvm.vms.NAME`). Upstream (nixos-modules/host/default.nix) links the guest toplevel into
# the VM's state directory from the `install-microvm-NAME` unit (:137, VMs that are not flakes)
# and makes it a restart trigger of `microvm@NAME` (:156). Both carry string context, so the
# host system references the guest toplevel and deploying the host copies the whole guest
# closure, whatever the runner does. For every declared VM whose guest uses storedisk's module
# with the store on a disk, this module writes both without context: they still change when the
# toplevel does (the unit restarts, `microvm -l` compares the link), but Nix records no
# reference. The text without context comes from nix/lib.nix's `toplevelText`, which the
# harness's model of such a host (vm-tests/lib.nix `hostSystem`, the `host` runs of
# `cargo xtask vm-test`) uses too.
{ config, lib, pkgs, ... }:

let
  cfg = config.storedisk.host;
  inherit (import ./with-pkgs.nix { inherit pkgs; }) toplevelText;
  inherit (config.microvm) stateDir;
  # As upstream's (host/default.nix:12-13).
  user = "microvm";
  group = "kvm";

  # The guest's configuration, found as upstream finds it (host/default.nix:102-107).
  guestOf = name: vm:
    if vm.flake != null then vm.flake.nixosConfigurations.${name}.config
    else if vm.evaluatedConfig != null then vm.evaluatedConfig.config
    else vm.config.config;
  applies = guest:
    guest.microvm.storeOnDisk && (guest.storedisk.enable or false);

  fixFor = name:
    let
      vm = config.microvm.vms.${name};
      guest = guestOf name vm;
      toplevel = toplevelText guest.system.build.toplevel;
      runner = guest.microvm.declaredRunner;
    in
    lib.optionalAttrs (applies guest) {
      "microvm@${name}".restartTriggers = lib.mkForce [ toplevel ];
      # Upstream's script (host/default.nix:127-145) with the toplevel link without context.
      "install-microvm-${name}".script = lib.mkForce (''
        mkdir -p ${stateDir}/${name}
        cd ${stateDir}/${name}

        ln -sTf ${runner} current
        chown -h ${user}:${group} . current
      '' + lib.optionalString (vm.flake == null) ''
        ln -sTf ${toplevel} toplevel
      '' + lib.optionalString (vm.flake != null) ''
        echo '${if vm.updateFlake != null then vm.updateFlake else vm.flake}' > flake
        chown -h ${user}:${group} flake
      '');
    };
in
{
  options.storedisk.host.enable = lib.mkOption {
    type = lib.types.bool;
    default = true;
    description = ''
      For each `microvm.vms` guest with the store on a disk and storedisk's module enabled,
      write its toplevel into the host's units without string context, so deploying the host
      does not copy the guest's closure.
    '';
  };

  config = lib.mkIf (cfg.enable && config.microvm.host.enable) {
    systemd.services = lib.mkMerge (map fixFor (builtins.attrNames config.microvm.vms));
  };
}
