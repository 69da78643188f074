#!/usr/bin/env bash
# run-vm.sh --socket SOCK --script FILE [options] [-- EXTRA-VMM-ARGS...]
#
# Boots a throw-away microVM (guest from build-guest.sh) whose /nix/store is
# the virtiofs share served by the vhost-user daemon listening on SOCK, runs
# FILE inside it with busybox sh, streams the guest console to stdout and
# exits with the script's exit status.
#
# Options:
#   --vmm qemu|cloud-hypervisor
#                     the VMM (default: $VMTEST_VMM, else qemu). QEMU runs
#                     with TCG unless --accel kvm; cloud-hypervisor always
#                     needs a working /dev/kvm and is not installed on our
#                     machines (see README.md)
#   --script-via fw_cfg|initrd
#                     how FILE reaches the guest: QEMU's fw_cfg (opt/run), or
#                     appended to the initramfs as /vmtest/run.sh in a second,
#                     uncompressed cpio archive (default: fw_cfg for qemu;
#                     initrd, the only choice, for cloud-hypervisor)
#   --socket SOCK     vhost-user-fs socket of the daemon (waited for up to 10 s).
#                     Without it no virtiofs device is attached and nothing is
#                     mounted at /nix/store (harness self-checks only).
#   --script FILE     shell script to run in the guest (required)
#   --tag TAG         virtiofs tag (default: nix-store)
#   --mem SIZE        guest memory, shared memfd (default: 1G)
#   --smp N           guest CPUs (default: 1)
#   --request-queues N  QEMU only: the virtio-fs device's request queues
#                     (num-request-queues; default 1): the daemon must
#                     offer as many (--request-queues)
#   --timeout SECS    kill QEMU after SECS seconds, boot included (default: 120)
#   --accel tcg|kvm   QEMU only: default tcg; kvm only when asked (the PVM
#                     /dev/kvm on our machines hangs a stock kernel)
#   --append ARGS     extra kernel command line arguments
#   --log FILE        also keep the console output in FILE
#   --reboot          QEMU only: a guest reboot restarts the guest (the
#                     script runs again, on the same vhost-user connection)
#                     instead of ending the VM
#
# Exit status: the guest script's status from its "VMTEST-EXIT=<n>" line;
#   124  timeout (the VMM was killed)
#   125  harness failure: guest init failed (VMTEST-ERROR line), the VMM is
#        missing or failed to start, or the guest died without printing
#        VMTEST-EXIT
#   2    usage error
#
# Environment:
#   VMTEST_CACHE   where build-guest.sh caches the guest
#                  (default: /var/tmp/tvix-vmtest)
#   VMTEST_KERNEL  boot this kernel image instead of the cached one (it must
#                  match the cached modules' version)
#   VMTEST_VMM     default for --vmm
#   QEMU           QEMU binary (default: qemu-system-x86_64)
#   CLOUD_HYPERVISOR  cloud-hypervisor binary (default: cloud-hypervisor)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
    exit 2
}
log() { echo "run-vm: $*" >&2; }

SOCK='' SCRIPT='' TAG=nix-store MEM=1G SMP=1 QUEUES=1 TIMEOUT=120 ACCEL='' APPEND='' LOGFILE='' REBOOT=''
VMM=${VMTEST_VMM:-qemu} SCRIPT_VIA=''
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --socket) SOCK=${2:?}; shift 2 ;;
        --script) SCRIPT=${2:?}; shift 2 ;;
        --tag) TAG=${2:?}; shift 2 ;;
        --mem) MEM=${2:?}; shift 2 ;;
        --smp) SMP=${2:?}; shift 2 ;;
        --request-queues) QUEUES=${2:?}; shift 2 ;;
        --timeout) TIMEOUT=${2:?}; shift 2 ;;
        --accel) ACCEL=${2:?}; shift 2 ;;
        --append) APPEND=${2?}; shift 2 ;;
        --log) LOGFILE=${2:?}; shift 2 ;;
        --reboot) REBOOT=1; shift ;;
        --vmm) VMM=${2:?}; shift 2 ;;
        --script-via) SCRIPT_VIA=${2:?}; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) usage ;;
        *) log "unknown argument: $1"; usage ;;
    esac
done
[ -n "$SCRIPT" ] || { log "--script is required"; usage; }
[ -r "$SCRIPT" ] || { log "cannot read script $SCRIPT"; exit 2; }
case "$TAG" in *[!A-Za-z0-9._-]*|"") log "bad tag '$TAG'"; exit 2 ;; esac
case "$TIMEOUT" in *[!0-9]*|"") log "bad timeout '$TIMEOUT'"; exit 2 ;; esac

