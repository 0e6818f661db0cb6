# The harness's model of what microvm.nix builds, for guests made of busybox alone (no nixpkgs,
# no NixOS): its runner with the script derivations (lib/runner.nix, lib/runners/qemu.nix), a
# stage-1 initrd, host programs as store paths (the hypervisor, socat), the host system that
# declares a MicroVM (nixos-modules/host) and `microvm -l`. Every fix, the store disk, layered
# store disks and the check are not modelled here but called from nix/lib.nix, the functions
# the NixOS modules use, so the variants `cargo xtask vm-test` measures are built by the code
# users import; comments give the microvm.nix (71beea0) file and line each part imitates. The
# result is nix/lib.nix's functions plus the model's.
{ busybox, storedisk, mkfsErofs ? null, system ? "x86_64-linux" }:

let
  optionalString = cond: s: if cond then s else "";
  # The fixes, the store disks and the check: the functions the NixOS modules use.
  fixes = import ../nix/lib.nix { inherit busybox storedisk mkfsErofs system; };
  inherit (fixes) runCommand;
in
fixes // rec {
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
  # runs the runner's preStart (lib/runner.nix:166-168) and execs
  # `${hypervisor}/bin/qemu-system-<arch>` (qemu.nix:174) with the store disk as virtio-blk
  # (qemu.nix:234-237), each volume after it as read-only virtio-blk `vd<letter>`
  # (qemu.nix:275-285) and the kernel parameters on its command line; a control socket
  # (qemu.nix:267, default "<hostName>.sock", options.nix:77-82) and so a microvm-shutdown script
  # (qemu.nix:372-421, lib/runner.nix:190-193); share/microvm/system links the toplevel when
  # systemSymlink is on (lib/runner.nix:230-232), for `microvm -l`.
  # The fixes, one switch each, all applied by nix/lib.nix's functions, as the NixOS module
  # applies them to microvm.nix's own runner: systemSymlinkContext = false (fix 2: the symlink
  # stays, so `microvm -l` keeps working, without string context; upstream instead drops the
  # symlink, systemSymlink = false), discardInitContext and discardRegInfoContext (fixes 3 and 4)
  # and bootFromKernelImage (fix 5).
  # `storeDisk`: nix/lib.nix's storeDisk, or its layeredStoreDisk: then layer 0 is the store disk
  # and the others volumes whose images the preStart links (nix/lib.nix layerVolumes, layerLinks),
  # and `storedisk.layers=` tells stage 1 the devices nix/lib.nix layerDevices gives the
  # module's fileSystems (the busybox stage 1 has no fstab).
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
      params = fixes.kernelParams { init = discardInitContext; regInfo = discardRegInfoContext; }
        ([ "init=${toplevel}/init" ] ++ (if regInfo == null then [ ] else [ "regInfo=${regInfo}/registration" ]));
      initParam = builtins.head params;
      regInfoParam = optionalString (regInfo != null) (builtins.elemAt params 1);
      kernelPath =
        if bootFromKernelImage
        then "${(fixes.bootKernel { inherit kernel; target = kernelTarget; }).out}/${kernelTarget}"
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
      layers = storeDisk.layers or [ storeDisk ];
      layered = builtins.length layers > 1;
      volumes = if layered then fixes.layerVolumes { inherit hostName; layers = builtins.length layers; } else [ ];
      preStart = optionalString layered (fixes.layerLinks { inherit hostName; disk = storeDisk; });
      drive = id: file:
        "-drive id=${id},format=raw,read-only=on,file=${file},if=none \\\n"
        + "  -device virtio-blk-device,drive=${id}";
      # (Interpolated text keeps its spaces: two, as the script's own continuation lines have.)
      devices = fixes.layerDevices { layers = builtins.length layers; };
      storeDiskArgs = builtins.concatStringsSep " \\\n  " ([ (drive "store" (builtins.head layers)) ]
        ++ builtins.genList (i: drive (baseNameOf (builtins.elemAt devices (i + 1))) (builtins.elemAt volumes i).image)
          (builtins.length volumes));
      layersParam = optionalString layered " storedisk.layers=${builtins.concatStringsSep "," devices}";
      qmpKey = key: ''{"type":"key","data":{"down":true,"key":{"type":"qcode","data":"${key}"}}}'';
      run = writeScript "microvm-${hostName}-microvm-run" (''
        # Starts the MicroVM ${hostName}. Generated by storedisk's vm-tests/lib.nix.
        set -eu
      '' + preStart + ''
        exec ${hypervisor}/bin/qemu-system-${arch} -name ${hostName} ${machine.args} -m ${toString mem} -smp 1 \
          -nodefaults -no-user-config -no-reboot -display none \
          ${accelArgs} \
          -kernel ${kernelPath} -initrd ${initrd}/initrd \
          -chardev stdio,id=stdio,signal=off -serial chardev:stdio ${socketArgs} ${deviceArgs} \
          -append "console=${machine.console} reboot=t panic=-1 ${extraKernelParams}${layersParam} ${initParam} ${regInfoParam}" \
          ${storeDiskArgs}
      '');
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
        "ln -s ${if systemSymlinkContext then "${toplevel}" else fixes.toplevelText toplevel} $out/share/microvm/system"}
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
      guest = if discardContext then fixes.toplevelText toplevel else "${toplevel}";
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

}
