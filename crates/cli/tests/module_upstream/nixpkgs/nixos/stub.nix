# The NixOS options the module test needs (crates/cli/tests/module_upstream.rs), and nothing that
# microvm.nix or storedisk declares: only options NixOS itself declares that microvm.nix's
# modules or storedisk's read or define, each with the nixpkgs file (nixos/modules/...) it models.
# Types follow NixOS where the modules depend on them (fileSystems with its overlay submodule,
# systemd units); the rest are as loose as NixOS allows.
#
# What matters most is that the toplevel depends on the configuration the way NixOS's does
# (system/activation/top-level.nix): it is built from /etc (fstab from `fileSystems`, the units
# from `systemd.services`), the initrd (its modules and the file systems needed for boot), the
# kernel, the kernel parameters and stage 2's `boot.postBootCommands`, and it fails on a failed
# assertion and shows every warning. A toplevel that depended on less would hide exactly the
# cycles a module can make (a value the toplevel reaches, computed from the toplevel, such as a
# layer plan read by import from derivation: an infinite recursion).
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption types;
  opt = type: default: mkOption { inherit type default; };
  bool = default: opt types.bool default;
  anything = opt types.anything;
  lines = opt types.lines "";
  strs = opt (types.listOf types.str) [ ];

  # nixos/lib/utils.nix: file systems stage 1 mounts.
  pathsNeededForBoot = [ "/" "/nix" "/nix/store" "/var" "/var/log" "/var/lib" "/var/lib/nixos" "/etc" "/usr" ];
  fsNeededForBoot = fs: fs.neededForBoot || builtins.elem fs.mountPoint pathsNeededForBoot;

  # nixos/modules/tasks/filesystems.nix (coreFileSystemOpts, fileSystemOpts) with stage-1.nix's
  # neededForBoot and overlayfs.nix's overlay options and their config.
  fileSystemOpts = { name, config, ... }: {
    options = {
      enable = bool true;
      mountPoint = opt types.str name;
      device = opt (types.nullOr types.str) null;
      fsType = opt types.str "auto";
      options = opt (types.nonEmptyListOf types.str) [ "defaults" ];
      depends = strs;
      label = opt (types.nullOr types.str) null;
      noCheck = bool false;
      neededForBoot = bool false;
      autoFormat = bool false;
      autoResize = bool false;
      overlay = {
        lowerdir = opt (types.nullOr (types.nonEmptyListOf types.str)) null;
        upperdir = opt (types.nullOr types.str) null;
        workdir = opt (types.nullOr types.str) null;
        useStage1BaseDirectories = bool true;
      };
    };
    config = lib.mkMerge [
      { device = lib.mkIf (config.label != null) (lib.mkDefault "/dev/disk/by-label/${config.label}"); }
      { options = lib.mkIf (fsNeededForBoot config) [ "x-initrd.mount" ]; }
      (lib.mkIf (config.overlay.lowerdir != null) (
        let
          prefix = if stage1Systemd && config.overlay.useStage1BaseDirectories && fsNeededForBoot config
            then "/sysroot" else "";
        in {
          fsType = "overlay";
          device = lib.mkDefault "overlay";
          depends = config.overlay.lowerdir
            ++ lib.optionals (config.overlay.upperdir != null) [ config.overlay.upperdir config.overlay.workdir ];
          options = [ "lowerdir=${lib.concatMapStringsSep ":" (d: prefix + d) config.overlay.lowerdir}" ]
            ++ lib.optionals (config.overlay.upperdir != null) [
              "upperdir=${prefix}${config.overlay.upperdir}" "workdir=${prefix}${config.overlay.workdir}"
            ];
        }))
    ];
  };
  stage1Systemd = config.boot.initrd.systemd.enable;
  fileSystems = builtins.attrValues config.fileSystems;
  # tasks/filesystems.nix makeFstabEntries.
  fstab = fss: lib.concatMapStrings (fs:
    "${if fs.device != null then fs.device else throw "No device specified for mount point ‘${fs.mountPoint}’."} ${fs.mountPoint} ${fs.fsType} ${lib.concatStringsSep "," fs.options} 0 ${if fs.noCheck then "0" else "2"}\n"
  ) fss;

  # system/boot/systemd.nix and systemd-lib.nix: a unit's options and how a unit file renders.
  unitOpts = { name, ... }: {
    options = {
      enable = bool true;
      description = opt types.str "";
      wantedBy = strs; requiredBy = strs; before = strs; after = strs; wants = strs;
      requires = strs; partOf = strs; bindsTo = strs;
      unitConfig = opt (types.attrsOf types.anything) { };
      restartTriggers = opt (types.listOf types.anything) [ ];
      reloadTriggers = opt (types.listOf types.anything) [ ];
      overrideStrategy = opt (types.enum [ "asDropinIfExists" "asDropin" ]) "asDropinIfExists";
    };
  };
  serviceOpts = { name, ... }: {
    imports = [ unitOpts ];
    options = {
      serviceConfig = opt (types.attrsOf types.anything) { };
      script = lines;
      preStart = lines;
      postStart = lines;
      path = opt (types.listOf (types.either types.package types.str)) [ ];
      environment = opt (types.attrsOf types.anything) { };
      restartIfChanged = bool true;
      stopIfChanged = bool true;
      startLimitIntervalSec = opt (types.nullOr types.int) null;
    };
  };
  render = value: if builtins.isList value then lib.concatMapStringsSep " " toString value else toString value;
  renderSection = attrs: lib.concatStrings (lib.mapAttrsToList (k: v: "${k}=${render v}\n") attrs);
  # makeJobScript: every script is its own store path.
  jobScript = name: kind: text: pkgs.writeShellScript "unit-script-${pathSafe name}-${kind}" text;
  # systemd-lib.nix mkPathSafeName: a unit's name as a store path name.
  pathSafe = lib.replaceStrings [ "@" ":" "\\" "[" "]" ] [ "-" "-" "-" "" "" ];
  serviceFile = name: s: pkgs.writeText "unit-${pathSafe name}.service" (''
    [Unit]
    Description=${s.description}
    After=${render s.after}
    Before=${render s.before}
    Wants=${render s.wants}
    Requires=${render s.requires}
    PartOf=${render s.partOf}
    X-Restart-Triggers=${render s.restartTriggers}
    X-Reload-Triggers=${render s.reloadTriggers}
  '' + renderSection s.unitConfig + ''
    [Service]
    Environment=PATH=${lib.makeBinPath s.path}
  '' + lib.optionalString (s.script != "") "ExecStart=${jobScript name "start" s.script}\n"
    + lib.optionalString (s.preStart != "") "ExecStartPre=${jobScript name "pre-start" s.preStart}\n"
    + renderSection s.serviceConfig);
  unitsDir = units: pkgs.runCommand "system-units" { } ''
    mkdir -p $out
    ${lib.concatStrings (lib.mapAttrsToList (name: file: "ln -s ${file} $out/${name}.service\n") units)}
  '';
  enabledServices = services: lib.mapAttrs serviceFile (lib.filterAttrs (_: s: s.enable) services);

  # system/etc/etc.nix: /etc from environment.etc.
  etc = pkgs.runCommand "etc" { } (''
    mkdir -p $out/etc
    ln -s ${unitsDir (enabledServices config.systemd.services)} $out/etc/systemd-system
  '' + lib.concatStrings (lib.mapAttrsToList (name: file:
    lib.optionalString file.enable ''
      mkdir -p "$(dirname $out/etc/${name})"
      ln -s ${if file.source != null then file.source else pkgs.writeText "etc-${baseNameOf name}" file.text} $out/etc/${name}
    '') config.environment.etc));

  kernel = config.boot.kernelPackages.kernel;
  # system/boot/stage-1.nix (scripted) or system/boot/systemd/initrd.nix: the initrd holds copies
  # of the modules it loads (makeModulesClosure: no reference to the kernel package), the file
  # systems stage 1 mounts and, with systemd, its units.
  initialRamdisk = pkgs.runCommand "initrd-linux-${kernel.version}" { } ''
    mkdir -p $out root
    cp ${kernel}/lib/modules/${kernel.modDirVersion or kernel.version}/kernel/erofs.ko root/
    echo ${lib.escapeShellArg (toString (lib.unique (config.boot.initrd.availableKernelModules ++ config.boot.initrd.kernelModules)))} > root/modules
    cat > root/fstab <<'EOF'
    ${fstab (builtins.filter fsNeededForBoot fileSystems)}
    EOF
    echo systemd=${lib.boolToString stage1Systemd} > root/stage-1
    ${lib.optionalString stage1Systemd
      "ln -s ${unitsDir (enabledServices config.boot.initrd.systemd.services)} root/units"}
    cd root && tar cf $out/initrd .
  '';

  # system/boot/stage-2.nix: the init script, with boot.postBootCommands.
  bootStage2 = pkgs.writeShellScript "stage-2-init" ''
    ${config.boot.postBootCommands}
    exec ${config.systemd.package}/bin/systemctl
  '';

  systemPath = pkgs.runCommand "system-path" { } ''
    mkdir -p $out
    ${lib.concatMapStrings (p: "ln -s ${p} $out/\n") config.environment.systemPackages}
  '';

  # system/activation/top-level.nix: the toplevel, checked against assertions and warnings.
  baseSystem = pkgs.runCommand "nixos-system-${config.system.name}-${config.system.nixos.label}" {
    kernelParams = config.boot.kernelParams;
  } ''
    mkdir -p $out
    cp ${bootStage2} $out/init
    ln -s ${etc}/etc $out/etc
    ln -s ${systemPath} $out/sw
    ln -s ${kernel}/${config.system.boot.loader.kernelFile} $out/kernel
    ln -s ${kernel}/lib/modules $out/kernel-modules
    ln -s ${initialRamdisk}/initrd $out/initrd
    echo -n "$kernelParams" > $out/kernel-params
    echo -n ${config.nixpkgs.hostPlatform.system} > $out/system
    echo ${lib.escapeShellArg (toString config.system.extraDependencies)} > $out/extra-dependencies
    ${config.system.systemBuilderCommands}
  '';
