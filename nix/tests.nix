# Tests of nix/flags.nix and of nix/lib.nix's pure fixes (kernelParams, toplevelText,
# layerNames, layerVolumes, layerDevices), evaluated with real Nix and no nixpkgs:
#   nix-instantiate --eval --strict --json nix/tests.nix
# gives the list of failures (empty when every case holds). Run by `cargo xtask test`
# (xtask/tests/nix_module.rs).
let
  flags = import ./flags.nix;
  # The pure functions need no busybox or storedisk (never forced here).
  fixes = import ./lib.nix { busybox = throw "no busybox in nix/tests.nix"; storedisk = throw "no storedisk"; };
  erofs = f: (flags.erofs f).args;
  squashfs = f: (flags.squashfs f).args;

  # A string with context, as "${toplevel}/init" has in a NixOS system (never built here).
  drv = name: derivation { inherit name; system = "x86_64-linux"; builder = "/bin/sh"; };
  toplevel = drv "nixos-system-guest";
  regInfo = drv "closure-info";
  userPath = drv "my-firmware";

  refused = value: !(builtins.tryEval (builtins.deepSeq value value)).success;

  # Each case: { name; ok; } with ok true when the expectation holds.
  check = name: ok: { inherit name ok; };
  equal = name: actual: expected:
    check "${name}: got ${builtins.toJSON actual}" (actual == expected);

  upstreamErofsDefault = kernelAtLeast516: kernelAtLeast61:
    [ "-zlz4hc" ]
    ++ (if kernelAtLeast516 then [ "-Eztailpacking" ] else [ ])
    ++ (if kernelAtLeast61 then [ "-Efragments" ] else [ ]);

  params = fixes.kernelParams { } [
    "init=${toplevel}/init"
    "regInfo=${regInfo}/registration"
    "firmware=${userPath}/blob"
    "console=ttyS0"
  ];

  cases = [
    # microvm.nix's defaults (options.nix:1042-1047), gated on the guest kernel as upstream.
    (equal "erofs default, kernel 6.1+: fragments by storedisk's own writer" (erofs (upstreamErofsDefault true true))
      [ "--compression" "lz4hc" "--erofs-ztailpacking" "true" "--erofs-fragments" ])
    (equal "erofs default, kernel 5.16-6.0" (erofs (upstreamErofsDefault true false))
      [ "--compression" "lz4hc" "--erofs-ztailpacking" "true" ])
    (equal "erofs default, kernel < 5.16: no tail packing" (erofs (upstreamErofsDefault false false))
      [ "--compression" "lz4hc" "--erofs-ztailpacking" "false" ])
    (equal "erofs level and combined -E" (erofs [ "-zzstd,level=9" "-Eztailpacking,fragments" ])
      [ "--erofs-writer" "mkfs" "--compression" "zstd" "--compression-level" "9" "--erofs-ztailpacking" "true" "--erofs-fragments" ])
    (equal "erofs zstd is mkfs.erofs's" (erofs [ "-zzstd" ])
      [ "--erofs-writer" "mkfs" "--compression" "zstd" "--erofs-ztailpacking" "false" ])
    (equal "erofs level after a comma" (erofs [ "-zlz4hc,12" ])
      [ "--compression" "lz4hc" "--compression-level" "12" "--erofs-ztailpacking" "false" ])
    (equal "erofs: the flags storedisk sets itself are accepted" (erofs [ "-zlz4" "--all-root" ])
      [ "--compression" "lz4" "--erofs-ztailpacking" "false" ])
    # options.nix:1039 tells users to add -Ededupe: dropped with a warning, never an error.
    (equal "erofs -Ededupe is dropped" (erofs [ "-zlz4hc" "-Ededupe" ])
      [ "--compression" "lz4hc" "--erofs-ztailpacking" "false" ])
    (check "erofs -Ededupe warns why" (builtins.match ".*-Ededupe, which is dropped: storedisk stores identical files once.*"
      (builtins.head (flags.erofs [ "-zlz4hc" "-Ededupe" ]).warnings) != null))
    (equal "erofs defaults warn nothing" (flags.erofs (upstreamErofsDefault true true)).warnings [ ])
    (check "erofs unknown flag is refused" (refused (erofs [ "-zlz4hc" "-C65536" ])))
    (check "erofs unknown compressor is refused" (refused (erofs [ "-zlzo" ])))
    (check "erofs bad level is refused" (refused (erofs [ "-zlz4hc,high" ])))

    (equal "squashfs default (options.nix:1058)" (squashfs [ "-c" "zstd" "-j" "$NIX_BUILD_CORES" ])
      [ "--compression" "zstd" ])
    (equal "squashfs xz with a level" (squashfs [ "-c" "xz" "-X" "level=6" ])
      [ "--compression" "xz" "--compression-level" "6" ])
    (equal "squashfs level alone keeps zstd" (squashfs [ "-X" "level=19" ])
      [ "--compression" "zstd" "--compression-level" "19" ])
    (equal "squashfs no flags" (squashfs [ ]) [ ])
    (equal "squashfs 128 KiB blocks are ours" (squashfs [ "-b" "131072" "-c" "gzip" ])
      [ "--compression" "gzip" ])
    (check "squashfs other block size is refused" (refused (squashfs [ "-b" "1048576" ])))
    (check "squashfs lzo is refused" (refused (squashfs [ "-c" "lzo" ])))
    (check "squashfs flag without value is refused" (refused (squashfs [ "-c" ])))
    (check "squashfs unknown flag is refused" (refused (squashfs [ "--defaults" "x" ])))

    # Only init= and regInfo= lose their context: the disk holds those paths. A user's own
    # path keeps it, so Nix still builds it and the runner still references it.
    (check "init= loses its context" (!(builtins.hasContext (builtins.elemAt params 0))))
    (check "regInfo= loses its context" (!(builtins.hasContext (builtins.elemAt params 1))))
    (check "a user's own store path keeps its context" (builtins.hasContext (builtins.elemAt params 2)))
    (check "init= alone: regInfo= keeps its context" (builtins.hasContext
      (builtins.elemAt (fixes.kernelParams { regInfo = false; } [ "init=${toplevel}/init" "regInfo=${regInfo}/registration" ]) 1)))
    (check "toplevelText has no context" (!(builtins.hasContext (fixes.toplevelText toplevel))))
    (equal "toplevelText keeps the path" (fixes.toplevelText toplevel)
      (builtins.unsafeDiscardStringContext toplevel.outPath))

    # Layers: names, volumes and devices follow from N alone (crates/builder/src/layers.rs
    # layer_names gives the same names).
    (equal "layer names, 2" (fixes.layerNames 2) [ "layer-00" "top" ])
    (equal "layer names, 4" (fixes.layerNames 4) [ "layer-00" "layer-01" "small" "top" ])
    (equal "layer names, 12 (ten buckets)" (builtins.elemAt (fixes.layerNames 12) 9) "layer-09")
    (equal "layer names, 20" (builtins.length (fixes.layerNames 20)) 20)
    (equal "layer volumes" (map (v: v.image) (fixes.layerVolumes { hostName = "g"; layers = 3; }))
      [ "storedisk-g-layer-1.img" "storedisk-g-layer-2.img" ])
    (check "layer volumes are read-only, never created, never mounted by microvm.nix"
      (builtins.all (v: v.readOnly && !v.autoCreate && v.mountPoint == null)
        (fixes.layerVolumes { hostName = "g"; layers = 5; })))
    (equal "layer devices" (fixes.layerDevices { layers = 3; }) [ "/dev/vda" "/dev/vdb" "/dev/vdc" ])
    (equal "layer devices after two volumes of the user's" (fixes.layerDevices { layers = 3; volumesBefore = 2; })
      [ "/dev/vda" "/dev/vdd" "/dev/vde" ])
    (equal "the text is unchanged" (map builtins.unsafeDiscardStringContext params) [
      "init=${builtins.unsafeDiscardStringContext toplevel.outPath}/init"
      "regInfo=${builtins.unsafeDiscardStringContext regInfo.outPath}/registration"
      "firmware=${builtins.unsafeDiscardStringContext userPath.outPath}/blob"
      "console=ttyS0"
    ])
  ];
in
map (c: c.name) (builtins.filter (c: !c.ok) cases)
