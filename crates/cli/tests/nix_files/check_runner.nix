# Fixture of crates/cli/tests/nix_files.rs: a small guest, its store disk (references discarded
# or kept) and runners (the harness's model, vm-tests/lib.nix) with and without each leak, every
# one checked by nix/lib.nix's checkRunner, the function behind the NixOS module's
# `config.microvm.storeDiskCheck`.
# `salt` makes each test run build (and check) afresh.
{ busybox, storedisk, mkfsErofs, salt }:

let
  lib = import ../../../../vm-tests/lib.nix {
    inherit busybox storedisk mkfsErofs;
    system = builtins.currentSystem;
  };

  payload = lib.runCommand "payload" { } ''
    mkdir -p $out/share
    i=0
    while [ $i -lt 4000 ]; do echo "line $i of run ${salt}"; i=$((i + 1)); done > $out/share/data
  '';
  toplevel = lib.runCommand "nixos-system-check-test" { } ''
    mkdir -p $out
    ln -s ${payload} $out/sw
    printf '#!${busybox}/bin/sh\necho ${salt}\n' > $out/init
    chmod 0555 $out/init
  '';
  regInfo = lib.closureInfo { rootPaths = [ toplevel ]; };
  # erofs keeps every packed path's name in its bytes: kept references are all of them.
  disk = discardReferences: lib.storeDisk {
    inherit toplevel regInfo discardReferences;
    format = "erofs";
  };
  # The runner is checked, not booted: stand-ins for the kernel and the initrd.
  kernel = lib.runCommand "kernel-stand-in" { } "mkdir -p $out; : > $out/bzImage";
  initrd = lib.runCommand "initrd-stand-in" { } "mkdir -p $out; : > $out/initrd";
  hypervisor = lib.hypervisor { qemuBinary = "/usr/bin/qemu-system-x86_64"; };

  check = { discardReferences ? true, systemSymlink ? false, discardRegInfoContext ? true
          , allowLeaks ? false }:
    let storeDisk = disk discardReferences;
    in lib.checkRunner {
      inherit storeDisk allowLeaks;
      runner = lib.runner {
        hostName = "check-test";
        inherit toplevel regInfo storeDisk kernel initrd hypervisor systemSymlink discardRegInfoContext;
        discardInitContext = true;
      };
    };
  # A layered store disk (lib.layeredStoreDisk, 3 layers: the payload goes to `small`, the
  # toplevel and the closure info to `top`, and `layer-00` is an empty image), checked as one
  # disk, every layer at once.
  layeredDisk = lib.layeredStoreDisk { inherit toplevel regInfo; format = "erofs"; layers = 3; };
  checkLayered = { systemSymlink ? false }: lib.checkRunner {
    storeDisk = layeredDisk;
    runner = lib.runner {
      hostName = "check-test-layered";
      storeDisk = layeredDisk;
      inherit toplevel regInfo kernel initrd hypervisor systemSymlink;
      discardRegInfoContext = true;
      discardInitContext = true;
    };
  };
in
{
  fixed = check { };
  layered = checkLayered { };
  layeredSystemSymlink = checkLayered { systemSymlink = true; };
  systemSymlink = check { systemSymlink = true; };
  systemSymlinkAllowed = check { systemSymlink = true; allowLeaks = true; };
  regInfoContext = check { discardRegInfoContext = false; };
  imageReferences = check { discardReferences = false; };
}
