# Tests of nix/flags.nix, evaluated with real Nix and no nixpkgs:
#   nix-instantiate --eval --strict --json nix/tests.nix
# gives the list of failures (empty when every case holds). Run by `cargo xtask test`
# (xtask/tests/nix_module.rs).
let
  flags = import ./flags.nix;

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

  params = flags.kernelParams [
    "init=${toplevel}/init"
    "regInfo=${regInfo}/registration"
    "firmware=${userPath}/blob"
    "console=ttyS0"
  ];

  cases = [
    # microvm.nix's defaults (options.nix:1042-1047), gated on the guest kernel as upstream.
    (equal "erofs default, kernel 6.1+" (flags.erofs (upstreamErofsDefault true true))
      [ "--compression" "lz4hc" "--erofs-ztailpacking" "true" "--erofs-fragments" ])
    (equal "erofs default, kernel 5.16-6.0" (flags.erofs (upstreamErofsDefault true false))
      [ "--compression" "lz4hc" "--erofs-ztailpacking" "true" ])
    (equal "erofs default, kernel < 5.16: no tail packing" (flags.erofs (upstreamErofsDefault false false))
      [ "--compression" "lz4hc" "--erofs-ztailpacking" "false" ])
    (equal "erofs level and combined -E" (flags.erofs [ "-zzstd,level=9" "-Eztailpacking,fragments" ])
      [ "--compression" "zstd" "--compression-level" "9" "--erofs-ztailpacking" "true" "--erofs-fragments" ])
    (equal "erofs level after a comma" (flags.erofs [ "-zlz4hc,12" ])
      [ "--compression" "lz4hc" "--compression-level" "12" "--erofs-ztailpacking" "false" ])
    (equal "erofs: the flags storedisk sets itself are accepted" (flags.erofs [ "-zlz4" "--all-root" ])
      [ "--compression" "lz4" "--erofs-ztailpacking" "false" ])
    (check "erofs -Ededupe is refused" (refused (flags.erofs [ "-zlz4hc" "-Ededupe" ])))
    (check "erofs unknown flag is refused" (refused (flags.erofs [ "-zlz4hc" "-C65536" ])))
    (check "erofs unknown compressor is refused" (refused (flags.erofs [ "-zlzo" ])))
    (check "erofs bad level is refused" (refused (flags.erofs [ "-zlz4hc,high" ])))

    (equal "squashfs default (options.nix:1058)" (flags.squashfs [ "-c" "zstd" "-j" "$NIX_BUILD_CORES" ])
      [ "--compression" "zstd" ])
    (equal "squashfs xz with a level" (flags.squashfs [ "-c" "xz" "-X" "level=6" ])
      [ "--compression" "xz" "--compression-level" "6" ])
    (equal "squashfs level alone keeps zstd" (flags.squashfs [ "-X" "level=19" ])
      [ "--compression" "zstd" "--compression-level" "19" ])
    (equal "squashfs no flags" (flags.squashfs [ ]) [ ])
    (equal "squashfs 128 KiB blocks are ours" (flags.squashfs [ "-b" "131072" "-c" "gzip" ])
      [ "--compression" "gzip" ])
    (check "squashfs other block size is refused" (refused (flags.squashfs [ "-b" "1048576" ])))
    (check "squashfs lzo is refused" (refused (flags.squashfs [ "-c" "lzo" ])))
    (check "squashfs flag without value is refused" (refused (flags.squashfs [ "-c" ])))
    (check "squashfs unknown flag is refused" (refused (flags.squashfs [ "--defaults" "x" ])))

    # Only init= and regInfo= lose their context: the disk holds those paths. A user's own
    # path keeps it, so Nix still builds it and the runner still references it.
    (check "init= loses its context" (!(builtins.hasContext (builtins.elemAt params 0))))
    (check "regInfo= loses its context" (!(builtins.hasContext (builtins.elemAt params 1))))
    (check "a user's own store path keeps its context" (builtins.hasContext (builtins.elemAt params 2)))
    (equal "the text is unchanged" (map builtins.unsafeDiscardStringContext params) [
      "init=${builtins.unsafeDiscardStringContext toplevel.outPath}/init"
      "regInfo=${builtins.unsafeDiscardStringContext regInfo.outPath}/registration"
      "firmware=${builtins.unsafeDiscardStringContext userPath.outPath}/blob"
      "console=ttyS0"
    ])
  ];
in
map (c: c.name) (builtins.filter (c: !c.ok) cases)