case "$VMM" in
    qemu)
        : "${SCRIPT_VIA:=fw_cfg}"
        case "${ACCEL:-tcg}" in
            tcg) ACCEL_ARGS=(-accel tcg,thread=multi -cpu max,-erms,-fsrm) ;;
            kvm) ACCEL_ARGS=(-accel kvm -cpu host) ;;
            *) log "--accel must be tcg or kvm"; exit 2 ;;
        esac
        ;;
    cloud-hypervisor)
        : "${SCRIPT_VIA:=initrd}"
        if [ "$SCRIPT_VIA" != initrd ]; then
            log "cloud-hypervisor has no fw_cfg (in default builds): use --script-via initrd"
            exit 2
        fi
        if [ -n "$ACCEL" ] && [ "$ACCEL" != kvm ]; then
            log "--accel $ACCEL is QEMU-only: cloud-hypervisor always runs on KVM"
            exit 2
        fi
        CH=${CLOUD_HYPERVISOR:-cloud-hypervisor}
        if ! command -v "$CH" >/dev/null 2>&1; then
            log "ERROR: --vmm cloud-hypervisor, but '$CH' is not installed (not on PATH; set CLOUD_HYPERVISOR to its binary)."
            log "ERROR: Debian 12 does not package it: install a static release binary from"
            log "ERROR: https://github.com/cloud-hypervisor/cloud-hypervisor/releases. It also needs a working /dev/kvm."
            exit 125
        fi
        if [ ! -w /dev/kvm ]; then
            log "ERROR: cloud-hypervisor needs KVM, and /dev/kvm is missing or not writable"
            exit 125
        fi
        case "$SOCK" in *,*) log "cloud-hypervisor cannot take a socket path with a comma: $SOCK"; exit 2 ;; esac
        ;;
    *) log "--vmm must be qemu or cloud-hypervisor"; exit 2 ;;
esac
case "$SCRIPT_VIA" in
    fw_cfg|initrd) ;;
    *) log "--script-via must be fw_cfg or initrd"; exit 2 ;;
esac

