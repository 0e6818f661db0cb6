#!/bin/sh
# Stage 1 of a storedisk test MicroVM (the busybox initramfs built by lib.nix): load the modules
# a store disk needs, mount the disk read-only at /nix/.ro-store and onto /nix/store inside a tmpfs
# root, and hand over to init= from the kernel command line (the guest toplevel's init, read from
# the store disk itself). Any failure prints a STOREDISK-RESULT line and stops the machine.
export PATH=/bin

fail() {
    echo "STOREDISK-RESULT {\"ok\":false,\"stage\":1,\"error\":\"$*\"}"
    reboot -f
    sleep 10
}

mount -t devtmpfs devtmpfs /dev || fail "mounting /dev"
mount -t proc proc /proc || fail "mounting /proc"
mount -t sysfs sysfs /sys || fail "mounting /sys"

for module in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$module" || fail "insmod $module"
done

init=
for word in $(cat /proc/cmdline); do
    case "$word" in
        init=*) init="${word#init=}" ;;
    esac
done
[ -n "$init" ] || fail "no init= on the kernel command line"

tries=0
while [ ! -b /dev/vda ]; do
    tries=$((tries + 1))
    [ "$tries" -le 100 ] || fail "no /dev/vda after 10 s"
    sleep 0.1
done

mount -t tmpfs -o mode=0755 tmpfs /mnt-root || fail "mounting the tmpfs root"
mkdir -p /mnt-root/nix/.ro-store /mnt-root/nix/store /mnt-root/dev /mnt-root/proc /mnt-root/sys /mnt-root/tmp
mounted=
for fstype in erofs squashfs; do
    if mount -t "$fstype" -o ro /dev/vda /mnt-root/nix/.ro-store 2>/dev/null; then
        mounted="$fstype"
        break
    fi
done
[ -n "$mounted" ] || fail "/dev/vda is neither erofs nor squashfs"
echo "stage 1: store disk ($mounted) mounted at /nix/.ro-store"
mount -o bind,ro /mnt-root/nix/.ro-store /mnt-root/nix/store || fail "bind-mounting /nix/store"
[ -x "/mnt-root$init" ] || fail "init $init is not on the store disk"
mount --move /dev /mnt-root/dev
mount --move /proc /mnt-root/proc
mount --move /sys /mnt-root/sys
echo "stage 1: switching to $init"
exec switch_root /mnt-root "$init"
