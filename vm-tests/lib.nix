# The one Nix implementation of what a store-disk MicroVM is made of, modelled on microvm.nix
# (nixos-modules/microvm/store-disk.nix, lib/runner.nix, lib/runners/qemu.nix): closure info,
# store disk, stage-1 initrd, runner. The harness (vm-tests/default.nix) and flake.nix import it.
#
# No nixpkgs: every derivation's builder is busybox's sh (busybox picks the applet from argv[0],
# so `busybox` must be a store directory with bin/<applet> symlinks). `storedisk` is a store
# directory with bin/storedisk: it is a build input of the closure-info and the store disk only,
# never part of what a guest or a runner references. `mkfsErofs`: the mkfs.erofs that
# `storedisk build` runs for erofs images, by absolute host path (the harness builds with the
# sandbox off; erofs-utils 1.8 comes from a private prefix that only works where it was unpacked).
# Its sha256 is a derivation input, so a different mkfs.erofs rebuilds the erofs disks.
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
  storeDisk = { toplevel, regInfo ? null, format, discardReferences ? true }:
    let roots = [ toplevel ] ++ (if regInfo == null then [ ] else [ regInfo ]);
      erofsTool = if format == "erofs" && mkfsErofs != null then {
        mkfsErofs = builtins.unsafeDiscardStringContext (toString mkfsErofs);
        mkfsErofsSha256 = builtins.hashFile "sha256" mkfsErofs;
      } else { };
      mkfsFlag = if erofsTool == { } then "" else "--mkfs-erofs ${erofsTool.mkfsErofs}";
    in runStructured "microvm-store-disk.${format}" ({
      exportReferencesGraph.closure = roots;
    } // erofsTool // (if discardReferences then { unsafeDiscardReferences.out = true; } else { })) ''
      ${storedisk}/bin/storedisk build --format ${format} --closure "$NIX_ATTRS_JSON_FILE" \
        --closure-key closure ${mkfsFlag} --output "$out" ${toString roots}
    '';

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
}
