#!/usr/bin/env bash
# build-guest.sh OUTDIR
#
# Builds (once) the guest used by run-vm.sh: a Debian 6.1 kernel plus a tiny
# busybox initramfs whose /init (guest-init.sh) mounts a virtiofs share
# read-only at /nix/store and runs a test script handed in through QEMU's
# fw_cfg.
#
# Result: OUTDIR/<kernel-package>_<version>-<hash of guest-init.sh etc>/ with
#   kernel      uncompressed ELF vmlinux (PVH entry) or, failing that, the bzImage
#   initrd.gz   gzip'd newc cpio archive
#   kver        kernel release string
# and the symlink OUTDIR/current pointing at it. The directory is printed on
# stdout (last line); all chatter goes to stderr.
#
# Idempotent: if the newest available kernel package was already built with
# this guest-init.sh (and module list), nothing is done; apt is asked for a
# newer kernel at most every 12 h. Safe to call concurrently (flock).
#
# Host requirements, installed with apt-get when missing (needs root):
#   qemu-system-x86  - run-vm.sh boots the guest with it (has vhost-user-fs-pci)
#   busybox-static   - the guest's whole userland (must be statically linked)
#   cpio             - to pack the initramfs
#   xz-utils, zstd   - to unpack the bzImage payload (Debian uses xz today)
#   gzip             - to compress the initramfs
# The kernel package itself is only fetched with `apt-get download` and
# unpacked with `dpkg -x`; it is never installed on the host.
#
# Environment:
#   VMTEST_KERNEL_PKG  force a kernel package name (default: newest
#                      linux-image-6.1*-amd64[-unsigned] known to apt)
set -euo pipefail

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
OUTDIR=$1
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The modules the guest needs, in load order. Missing ones are an error
# unless the kernel has them built in (modules.builtin).
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci fuse virtiofs qemu_fw_cfg"
# Bump when the way the guest is assembled changes; the cache key also covers
# guest-init.sh and the module list.
GUEST_FORMAT=1
SELF_HASH=$( (echo "$GUEST_FORMAT $MODULES"; cat "$HERE/guest-init.sh") | sha256sum | cut -c1-12)

apt_updated=
apt_update() {
    if [ -z "$apt_updated" ]; then
        log "apt-get update"
        apt-get update -qq >&2 || log "warning: apt-get update failed"
        apt_updated=1
    fi
}

# ensure_pkg PACKAGE TEST-COMMAND...: install PACKAGE unless the test succeeds.
ensure_pkg() {
    local pkg=$1; shift
    if "$@" >/dev/null 2>&1; then return 0; fi
    log "installing $pkg"
    [ "$(id -u)" -eq 0 ] || die "$pkg is missing and we are not root to apt-get install it"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >&2; then
        apt_update
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >&2
    fi
}

is_static_busybox() {
    [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1
}

ensure_pkg qemu-system-x86 command -v qemu-system-x86_64
ensure_pkg busybox-static is_static_busybox
ensure_pkg cpio command -v cpio
ensure_pkg xz-utils command -v xz
ensure_pkg zstd command -v zstd
ensure_pkg gzip command -v gzip

# --- fast path ------------------------------------------------------------------
# Asking apt for the newest kernel costs ~1 s; do it at most every 12 hours
# unless a package is forced.
cur=$(readlink "$OUTDIR/current" 2>/dev/null || true)
if [ -z "${VMTEST_KERNEL_PKG:-}" ] && [ -n "$cur" ] && [ "${cur%-"$SELF_HASH"}" != "$cur" ] &&
    [ -e "$OUTDIR/current/.complete" ] &&
    [ -n "$(find "$OUTDIR/.checked" -mmin -720 2>/dev/null)" ]; then
    echo "$OUTDIR/$cur"
    exit 0
fi

# --- pick the kernel package ------------------------------------------------
newest_kernel_pkg() {
    apt-cache pkgnames linux-image-6.1 2>/dev/null |
        grep -E '^linux-image-6\.1\.[0-9]+-[0-9]+-amd64(-unsigned)?$' |
        sort -V | tail -n1
}
pkg_version() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }'
}

