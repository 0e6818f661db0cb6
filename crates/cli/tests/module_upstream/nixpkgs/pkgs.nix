# The package set of the module test's stand-in for nixpkgs (crates/cli/tests/module_upstream.rs):
# what microvm.nix's modules and storedisk's read from `pkgs`, modelled on nixpkgs and built by
# busybox alone, so that the real microvm.nix modules evaluate and their derivations instantiate
# (and, for the cases the test builds, build) on a machine without nixpkgs. Packages are store
# directories of stub programs: what matters to the test is which derivation references which,
# never what a program does. Every attribute cites what it models in nixpkgs.
#
# `hostSystem`: where the packages run (the guest's system for a guest's pkgs); `buildSystem`:
# where every derivation builds, as in nixpkgs (a derivation's `system` is its build platform).
{ lib, busybox, hostSystem, buildSystem ? hostSystem }:

let
  # lib/systems: the attributes of a platform the modules read.
  platform = system: rec {
    inherit system;
    isLinux = lib.hasSuffix "-linux" system;
    isDarwin = lib.hasSuffix "-darwin" system;
    isAarch64 = lib.hasPrefix "aarch64-" system;
    isx86_64 = lib.hasPrefix "x86_64-" system;
    linux-kernel.target = if isAarch64 then "Image" else "bzImage";
  };

  # With __structuredAttrs the outputs are not environment variables: read them from the attrs
  # JSON, as nix/lib.nix's runStructured does.
  structuredPreamble = ''
    for output in $(sed -n 's/.*"outputs":{\([^}]*\)}.*/\1/p' "$NIX_ATTRS_JSON_FILE" | tr , ' '); do
      name=$(echo "$output" | sed 's/^"\([^"]*\)".*/\1/')
      value=$(echo "$output" | sed 's/^"[^"]*":"\([^"]*\)"$/\1/')
      eval "$name=$value"
    done
  '';

  # stdenv.mkDerivation (pkgs/stdenv/generic/make-derivation.nix): `buildCommand` (default: an
  # empty $out directory) run by busybox sh with the inputs' bin/ on PATH; `passthru` and `meta`
  # on the result, not in the derivation; `overrideAttrs` and `override` as nixpkgs gives them.
  mkDerivation = attrs:
    let
      passthru = attrs.passthru or { };
      drvAttrs = removeAttrs attrs [ "passthru" "meta" "buildCommand" "nativeBuildInputs" "buildInputs" "pname" "version" ];
      name = attrs.name or "${attrs.pname}-${attrs.version}";
      inputs = (attrs.nativeBuildInputs or [ ]) ++ (attrs.buildInputs or [ ]);
      structured = attrs.__structuredAttrs or false;
      script = ''
        set -eu
        export PATH=${lib.concatMapStringsSep ":" (p: "${p}/bin") ([ busybox ] ++ inputs)}
        ${if structured then structuredPreamble else ""}
      '' + (attrs.buildCommand or "mkdir -p $out\n");
      drv = derivation (drvAttrs // {
        inherit name;
        system = buildSystem;
        builder = "${busybox}/bin/sh";
        args = [ "-c" script ];
      } // lib.optionalAttrs (inputs != [ ]) { nativeBuildInputs = inputs; });
      outputs = attrs.outputs or [ "out" ];
      withOutput = output: drv.${output} // common;
      common = passthru // {
        inherit passthru;
        meta = attrs.meta or { };
        configureFlags = attrs.configureFlags or [ ];
        version = attrs.version or "";
        overrideAttrs = f:
          let old = { configureFlags = [ ]; } // attrs;
          in mkDerivation (attrs // (if builtins.isFunction (f old) then f old old else f old));
        override = _: mkDerivation attrs;
      } // lib.optionalAttrs (attrs ? pname) { inherit (attrs) pname; };
    in
    drv // common // lib.genAttrs outputs withOutput;

  # A package of stub programs, `bins` in $out/bin, `mainProgram` the first.
  package = pname: version: bins: mkDerivation {
    inherit pname version;
    meta.mainProgram = builtins.head bins;
    buildCommand = ''
      mkdir -p $out/bin
      for bin in ${toString bins}; do
        printf '#!%s\necho "%s: a stand-in of the module test" >&2\nexit 1\n' ${busybox}/bin/sh "$bin" > $out/bin/$bin
        chmod 0555 $out/bin/$bin
      done
    '';
  };

  self = {
    # What lib.types.pkgs checks (pkgs/top-level/stage.nix sets it).
    _type = "pkgs";
    inherit lib;
    system = hostSystem;
    # pkgs.path: the nixpkgs tree, where microvm.nix's host module finds nixos/lib/eval-config.nix.
    path = ./.;
    stdenv = {
      hostPlatform = platform hostSystem;
      buildPlatform = platform buildSystem;
      targetPlatform = platform hostSystem;
      inherit mkDerivation;
    };
    stdenvNoCC = self.stdenv;
    # pkgs.buildPackages: the packages of the build machine.
    buildPackages = import ./pkgs.nix { inherit lib busybox; hostSystem = buildSystem; };
    callPackage = fn: args: (if builtins.isFunction fn then fn else import fn)
      (builtins.intersectAttrs (builtins.functionArgs (if builtins.isFunction fn then fn else import fn)) self // args);

    runtimeShell = "${busybox}/bin/sh";
    busybox = busybox;

    # pkgs/build-support/trivial-builders.
    runCommand = name: env: buildCommand: mkDerivation ({ inherit name buildCommand; } // env);
    runCommandLocal = self.runCommand;
    writeTextFile = { name, text, executable ? false, destination ? "", meta ? { } }: mkDerivation {
      inherit name text meta;
      passAsFile = [ "text" ];
      buildCommand = ''
        target=$out${destination}
        mkdir -p "$(dirname "$target")"
        cp "$textPath" "$target"
        ${if executable then "chmod +x \"$target\"" else ""}
      '';
    };
    writeText = name: text: self.writeTextFile { inherit name text; };
    writeShellScript = name: text: self.writeTextFile {
      inherit name;
      executable = true;
      text = "#!${self.runtimeShell}\n${text}";
    };
    writeShellScriptBin = name: text: self.writeTextFile {
      inherit name;
      executable = true;
      destination = "/bin/${name}";
      text = "#!${self.runtimeShell}\n${text}";
      meta.mainProgram = name;
    };
    # writeClosure: the store paths of the closure of `paths`, one per line.
    writeClosure = paths: mkDerivation {
      name = "store-paths";
      __structuredAttrs = true;
      exportReferencesGraph.closure = paths;
      buildCommand = ''
        grep -o '"path":"[^"]*"' "$NIX_ATTRS_JSON_FILE" | sed 's/^"path":"//; s/"$//' | sort -u > $out
      '';
    };
    # pkgs/build-support/closure-info.nix: registration, store-paths, total-nar-size (written by
    # storedisk's busybox awk, which renders the same three files).
    closureInfo = { rootPaths }: mkDerivation {
      name = "closure-info";
      __structuredAttrs = true;
      exportReferencesGraph.closure = rootPaths;
      buildCommand = ''
        mkdir "$out"
        awk -v out="$out" -f ${../../../../../vm-tests/closure-info.awk} "$NIX_ATTRS_JSON_FILE"
      '';
    };
    formats.json = { }: {
      type = lib.types.attrsOf lib.types.anything;
      generate = name: value: self.writeText name (builtins.toJSON value);
    };
    writers.writeJSON = name: value: self.writeText name (builtins.toJSON value);

    # pkgs/os-specific/linux/kernel: a kernel package with `out` (the image and lib/modules) and
    # `dev` (vmlinux), as microvm.nix's runners read them.
    linuxPackages.kernel = mkDerivation {
      pname = "linux";
      version = "6.12.1";
      outputs = [ "out" "dev" ];
      passthru.modDirVersion = "6.12.1";
      buildCommand = ''
        mkdir -p $out/lib/modules/6.12.1/kernel $dev
        echo "kernel image for ${hostSystem}" > $out/${self.stdenv.hostPlatform.linux-kernel.target}
        echo "module" > $out/lib/modules/6.12.1/kernel/erofs.ko
        echo "vmlinux for ${hostSystem}" > $dev/vmlinux
      '';
    };
    linux = self.linuxPackages.kernel;

    # The hypervisors and host tools microvm.nix's runners and modules name (lib/runners/*.nix,
    # nixos-modules), each as a package of stub programs.
    qemu_kvm = package "qemu-kvm-host-${hostSystem}" "10.0.2"
      [ "qemu-system-x86_64" "qemu-system-aarch64" ];
    qemu = package "qemu-host-${hostSystem}" "10.0.2"
      [ "qemu-system-x86_64" "qemu-system-aarch64" ];
    cloud-hypervisor = package "cloud-hypervisor" "48.0" [ "cloud-hypervisor" "ch-remote" ];
    cloud-hypervisor-graphics = self.cloud-hypervisor;
    firecracker = package "firecracker" "1.13.1" [ "firecracker" ];
    crosvm = package "crosvm" "131.0" [ "crosvm" ];
    kvmtool = package "kvmtool" "3.18" [ "lkvm" ];
    stratovirt = package "stratovirt" "2.4.0" [ "stratovirt" ];
    alioth = package "alioth" "0.8.0" [ "alioth" ];
    vfkit = package "vfkit" "0.6.1" [ "vfkit" ];
    virtiofsd = package "virtiofsd" "1.13.2" [ "virtiofsd" ];
    socat = package "socat" "1.8.0" [ "socat" ];
    jq = package "jq" "1.7.1" [ "jq" ];
    python3 = package "python3" "3.12.0" [ "python3" ] // { interpreter = "${self.python3}/bin/python3"; };
    systemd = package "systemd" "257.0" [ "busctl" "systemctl" ] // { interfaceVersion = 2; };
    coreutils = package "coreutils" "9.5" [ "mkdir" "chown" ];
    coreutils-full = self.coreutils;
    gnused = package "gnused" "4.9" [ "sed" ];
    gawk = package "gawk" "5.3" [ "awk" ];
    iproute2 = package "iproute2" "6.11" [ "ip" ];
    util-linux = package "util-linux" "2.40" [ "mount" ];
    kmod = package "kmod" "33" [ "modprobe" ];
    netcat = package "netcat" "1.226" [ "nc" ];
    curl = package "curl" "8.11" [ "curl" ];
    expect = package "expect" "5.45" [ "expect" ];
    git = package "git" "2.47" [ "git" ];
    openssh = package "openssh" "9.9" [ "ssh" ];
    e2fsprogs = package "e2fsprogs" "1.47" [ "mkfs.ext4" ];
    time = package "time" "1.9" [ "time" ];
    bubblewrap = package "bubblewrap" "0.11" [ "bwrap" ];
    squashfs-tools-ng = package "squashfs-tools-ng" "1.3.2" [ "gensquashfs" ];
    erofs-utils = package "erofs-utils" "1.8.6" [ "mkfs.erofs" "fsck.erofs" ];
    nix = package "nix" "2.26.3" [ "nix" "nix-store" ];
  };
in
self
