#!/bin/sh
# vmtest guest init: mount the virtiofs share at /nix/store, run the test
# script (appended to the initramfs as /vmtest/run.sh, or passed via QEMU's
# fw_cfg as opt/run), report its status and power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

uptime_s() { cut -d' ' -f1 /proc/uptime; }

finish() {
    echo
    echo "VMTEST-EXIT=$1"
    sync
    poweroff -f
    sleep 10
}

fail() {
    echo "VMTEST-ERROR: $*"
    finish 125
}

echo  # the firmware may have left the cursor mid-line
echo "vmtest: init started at uptime $(uptime_s)s"

TAG=nix-store
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmtest.tag=*) TAG=${arg#vmtest.tag=} ;;
    esac
done

for m in $(cat /etc/vmtest-modules); do
    insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done

if [ "$TAG" != none ]; then
    mount -t virtiofs -o ro "$TAG" /nix/store || fail "mounting virtiofs tag '$TAG' at /nix/store failed"
fi

# The test script: /vmtest/run.sh when run-vm.sh appended it to the
# initramfs as a second cpio archive (--script-via initrd, the only way with
# VMMs without fw_cfg such as cloud-hypervisor), else QEMU's fw_cfg opt/run.
RUN=/sys/firmware/qemu_fw_cfg/by_name/opt/run/raw
if [ -e /vmtest/run.sh ]; then
    SRC=initrd
    cp /vmtest/run.sh /run.sh || fail "copying /vmtest/run.sh failed"
elif [ -r "$RUN" ]; then
    SRC=fw_cfg
    cat "$RUN" >/run.sh || fail "reading $RUN failed"
else
    fail "no test script (neither /vmtest/run.sh in the initramfs nor fw_cfg opt/run)"
fi

echo "vmtest: running test script (from $SRC) at uptime $(uptime_s)s"
cd /
sh /run.sh
status=$?
echo "vmtest: test script finished at uptime $(uptime_s)s"
finish "$status"
