# The harness's matrix: every scenario x store disk format x variant, as runners that
# `cargo xtask vm-test` builds, boots and copies. Host-provided inputs come from `hostDir`, which
# the harness fills (target/vm-test/host): busybox/ (static busybox + applet links), storedisk/
# (bin/storedisk), kernel/ (the kernel package: bzImage and lib/modules/<release>/ with the
# uncompressed modules a store-disk guest loads and their load-order). QEMU is wrapped in a store
# path (lib.hypervisor) that execs the host's binary, so the runner references a hypervisor with
# a closure of its own, as microvm.nix's does.
#
# Sharing: per scenario one toplevel and one closure info; per scenario and format two store disks
# (references kept / discarded, same bytes); the runners alone differ per variant.
{ hostDir ? builtins.getEnv "STOREDISK_VM_HOST_DIR"
, qemu ? "/usr/bin/qemu-system-x86_64"
, qemuAarch64 ? "/usr/bin/qemu-system-aarch64"
, socat ? "/usr/bin/socat"
, mkfsErofs ? null
  # Where `cargo xtask vm-test --scenario realistic` generated the realistic closure; "" leaves
  # that scenario out of the plan.
, realisticDir ? ""
}:

let
  host = /. + hostDir;
  busybox = builtins.path { path = host + "/busybox"; name = "busybox"; };
  storedisk = builtins.path { path = host + "/storedisk"; name = "storedisk"; };
  # The kernel package, shaped like nixpkgs' kernel.out: the image and lib/modules. The guest
  # toplevel references it (NixOS's `kernel` and `kernel-modules` links), so the store disk packs
  # it, modules included; upstream's runner boots "${kernel.out}/${linuxTarget}"
  # (microvm.nix lib/runners/qemu.nix:116,183), which copies the package a second time.
  kernel = builtins.path { path = host + "/kernel"; name = "linux-host"; };
  hypervisor = lib.hypervisor { qemuBinary = qemu; };
  socatHost = lib.hostProgram { name = "socat-host"; program = "socat"; binary = socat; };

  lib = import ./lib.nix { inherit busybox storedisk mkfsErofs; };
  optionalString = cond: s: if cond then s else "";
  guest = import ./guest.nix { inherit lib busybox; };
  scenarios = import ./scenarios.nix { inherit lib busybox realisticDir; };
  initrd = lib.initrd { inherit kernel; };

  # The five fixes, one switch each. upstream = what microvm.nix main does (commit 71beea0, see
  # vm-tests/README.md): leaks 1-3 fixed (store-disk.nix:79-80, system.nix:35-43; leak 2 by
  # dropping the system symlink, options.nix:1061-1063, which breaks `microvm -l`), regInfo=
  # keeps its context (store-disk.nix:98-100, the fd7e14d regression) and the runner boots from
  # the kernel package (qemu.nix:116). Our fix for leak 2 keeps the symlink, without context.
  # `host`: the host system that declares the VM writes its toplevel without context (only the
  # `host` runs read it; `fixed` has it).
  noFix = {
    image = false; symlink = false; dropSymlink = false; init = false; regInfo = false;
    kernel = false; host = false;
  };
  variants = {
    unfixed = noFix;
    upstream = noFix // { image = true; symlink = true; dropSymlink = true; init = true; };
    fixed = allFixed;
    fix-image = noFix // { image = true; };
    fix-symlink = noFix // { symlink = true; };
    fix-init = noFix // { init = true; };
    fix-reginfo = noFix // { regInfo = true; };
    fix-kernel = noFix // { kernel = true; };
    # The leaks overlap (each alone drags the whole closure in), so a single fix on top of
    # `unfixed` saves almost nothing; the leave-one-out variants show what each leak costs alone.
    leak-image = allFixed // { image = false; };
    leak-symlink = allFixed // { symlink = false; };
    leak-init = allFixed // { init = false; };
    leak-reginfo = allFixed // { regInfo = false; };
    leak-kernel = allFixed // { kernel = false; };
  };
  allFixed = noFix // { image = true; symlink = true; init = true; regInfo = true; kernel = true; host = true; };
  # The variants whose host deployment is measured.
  hostVariants = [ "unfixed" "upstream" "fixed" ];
  formats = [ "squashfs" "erofs" ];

  system = scenarioName: guestName:
    let
      s = scenarios.${guestName};
      # microvm.nix passes regInfo= only with registerClosure && nix.enable (store-disk.nix:98)
      # and packs the closure info only with nix.enable (store-disk.nix:36-40).
      registerClosure = s.registerClosure or true;
      g = guest {
        name = guestName;
        scenario = scenarioName;
        inherit (s) packages program expected;
        inherit kernel initrd registerClosure;
        checkDb = s.checkDb or false;
      };
      regInfo = if registerClosure then lib.closureInfo { rootPaths = [ g.toplevel ]; } else null;
      disk = format: discard: lib.storeDisk {
        inherit (g) toplevel;
        inherit regInfo format;
        discardReferences = discard;
      };
      disks = builtins.listToAttrs (map (format: {
        name = format;
        value = { keeping = disk format false; discarding = disk format true; };
      }) formats);
      layeredDisk = { format, layers }: lib.layeredStoreDisk {
        inherit (g) toplevel;
        inherit regInfo format layers;
      };
    in
    { inherit (g) toplevel manifest; inherit regInfo disks layeredDisk; };

  # The runner of one variant; `hold`: the guest stays up after its result line until the host
  # stops it (the microvm-shutdown test).
  runnerOf = { scenarioName, sys, format, fixes, hold ? false, layers ? null }:
    let
      storeDisk =
        if layers != null then sys.layeredDisk { inherit format layers; }
        else if fixes.image then sys.disks.${format}.discarding else sys.disks.${format}.keeping;
    in
    rec {
      inherit storeDisk fixes;
      inherit (sys) toplevel regInfo;
      hostSystem = lib.hostSystem {
        name = scenarioName;
        inherit runner;
        inherit (sys) toplevel;
        discardContext = fixes.host;
      };
      runner = lib.runner {
        # The same name for every variant and version, as a deployed MicroVM keeps its name.
        hostName = scenarioName;
        inherit (sys) toplevel regInfo;
        inherit storeDisk kernel initrd hypervisor;
        socat = socatHost;
        # Under TCG on a loaded host the kernel's PIT calibration of the TSC can fail, and
        # the boot then hangs; a given TSC rate skips that calibration (guest-side only).
        extraKernelParams = "tsc_early_khz=2000000" + optionalString hold " storedisk.hold";
        systemSymlink = !fixes.dropSymlink;
        systemSymlinkContext = !fixes.symlink;
        discardInitContext = fixes.init;
        discardRegInfoContext = fixes.regInfo;
        bootFromKernelImage = fixes.kernel;
      };
    };

  runsOf = scenarioName: guestName:
    let sys = system scenarioName guestName;
    in builtins.listToAttrs (map (format: {
      name = format;
      value = builtins.mapAttrs (variantName: fixes:
        runnerOf { inherit scenarioName sys format fixes; }
      ) variants;
    }) formats);

  # microvm-shutdown, tried for real: the fixed minimal erofs machine, held up until it is run.
  shutdown = (runnerOf {
    scenarioName = "minimal";
    sys = system "minimal" "minimal";
    format = "erofs";
    fixes = allFixed;
    hold = true;
  }).runner;

  # The aarch64 guest (vm-tests/aarch64.nix): Debian's arm64 busybox and kernel, its disks built
  # here, booted by a runner that emulates it with qemu-system-aarch64 under TCG.
  aarch64 = import ./aarch64.nix {
    inherit lib host variants formats;
    socat = socatHost;
    qemu = qemuAarch64;
  };

  runs = {
    minimal = runsOf "minimal" "minimal";
    nix-db = runsOf "nix-db" "nix-db";
    no-reginfo = runsOf "no-reginfo" "no-reginfo";
    large = runsOf "large" "large";
  } // (if realisticDir == "" then { } else { realistic = runsOf "realistic" "realistic"; });
  updates = {
    minimal = runsOf "minimal" "minimal-v2";
  };
  # A NixOS host that declares the minimal guest, deployed with `nix copy` of its system.
  hosts = {
    minimal = builtins.mapAttrs (format: byVariant:
      builtins.listToAttrs (map (v: { name = v; value = byVariant.${v}; }) hostVariants)
    ) runs.minimal;
  };

  # Layered store disks (ARCHITECTURE.md "Layered store disks"): every guest of the layered
  # scenario, with all fixes, once with one store disk (`single`) and once with a layered one of
  # `layerCount` layers. The harness (xtask/src/vm_test/layered.rs) boots `large` both ways and
  # measures with `nix copy`: a first deployment, an update to `large-update` (hello changed)
  # and to `large-update-big` (one payload changed), and a fleet of fleet-a, -b and -c on one host.
  # Every layered guest's runner is named `layered`, every single one `single` (a deployed
  # MicroVM keeps its name through updates).
  layerCount = 16;
  layeredGuests = [ "large" "large-update" "large-update-big" "fleet-a" "fleet-b" "fleet-c" ];
  layered = builtins.listToAttrs (map (format: {
    name = format;
    value = builtins.listToAttrs (map (guestName: {
      name = guestName;
      value =
        let sys = system guestName guestName;
        in {
          single = runnerOf { scenarioName = "single"; inherit sys format; fixes = allFixed; };
          layered = runnerOf {
            scenarioName = "layered"; inherit sys format; fixes = allFixed; layers = layerCount;
          };
        };
    }) layeredGuests);
  }) formats);
  layeredPlan = builtins.concatLists (map (format:
    builtins.concatLists (map (guestName:
      map (layout:
        let r = layered.${format}.${guestName}.${layout}; in {
          inherit format layout;
          guest = guestName;
          runner = r.runner.outPath;
          toplevel = r.toplevel.outPath;
          regInfo = if r.regInfo == null then null else r.regInfo.outPath;
          disks = map (d: d.outPath) r.storeDisk.layers;
          layers = if layout == "layered"
            then map (l: { inherit (l) name paths; }) r.storeDisk.plan.layers
            else [ ];
        }) [ "single" "layered" ]
    ) layeredGuests)
  ) formats);

  planOf = kind: set: builtins.concatLists (builtins.attrValues (builtins.mapAttrs (scenario: byFormat:
    builtins.concatLists (builtins.attrValues (builtins.mapAttrs (format: byVariant:
      builtins.attrValues (builtins.mapAttrs (variant: r: {
        inherit kind scenario format variant;
        inherit (r) fixes;
        runner = r.runner.outPath;
        storeDisk = r.storeDisk.outPath;
        toplevel = r.toplevel.outPath;
        regInfo = if r.regInfo == null then null else r.regInfo.outPath;
        kernel = "${kernel}";
        hostSystem = r.hostSystem.outPath;
      }) byVariant)) byFormat))) set));
in
{
  inherit runs updates hosts shutdown initrd kernel hypervisor busybox variants aarch64 layered;
  # What the harness's layered phase reads (`-A layeredPlan`, import from derivation: evaluating
  # it builds each guest's closure and layer plan) and builds (-A layered.<disk>.<guest>.<layout>).
  inherit layeredPlan layerCount;
  microvmList = lib.microvmList;
  # What the harness reads (`nix-instantiate --eval --strict --json -A plan`) and builds (-A plan).
  plan = planOf "run" runs ++ planOf "update" updates ++ planOf "host" hosts;
  hostPaths = { inherit busybox kernel initrd hypervisor socatHost storedisk; };
}
