# A guest system in the shape of a NixOS toplevel, without NixOS: `init` (stage 2, see
# stage-2-init.sh), `sw/bin` linking the packages' programs, and a manifest of every package file's
# sha256 made at build time, which the guest checks against what it reads from its store disk.
{ lib, busybox }:

{ name, scenario, packages, program, expected, checkDb ? false }:

let
  manifest = lib.runStructured "${name}-manifest" {
    exportReferencesGraph.closure = packages;
  } ''
    mkdir -p $out
    grep -o '"path":"[^"]*"' "$NIX_ATTRS_JSON_FILE" | sed 's/^"path":"//; s/"$//' | sort -u > $out/paths
    : > $out/sha256sums
    for path in $(cat $out/paths); do
      find "$path" -type f | sort | while read -r file; do sha256sum "$file"; done >> $out/sha256sums
    done
  '';

  init = builtins.replaceStrings
    [ "@busybox@" "@manifest@" "@scenario@" "@program@" "@expected@" "@checkDb@" ]
    [ "${busybox}" "${manifest}" scenario program expected (if checkDb then "1" else "0") ]
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
    printf '%s' "$init" > $out/init
    chmod 0555 $out/init
  '';
in
{
  inherit toplevel manifest;
}
