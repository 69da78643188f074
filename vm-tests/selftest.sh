#!/usr/bin/env bash
# selftest.sh: checks the harness itself, without tvix-virtiofsd.
#
# Shares a small directory with a virtiofs daemon, boots a guest that lists
# /nix/store, prints a file from it and exits 3, and checks that run-vm.sh
# printed the file and exited 3. Then checks that a script can come through
# the initramfs (--script-via initrd) and that a hung guest times out (124).
#
# The daemon defaults to rust-vmm's reference virtiofsd, e.g. built with
#   apt-get install -y libseccomp-dev libcap-ng-dev
#   cargo install virtiofsd --root /var/tmp/vmtest-virtiofsd
# Environment:
#   VIRTIOFSD   daemon binary (default /var/tmp/vmtest-virtiofsd/bin/virtiofsd)
#   SKIP_TIMEOUT_TEST=1  skip the (slower) timeout check
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VIRTIOFSD=${VIRTIOFSD:-/var/tmp/vmtest-virtiofsd/bin/virtiofsd}
[ -x "$VIRTIOFSD" ] || { echo "selftest: no virtiofsd at $VIRTIOFSD" >&2; exit 2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/vmtest-selftest.XXXXXX")
dpid=
cleanup() {
    if [ -n "$dpid" ]; then kill "$dpid" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

passed=0 failed=0
check() { # NAME CONDITION...
    local name=$1; shift
    if "$@"; then
        echo "selftest: ok: $name"; passed=$((passed + 1))
    else
        echo "selftest: FAILED: $name"; failed=$((failed + 1))
    fi
}

mkdir -p "$TMP/share/some-dir"
echo "hello from the host store" >"$TMP/share/hello.txt"
cat >"$TMP/test.sh" <<'EOF'
ls /nix/store
cat /nix/store/hello.txt
grep -q ' /nix/store virtiofs ro' /proc/mounts || echo "store not mounted read-only"
exit 3
EOF

"$VIRTIOFSD" --socket-path "$TMP/vfs.sock" --shared-dir "$TMP/share" \
    --readonly --sandbox none >"$TMP/virtiofsd.log" 2>&1 &
dpid=$!

rc=0
"$HERE/run-vm.sh" --socket "$TMP/vfs.sock" --script "$TMP/test.sh" --timeout 120 \
    | tee "$TMP/out" || rc=$?
check "exit status is 3 (got $rc)" [ "$rc" -eq 3 ]
check "file content printed" grep -qx "hello from the host store" "$TMP/out"
check "directory listed" grep -q "some-dir" "$TMP/out"
check "store mounted read-only" bash -c "! grep -q 'store not mounted read-only' '$TMP/out'"
wait "$dpid" 2>/dev/null || true
dpid=

# The script through the initramfs (how cloud-hypervisor gets it), no fw_cfg.
printf 'echo "script at $(ls /vmtest/run.sh)"\nexit 4\n' >"$TMP/initrd.sh"
rc=0
"$HERE/run-vm.sh" --script "$TMP/initrd.sh" --script-via initrd --timeout 120 >"$TMP/out3" || rc=$?
check "--script-via initrd: exit status is 4 (got $rc)" [ "$rc" -eq 4 ]
check "--script-via initrd: script came from the initramfs" \
    grep -q '^vmtest: running test script (from initrd)' "$TMP/out3"

if [ -z "${SKIP_TIMEOUT_TEST:-}" ]; then
    echo 'echo sleeping; sleep 1000' >"$TMP/hang.sh"
    rc=0
    "$HERE/run-vm.sh" --script "$TMP/hang.sh" --timeout 15 >"$TMP/out2" || rc=$?
    check "hung guest times out with 124 (got $rc)" [ "$rc" -eq 124 ]
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
