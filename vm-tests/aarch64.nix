# The aarch64 guest of the harness (imported by default.nix as its `aarch64` attribute): a MicroVM
# whose userland is Debian's static arm64 busybox and whose kernel is Debian's arm64 cloud kernel,
# built on this x86_64 machine (every derivation's builder is the host's busybox; a store disk
# holds files, not code to run, so it is built where the build runs whatever the guest's CPU) and
# booted by a runner that starts qemu-system-aarch64 -M virt -cpu max under TCG, as microvm.nix
# runs an emulated guest (lib/runners/qemu.nix: `-accel tcg -cpu max` when the guest's system is
# not the host's). Stage 1 loads the arm64 modules and mounts the disk; stage 2 checks every
# registered path and file hash from the disk and runs the arm64 `uname -m`.
#
# Host inputs come from `host` (target/vm-test/host, filled by the harness): busybox-arm64/
# (bin/busybox + applet links) and kernel-aarch64/ (the kernel package: `Image` and
# lib/modules/<release>/ with the uncompressed modules stage 1 loads and their load-order).
# `variants`: default.nix's fix switches; the aarch64 guest gets unfixed, upstream and fixed.
# `plan`: what the harness reads (`-A aarch64.plan`), entries shaped like default.nix's plan.
{ lib, host, variants, formats, socat, qemu }:

let
  busybox = builtins.path { path = host + "/busybox-arm64"; name = "busybox-aarch64"; };
  kernel = builtins.path { path = host + "/kernel-aarch64"; name = "linux-host-aarch64"; };
  kernelTarget = "Image";
  hypervisor = lib.hypervisor { qemuBinary = qemu; arch = "aarch64"; };
  initrd = lib.initrd { inherit kernel; initrdBusybox = busybox; };

  g = (import ./guest.nix { inherit lib busybox; }) {
    name = "aarch64";
    scenario = "aarch64";
    packages = [ busybox ];
    program = "${busybox}/bin/uname -m";
    expected = "aarch64";
    inherit kernel initrd kernelTarget;
  };
  inherit (g) toplevel;
  regInfo = lib.closureInfo { rootPaths = [ toplevel ]; };

  disk = format: discard: lib.storeDisk {
    inherit toplevel regInfo format;
    discardReferences = discard;
  };
  disks = builtins.listToAttrs (map (format: {
    name = format;
    value = { keeping = disk format false; discarding = disk format true; };
  }) formats);

  measured = { inherit (variants) unfixed upstream fixed; };

  runs = builtins.listToAttrs (map (format: {
    name = format;
    value = builtins.mapAttrs (variantName: fixes:
      let
        storeDisk = if fixes.image then disks.${format}.discarding else disks.${format}.keeping;
        runner = lib.runner {
          hostName = "aarch64";
          arch = "aarch64";
          cpu = "max";
          inherit toplevel regInfo storeDisk kernel kernelTarget initrd hypervisor socat;
          systemSymlink = !fixes.dropSymlink;
          systemSymlinkContext = !fixes.symlink;
          discardInitContext = fixes.init;
          discardRegInfoContext = fixes.regInfo;
          bootFromKernelImage = fixes.kernel;
        };
      in
      {
        inherit runner storeDisk fixes toplevel regInfo;
        hostSystem = lib.hostSystem {
          name = "aarch64";
          inherit runner toplevel;
          discardContext = fixes.host;
        };
      }
    ) measured;
  }) formats);

  plan = builtins.concatLists (map (format:
    builtins.attrValues (builtins.mapAttrs (variant: r: {
      kind = "run";
      arch = "aarch64";
      scenario = "aarch64";
      inherit format variant;
      inherit (r) fixes;
      runner = r.runner.outPath;
      storeDisk = r.storeDisk.outPath;
      toplevel = r.toplevel.outPath;
      regInfo = r.regInfo.outPath;
      kernel = "${kernel}";
      hostSystem = r.hostSystem.outPath;
    }) runs.${format})
  ) formats);
in
{
  inherit toplevel regInfo disks runs plan kernel initrd hypervisor busybox;
}