# pick_pkg: set pkg, ver, key and DEST from apt's current view.
pick_pkg() {
    pkg=${VMTEST_KERNEL_PKG:-}
    [ -n "$pkg" ] || pkg=$(newest_kernel_pkg || true)
    ver=
    [ -z "$pkg" ] || ver=$(pkg_version "$pkg")
    [ "$ver" != "(none)" ] || ver=
    key="${pkg}_${ver}-${SELF_HASH}"
    key=${key//[^A-Za-z0-9._+-]/_}
    DEST="$OUTDIR/$key"
    [ -n "$pkg" ] && [ -n "$ver" ]
}

# reuse: succeed (and print the guest) if DEST is already built.
reuse() {
    [ -e "$DEST/.complete" ] || return 1
    ln -sfn "$key" "$OUTDIR/current"
    touch "$OUTDIR/.checked"
    echo "$DEST"
}

exec 9>"$OUTDIR/.lock"
flock 9

WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# download: fetch the chosen package into $WORK (quietly; errors only matter
# once apt's lists are known to be fresh).
download() {
    [ -n "$pkg" ] && [ -n "$ver" ] || return 1
    (cd "$WORK" && apt-get download -q "$pkg=$ver" 2>&1 | grep -v 'unsandboxed as root' >&2)
    ls "$WORK"/*.deb >/dev/null 2>&1
}

# fallback MESSAGE: no newer kernel can be had (offline?): keep using the
# current guest if it was built from this guest-init.sh, else fail.
fallback() {
    if [ -n "$cur" ] && [ "${cur%-"$SELF_HASH"}" != "$cur" ] && [ -e "$OUTDIR/current/.complete" ]; then
        log "warning: $1; reusing $cur"
        echo "$OUTDIR/$cur"
        exit 0
    fi
    die "$1"
}

if pick_pkg && reuse; then exit 0; fi
if ! download; then
    # Lists missing or stale (old kernel builds vanish from the mirrors).
    apt_update
    pick_pkg || fallback "no linux-image-6.1*-amd64 package known to apt"
    if reuse; then exit 0; fi
    download || fallback "apt-get download $pkg=$ver failed"
fi

log "building guest $key"
deb=$(ls "$WORK"/*.deb)
dpkg -x "$deb" "$WORK/pkg"
rm -f "$deb"

vmlinuz=$(ls "$WORK"/pkg/boot/vmlinuz-* | head -n1)
[ -f "$vmlinuz" ] || die "no vmlinuz in $pkg"
kver=${vmlinuz##*/vmlinuz-}
moddir="$WORK/pkg/lib/modules/$kver"
[ -d "$moddir" ] || die "no modules for $kver in $pkg"
config="$WORK/pkg/boot/config-$kver"

OUT="$WORK/out"
mkdir -p "$OUT"

# --- kernel: try to get the uncompressed ELF vmlinux -------------------------------
# Same idea as the kernel's scripts/extract-vmlinux: look for the magic of each
# supported compressor inside the bzImage, decompress from there, and keep the
# first result that is an ELF file. QEMU can boot it directly (PVH entry point,
# needs CONFIG_PVH=y), which skips the in-guest decompression (~2 s under TCG).
is_elf() { [ "$(head -c4 "$1" | od -An -c | tr -d ' ')" = "177ELF" ]; }

try_decompress() { # MAGIC-REGEX DECOMPRESS-CMD...
    local magic=$1; shift
    local off
    for off in $(LC_ALL=C grep -obUaP "$magic" "$vmlinuz" | cut -d: -f1); do
        tail -c +$((off + 1)) "$vmlinuz" | "$@" >"$WORK/vmlinux" 2>/dev/null || true
        if [ -s "$WORK/vmlinux" ] && is_elf "$WORK/vmlinux"; then
            return 0
        fi
    done
    rm -f "$WORK/vmlinux"
    return 1
}

kernel_kind=bzimage
if [ -f "$config" ] && grep -q '^CONFIG_PVH=y' "$config"; then
    if try_decompress '\xfd7zXZ\x00' xz -dc --single-stream ||
        try_decompress '\x28\xb5\x2f\xfd' zstd -dc ||
        try_decompress '\x1f\x8b\x08' gzip -dc; then
        kernel_kind=elf
    fi
fi
if [ "$kernel_kind" = elf ]; then
    mv "$WORK/vmlinux" "$OUT/kernel"
    log "kernel: uncompressed ELF vmlinux ($kver)"
else
    cp "$vmlinuz" "$OUT/kernel"
    log "kernel: bzImage ($kver); could not extract a bootable vmlinux"
fi

# --- initramfs ---------------------------------------------------------------------
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,nix/store,lib/modules}
cp /bin/busybox "$ROOT/bin/busybox"
# One symlink per applet, at the path busybox itself suggests.
for applet in $(/bin/busybox --list-full); do
    [ -e "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done
# A console node so the kernel can open it before /init mounts devtmpfs.
if [ "$(id -u)" -eq 0 ]; then
    mknod -m 600 "$ROOT/dev/console" c 5 1
fi

order=
for m in $MODULES; do
    f=$(find "$moddir/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) | head -n1)
    if [ -z "$f" ]; then
        if grep -qE "/$m\.ko\$" "$moddir/modules.builtin" 2>/dev/null; then
            log "module $m is built in"
            continue
        fi
        die "module $m not found in $pkg"
    fi
    case "$f" in
        *.ko.xz) xz -dc "$f" >"$ROOT/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$ROOT/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$ROOT/lib/modules/$m.ko" ;;
        *) cp "$f" "$ROOT/lib/modules/$m.ko" ;;
    esac
    order="$order $m"
done
echo "$order" >"$ROOT/etc/vmtest-modules"

cp "$HERE/guest-init.sh" "$ROOT/init"
chmod 755 "$ROOT/init"

(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) | gzip -6 >"$OUT/initrd.gz"

echo "$kver" >"$OUT/kver"
echo "$kernel_kind" >"$OUT/kernel-kind"
echo "$pkg=$ver" >"$OUT/package"
touch "$OUT/.complete"

rm -rf "$DEST"
mv "$OUT" "$DEST"
ln -sfn "$key" "$OUTDIR/current"
touch "$OUTDIR/.checked"
# Drop guests built from older kernels or older versions of this script.
for old in "$OUTDIR"/linux-image-*; do
    [ "$old" = "$DEST" ] || rm -rf "$old"
done
log "guest ready in $DEST"
echo "$DEST"
