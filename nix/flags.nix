# How the NixOS module (nix/module.nix) reads microvm.nix's store-disk options: pure functions
# over strings, with builtins only (no nixpkgs), so `cargo xtask test` evaluates them with real
# Nix (nix/tests.nix) on a machine without nixpkgs. Each gives { args; warnings; }:
#
#   erofs FLAGS       microvm.storeDiskErofsFlags (mkfs.erofs flags) -> `storedisk build` flags
#                     (`--erofs-writer mkfs` when they ask for what only mkfs.erofs does:
#                     zstd, lzma, deflate)
#   squashfs FLAGS    microvm.storeDiskSquashfsFlags (gensquashfs flags) -> the same
#
# Every flag microvm.nix's defaults or docs name takes effect, or is dropped with a `warnings`
# entry saying why (-Ededupe, which options.nix:1039 suggests); any other flag storedisk cannot
# honour is refused with an evaluation error naming the option and the flag. Flags that storedisk
# sets itself (timestamps, ownership, label, UUID) are accepted and left to it, as the image must
# stay reproducible.
let
  startsWith = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
  dropPrefix = prefix: s:
    builtins.substring (builtins.stringLength prefix) (builtins.stringLength s) s;
  stripPrefix = prefix: s: if startsWith prefix s then dropPrefix prefix s else s;
  splitComma = s: builtins.filter builtins.isString (builtins.split "," s);
  isDigits = s: builtins.match "[0-9]+" s != null;

  refuse = option: flag: why: throw
    "storedisk: ${option} holds \"${flag}\", which storedisk cannot honour: ${why}. Remove it, or set storedisk.enable = false to build the store disk with microvm.nix's own tools.";

  erofsOption = "microvm.storeDiskErofsFlags";
  squashfsOption = "microvm.storeDiskSquashfsFlags";

  # storedisk's erofs compressions (mkfs.erofs names); the last three through mkfs.erofs.
  erofsCompressions = [ "lz4" "lz4hc" "zstd" "lzma" "deflate" ];
  mkfsOnlyCompressions = [ "zstd" "lzma" "deflate" ];
  # Set by storedisk itself, for reproducible images: accepted, not passed on.
  erofsOwnFlags = [ "--all-root" "-T0" "-Uclear" "--mount-point=/nix/store" "-Lnix-store" ];

  # "-zlz4hc", "-zlz4hc,12", "-zlz4hc,level=12" -> { compression; level; }
  erofsCompression = flag:
    let
      parts = splitComma (dropPrefix "-z" flag);
      algorithm = builtins.head parts;
      rest = builtins.tail parts;
      levelText = if rest == [ ] then null else stripPrefix "level=" (builtins.head rest);
    in
    if !(builtins.elem algorithm erofsCompressions) then
      refuse erofsOption flag "storedisk's erofs compressions are ${toString erofsCompressions}"
    else if builtins.length rest > 1 || (levelText != null && !(isDigits levelText)) then
      refuse erofsOption flag "only -zALGORITHM or -zALGORITHM,LEVEL is understood"
    else { compression = algorithm; level = levelText; };

  # "-Eztailpacking,fragments" -> [ "ztailpacking" "fragments" ]
  erofsExtended = flag:
    let features = splitComma (dropPrefix "-E" flag);
    in map (feature:
      if builtins.elem feature [ "ztailpacking" "fragments" "dedupe" ] then feature
      else refuse erofsOption flag "of mkfs.erofs's extended options storedisk understands ztailpacking, fragments and dedupe only"
    ) features;

  dedupeWarning = "storedisk: ${erofsOption} holds -Ededupe, which is dropped: storedisk stores identical files once in every image it writes (the bulk of what -Ededupe saves in a Nix store) and keeps compressing on every core, which -Ededupe would stop (microvm.nix options.nix:1039 says so).";

  compressionArgs = c:
    if c == null then [ ]
    else [ "--compression" c.compression ]
      ++ (if c.level == null then [ ] else [ "--compression-level" c.level ]);

  last = list: builtins.elemAt list (builtins.length list - 1);
in
{
  erofs = flags:
    let
      compressions = map erofsCompression (builtins.filter (startsWith "-z") flags);
      extended = builtins.concatLists (map erofsExtended (builtins.filter (startsWith "-E") flags));
      unknown = builtins.filter (f:
        !(startsWith "-z" f) && !(startsWith "-E" f) && !(builtins.elem f erofsOwnFlags)
      ) flags;
    in
    if unknown != [ ] then
      refuse erofsOption (builtins.head unknown) "storedisk understands -zALGORITHM[,LEVEL] and -Eztailpacking/-Efragments/-Ededupe (and sets timestamps, ownership, label and UUID itself)"
    else
    let
      compression = if compressions == [ ] then null else last compressions;
      fragments = builtins.elem "fragments" extended;
      # storedisk writes erofs itself (lz4hc, lz4, tail packing, fragments); the other
      # algorithms only mkfs.erofs does.
      mkfsOnly = compression != null && builtins.elem compression.compression mkfsOnlyCompressions;
    in {
      args = (if mkfsOnly then [ "--erofs-writer" "mkfs" ] else [ ])
        ++ compressionArgs compression
        ++ [ "--erofs-ztailpacking" (if builtins.elem "ztailpacking" extended then "true" else "false") ]
        ++ (if fragments then [ "--erofs-fragments" ] else [ ]);
      warnings = if builtins.elem "dedupe" extended then [ dedupeWarning ] else [ ];
    };

  squashfs = flags:
    let
      # gensquashfs takes options with their value as the next word.
      go = acc: rest:
        if rest == [ ] then acc
        else
          let
            flag = builtins.head rest;
            tail = builtins.tail rest;
            value = if tail == [ ] then refuse squashfsOption flag "it needs a value" else builtins.head tail;
            after = builtins.tail tail;
          in
          if flag == "-c" || flag == "--compressor" then
            (if builtins.elem value [ "zstd" "xz" "gzip" "lz4" ]
             then go (acc // { compression = value; }) after
             else refuse squashfsOption "${flag} ${value}" "storedisk's squashfs compressions are zstd, xz, gzip and lz4")
          else if flag == "-X" || flag == "--comp-extra" then
            (let level = dropPrefix "level=" value; in
             if startsWith "level=" value && isDigits level
             then go (acc // { inherit level; }) after
             else refuse squashfsOption "${flag} ${value}" "of the compressor options storedisk understands level=N only")
          else if flag == "-j" || flag == "--num-jobs" then
            # Compression threads: storedisk uses every core, and the image does not depend on it.
            go acc after
          else if flag == "-b" || flag == "--block-size" then
            (if value == "131072" then go acc after
             else refuse squashfsOption "${flag} ${value}" "storedisk writes 128 KiB blocks")
          else if flag == "--all-root" || flag == "-q" || flag == "--quiet" then go acc tail
          else refuse squashfsOption flag "storedisk understands -c, -X level=N, -j and -b 131072";
      parsed = go { compression = null; level = null; } flags;
    in {
      args = if parsed.compression == null && parsed.level == null then [ ]
        else compressionArgs {
          compression = if parsed.compression == null then "zstd" else parsed.compression;
          inherit (parsed) level;
        };
      warnings = [ ];
    };
}
