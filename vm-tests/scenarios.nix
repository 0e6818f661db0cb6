# The guests the harness builds. Every byte comes from this directory and busybox: payloads are
# generated at build time by gen.awk from fixed seeds, so they are identical on every machine.
#   minimal    a few small packages
#   minimal-v2 the same with one package (greeting) changed: the update measurement
#   nix-db     a 24-library reference graph; the guest checks its registration as a Nix DB
#   no-reginfo minimal, built with microvm.registerClosure (or nix.enable) off: no closure info
#              on the disk, no regInfo= on the kernel command line
#   large      150 payload paths (>= 100 MiB) plus a bundle referencing them
#   large-update, large-update-big, fleet-a/b/c: the layered scenario's guests (see below)
#   realistic  (opt-in, with `realisticDir`) a generated closure of NixOS size, see realistic.nix
{ lib, busybox, realisticDir ? "" }:

let
  generate = { seed, bytes, file }: ''
    mkdir -p "$(dirname "${file}")"
    awk -v seed=${toString seed} -v bytes=${toString bytes} -f ${./gen.awk} > "${file}"
  '';

  pad = width: n: let s = toString n; in
    if builtins.stringLength s >= width then s else pad width ("0" + s);

  range = from: to: if from > to then [ ] else [ from ] ++ range (from + 1) to;

  greeting = version: lib.runCommand "greeting-${version}" { } ''
    mkdir -p $out/share
    printf 'Hello from the storedisk guest (%s)\n' ${version} > $out/share/greeting
  '';

  hello = version: lib.runCommand "hello-${version}" { } ''
    mkdir -p $out/bin
    printf '#!%s\ncat %s\n' ${busybox}/bin/sh ${greeting version}/share/greeting > $out/bin/hello
    chmod 0555 $out/bin/hello
  '';

  words = lib.runCommand "words" { } (generate { seed = 1; bytes = 65536; file = "$out/share/words.txt"; });

  minimal = version: {
    packages = [ (hello version) words ];
    program = "${hello version}/bin/hello";
    expected = "Hello from the storedisk guest (${version})";
  };

  # lib-N references lib-(N/2): a binary tree of references rooted at lib-00.
  libs = builtins.foldl' (acc: n:
    let
      name = "lib-${pad 2 n}";
      parent = if n == 0 then null else builtins.elemAt acc (n / 2);
    in
    acc ++ [
      (lib.runCommand name { } (''
        mkdir -p $out/lib $out/nix-support
      '' + generate { seed = 100 + n; bytes = 8192; file = "$out/lib/${name}.txt"; } + (if parent == null then "" else ''
        echo ${parent} > $out/nix-support/depends
      '')))
    ]) [ ] (range 0 23);

  app = lib.runCommand "nix-db-app" { } ''
    mkdir -p $out/bin
    {
      echo '#!${busybox}/bin/sh'
      echo 'n=0'
      for l in ${toString libs}; do echo "[ -s $l/lib/\$(basename $l | cut -d- -f2-).txt ] && n=\$((n + 1))"; done
      echo 'echo "nix-db app sees $n libraries"'
    } > $out/bin/nix-db-app
    chmod 0555 $out/bin/nix-db-app
  '';

  # payload-N references payload-(N - N mod 10): 15 groups of ten. `changed`: the payload whose
  # bytes differ (another seed), for the layered scenario's update of a large package.
  payloadsWith = changed: builtins.foldl' (acc: n:
    let
      name = "payload-${pad 3 n}";
      mod10 = n - (n / 10) * 10;
      base = if mod10 == 0 then null else builtins.elemAt acc (n - mod10);
      seedOffset = if n == changed then 7 else 0;
    in
    acc ++ [
      (lib.runCommand name { } (builtins.concatStringsSep "" (map (part:
        generate { seed = 1000 + n * 4 + part + seedOffset; bytes = 180224; file = "$out/share/${name}/part-${toString part}.txt"; }
      ) (range 0 3)) + (if base == null then "" else ''
        echo ${base} > $out/share/${name}/depends
      '')))
    ]) [ ] (range 0 149);

  bundleOf = payloads: lib.runCommand "payload-bundle" { } ''
    mkdir -p $out/bin $out/share
    for p in ${toString payloads}; do echo $p; done > $out/share/payloads
    {
      echo '#!${busybox}/bin/sh'
      echo 'n=0'
      echo "for p in \$(cat $out/share/payloads); do [ -d \"\$p/share\" ] && n=\$((n + 1)); done"
      echo 'echo "$n payload paths"'
    } > $out/bin/payload-bundle
    chmod 0555 $out/bin/payload-bundle
  '';

  bundle = bundleOf (payloadsWith null);

  largeWith = { helloVersion ? "v1", changedPayload ? null, extra ? [ ] }:
    let b = if changedPayload == null then bundle else bundleOf (payloadsWith changedPayload); in {
      packages = [ b (hello helloVersion) ] ++ extra;
      program = "${b}/bin/payload-bundle";
      expected = "150 payload paths";
    };

  # A fleet member: the large guest's packages plus an application of its own (2 MiB of data
  # and a program), as MicroVMs of one host built from one base system.
  fleetApp = name: seed: lib.runCommand "app-${name}-1.0" { } (generate {
    inherit seed; bytes = 2097152; file = "$out/share/app-${name}/data.txt";
  } + ''
    mkdir -p $out/bin
    printf '#!%s\necho "fleet app ${name}"\n' ${busybox}/bin/sh > $out/bin/app-${name}
    chmod 0555 $out/bin/app-${name}
  '');
  fleet = name: seed:
    let app = fleetApp name seed; in
    largeWith { extra = [ app ]; } // {
      program = "${app}/bin/app-${name}";
      expected = "fleet app ${name}";
    };
in
{
  minimal = minimal "v1";
  minimal-v2 = minimal "v2";

  no-reginfo = minimal "v1" // { registerClosure = false; };

  nix-db = {
    packages = [ app (hello "v1") ];
    program = "${app}/bin/nix-db-app";
    expected = "nix-db app sees 24 libraries";
    checkDb = true;
  };

  large = largeWith { };

  # The layered scenario's guests (default.nix `layered`): the large guest after a one-package
  # update (hello, a small package), after an update of one large package (payload-017, 704 KiB),
  # and three fleet members sharing its packages.
  large-update = largeWith { helloVersion = "v2"; };
  large-update-big = largeWith { changedPayload = 17; };
  fleet-a = fleet "a" 7001;
  fleet-b = fleet "b" 7002;
  fleet-c = fleet "c" 7003;
} // (if realisticDir == "" then { } else {
  realistic = minimal "v1" // {
    packages = [ (import ./realistic.nix { inherit lib; dir = realisticDir; }).root (hello "v1") words ];
  };
})
