#!/usr/bin/env bash
# Boots one test-bed device: its own PID 1 systemd, mount, UTS, IPC, network and cgroup namespaces,
# with an overlay of the shared rootfs as its disk. Used by tests/src/testbed.rs; by hand:
#
#   device.sh boot ROOTFS DEVICE_DIR HOSTNAME CGROUP_DIR
#
# DEVICE_DIR holds upper/ (the device's disk: it survives a power cut), work/ and merged/.
# CGROUP_DIR is a fresh cgroup v2 directory on the host that becomes the device's cgroup root.
# The process stays in the foreground as the namespaces' owner: SIGKILL to it (or the death of
# whoever started it) kills PID 1 and with it every process of the device; the kernel then drops
# the device's mounts and network namespace, veth included. Nothing is mounted on the host.
set -euo pipefail

case ${1:-} in
boot)
    [[ $# == 5 ]] || { echo "usage: $0 boot ROOTFS DEVICE_DIR HOSTNAME CGROUP_DIR" >&2; exit 2; }
    # Enter the device's cgroup first, so that the new cgroup namespace is rooted there and the
    # device's systemd manages its own subtree, never the host's or another device's.
    echo $$ >"$5/cgroup.procs"
    exec unshare --pid --fork --kill-child=SIGKILL --mount --propagation private --uts --ipc \
        --net --cgroup "$0" pid1 "$2" "$3" "$4"
    ;;
pid1)
    # Now PID 1 of the new PID namespace, in a private mount namespace.
    rootfs=$2 dir=$3 name=$4
    m=$dir/merged
    mount -t overlay overlay -o "lowerdir=$rootfs,upperdir=$dir/upper,workdir=$dir/work" "$m"
    mount -t proc proc "$m/proc"
    # Kernel-wide settings stay the host's: systemd-sysctl and binfmt skip a read-only /proc/sys.
    mount --bind "$m/proc/sys" "$m/proc/sys"
    mount -o remount,bind,ro "$m/proc/sys"
    if [[ -e $m/proc/sysrq-trigger ]]; then
        mount --bind "$m/proc/sysrq-trigger" "$m/proc/sysrq-trigger"
        mount -o remount,bind,ro "$m/proc/sysrq-trigger"
    fi
    # A sysfs mounted from inside the network namespace lists only the device's interfaces.
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$m/sys"
    # Mounted from inside the cgroup namespace: the device's cgroup appears as the root.
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$m/sys/fs/cgroup"
    # A minimal /dev: no host consoles, disks or ttys for the device's units to grab.
    mount -t tmpfs -o mode=755,nosuid,size=4m dev "$m/dev"
    mknod -m 666 "$m/dev/null" c 1 3
    mknod -m 666 "$m/dev/zero" c 1 5
    mknod -m 666 "$m/dev/full" c 1 7
    mknod -m 666 "$m/dev/random" c 1 8
    mknod -m 666 "$m/dev/urandom" c 1 9
    mknod -m 666 "$m/dev/tty" c 5 0
    mkdir -m 755 "$m/dev/pts" "$m/dev/mqueue"
    mkdir -m 1777 "$m/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$m/dev/pts"
    ln -s pts/ptmx "$m/dev/ptmx"
    ln -s /proc/self/fd "$m/dev/fd"
    ln -s /proc/self/fd/0 "$m/dev/stdin"
    ln -s /proc/self/fd/1 "$m/dev/stdout"
    ln -s /proc/self/fd/2 "$m/dev/stderr"
    mount -t tmpfs -o mode=1777,nosuid,nodev,size=64m tmpfs "$m/dev/shm"
    mount -t mqueue -o nosuid,nodev,noexec mqueue "$m/dev/mqueue"
    mount -t tmpfs -o mode=755,nosuid,nodev,size=64m tmpfs "$m/run"
    mount -t tmpfs -o mode=1777,nosuid,nodev,size=64m tmpfs "$m/tmp"
    hostname "$name"
    exec chroot "$m" /usr/bin/env -i container=fleet-testbed TERM=dumb \
        /lib/systemd/systemd --system
    ;;
*)
    echo "usage: $0 boot ROOTFS DEVICE_DIR HOSTNAME CGROUP_DIR" >&2
    exit 2
    ;;
esac
