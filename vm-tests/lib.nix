# The one Nix implementation of what a store-disk MicroVM is made of, modelled on microvm.nix
# (nixos-modules/microvm/store-disk.nix, lib/runner.nix, lib/runners/qemu.nix): closure info,
# store disk, stage-1 initrd, runner, and the check that verifies a runner against its store
# disk. The harness (vm-tests/default.nix) and flake.nix (its `lib` and the NixOS module in
# nix/module.nix) import it, so what `cargo xtask vm-test` builds is what users build.
#
# No nixpkgs: every derivation's builder is busybox's sh (busybox picks the applet from argv[0],
# so `busybox` must be a store directory with bin/<applet> symlinks). `storedisk` is a store
# directory with bin/storedisk: it is a build input of the closure-info and the store disk only,
# never part of what a guest or a runner references. `mkfsErofs`: the mkfs.erofs that
# `storedisk build` runs for erofs images, either a store path (the module: an ordinary build
# input) or an absolute host path without string context (the harness builds with the sandbox
# off; its erofs-utils 1.8 comes from a private prefix that only works where it was unpacked):
# then its sha256 is a derivation input, so a different mkfs.erofs rebuilds the erofs disks.
# `system`: where the derivations build (the build machine), never the guest's architecture:
# a store disk holds files, not code to run, so any machine can build any guest's disk.
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

  # nixpkgs' closureInfo (registration, store-paths, total-nar-size), written by
  # `storedisk closure-info` from the exportReferencesGraph JSON.
  closureInfo = { rootPaths }: runStructured "closure-info" {
    exportReferencesGraph.closure = rootPaths;
  } ''
    ${storedisk}/bin/storedisk closure-info --closure "$NIX_ATTRS_JSON_FILE" --closure-key closure --output "$out"
  '';

  # The store disk: the closure of the toplevel (and the closure info, as microvm.nix packs it
  # when nix.enable) in one squashfs or erofs image, built by `storedisk build`.
  # discardReferences = false reproduces leak 1: Nix then records every store path whose hash
  # appears in the image bytes as a runtime reference of the image.
  # The result also carries `guestRoots` (not a derivation attribute): what checkRunner needs.
  storeDisk = { toplevel, regInfo ? null, format, discardReferences ? true }:
    let roots = [ toplevel ] ++ (if regInfo == null then [ ] else [ regInfo ]);
      hostTool = mkfsErofs != null && !(builtins.hasContext (toString mkfsErofs));
      erofsTool = if format == "erofs" && hostTool then {
        mkfsErofs = builtins.unsafeDiscardStringContext (toString mkfsErofs);
        mkfsErofsSha256 = builtins.hashFile "sha256" mkfsErofs;
      } else { };
      mkfsFlag =
        if format != "erofs" || mkfsErofs == null then ""
        else if hostTool then "--mkfs-erofs ${erofsTool.mkfsErofs}"
        else "--mkfs-erofs ${mkfsErofs}";
      disk = runStructured "microvm-store-disk.${format}" ({
        exportReferencesGraph.closure = roots;
      } // erofsTool // (if discardReferences then { unsafeDiscardReferences.out = true; } else { })) ''
        ${storedisk}/bin/storedisk build --format ${format} --closure "$NIX_ATTRS_JSON_FILE" \
          --closure-key closure ${mkfsFlag} --output "$out" ${toString roots}
      '';
    in disk // { guestRoots = roots; };

  # Stage 1: a busybox initramfs that loads the store-disk modules, mounts the disk read-only at
  # /nix/.ro-store and onto /nix/store in a tmpfs root, and switches to init= from the kernel
  # command line. kernelModules: a store directory with uncompressed .ko files and `load-order`.
  initrd = { kernelModules }: runCommand "microvm-initrd" { } ''
    mkdir -p root/bin root/lib/modules root/dev root/proc root/sys root/mnt-root
    cp ${busybox}/bin/busybox root/bin/busybox
    for applet in sh mount mkdir insmod switch_root cat sleep poweroff reboot; do
      ln -s busybox root/bin/$applet
    done
    for module in $(cat ${kernelModules}/load-order); do
      cp ${kernelModules}/$module root/lib/modules/$module
    done
    cp ${kernelModules}/load-order root/lib/modules/load-order
    cp ${./stage-1-init.sh} root/init
    chmod 0755 root/init
    find root -exec touch -h -d '1970-01-01 00:00:01' {} +
    mkdir -p $out
    cd root
    find . | sort | cpio -o -H newc --quiet | gzip -9n > $out/initrd
  '';

  # The runner, as microvm.nix's qemu runner: bin/microvm-run starts `qemu-system-x86_64 -M
  # microvm` with the store disk as virtio-blk and init=/regInfo= on the kernel command line;
  # share/microvm/system links the toplevel when systemSymlink is on. The discard switches drop
  # the string context of init= and regInfo= (the text stays the same, the reference goes).
  # KVM as upstream by default; MICROVM_ACCEL/MICROVM_CPU override it (the harness's TCG runs).
  runner = { hostName, toplevel, regInfo ? null, storeDisk, kernel, initrd
           , qemu ? "/usr/bin/qemu-system-x86_64", mem ? 256
           , systemSymlink ? true, discardInitContext ? false, discardRegInfoContext ? false
           , extraKernelParams ? "" }:
    let
      keepContextUnless = discard: s: if discard then builtins.unsafeDiscardStringContext s else s;
      initParam = keepContextUnless discardInitContext "init=${toplevel}/init";
      regInfoParam = optionalString (regInfo != null)
        (keepContextUnless discardRegInfoContext "regInfo=${regInfo}/registration");
      script = ''
        #!${busybox}/bin/sh
        # Starts the MicroVM ${hostName}. Generated by storedisk's vm-tests/lib.nix.
        set -eu
        exec ${qemu} -name ${hostName} -M microvm -m ${toString mem} -smp 1 \
          -nodefaults -no-user-config -no-reboot -display none \
          -accel "''${MICROVM_ACCEL:-kvm}" -cpu "''${MICROVM_CPU:-host}" \
          -kernel ${kernel}/bzImage -initrd ${initrd}/initrd \
          -chardev stdio,id=stdio,signal=off -serial chardev:stdio \
          -append "console=ttyS0 reboot=t panic=-1 ${extraKernelParams} ${initParam} ${regInfoParam}" \
          -drive id=store,format=raw,read-only=on,file=${storeDisk},if=none \
          -device virtio-blk-device,drive=store
      '';
    in
    runCommand "microvm-qemu-${hostName}" { inherit script; } ''
      mkdir -p $out/bin $out/share/microvm
      printf '%s' "$script" > $out/bin/microvm-run
      chmod 0555 $out/bin/microvm-run
      ${optionalString systemSymlink "ln -s ${toplevel} $out/share/microvm/system"}
      echo vnet_hdr > $out/share/microvm/tap-flags
    '';

  # The closure of rootPaths as exportReferencesGraph JSON (the structured-attrs file, whose one
  # list of path infos is what `storedisk verify --closure/--runner-closure` reads). It only
  # describes those paths, so its references are discarded: building it needs them, using it not.
  closureJson = name: rootPaths: runStructured name {
    exportReferencesGraph.closure = rootPaths;
    unsafeDiscardReferences.out = true;
  } ''
    cp "$NIX_ATTRS_JSON_FILE" "$out"
  '';

  # The check: `storedisk verify` on a store disk (made by storeDisk above) and the runner that
  # boots it, with both closures from exportReferencesGraph (no Nix database inside a build).
  # Fails on any finding; the report (leaked paths with their bytes and reference chains) is
  # printed to the build log and kept in $out/report.txt. `self_contained` needs the Nix
  # database and is reported as not checked here; an image that kept references still fails,
  # through `runner_overlap`, because the runner's closure then reaches the guest through it.
  # allowLeaks: findings that are all runner_overlap leaks (e.g. a deliberate
  # microvm.systemSymlink) are reported but do not fail the build; any other finding still does.
  # allow: globs for the policy check (runner closure paths allowed outside the image).
  checkRunner = { runner, storeDisk, allowLeaks ? false, allow ? [ ] }:
    let
      guestClosure = closureJson "storedisk-guest-closure.json" storeDisk.guestRoots;
      runnerClosure = closureJson "storedisk-runner-closure.json" [ runner ];
      allowFlags = toString (map (glob: "--allow '${glob}'") allow);
    in
    runCommand "storedisk-check-${runner.name or "runner"}" { } ''
      mkdir -p $out
      status=0
      ${storedisk}/bin/storedisk verify ${storeDisk} --closure ${guestClosure} \
        --runner ${runner} --runner-closure ${runnerClosure} ${allowFlags} \
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
}
