# storedisk's Nix functions: the one implementation of every fix that keeps a MicroVM deployment
# from copying its guest's uncompressed closure (README "The five fixes"), of layered store disks
# and of the check. The NixOS modules (nix/module.nix, nix/host-module.nix) and the harness's
# fixtures (vm-tests/) call these and have no code of their own for any fix, so the `fixed`
# variant that `cargo xtask vm-test` measures is built by the code users import:
#
#   fix 1   storeDisk, layeredStoreDisk  the image built with its references discarded
#   fix 2   toplevelText                 share/microvm/system names the toplevel without context
#   fix 3/4 kernelParams                 init= and regInfo= without string context
#   fix 5   bootKernel                   the runner boots a path holding only the kernel image
#   host    toplevelText                 a host's units name the guest toplevel without context
#   layers  layeredStoreDisk, layerVolumes, layerLinks, layerDevices
#   check   checkRunner                  `storedisk verify` of a disk and its runner, in a build
#
# No nixpkgs: every derivation's builder is busybox's sh (busybox picks the applet from argv[0],
# so `busybox` must be a store directory with bin/<applet> symlinks). `storedisk` is a store
# directory with bin/storedisk: a build input of the store disk and the check only, never part of
# what a guest or a runner references. `mkfsErofs`: a mkfs.erofs for `storedisk build` to run when
# a build asks for it (`--erofs-writer mkfs`; storedisk writes erofs itself otherwise), a store path (an ordinary build input) or an absolute host path without string context (the
# harness builds with the sandbox off; its erofs-utils comes from a private prefix that only works
# where it was unpacked): then its sha256 is a derivation input, so another mkfs.erofs rebuilds
# the erofs disks. `system`: where the derivations build (the build machine), never the guest's
# architecture: a store disk holds files, not code to run, so any machine builds any guest's disk.
# nix/with-pkgs.nix instantiates this file from nixpkgs; vm-tests/default.nix from host tools.
{ busybox, storedisk, mkfsErofs ? null, system ? "x86_64-linux" }:

let
  # With __structuredAttrs the outputs are not environment variables: read `out` from the attrs
  # JSON (Nix writes it compactly with sorted keys; busybox has no jq).
  structuredPreamble = ''
    set -eu
    export PATH=${busybox}/bin
    out=$(sed -n 's/.*"outputs":{"out":"\([^"]*\)".*/\1/p' "$NIX_ATTRS_JSON_FILE")
    if [ -z "$out" ]; then echo "no output path in $NIX_ATTRS_JSON_FILE" >&2; exit 1; fi
  '';

  optionalString = cond: s: if cond then s else "";
  startsWith = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
  lowerChars = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t"
                 "u" "v" "w" "x" "y" "z" ];
