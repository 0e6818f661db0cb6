# A guest system in the shape of a NixOS toplevel, without NixOS: `init` (stage 2, see
# stage-2-init.sh), `sw/bin` linking the packages' programs, `kernel`, `kernel-modules` and
# `initrd` links as NixOS's toplevel has them (so the kernel package, modules included, is in the
# guest closure and on the store disk), and a manifest of every file's sha256 (packages and
# kernel package) made at build time, which the guest checks against what it reads from its disk.
# registerClosure = false: a guest built with microvm.registerClosure or nix.enable off, which
# gets no regInfo= (stage 2 then checks the files only).
{ lib, busybox }:

{ name, scenario, packages, program, expected, checkDb ? false
, kernel ? null, initrd ? null, kernelTarget ? "bzImage", registerClosure ? true }:

let
  kernelPackages = if kernel == null then [ ] else [ kernel ];
  manifest = lib.runStructured "${name}-manifest" {
    exportReferencesGraph.closure = packages ++ kernelPackages;
  } ''
    mkdir -p $out
    grep -o '"path":"[^"]*"' "$NIX_ATTRS_JSON_FILE" | sed 's/^"path":"//; s/"$//' | sort -u > $out/paths
    : > $out/sha256sums
    for path in $(cat $out/paths); do
      find "$path" -type f | sort | while read -r file; do sha256sum "$file"; done >> $out/sha256sums
    done
  '';

  init = builtins.replaceStrings
    [ "@busybox@" "@manifest@" "@scenario@" "@program@" "@expected@" "@checkDb@" "@registerClosure@" ]
    [ "${busybox}" "${manifest}" scenario program expected (if checkDb then "1" else "0")
      (if registerClosure then "1" else "0") ]
    (builtins.readFile ./stage-2-init.sh);

  toplevel = lib.runCommand "nixos-system-${name}" {
    inherit init;
    packages = packages;
  } ''
    mkdir -p $out/sw/bin
    for package in $packages; do
      if [ -d "$package/bin" ]; then
        for program in "$package"/bin/*; do ln -s "$program" $out/sw/bin/; done
      fi
    done
    ln -s ${manifest} $out/manifest
    ${if kernel == null then "" else ''
      ln -s ${kernel}/${kernelTarget} $out/kernel
      ln -s ${kernel}/lib/modules $out/kernel-modules
    ''}
    ${if initrd == null then "" else "ln -s ${initrd}/initrd $out/initrd"}
    printf '%s' "$init" > $out/init
    chmod 0555 $out/init
  '';
in
{
  inherit toplevel manifest;
}