in
{
  options = {
    # misc/assertions.nix
    assertions = opt (types.listOf types.unspecified) [ ];
    warnings = opt (types.listOf types.str) [ ];

    # misc/nixpkgs.nix (the package set itself comes from eval-config.nix, as `pkgs`).
    nixpkgs.hostPlatform = mkOption { type = types.either types.str types.attrs; apply = lib.systems.elaborate; };
    nixpkgs.buildPlatform = mkOption {
      type = types.either types.str types.attrs;
      default = config.nixpkgs.hostPlatform;
      apply = lib.systems.elaborate;
    };
    nixpkgs.overlays = opt (types.listOf types.anything) [ ];

    # system/activation/top-level.nix, misc/version.nix, system/boot/loader/loader.nix
    system.build = mkOption {
      type = types.submoduleWith { modules = [ { freeformType = types.lazyAttrsOf types.unspecified; } ]; };
      default = { };
    };
    system.name = opt types.str (if config.networking.hostName == "" then "unnamed" else config.networking.hostName);
    system.nixos.label = opt types.str "25.11";
    system.stateVersion = opt types.str "25.11";
    system.extraDependencies = opt (types.listOf types.package) [ ];
    system.systemBuilderCommands = lines;
    system.boot.loader.kernelFile = opt types.str pkgs.stdenv.hostPlatform.linux-kernel.target;
    system.boot.loader.initrdFile = opt types.str "initrd";
    # system/activation/activation-script.nix
    system.activationScripts = opt (types.attrsOf types.anything) { };

    # system/boot/kernel.nix
    boot.kernelPackages = opt types.raw pkgs.linuxPackages;
    boot.kernelParams = strs;
    boot.kernelModules = strs;
    boot.blacklistedKernelModules = strs;
    boot.initrd.kernelModules = strs;
    boot.initrd.availableKernelModules = strs;
    # system/boot/systemd/initrd.nix
    boot.initrd.systemd.enable = bool false;
    boot.initrd.systemd.services = opt (types.attrsOf (types.submodule serviceOpts)) { };
    # system/boot/systemd/tpm2.nix
    boot.initrd.systemd.tpm2.enable = bool true;
    # system/boot/stage-2.nix
    boot.postBootCommands = lines;
    # system/boot/loader/grub/grub.nix
    boot.loader.grub.enable = bool true;
    # tasks/swraid.nix
    boot.swraid.enable = bool false;

    # tasks/filesystems.nix (+ overlayfs.nix, stage-1.nix)
    fileSystems = mkOption {
      type = types.attrsOf (types.submodule fileSystemOpts);
      default = { };
      apply = lib.filterAttrs (_: fs: fs.enable);
    };

    # system/boot/systemd.nix, system/boot/systemd/tmpfiles.nix, system/boot/networkd.nix,
    # system/boot/systemd/tpm2.nix
    systemd.package = opt types.package pkgs.systemd;
    systemd.services = opt (types.attrsOf (types.submodule serviceOpts)) { };
    systemd.sockets = opt (types.attrsOf (types.submodule unitOpts)) { };
    systemd.targets = opt (types.attrsOf (types.submodule unitOpts)) { };
    systemd.mounts = opt (types.listOf types.anything) [ ];
    systemd.generators = opt (types.attrsOf types.str) { };
    systemd.tmpfiles.settings = opt (types.attrsOf types.anything) { };
    systemd.network.wait-online.enable = bool true;
    systemd.tpm2.enable = bool true;

    # system/etc/etc.nix
    environment.etc = opt (types.attrsOf (types.submodule ({ name, ... }: {
      options.enable = bool true;
      options.text = opt (types.nullOr types.lines) null;
      options.source = opt (types.nullOr types.path) null;
    }))) { };
    # config/system-path.nix
    environment.systemPackages = opt (types.listOf types.package) [ ];

    # tasks/network-interfaces.nix, services/networking/networkd.nix
    networking.hostName = opt types.str "nixos";
    networking.hostId = opt (types.nullOr types.str) null;
    networking.useNetworkd = bool false;

    # services/system/nix-daemon.nix, config/nix.nix, services/misc/nix-optimise.nix
    nix.enable = bool true;
    nix.package = opt types.package pkgs.nix;
    nix.settings = opt (types.submodule { freeformType = types.attrsOf types.anything;
      options.auto-optimise-store = bool false; }) { };
    nix.optimise.automatic = bool false;

    # security/misc.nix, security/pam.nix, security/wrappers/default.nix
    security.virtualisation.flushL1DataCache = opt (types.nullOr types.str) null;
    security.pam.loginLimits = opt (types.listOf types.attrs) [ ];
    security.wrappers = opt (types.attrsOf types.anything) { };

    # config/users-groups.nix
    users.users = opt (types.attrsOf types.anything) { };
    users.groups = opt (types.attrsOf types.anything) { };

    # misc/documentation.nix, services/networking/ssh/sshd.nix, hardware/ksm.nix,
    # virtualisation/libvirtd.nix, virtualisation/rosetta.nix
    documentation.enable = bool true;
    services.openssh.enable = bool false;
    hardware.ksm.enable = bool false;
    virtualisation.libvirtd.enable = bool false;
    virtualisation.rosetta.enable = bool false;
  };

  config = {
    system.build.toplevel = lib.asserts.checkAssertWarn config.assertions config.warnings baseSystem;
    system.build.initialRamdisk = initialRamdisk;
    system.build.etc = etc;

    # tasks/filesystems/overlayfs.nix: its assertions and the overlay module in the initrd.
    assertions = lib.concatLists (lib.mapAttrsToList (_: fs: lib.optionals (fs.overlay.lowerdir != null) [
      {
        assertion = (fs.overlay.upperdir == null) == (fs.overlay.workdir == null);
        message = "You cannot define a `lowerdir` without a `workdir` and vice versa for mount point: ${fs.mountPoint}";
      }
      {
        assertion = fs.overlay.upperdir == null -> lib.length fs.overlay.lowerdir >= 2;
        message = "A read-only overlay (without an `upperdir`) requires at least 2 `lowerdir`s: ${fs.mountPoint}";
      }
      {
        assertion = (fsNeededForBoot fs && fs.overlay.upperdir == null) -> stage1Systemd;
        message = "Stage 1 overlay file system ${fs.mountPoint} has no upperdir, which is not supported with scripted initrd. Please enable 'boot.initrd.systemd.enable'.";
      }
    ]) config.fileSystems);
    boot.initrd.availableKernelModules = lib.mkIf (builtins.any (fs: fs.overlay.lowerdir != null && fsNeededForBoot fs) fileSystems) [ "overlay" ];
    # tasks/filesystems.nix: fstab in /etc.
    environment.etc.fstab.text = fstab fileSystems;
  };
}