in
rec {
  # A derivation built by `busybox sh -c script`, PATH = busybox.
  runCommand = name: attrs: script: derivation ({
    inherit name system;
    builder = "${busybox}/bin/sh";
    args = [ "-c" ("set -eu\nexport PATH=${busybox}/bin\n" + script) ];
  } // attrs);

  # The same with __structuredAttrs (needed for exportReferencesGraph as JSON and for
  # unsafeDiscardReferences); `$out` is set by the preamble.
  runStructured = name: attrs: script: derivation ({
    inherit name system;
    builder = "${busybox}/bin/sh";
    __structuredAttrs = true;
    args = [ "-c" (structuredPreamble + script) ];
  } // attrs);

  # nixpkgs' closureInfo (registration, store-paths, total-nar-size), written by busybox awk
  # from the exportReferencesGraph JSON. Not by storedisk: the closure info is packed into the
  # store disk, so its store path is in the image's bytes and must not follow the storedisk
  # binary (vm-tests/closure-info.awk says more).
  closureInfo = { rootPaths }: runStructured "closure-info" {
    exportReferencesGraph.closure = rootPaths;
  } ''
    mkdir "$out"
    awk -v out="$out" -f ${../vm-tests/closure-info.awk} "$NIX_ATTRS_JSON_FILE"
  '';

  # What a store disk holds: the closure of the toplevel, and of the closure info when the guest
  # registers its closure (microvm.nix store-disk.nix:36-40 packs it with nix.enable).
  guestRootsOf = { toplevel, regInfo ? null }:
    [ toplevel ] ++ (if regInfo == null then [ ] else [ regInfo ]);

  # Fix 1: the store disk, built by `storedisk build` with its references discarded, so Nix records
  # none of the paths whose hashes its bytes hold (vm-tests/README.md, fix `image`; microvm.nix does
  # the same, store-disk.nix:79-80). discardReferences = false reproduces the leak (the harness's
  # variants). The result also carries `guestRoots` (what checkRunner needs) and `layers` (a single
  # disk is a set of one image). buildFlags: more `storedisk build` flags (the module's reading of
  # microvm.nix's mkfs options, nix/flags.nix).
  storeDisk = { toplevel, regInfo ? null, format, discardReferences ? true, buildFlags ? [ ] }:
    let roots = guestRootsOf { inherit toplevel regInfo; };
      disk = runStructured "microvm-store-disk.${format}" ({
        exportReferencesGraph.closure = roots;
      } // (erofsTool format buildFlags) // (if discardReferences then { unsafeDiscardReferences.out = true; } else { })) ''
        ${storedisk}/bin/storedisk build --format ${format} --closure "$NIX_ATTRS_JSON_FILE" \
          --closure-key closure ${mkfsFlag format buildFlags} ${toString buildFlags} --output "$out" ${toString roots}
      '';
    in disk // { guestRoots = roots; layers = [ disk ]; };

  # How a store disk derivation gets its mkfs.erofs (see `mkfsErofs` above): the host path and
  # its hash as attributes, and the flag that passes it to `storedisk build`. Only for builds
  # that ask for it (`--erofs-writer mkfs`, which nix/flags.nix adds for the algorithms
  # storedisk's own erofs writer does not have): the others never run it, so they do not depend
  # on it either.
  usesMkfs = format: buildFlags:
    let n = builtins.length buildFlags;
    in format == "erofs" && n >= 2 && builtins.any (i:
      builtins.elemAt buildFlags i == "--erofs-writer" && builtins.elemAt buildFlags (i + 1) == "mkfs"
    ) (builtins.genList (i: i) (n - 1));
  hostErofsTool = mkfsErofs != null && !(builtins.hasContext (toString mkfsErofs));
  erofsTool = format: buildFlags: if usesMkfs format buildFlags && hostErofsTool then {
    mkfsErofs = builtins.unsafeDiscardStringContext (toString mkfsErofs);
    mkfsErofsSha256 = builtins.hashFile "sha256" mkfsErofs;
  } else { };
  mkfsFlag = format: buildFlags:
    if !(usesMkfs format buildFlags) || mkfsErofs == null then ""
    else if hostErofsTool then "--mkfs-erofs ${(erofsTool format buildFlags).mkfsErofs}"
    else "--mkfs-erofs ${mkfsErofs}";

  # Fixes 3 and 4: the kernel command line with the string context of `init=` and `regInfo=` dropped
  # (vm-tests/README.md, fixes `init` and `regInfo`). Both name paths the store disk holds, which
  # the guest reads from its own store; with their context the runner's script references the
  # toplevel and the closure info, and the closure info lists, so references, the whole guest
  # closure. The text is unchanged. Every other parameter keeps its context: a user's own store path
  # on the command line is still built and still travels with the runner. `init`/`regInfo` = false
  # keep a parameter's context (the harness's one-fix variants).
  kernelParams = { init ? true, regInfo ? true }: params: map (param:
    if (init && startsWith "init=" param) || (regInfo && startsWith "regInfo=" param)
    then builtins.unsafeDiscardStringContext param
    else param
  ) params;

  # Fix 2 and the host fix: a toplevel's store path as text without string context. The
  # runner's `share/microvm/system` symlink (what `microvm -l` reads, microvm.nix
  # pkgs/microvm-command.nix:174) and a host's `install-microvm-NAME` unit and `microvm@NAME`
  # restart trigger (nixos-modules/host/default.nix:137,156) name the toplevel; Nix records a
  # reference only to paths among a build's inputs, and without the context (and with fixes 1,
  # 3 and 4) the toplevel is not one of them. The text still changes whenever the toplevel does.
  toplevelText = toplevel: builtins.unsafeDiscardStringContext "${toplevel}";

  # Fix 5: a store path holding only one file of a kernel package. microvm.nix's runners boot
  # `${kernel.out}/${linuxTarget}` (lib/runners/qemu.nix:116, vfkit.nix:25, the aarch64 branches
  # of cloud-hypervisor.nix:27, crosvm.nix:21, firecracker.nix:20), `${kernel}/${linuxTarget}`
  # (alioth.nix:36, kvmtool.nix:42, stratovirt.nix:97) or `${kernel.dev}/vmlinux` (the x86_64
  # branches of cloud-hypervisor.nix:26, crosvm.nix:20, firecracker.nix:19). kernel.out also holds
  # lib/modules, which the guest toplevel references and the store disk packs, and kernel.dev a
  # kernel build tree: either copies them a second time with every deployment.
  kernelImage = { kernel, file }:
    runCommand (if file == "vmlinux" then "microvm-kernel-vmlinux" else "microvm-kernel-image") { } ''
      mkdir -p $out
      cp ${kernel}/${file} $out/${file}
    '';

  # The kernel as a runner reads it, with fix 5: `out` (also the value itself) holds only
  # `target` (bzImage, Image...) copied from kernel.out, `dev` only vmlinux copied from
  # kernel.dev (built only when a runner reads it); `version` and `modDirVersion` pass through.
  # `kernel` is a kernel package (nixpkgs' linux) or a plain store directory shaped like one.
  bootKernel = { kernel, target }:
    let
      out = kernelImage { kernel = kernel.out or kernel; file = target; };
      dev = kernelImage { kernel = kernel.dev; file = "vmlinux"; };
      passthru = if builtins.isAttrs kernel
        then builtins.intersectAttrs { version = null; modDirVersion = null; } kernel
        else { };
    in
    out // passthru // { inherit out dev; outputs = [ "out" "dev" ]; };

  # Layered store disks (ARCHITECTURE.md "Layered store disks"): the closure split into exactly
  # `layers` images that the guest stacks with overlayfs. The layer names depend on N alone
  # (crates/builder/src/layers.rs `layer_names`), so a guest's disks and mounts can be declared
  # before the closure exists: nothing its toplevel depends on needs the plan.
  layerNames = count:
    let buckets = if count <= 2 then 1 else count - 2;
        bucket = i: "layer-${if i < 10 then "0" else ""}${toString i}";
    in builtins.genList bucket buckets ++ (if count > 2 then [ "small" ] else [ ]) ++ [ "top" ];

  # Which path goes to which layer is decided by `storedisk layers` in a derivation of its own
  # and read back at evaluation time (import from derivation; only the runner and the check
  # depend on it, never the toplevel). Each layer is then a derivation whose inputs are exactly
  # its store paths (their string context, one by one), with references discarded: a layer whose
  # paths did not change is the same derivation, hence the same store path, across updates and
  # across guests, and `nix copy` skips it. An empty layer is an empty image.
  # The result: `layers` (the N images, in layerNames order), `guestRoots`, `plan`, `planFile`.
  layeredStoreDisk = { toplevel, regInfo ? null, format, layers, buildFlags ? [ ] }:
    let
      roots = guestRootsOf { inherit toplevel regInfo; };
      planFile = runStructured "storedisk-layers.json" {
        exportReferencesGraph.closure = roots;
        unsafeDiscardReferences.out = true;
      } ''
        ${storedisk}/bin/storedisk layers --layers ${toString layers} --closure "$NIX_ATTRS_JSON_FILE" \
          --closure-key closure --json ${toString roots} > "$out"
      '';
      # The plan names paths that exist (building planFile realised the closure); the strings
      # read from it carry planFile's context (the whole closure), which is exactly what a layer
      # must not depend on: drop it and give each path its own.
      plan = builtins.fromJSON (builtins.unsafeDiscardStringContext (builtins.readFile planFile));
      names = layerNames layers;
      planned = map (l: l.name) plan.layers;
      own = path: builtins.appendContext path { ${path} = { path = true; }; };
      layer = l: runStructured "storedisk-${l.name}.${format}" ({
        unsafeDiscardReferences.out = true;
      } // (erofsTool format buildFlags)) ''
        ${storedisk}/bin/storedisk build --format ${format} --exact ${mkfsFlag format buildFlags} ${toString buildFlags} \
          --output "$out" ${toString (map own l.paths)}
      '';
      images =
        if planned == names then map layer plan.layers
        else throw "storedisk: `storedisk layers --layers ${toString layers}` planned the layers ${toString planned}, expected ${toString names} (a storedisk older than this Nix code?)";
    in
    { layers = images; guestRoots = roots; inherit plan planFile; };

  # How a runner attaches a layered store disk, the same on every hypervisor microvm.nix ships
  # that can attach read-only disks: layer 0 is the store disk (`microvm.storeDisk`, which every
  # runner attaches first, e.g. qemu.nix:234-237), layers 1..N-1 are read-only volumes
  # (`microvm.volumes`, attached in list order after it, qemu.nix:275-285). A volume's image is a
  # name fixed by the host name and the layer, relative to the runner's working directory
  # (microvm.nix's own volumes are, e.g. `var.img`; a declared MicroVM runs in its state
  # directory), which `layerLinks`, run by the runner before the hypervisor starts, points at the
  # layer's image in the store. So the volumes, which the guest's toplevel depends on
  # (microvm.nix asserts.nix:8-16 groups them by image, mounts.nix:103-117 folds over them), do
  # not depend on the layer plan.
  layerVolumeImage = { hostName, index }: "storedisk-${hostName}-layer-${toString index}.img";
  layerVolumes = { hostName, layers }: builtins.genList (i: {
    image = layerVolumeImage { inherit hostName; index = i + 1; };
    readOnly = true;
    autoCreate = false;
    mountPoint = null;
    size = 0;
  }) (layers - 1);
  # The runner's part (its preStart): link each volume's image name to the layer's store path.
  # The text carries the layers' context, so the runner references every layer, and `nix copy`
  # of the runner copies the layers that changed.
  layerLinks = { hostName, disk }: builtins.concatStringsSep "" (builtins.genList (i:
    let index = i + 1; in
    "ln -sfn ${builtins.elemAt disk.layers index} ${layerVolumeImage { inherit hostName index; }}\n"
  ) (builtins.length disk.layers - 1));
  # The guest's part: the block device of each layer, as microvm.nix names disks (mounts.nix:21-26
  # for the store disk, :103-117 with lib/default.nix `withDriveLetters` for volumes: the store
  # disk is vda, the volumes follow in list order). `volumesBefore`: how many other volumes come
  # before the layers' in microvm.volumes. Device order rather than a label or serial: squashfs
  # has no label, firecracker, kvmtool and alioth pass no serial (firecracker.nix:45,
  # kvmtool.nix:55, alioth.nix:48), and microvm.nix itself finds unlabelled volumes this way.
  layerDevices = { layers, volumesBefore ? 0 }:
    [ "/dev/vda" ] ++ builtins.genList (i:
      "/dev/vd${builtins.elemAt lowerChars (1 + volumesBefore + i)}") (layers - 1);

  # The closure of rootPaths as exportReferencesGraph JSON (the structured-attrs file, whose one
  # list of path infos is what `storedisk verify --closure/--runner-closure` reads). It only
  # describes those paths, so its references are discarded: building it needs them, using it not.
  closureJson = name: rootPaths: runStructured name {
    exportReferencesGraph.closure = rootPaths;
    unsafeDiscardReferences.out = true;
  } ''
    cp "$NIX_ATTRS_JSON_FILE" "$out"
  '';

  # The check: `storedisk verify` on a store disk (made by storeDisk or layeredStoreDisk above)
  # and the runner that boots it, with both closures from exportReferencesGraph (no Nix database
  # inside a build). Fails on any finding, and when complete, integrity or runner_overlap (or
  # policy, with `allow`) could not run (`--require`); the report (leaked paths with their bytes
  # and reference chains) is printed to the build log and kept in $out/report.txt.
  # `self_contained` needs the Nix database and is reported as not checked here; an image that
  # kept references still fails, through `runner_overlap`, because the runner's closure then
  # reaches the guest through it. allowLeaks: findings that are all runner_overlap leaks (e.g. a
  # deliberate microvm.systemSymlink) are reported but do not fail the build; any other finding
  # still does. allow: globs for the policy check (runner closure paths allowed outside the image).
  checkRunner = { runner, storeDisk, allowLeaks ? false, allow ? [ ] }:
    let
      guestClosure = closureJson "storedisk-guest-closure.json" storeDisk.guestRoots;
      runnerClosure = closureJson "storedisk-runner-closure.json" [ runner ];
      allowFlags = toString (map (glob: "--allow '${glob}'") allow);
      # A layered store disk (layeredStoreDisk) is checked as one: all its layers together.
      images = storeDisk.layers or [ storeDisk ];
    in
    runCommand "storedisk-check-${runner.name or "runner"}" { } ''
      mkdir -p $out
      status=0
      ${storedisk}/bin/storedisk verify ${toString images} --closure ${guestClosure} \
        --runner ${runner} --runner-closure ${runnerClosure} ${allowFlags} \
        --require complete,integrity,runner_overlap${if allow == [ ] then "" else ",policy"}${
          optionalString (builtins.length images > 1) ",disjoint"} \
        > $out/report.txt || status=$?
      cat $out/report.txt
      if [ "$status" = 1 ] && ${if allowLeaks then "true" else "false"}; then
        # Only leaks: the report's finding count equals runner_overlap's path count.
        findings=$(sed -n '1s/^\([0-9]*\) findings*$/\1/p' $out/report.txt)
        leaks=$(sed -n 's/^runner_overlap: \([0-9]*\) path(s) leak.*/\1/p' $out/report.txt)
        if [ -n "$findings" ] && [ "$findings" = "$leaks" ]; then
          echo "storedisk check: $leaks leaked path(s) allowed (allowLeaks)" >&2
          status=0
        fi
      fi
      if [ "$status" != 0 ]; then
        echo "storedisk check failed (storedisk verify exit $status): see the report above" >&2
        exit 1
      fi
    '';

  # What microvm.storeDiskCheck is when there is no store disk to check (storedisk disabled, or
  # the guest's store not on a disk): a build that says so and succeeds.
  nothingToCheck = why: runCommand "storedisk-check-nothing" { inherit why; } ''
    mkdir -p $out
    echo "storedisk check: nothing to check: $why" | tee $out/report.txt
  '';
}
