#!@busybox@/bin/sh
# Stage 2 of a storedisk test MicroVM: this is the guest toplevel's `init`, run from the store
# disk. It checks that every path of the registration (regInfo= on the kernel command line) is
# present, that every file of the guest's packages is intact (sha256 against the manifest made at
# build time), optionally that the registration is a consistent Nix database (nix-db scenario),
# runs a program from a package, prints one STOREDISK-RESULT line and powers off.
export PATH=@busybox@/bin
toplevel=$(dirname "$0")

result() {
    echo "STOREDISK-RESULT $1"
    sync
    # storedisk.hold: stay up until the host stops the machine (the harness's microvm-shutdown
    # test); ctrl-alt-del then restarts the kernel, which ends QEMU (-no-reboot).
    if grep -qw storedisk.hold /proc/cmdline; then
        echo "stage 2: holding for microvm-shutdown"
        while :; do sleep 60; done
    fi
    poweroff -f
    reboot -f
    sleep 10
}
fail() {
    result "{\"ok\":false,\"stage\":2,\"scenario\":\"@scenario@\",\"error\":\"$*\"}"
}

echo "stage 2: $toplevel/init running from the store disk"
registered=0
if [ "@registerClosure@" = 1 ]; then
    reginfo=
    for word in $(cat /proc/cmdline); do
        case "$word" in
            regInfo=*) reginfo="${word#regInfo=}" ;;
        esac
    done
    [ -n "$reginfo" ] || fail "no regInfo= on the kernel command line"
    [ -f "$reginfo" ] || fail "registration $reginfo is not on the store disk"

    # The registration: per path, its name, narHash, narSize, deriver, reference count, references.
    awk '
        state == 0 { path = $0; state = 1; next }
        state == 1 { hash = $0; state = 2; next }
        state == 2 { size = $0; state = 3; next }
        state == 3 { state = 4; next }
        state == 4 { n = $0 + 0; print "P " path " " size; state = (n == 0) ? 0 : 5; next }
        state == 5 { print "R " path " " $0; n--; if (n == 0) state = 0; next }
        END { if (state != 0) print "E truncated" }
    ' "$reginfo" > /tmp/registration || fail "cannot parse $reginfo"
    grep -q '^E ' /tmp/registration && fail "registration $reginfo is truncated"

    while read -r kind path rest; do
        if [ "$kind" = P ]; then
            [ -e "$path" ] || fail "registered path $path is missing"
            registered=$((registered + 1))
        fi
    done < /tmp/registration
    unregistered=$(awk '$1 == "P" { p[$2] = 1 } $1 == "R" { r[$3] = $2 } END { for (x in r) if (!(x in p)) { print r[x] " references " x; exit } }' /tmp/registration)
    [ -z "$unregistered" ] || fail "$unregistered, which is not registered"
    [ "$registered" -gt 0 ] || fail "the registration lists no path"
    grep -q "^P $toplevel " /tmp/registration || fail "the toplevel $toplevel is not registered"
else
    # microvm.registerClosure or nix.enable off: no regInfo=, no closure info on the disk.
    grep -q 'regInfo=' /proc/cmdline && fail "regInfo= given to a guest that registers no closure"
fi

# Every file of every package, byte for byte.
manifest=@manifest@
files=$(wc -l < "$manifest/sha256sums")
sha256sum -c -s "$manifest/sha256sums" || fail "a file differs from its build-time sha256"
if [ "@registerClosure@" = 1 ]; then
    stray=$(awk 'NR == FNR { if ($1 == "P") p[$2] = 1; next } !($1 in p) { print; exit }' /tmp/registration "$manifest/paths")
    [ -z "$stray" ] || fail "package path $stray is not registered"
fi

if [ "@checkDb@" = 1 ]; then
    # nix-db: the registration is what `nix-store --load-db` would load: closed under references,
    # exactly the closure of the toplevel and the registration itself, sizes adding up.
    total=$(awk '$1 == "P" { s += $3 } END { printf "%d", s }' /tmp/registration)
    expected_total=$(cat "$(dirname "$reginfo")/total-nar-size")
    [ "$total" = "$expected_total" ] || fail "narSizes add up to $total, total-nar-size says $expected_total"
    echo "$toplevel" > /tmp/reach
    while :; do
        before=$(wc -l < /tmp/reach)
        awk 'NR == FNR { seen[$1] = 1; next } $1 == "R" && seen[$2] { print $3 }' /tmp/reach /tmp/registration >> /tmp/reach
        sort -u /tmp/reach > /tmp/reach.new && mv /tmp/reach.new /tmp/reach
        [ "$(wc -l < /tmp/reach)" = "$before" ] && break
    done
    awk '$1 == "P" { print $2 }' /tmp/registration | sort -u > /tmp/listed
    cmp -s /tmp/reach /tmp/listed || fail "registered paths are not exactly the closure of $toplevel"
fi

output=$(@program@) || fail "@program@ failed"
[ "$output" = "@expected@" ] || fail "@program@ printed '$output'"

result "{\"ok\":true,\"scenario\":\"@scenario@\",\"registered_paths\":$registered,\"files_checked\":$files,\"program_output\":\"$output\"}"
