# The one Nix implementation of what a store-disk MicroVM is made of, modelled on microvm.nix
# (nixos-modules/microvm/store-disk.nix, lib/runner.nix, lib/runners/qemu.nix): closure info,
# store disk, stage-1 initrd, runner, and the check that verifies a runner against its store
# disk. The harness (vm-tests/default.nix) and flake.nix (its `lib` and the NixOS module in
# nix/module.nix) import it, so what `cargo xtask vm-test` builds is what users build.
#
# No nixpkgs: every derivation's builder is busybox's sh (busybox picks the applet from argv[0],
# so `busybox` must be a store directory with bin/<applet> symlinks). `storedisk` is a store
# directory with bin/storedisk: it is a build input of the store disk only, never part of what a
# guest or a runner references. `mkfsErofs`: the mkfs.erofs that
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

  # nixpkgs' closureInfo (registration, store-paths, total-nar-size), written by busybox awk
  # from the exportReferencesGraph JSON. Not by storedisk: the closure info is packed into the
  # store disk, so its store path is in the image's bytes and must not follow the storedisk
  # binary (closure-info.awk says more).
  closureInfo = { rootPaths }: runStructured "closure-info" {
    exportReferencesGraph.closure = rootPaths;
  } ''
    mkdir "$out"
    awk -v out="$out" -f ${./closure-info.awk} "$NIX_ATTRS_JSON_FILE"
  '';

  # The store disk: the closure of the toplevel (and the closure info, as microvm.nix packs it
  # when nix.enable) in one squashfs or erofs image, built by `storedisk build`.
  # discardReferences = false reproduces leak 1: Nix then records every store path whose hash
  # appears in the image bytes as a runtime reference of the image.
  # The result also carries `guestRoots` (not a derivation attribute): what checkRunner needs.
  # buildFlags: more `storedisk build` flags (the module's translation of microvm.nix's
  # storeDiskErofsFlags/storeDiskSquashfsFlags, nix/flags.nix).
  storeDisk = { toplevel, regInfo ? null, format, discardReferences ? true, buildFlags ? [ ] }:
    let roots = guestRootsOf { inherit toplevel regInfo; };
      disk = runStructured "microvm-store-disk.${format}" ({
        exportReferencesGraph.closure = roots;
      } // (erofsTool format) // (if discardReferences then { unsafeDiscardReferences.out = true; } else { })) ''
        ${storedisk}/bin/storedisk build --format ${format} --closure "$NIX_ATTRS_JSON_FILE" \
          --closure-key closure ${mkfsFlag format} ${toString buildFlags} --output "$out" ${toString roots}
      '';
    in disk // { guestRoots = roots; layers = [ disk ]; };

  guestRootsOf = { toplevel, regInfo ? null }:
    [ toplevel ] ++ (if regInfo == null then [ ] else [ regInfo ]);

  # How a store disk derivation gets its mkfs.erofs (see `mkfsErofs` above): the host path and
  # its hash as attributes, and the flag that passes it to `storedisk build`.
  hostErofsTool = mkfsErofs != null && !(builtins.hasContext (toString mkfsErofs));
  erofsTool = format: if format == "erofs" && hostErofsTool then {
    mkfsErofs = builtins.unsafeDiscardStringContext (toString mkfsErofs);
    mkfsErofsSha256 = builtins.hashFile "sha256" mkfsErofs;
  } else { };
  mkfsFlag = format:
    if format != "erofs" || mkfsErofs == null then ""
    else if hostErofsTool then "--mkfs-erofs ${(erofsTool format).mkfsErofs}"
    else "--mkfs-erofs ${mkfsErofs}";

  # A layered store disk (`storedisk build --layers`, ARCHITECTURE.md "Layered store disks"):
  # the same closure as storeDisk, split into at most `layers` images that the guest stacks
  # with overlayfs. Which path goes to which layer is decided by `storedisk layers` in a
  # derivation of its own and read back at evaluation time (import from derivation); each layer
  # is then a derivation whose inputs are exactly its store paths (their string context, one by
  # one), with references discarded: a layer whose paths did not change is the same derivation,
  # hence the same store path, across updates and across guests, and `nix copy` skips it.
  # The result is the list of layer images plus `guestRoots` and `plan` (the JSON manifest).
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
      own = path: builtins.appendContext path { ${path} = { path = true; }; };
      layer = l: runStructured "storedisk-${l.name}.${format}" ({
        unsafeDiscardReferences.out = true;
      } // (erofsTool format)) ''
        ${storedisk}/bin/storedisk build --format ${format} --exact ${mkfsFlag format} ${toString buildFlags} \
          --output "$out" ${toString (map own l.paths)}
      '';
      images = map layer plan.layers;
    in
    { layers = images; guestRoots = roots; inherit plan planFile; };

  # A script as its own store path, like nixpkgs' writeShellScript (lib/runner.nix turns every
  # `bin/` entry of the runner into one: `binScriptPkgs`, with vmHostPackages.writeShellScript).
  writeScript = name: text: runCommand name { inherit text; } ''
    { echo "#!${busybox}/bin/sh"; printf '%s\n' "$text"; } > $out
    chmod 0555 $out
  '';

  # Stage 1: a busybox initramfs that loads the store-disk modules, mounts the disk read-only at
  # /nix/.ro-store and onto /nix/store in a tmpfs root, and switches to init= from the kernel
  # command line. Like NixOS's initrd (makeModulesClosure) it holds *copies* of the modules it
  # loads, taken from the kernel package's lib/modules/<release>/ in the order of its
  # `load-order` file, so the initrd does not reference the kernel package.
  # initrdBusybox: the guest's busybox (it runs inside the guest, so it is the guest's arch).
  initrd = { kernel, initrdBusybox ? busybox }: runCommand "microvm-initrd" { } ''
    mkdir -p root/bin root/lib/modules root/dev root/proc root/sys root/mnt-root
    cp ${initrdBusybox}/bin/busybox root/bin/busybox
    for applet in sh mount mkdir insmod switch_root cat sleep poweroff reboot; do
      ln -s busybox root/bin/$applet
    done
    moddir=$(echo ${kernel}/lib/modules/*)
    : > root/lib/modules/load-order
    for module in $(cat $moddir/load-order); do
      name=$(basename $module)
      cp $moddir/$module root/lib/modules/$name
      echo $name >> root/lib/modules/load-order
    done
    cp ${./stage-1-init.sh} root/init
    chmod 0755 root/init
    find root -exec touch -h -d '1970-01-01 00:00:01' {} +
    mkdir -p $out
    cd root
    find . | sort | cpio -o -H newc --quiet | gzip -9n > $out/initrd
  '';

  # Fix 5: a store path holding only the kernel image, copied out of the kernel package. The
  # kernel package (nixpkgs' kernel.out) also holds lib/modules, which the guest toplevel
  # references and the store disk therefore packs; a runner booting
  # "${kernel.out}/${linuxTarget}" (microvm.nix lib/runners/qemu.nix:116,183) copies those
  # modules a second time on every deployment.
  kernelImage = { kernel, target }: runCommand "microvm-kernel-image" { } ''
    mkdir -p $out
    cp ${kernel}/${target} $out/${target}
  '';

  # A host program as a store path with a closure of its own: `bin/<name>` execs `binary` (a host
  # path, its string context discarded). The hypervisor is one, like microvm.nix's
  # `microvm.qemu.package` (qemu_kvm from the guest's pkgs, lib/runners/qemu.nix:35,174), and so
  # is socat, which upstream's microvm-shutdown speaks QMP with (qemu.nix:419).
  hostProgram = { name, program, binary }: runCommand name { } ''
    mkdir -p $out/bin
    printf '#!%s\nexec %s "$@"\n' ${busybox}/bin/sh ${builtins.unsafeDiscardStringContext (toString binary)} \
      > $out/bin/${program}
    chmod 0555 $out/bin/${program}
  '';
  hypervisor = { qemuBinary, arch ? "x86_64" }:
    hostProgram { name = "qemu-host"; program = "qemu-system-${arch}"; binary = qemuBinary; };

  # The runner, as microvm.nix's (lib/runner.nix + lib/runners/qemu.nix): every bin/ entry is
  # its own script derivation, linked from the runner (lib/runner.nix:219-225); microvm-run
  # execs `${hypervisor}/bin/qemu-system-<arch>` (qemu.nix:174) with the store disk as
  # virtio-blk (qemu.nix:235-236) and `init=`/`regInfo=` on the kernel command line;
  # a control socket (qemu.nix:267, default "<hostName>.sock", options.nix:77-82) and so a
  # microvm-shutdown script (qemu.nix:372-421, lib/runner.nix:190-193); share/microvm/system links
  # the toplevel when systemSymlink is on (lib/runner.nix:230-232), for `microvm -l`.
  # The fixes, one switch each: systemSymlinkContext = false (leak 2: the symlink stays, so
  # `microvm -l` keeps working, but without string context; Nix records a reference only to paths
  # in the build's inputs, and with leaks 1, 3 and 4 closed the toplevel is not among them;
  # upstream instead drops the symlink, systemSymlink = false), discardInitContext (leak 3),
  # discardRegInfoContext (leak 4: the text stays the same, the reference goes) and
  # bootFromKernelImage (fix 5: boot `kernelImage` instead of "${kernel}/${target}").
  # KVM as upstream by default; MICROVM_ACCEL/MICROVM_CPU override it (the harness's TCG runs).
  # `arch` picks the machine: x86_64 `-M microvm` (console ttyS0), aarch64 `-M virt` (ttyAMA0,
  # qemu.nix:95-98,147-154); `cpu` set means an emulated guest: TCG with that CPU model.
  runner = { hostName, toplevel, regInfo ? null, storeDisk, kernel, initrd, hypervisor, socat ? null
           , arch ? "x86_64", kernelTarget ? (if arch == "aarch64" then "Image" else "bzImage")
           , cpu ? null, mem ? 256, socket ? "${hostName}.sock"
           , systemSymlink ? true, systemSymlinkContext ? true
           , discardInitContext ? false, discardRegInfoContext ? false
           , bootFromKernelImage ? false, extraKernelParams ? "" }:
    let
      keepContextUnless = discard: s: if discard then builtins.unsafeDiscardStringContext s else s;
      initParam = keepContextUnless discardInitContext "init=${toplevel}/init";
      regInfoParam = optionalString (regInfo != null)
        (keepContextUnless discardRegInfoContext "regInfo=${regInfo}/registration");
      kernelPath =
        if bootFromKernelImage
        then "${kernelImage { inherit kernel; target = kernelTarget; }}/${kernelTarget}"
        else "${kernel}/${kernelTarget}";
      machine = {
        x86_64 = { args = "-M microvm,pit=off,pic=off,rtc=on"; console = "ttyS0"; };
        aarch64 = { args = "-M virt,gic-version=max"; console = "ttyAMA0"; };
      }.${arch};
      accelArgs =
        if cpu == null
        then ''-accel "''${MICROVM_ACCEL:-kvm}" -cpu "''${MICROVM_CPU:-host}"''
        else "-accel tcg -cpu ${cpu}";
      socketArgs = optionalString (socket != null) "-qmp unix:${socket},server=on,wait=off";
      # qemu.nix:226-227: x86_64 gets an i8042, through which microvm-shutdown's
      # ctrl-alt-del reaches the guest kernel.
      deviceArgs = optionalString (arch == "x86_64") "-device i8042";
      # One read-only virtio-blk disk per layer (a plain store disk is one layer); a layered
      # one also tells stage 1 how many disks to stack (storedisk.layers=N).
      disks = storeDisk.layers or [ storeDisk ];
      layered = builtins.length disks > 1;
      # (Interpolated text keeps its spaces: two, as the script's own continuation lines have.)
      storeDiskArgs = builtins.concatStringsSep " \\\n  " (builtins.genList (i:
        let id = if layered then "store${toString i}" else "store"; in
        "-drive id=${id},format=raw,read-only=on,file=${builtins.elemAt disks i},if=none \\\n"
        + "  -device virtio-blk-device,drive=${id}") (builtins.length disks));
      layersParam = optionalString layered " storedisk.layers=${toString (builtins.length disks)}";
      qmpKey = key: ''{"type":"key","data":{"down":true,"key":{"type":"qcode","data":"${key}"}}}'';
      run = writeScript "microvm-${hostName}-microvm-run" ''
        # Starts the MicroVM ${hostName}. Generated by storedisk's vm-tests/lib.nix.
        set -eu
        exec ${hypervisor}/bin/qemu-system-${arch} -name ${hostName} ${machine.args} -m ${toString mem} -smp 1 \
          -nodefaults -no-user-config -no-reboot -display none \
          ${accelArgs} \
          -kernel ${kernelPath} -initrd ${initrd}/initrd \
          -chardev stdio,id=stdio,signal=off -serial chardev:stdio ${socketArgs} ${deviceArgs} \
          -append "console=${machine.console} reboot=t panic=-1 ${extraKernelParams}${layersParam} ${initParam} ${regInfoParam}" \
          ${storeDiskArgs}
      '';
      # As upstream's shutdownCommand (qemu.nix:374-420): ctrl-alt-del as QMP key events through
      # the control socket, with socat, then wait until QEMU closes the socket.
      shutdown = writeScript "microvm-${hostName}-microvm-shutdown" ''
        # Stops the MicroVM ${hostName} through its control socket ${socket}.
        [ -S ${socket} ] || exit 0
        (
          echo '{"execute":"qmp_capabilities"}'
          echo '{"execute":"input-send-event","arguments":{"events":[${qmpKey "ctrl"},${qmpKey "alt"},${qmpKey "delete"}]}}'
          cat
        ) | ${socat}/bin/socat STDIO UNIX:${socket},shut-none
      '';
      canShutdown = socket != null && socat != null;
      scripts = { microvm-run = run; } // (if canShutdown then { microvm-shutdown = shutdown; } else { });
    in
    runCommand "microvm-qemu-${hostName}" { } (''
      mkdir -p $out/bin $out/share/microvm
    '' + builtins.concatStringsSep "" (map (name: ''
      ln -s ${scripts.${name}} $out/bin/${name}
    '') (builtins.attrNames scripts)) + ''
      ${optionalString systemSymlink
        "ln -s ${keepContextUnless (!systemSymlinkContext) "${toplevel}"} $out/share/microvm/system"}
      echo vnet_hdr > $out/share/microvm/tap-flags
      echo qemu > $out/share/microvm/hypervisor
    '');

  # A host system that declares the MicroVM `name`, as microvm.nix's host module makes it
  # (nixos-modules/host/default.nix): the `install-microvm-<name>` unit, whose script links
  # `current` to the runner and, for a VM that is not a flake, `toplevel` to the guest toplevel in
  # the VM's state directory (:127-138), and a `microvm@<name>` drop-in whose restart trigger is the
  # toplevel (:156). Upstream both carry string context, so deploying the host copies the whole
  # guest closure whatever the runner does. discardContext: the same strings without context (they
  # still change when the toplevel does, so the unit still restarts; `toplevel` dangles on a
  # host that has not copied it, and `microvm -l` only reads it). The state directory is
  # $MICROVM_STATE_DIR (default /var/lib/microvms, upstream's stateDir).
  hostSystem = { name, runner, toplevel, discardContext ? false }:
    let
      guest = if discardContext then builtins.unsafeDiscardStringContext "${toplevel}" else "${toplevel}";
      install = writeScript "unit-script-install-microvm-${name}-start" ''
        set -eu
        dir="''${MICROVM_STATE_DIR:-/var/lib/microvms}/${name}"
        mkdir -p "$dir"
        cd "$dir"
        ln -sTf ${runner} current
        ln -sTf ${guest} toplevel
      '';
    in
    runCommand "nixos-system-host" { } ''
      units=$out/etc/systemd/system
      mkdir -p "$units/microvm@${name}.service.d" $out/bin
      printf '[Unit]\nDescription=Install MicroVM ${name}\n[Service]\nType=oneshot\nExecStart=%s\n' \
        ${install} > "$units/install-microvm-${name}.service"
      printf '[Unit]\nX-Restart-Triggers=%s\n' ${guest} > "$units/microvm@${name}.service.d/overrides.conf"
      ln -s ${install} $out/bin/install-microvm-${name}
    '';

  # `microvm -l` as microvm.nix's microvm command lists (pkgs/microvm-command.nix:170-208), for
  # VMs that are not flakes: a VM is `current` when `current/share/microvm/system` (the runner's
  # symlink) names the same toplevel as the `toplevel` link, else `outdated`. The colours and
  # systemctl's booted/active states are left out.
  microvmList = writeScript "microvm-list" ''
    STATE_DIR="''${MICROVM_STATE_DIR:-/var/lib/microvms}"
    for DIR in "$STATE_DIR"/* ; do
      NAME=$(basename "$DIR")
      if [ -d "$DIR" ] && [ -L "$DIR/current" ] ; then
        CURRENT_SYSTEM=$(readlink "$DIR/current/share/microvm/system")
        NEW_SYSTEM=$(readlink "$DIR/toplevel")
        if [ "$CURRENT_SYSTEM" != "$NEW_SYSTEM" ] ; then
          echo "$NAME: outdated(''${CURRENT_SYSTEM#*-}), rebuild(''${NEW_SYSTEM#*-})"
        else
          echo "$NAME: current(''${CURRENT_SYSTEM#*-})"
        fi
      fi
    done
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

  # The check: `storedisk verify` on a store disk (made by storeDisk or layeredStoreDisk above)
  # and the runner that boots it, with both closures from exportReferencesGraph (no Nix database inside a build).
  # Fails on any finding, and when complete, integrity or runner_overlap (or policy, with
  # `allow`) could not run (`--require`); the report (leaked paths with their bytes and reference chains) is
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
}
