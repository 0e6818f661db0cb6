# The harness's matrix: every scenario x store disk format x variant, as runners that
# `cargo xtask vm-test` builds, boots and copies. Host-provided inputs come from `hostDir`, which
# the harness fills (target/vm-test/host): busybox/ (static busybox + applet links), storedisk/
# (bin/storedisk), kernel/bzImage, modules/ (uncompressed .ko files + load-order). QEMU is used by
# its host path: it is the deployment target's hypervisor, not part of what is copied.
#
# Sharing: per scenario one toplevel and one closure info; per scenario and format two store disks
# (references kept / discarded, same bytes); the runners alone differ per variant.
{ hostDir ? builtins.getEnv "STOREDISK_VM_HOST_DIR"
, qemu ? "/usr/bin/qemu-system-x86_64"
, mkfsErofs ? null
}:

let
  host = /. + hostDir;
  busybox = builtins.path { path = host + "/busybox"; name = "busybox"; };
  # Debian's static arm64 busybox: the userland of the aarch64 guest (it never runs here).
  busyboxAarch64 = builtins.path { path = host + "/busybox-arm64"; name = "busybox-aarch64"; };
  storedisk = builtins.path { path = host + "/storedisk"; name = "storedisk"; };
  kernel = builtins.path { path = host + "/kernel"; name = "linux-kernel-host"; };
  kernelModules = builtins.path { path = host + "/modules"; name = "linux-modules-host"; };

  lib = import ./lib.nix { inherit busybox storedisk mkfsErofs; };
  guest = import ./guest.nix { inherit lib busybox; };
  scenarios = import ./scenarios.nix { inherit lib busybox; };
  initrd = lib.initrd { inherit kernelModules; };

  # The four fixes, one switch each. upstream = what microvm.nix's store-disk.nix does today
  # according to DESIGN.md section 1: leaks 1-3 fixed, regInfo= keeps its context.
  noFix = { image = false; symlink = false; init = false; regInfo = false; };
  variants = {
    unfixed = noFix;
    upstream = { image = true; symlink = true; init = true; regInfo = false; };
    fixed = allFixed;
    fix-image = noFix // { image = true; };
    fix-symlink = noFix // { symlink = true; };
    fix-init = noFix // { init = true; };
    fix-reginfo = noFix // { regInfo = true; };
    # The leaks overlap (each alone drags the whole closure in), so a single fix on top of
    # `unfixed` saves almost nothing; the leave-one-out variants show what each leak costs alone.
    # (leak-reginfo would be `upstream`.)
    leak-image = allFixed // { image = false; };
    leak-symlink = allFixed // { symlink = false; };
    leak-init = allFixed // { init = false; };
  };
  allFixed = { image = true; symlink = true; init = true; regInfo = true; };
  formats = [ "squashfs" "erofs" ];

  system = scenarioName: guestName:
    let
      s = scenarios.${guestName};
      g = guest {
        name = guestName;
        scenario = scenarioName;
        inherit (s) packages program expected;
        checkDb = s.checkDb or false;
      };
      regInfo = lib.closureInfo { rootPaths = [ g.toplevel ]; };
      disk = format: discard: lib.storeDisk {
        inherit (g) toplevel;
        inherit regInfo format;
        discardReferences = discard;
      };
      disks = builtins.listToAttrs (map (format: {
        name = format;
        value = { keeping = disk format false; discarding = disk format true; };
      }) formats);
    in
    { inherit (g) toplevel manifest; inherit regInfo disks; };

  runsOf = scenarioName: guestName:
    let sys = system scenarioName guestName;
    in builtins.listToAttrs (map (format: {
      name = format;
      value = builtins.mapAttrs (variantName: fixes:
        let
          storeDisk = if fixes.image then sys.disks.${format}.discarding else sys.disks.${format}.keeping;
          runner = lib.runner {
            # The same name for every variant and version, as a deployed MicroVM keeps its name.
            hostName = scenarioName;
            inherit (sys) toplevel regInfo;
            inherit storeDisk kernel initrd qemu;
            # Under TCG on a loaded host the kernel's PIT calibration of the TSC can fail, and
            # the boot then hangs; a given TSC rate skips that calibration (guest-side only).
            extraKernelParams = "tsc_early_khz=2000000";
            systemSymlink = !fixes.symlink;
            discardInitContext = fixes.init;
            discardRegInfoContext = fixes.regInfo;
          };
        in
        { inherit runner storeDisk fixes; inherit (sys) toplevel regInfo; }
      ) variants;
    }) formats);

  # An aarch64 guest, built on this machine: its init and programs are the arm64 busybox, every
  # derivation is built by the host's busybox. Its store disk is architecture-independent, so it
  # is built and verified here like the others; booting it would need qemu-system-aarch64 and an
  # arm64 kernel.
  aarch64 =
    let
      g = (import ./guest.nix { inherit lib; busybox = busyboxAarch64; }) {
        name = "aarch64";
        scenario = "aarch64";
        packages = [ busyboxAarch64 ];
        program = "${busyboxAarch64}/bin/uname -m";
        expected = "aarch64";
      };
      regInfo = lib.closureInfo { rootPaths = [ g.toplevel ]; };
    in
    {
      inherit (g) toplevel;
      inherit regInfo;
      disks = builtins.listToAttrs (map (format: {
        name = format;
        value = lib.storeDisk {
          inherit (g) toplevel;
          inherit regInfo format;
          discardReferences = true;
        };
      }) formats);
    };

  runs = {
    minimal = runsOf "minimal" "minimal";
    nix-db = runsOf "nix-db" "nix-db";
    large = runsOf "large" "large";
  };
  updates = {
    minimal = runsOf "minimal" "minimal-v2";
  };

  planOf = kind: set: builtins.concatLists (builtins.attrValues (builtins.mapAttrs (scenario: byFormat:
    builtins.concatLists (builtins.attrValues (builtins.mapAttrs (format: byVariant:
      builtins.attrValues (builtins.mapAttrs (variant: r: {
        inherit kind scenario format variant;
        inherit (r) fixes;
        runner = r.runner.outPath;
        storeDisk = r.storeDisk.outPath;
        toplevel = r.toplevel.outPath;
        regInfo = r.regInfo.outPath;
      }) byVariant)) byFormat))) set));
in
{
  inherit runs updates initrd kernel busybox variants aarch64;
  # What the harness reads (`nix-instantiate --eval --strict --json -A plan`) and builds (-A plan).
  plan = planOf "run" runs ++ planOf "update" updates;
  hostPaths = { inherit busybox kernel kernelModules initrd storedisk; };
}
