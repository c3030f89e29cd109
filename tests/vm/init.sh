#!/bin/busybox sh
# PID 1 of the cgroup v2 test VM (see tests/vm/run_v2.py, which packs this file as /init).
#
# It mounts the host's root (9p, read-only) at /host, gives it a fresh /proc, /sys, /dev, a cgroup2
# hierarchy, tmpfs on the paths the tests write to and a real ext4 block device on /var/tmp, then
# runs the test command chrooted into /host and prints its exit status on the console between
# markers that carry a per-run nonce. Whatever happens, the VM powers off at the end: `reboot -f`
# with qemu's -no-reboot, or, if this script dies, the kernel panic with panic=-1 does it.
#
# /vm.conf (written by run_v2.py) sets NONCE, MODULES, HOST_MODULES, KEEP and DISK, and the test
# command, to run chrooted into the host's root, as the positional parameters ("$@").

/bin/busybox mkdir -p /bin /sbin /proc /sys /dev /host /keep
/bin/busybox --install -s /bin
export PATH=/bin:/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

. /vm.conf

vm_error() {
    echo "JOBLET-VM-ERROR-$NONCE=$*"
    sync
    reboot -f
    sleep 60
}

echo "JOBLET-VM-BOOTED-$NONCE $(uname -r)"

for m in $MODULES; do
    insmod "/modules/$m.ko" || vm_error "insmod $m failed"
done

mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro host /host \
    || vm_error "cannot mount the host root over 9p"

# Any other module (ext4 for the disk, veth, overlay, ... on the kernel's own request) comes from
# the host's /lib/modules through the host's modprobe; /sbin/modprobe here forwards to it.
if [ -n "$HOST_MODULES" ]; then
    chroot /host /sbin/modprobe -a $HOST_MODULES || vm_error "modprobe $HOST_MODULES failed"
fi

mount -t proc proc /host/proc || vm_error "mount /host/proc"
mount -t sysfs sysfs /host/sys || vm_error "mount /host/sys"
mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 /host/sys/fs/cgroup || vm_error "mount cgroup2"
mount -t devtmpfs devtmpfs /host/dev || vm_error "mount /host/dev"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
[ -e /host/dev/fd ] || ln -s /proc/self/fd /host/dev/fd
[ -e /host/dev/stdin ] || ln -s /proc/self/fd/0 /host/dev/stdin
[ -e /host/dev/stdout ] || ln -s /proc/self/fd/1 /host/dev/stdout
[ -e /host/dev/stderr ] || ln -s /proc/self/fd/2 /host/dev/stderr

# The repo, the interpreter and the venv stay visible even if they live under a path hidden below
# by a tmpfs or the disk (a clone under /tmp, say): bind them aside first, and back afterwards.
i=0
for p in $KEEP; do
    i=$((i + 1))
    mkdir -p "/keep/$i" && mount -o bind "/host$p" "/keep/$i" || vm_error "bind $p aside"
done

mount -t tmpfs -o mode=1777 tmpfs /host/tmp || vm_error "mount /host/tmp"
mount -t tmpfs -o mode=0755 tmpfs /host/run || vm_error "mount /host/run"

n=0
while [ ! -e "/sys/block/$DISK" ] && [ $n -lt 100 ]; do
    sleep 0.1
    n=$((n + 1))
done
[ -e "/sys/block/$DISK" ] || vm_error "no /sys/block/$DISK: the virtio disk did not show up"
mount -t ext4 "/dev/$DISK" /host/var/tmp || vm_error "mount /dev/$DISK on /host/var/tmp"
chmod 1777 /host/var/tmp

i=0
for p in $KEEP; do
    i=$((i + 1))
    mkdir -p "/host$p" && mount -o bind "/keep/$i" "/host$p" || vm_error "bind $p back"
done

ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
hostname joblet-vm

echo "JOBLET-VM-READY-$NONCE"
# Through a pipe, so pytest writes for a log (no tty: no \r progress, no colours).
set -o pipefail
chroot /host "$@" </dev/null 2>&1 | cat
rc=$?
echo "JOBLET-VM-EXIT-$NONCE=$rc"
sync
umount /host/var/tmp 2>/dev/null
reboot -f
sleep 60