T0=$(date +%s.%N)
GUEST=$("$HERE/build-guest.sh" "${VMTEST_CACHE:-/var/tmp/tvix-vmtest}" | tail -n1) || GUEST=
if [ -z "$GUEST" ] || [ ! -e "$GUEST/.complete" ]; then
    log "guest build failed"
    exit 125
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/vmtest.XXXXXX")
qpid=''
cleanup() {
    if [ -n "$qpid" ]; then kill "$qpid" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# QEMU option values can't contain unescaped commas: work on copies/escapes.
cp "$SCRIPT" "$TMP/run.sh"
qesc() { printf '%s' "${1//,/,,}"; }

# The test script, either through fw_cfg or as /vmtest/run.sh in a second
# cpio archive after the guest's initramfs: Linux unpacks concatenated
# archives (each compressed or not) one after the other into the same
# rootfs. An uncompressed archive must start 4-byte aligned, hence the zero
# padding after the gzip'd one (zeros between archives are skipped).
INITRD=$GUEST/initrd.gz
SCRIPT_ARGS=()
if [ "$SCRIPT_VIA" = initrd ]; then
    mkdir -p "$TMP/scriptroot/vmtest"
    cp "$SCRIPT" "$TMP/scriptroot/vmtest/run.sh"
    chmod 0755 "$TMP/scriptroot/vmtest/run.sh"
    size=$(stat -c %s "$INITRD")
    {
        cat "$INITRD"
        head -c $(((4 - size % 4) % 4)) /dev/zero
        (cd "$TMP/scriptroot" && printf '%s\n' vmtest vmtest/run.sh |
            cpio -o -H newc --owner=0:0 --quiet)
    } >"$TMP/initrd" || { log "packing the script into the initramfs failed"; exit 125; }
    INITRD=$TMP/initrd
elif [ "$VMM" = qemu ]; then
    SCRIPT_ARGS=(-fw_cfg "name=opt/run,file=$(qesc "$TMP/run.sh")")
fi

if [ -n "$SOCK" ]; then
    for _ in $(seq 100); do
        [ -S "$SOCK" ] && break
        sleep 0.1
    done
    [ -S "$SOCK" ] || { log "socket $SOCK does not exist"; exit 125; }
else
    TAG=none
fi

# qboot (from qemu-system-data) is a minimal firmware: no SeaBIOS banner and
# terminal escapes on the console.
BIOS_ARGS=()
QBOOT=/usr/share/qemu/qboot.rom
[ -r "$QBOOT" ] && BIOS_ARGS=(-bios "$QBOOT")

# cryptomgr.notests: skip the kernel's crypto self-tests (~0.25 s under TCG).
CMDLINE="console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init cryptomgr.notests vmtest.tag=$TAG $APPEND"

KERNEL=${VMTEST_KERNEL:-$GUEST/kernel}
if [ "$VMM" = qemu ]; then
    REBOOT_ARGS=(-no-reboot)
    [ -z "$REBOOT" ] || REBOOT_ARGS=()
    FS_ARGS=()
    [ -z "$SOCK" ] || FS_ARGS=(
        -chardev "socket,id=vfs,path=$(qesc "$SOCK")"
        -device "vhost-user-fs-pci,chardev=vfs,tag=$TAG,queue-size=1024,num-request-queues=$QUEUES"
    )
    VM_CMD=(
        "${QEMU:-qemu-system-x86_64}"
        -nodefaults -no-user-config -nographic "${REBOOT_ARGS[@]}"
        -machine pc
        "${BIOS_ARGS[@]}"
        "${ACCEL_ARGS[@]}"
        -smp "$SMP"
        -m "$MEM"
        -object "memory-backend-memfd,id=mem,size=$MEM,share=on"
        -numa node,memdev=mem
        -serial stdio -monitor none
        -kernel "$KERNEL"
        -initrd "$INITRD"
        -append "$CMDLINE"
        "${SCRIPT_ARGS[@]}"
        "${FS_ARGS[@]}"
        "${EXTRA[@]}"
    )
else
    # Direct boot of the same vmlinux (PVH entry) and initramfs; guest RAM
    # shared with the daemon (shared=on); the legacy serial port (ttyS0) on
    # our stdout, the virtio console off. NOT RUN on our machines (no
    # cloud-hypervisor binary, and the PVM /dev/kvm hangs a stock kernel).
    FS_ARGS=()
    [ -z "$SOCK" ] || FS_ARGS=(--fs "tag=$TAG,socket=$SOCK,num_queues=1,queue_size=1024")
    VM_CMD=(
        "$CH"
        --kernel "$KERNEL"
        --initramfs "$INITRD"
        --cmdline "$CMDLINE"
        --cpus "boot=$SMP"
        --memory "size=$MEM,shared=on"
        --serial tty --console off
        "${FS_ARGS[@]}"
        "${EXTRA[@]}"
    )
fi

# Console: VMM -> fifo -> strip CRs -> stdout (+ log). The VMM runs in the
# background so we know its pid and can kill it if we are interrupted.
mkfifo "$TMP/console"
sed -u 's/\r$//' <"$TMP/console" | tee "$TMP/console.log" &
rpid=$!
T1=$(date +%s.%N)
timeout -k 5 "$TIMEOUT" "${VM_CMD[@]}" </dev/null >"$TMP/console" &
qpid=$!
qrc=0
wait "$qpid" || qrc=$?
qpid=
wait "$rpid" || true
T2=$(date +%s.%N)
[ -n "$LOGFILE" ] && cp "$TMP/console.log" "$LOGFILE"

elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
times="total $(elapsed "$T0" "$T2")s, $VMM $(elapsed "$T1" "$T2")s"
init_at=$(sed -n 's/^vmtest: init started at uptime \([0-9.]*\)s$/\1/p' "$TMP/console.log" | tail -n1)
[ -n "$init_at" ] && times="$times, guest reached init at ${init_at}s"

if [ "$qrc" -eq 124 ] || [ "$qrc" -eq 137 ]; then
    log "TIMEOUT after ${TIMEOUT}s: $VMM killed ($times)"
    exit 124
fi
status=$(sed -n 's/^VMTEST-EXIT=\([0-9][0-9]*\)$/\1/p' "$TMP/console.log" | tail -n1)
if [ -z "$status" ]; then
    log "guest printed no VMTEST-EXIT line ($VMM exit status $qrc; $times)"
    exit 125
fi
err=''
[ "$status" -ne 125 ] || err=$(grep -m1 '^VMTEST-ERROR: ' "$TMP/console.log" || true)
if [ -n "$err" ]; then
    log "guest setup failed before the script ran: ${err#VMTEST-ERROR: } ($times)"
    exit 125
fi
log "guest script exited with $status ($times)"
exit "$status"
