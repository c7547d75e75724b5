#!/usr/bin/env bash
# Builds (once) the read-only root filesystem every test-bed device boots from, and prints its path.
#
#   build-rootfs.sh            # cached under /var/cache/fleet-testbed (FLEET_TESTBED_CACHE overrides)
#
# The tree is a debootstrap bookworm minbase with systemd, prepared to run as PID 1 of a container
# (units that would touch the host's devices, consoles or kernel settings are masked). It is built
# into a scratch directory and renamed into place only when complete and verified, under a lock, so
# parallel test processes never see a half-built tree and an interrupted build is simply redone.
# Needs root and debootstrap; quiet on success apart from the path (progress goes to the log).
set -euo pipefail

# Bump when the package list or the preparation below changes: a new name means a fresh build.
VERSION=bookworm-v1
PACKAGES=systemd,systemd-sysv,dbus,iproute2,curl,ca-certificates,procps,iputils-ping
MIRROR=${FLEET_TESTBED_MIRROR:-http://deb.debian.org/debian}
CACHE=${FLEET_TESTBED_CACHE:-/var/cache/fleet-testbed}
ROOTFS=$CACHE/rootfs-$VERSION
MARKER=$ROOTFS/.fleet-testbed-complete

# Files whose absence means the tree is unusable (a build cut short, or someone pruned it).
verify() {
    local root=$1 f
    for f in usr/lib/systemd/systemd usr/bin/systemctl usr/bin/systemd-notify usr/bin/dbus-daemon \
        usr/sbin/ip usr/bin/curl usr/bin/ping usr/bin/pgrep usr/bin/env bin/sh etc/os-release; do
        [[ -e $root/$f ]] || { echo "rootfs $root is missing /$f" >&2; return 1; }
    done
}

if [[ -f $MARKER ]] && verify "$ROOTFS" 2>/dev/null; then
    echo "$ROOTFS"
    exit 0
fi

[[ $(id -u) == 0 ]] || { echo "building the test-bed rootfs needs root" >&2; exit 1; }
command -v debootstrap >/dev/null || {
    echo "debootstrap is not installed (apt-get install -y debootstrap)" >&2
    exit 1
}
mkdir -p "$CACHE/debs"
exec 9>"$CACHE/lock"
flock 9
# Another process may have finished the build while this one waited for the lock.
if [[ -f $MARKER ]] && verify "$ROOTFS" 2>/dev/null; then
    echo "$ROOTFS"
    exit 0
fi

# Removes a tree safely: never follow a mount left behind by an interrupted build into the host.
remove_tree() {
    local dir=$1 m
    [[ -e $dir ]] || return 0
    while read -r m; do umount -l "$m" 2>/dev/null || true; done \
        < <(findmnt -rn -o TARGET | grep -F "$dir/" | sort -r)
    rm -rf --one-file-system "$dir"
}

started=$(date +%s)
scratch=$ROOTFS.partial
log=$CACHE/build-$VERSION.log
remove_tree "$scratch"
remove_tree "$ROOTFS"
echo "building test-bed rootfs $ROOTFS (log: $log)" >&2
# A private mount namespace: whatever debootstrap mounts inside the target vanishes with it.
if ! unshare --mount --propagation private \
    debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$CACHE/debs" \
    bookworm "$scratch" "$MIRROR" >"$log" 2>&1; then
    echo "debootstrap failed; last lines of $log:" >&2
    tail -n 20 "$log" >&2
    remove_tree "$scratch"
    exit 1
fi

# Prepare the tree to boot as a container's PID 1 (see tests/testbed/device.sh).
mask() { local u; for u in "$@"; do ln -sf /dev/null "$scratch/etc/systemd/system/$u"; done; }
# udev would react to the host's devices; module loading, the audit socket and consoles are host
# business; apt's timers would reach the network at random times in the middle of a test.
mask systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
    systemd-udev-trigger.service systemd-udev-settle.service systemd-hwdb-update.service \
    systemd-modules-load.service systemd-journald-audit.socket systemd-firstboot.service \
    getty.target console-getty.service getty@.service serial-getty@.service \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer \
    sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount \
    sys-fs-fuse-connections.mount dev-hugepages.mount
# Each device gets its own machine id and hostname, written into its disk at first boot.
: >"$scratch/etc/machine-id"
rm -f "$scratch/var/lib/dbus/machine-id" "$scratch/etc/hostname"
# The journal stays in memory: devices are small and their disks are measured.
mkdir -p "$scratch/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=8M\n' \
    >"$scratch/etc/systemd/journald.conf.d/fleet-testbed.conf"
chroot "$scratch" apt-get clean >/dev/null 2>&1 || true
rm -rf "$scratch/var/lib/apt/lists/"*

verify "$scratch"
echo "$VERSION built in $(( $(date +%s) - started ))s" >"$scratch/.fleet-testbed-complete"
mv "$scratch" "$ROOTFS"
echo "test-bed rootfs built in $(( $(date +%s) - started ))s" >&2
echo "$ROOTFS"
