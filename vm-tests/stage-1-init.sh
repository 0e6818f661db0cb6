#!/bin/sh
# Stage 1 of a storedisk test MicroVM (the busybox initramfs built by lib.nix): load the modules
# a store disk needs, mount the disk read-only at /nix/.ro-store (a layered store disk: each of
# the disks storedisk.layers=DEV,DEV,... names, stacked there with overlayfs: the devices
# nix/lib.nix's layerDevices gives the NixOS module's fileSystems) and onto /nix/store inside a tmpfs
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
disks=/dev/vda
for word in $(cat /proc/cmdline); do
    case "$word" in
        init=*) init="${word#init=}" ;;
        storedisk.layers=*)
            # A comma-separated list (the initrd has no tr): split it on commas.
            disks=
            ifs=$IFS
            IFS=,
            for disk in ${word#storedisk.layers=}; do disks="$disks $disk"; done
            IFS=$ifs
            ;;
    esac
done
[ -n "$init" ] || fail "no init= on the kernel command line"

# The disks: /dev/vda for a store disk, the devices storedisk.layers= names for a layered one.
layers=0
for disk in $disks; do
    layers=$((layers + 1))
    tries=0
    while [ ! -b "$disk" ]; do
        tries=$((tries + 1))
        [ "$tries" -le 100 ] || fail "no $disk after 10 s"
        sleep 0.1
    done
done

mount_image() { # DISK DIR: mount a store disk image read-only, whichever format it has
    for fstype in erofs squashfs; do
        if mount -t "$fstype" -o ro "$1" "$2" 2>/dev/null; then
            mounted="$fstype"
            return 0
        fi
    done
    fail "$1 is neither erofs nor squashfs"
}

mount -t tmpfs -o mode=0755 tmpfs /mnt-root || fail "mounting the tmpfs root"
mkdir -p /mnt-root/nix/.ro-store /mnt-root/nix/store /mnt-root/dev /mnt-root/proc /mnt-root/sys /mnt-root/tmp
mounted=
if [ "$layers" -eq 1 ]; then
    mount_image /dev/vda /mnt-root/nix/.ro-store
    echo "stage 1: store disk ($mounted) mounted at /nix/.ro-store"
else
    # Layers hold disjoint sets of store paths: stacked as overlayfs lower layers (no upper
    # layer: read-only), in any order, they show the whole store.
    lower=
    for disk in $disks; do
        dir="/mnt-root/nix/.ro-layers/${disk#/dev/}"
        mkdir -p "$dir"
        mount_image "$disk" "$dir"
        lower="${lower:+$lower:}$dir"
    done
    mount -t overlay overlay -o "ro,lowerdir=$lower" /mnt-root/nix/.ro-store \
        || fail "stacking the $layers layers with overlayfs"
    echo "stage 1: store disk of $layers layers ($mounted) stacked at /nix/.ro-store"
fi
mount -o bind,ro /mnt-root/nix/.ro-store /mnt-root/nix/store || fail "bind-mounting /nix/store"
[ -x "/mnt-root$init" ] || fail "init $init is not on the store disk"
mount --move /dev /mnt-root/dev
mount --move /proc /mnt-root/proc
mount --move /sys /mnt-root/sys
echo "stage 1: switching to $init"
exec switch_root /mnt-root "$init"
