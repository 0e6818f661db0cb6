# nixpkgs' closureInfo (pkgs/build-support/closure-info.nix) in busybox awk: reads the
# structured-attrs JSON of a derivation with `exportReferencesGraph.closure` and writes, in the
# directory `out`, the three files closureInfo's jq writes:
#   registration    per path: path, narHash, narSize, "" (deriver), reference count, references
#                   (what `nix-store --load-db` reads, in exportReferencesGraph's order)
#   store-paths     the paths, one a line
#   total-nar-size  the sum of narSize
# Usage: awk -v out=DIR -f closure-info.awk "$NIX_ATTRS_JSON_FILE"
#
# Why not `storedisk closure-info`: the closure info is packed into every store disk, so its store
# path (whose hash follows its builder's inputs) is in the image bytes; built by storedisk, it
# changed with every storedisk binary and so did the compressed squashfs images' bytes. Built from
# busybox and this file alone it changes only with the closure. The harness checks each one it
# builds against `storedisk closure-info`'s rendering of `nix path-info` (xtask/src/vm_test.rs).
#
# The input is Nix's compact JSON with sorted keys: the first `"closure":[{` starts the array of
# path infos (exportReferencesGraph.closure, later, holds strings only). A path info holds no
# nested object and its strings no quote or brace, so `},{` separates them and `}]` ends the array.

function field(obj, key,    rest) {
    if (!match(obj, "\"" key "\":")) return ""
    rest = substr(obj, RSTART + RLENGTH)
    if (substr(rest, 1, 1) == "\"") {
        rest = substr(rest, 2)
        return substr(rest, 1, index(rest, "\"") - 1)
    }
    if (substr(rest, 1, 1) == "[") return substr(rest, 2, index(rest, "]") - 2)
    match(rest, /^[0-9]+/)
    return substr(rest, 1, RLENGTH)
}

function fail(why) {
    print "closure-info.awk: " why > "/dev/stderr"
    failed = 1
    exit 1
}

{ json = json $0 }

END {
    if (failed) exit 1
    if (out == "") fail("no output directory (-v out=DIR)")
    start = index(json, "\"closure\":[{")
    if (start == 0) fail("no exportReferencesGraph.closure array of path infos in the input")
    body = substr(json, start + length("\"closure\":[{"))
    end = index(body, "}]")
    if (end == 0) fail("the closure array does not end")
    n = split(substr(body, 1, end - 1), infos, "[}],[{]")
    total = 0
    for (i = 1; i <= n; i++) {
        path = field(infos[i], "path")
        hash = field(infos[i], "narHash")
        size = field(infos[i], "narSize")
        if (path == "" || hash == "" || size == "") fail("path info " i " lacks path, narHash or narSize")
        refs = field(infos[i], "references")
        gsub(/"/, "", refs)
        count = refs == "" ? 0 : split(refs, ref, ",")
        printf "%s\n%s\n%s\n\n%d\n", path, hash, size, count > (out "/registration")
        for (r = 1; r <= count; r++) print ref[r] > (out "/registration")
        print path > (out "/store-paths")
        total += size
    }
    printf "%.0f\n", total > (out "/total-nar-size")
}
