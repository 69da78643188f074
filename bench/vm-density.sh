#!/usr/bin/env bash
# Memory of many guests on one store, by guest cache policy: for each
# --cache POLICY, three TCG microVMs (vm-tests/) at once, each with its own
# `tvix-virtiofsd virtiofs --cache POLICY` over one embedded store, each
# reading every file of the same trees. Once all three have read them, the
# script takes the sum of the three QEMU processes' resident memory (their
# guest RAM is a shared memfd: a guest's page cache is counted there, as
# RssShmem) and the host page cache's growth since the start of the round
# without shared memory (the store's files, read once for all daemons). A guest holds no data pages with
# `never`; with `always` each holds its own copy.
#
# Usage: bench/vm-density.sh [DIR...]  (default /usr/share/doc
#        /usr/lib/python3.11; root: drops the host page cache per round)
# Environment:
#   POLICIES  cache policies, in order ("never always")
#   VMS       guests per round (3)
#   MEM       guest memory (1G)
#   TIMEOUT   seconds a VM may run, boot included (900)
#   BIN       our binary (default: target/release/tvix-virtiofsd, built first)
set -euo pipefail
shopt -s inherit_errexit
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(/usr/share/doc /usr/lib/python3.11)
policies=${POLICIES:-never always}
vms=${VMS:-3}
mem=${MEM:-1G}
timeout=${TIMEOUT:-900}
cd "$(dirname "$0")/.."
[ -n "${BIN:-}" ] || cargo build --release --quiet
bin=${BIN:-target/release/tvix-virtiofsd}
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"

work=$(mktemp -d /var/tmp/tvix-density.XXXXXX)
pids=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$rc" != 0 ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
cp "$bin" "$work/tvix-virtiofsd"
B=$work/tvix-virtiofsd
mkdir -p "$work/src"
for d in "${dirs[@]}"; do cp -a "$d" "$work/src/"; done
store=local://$work/store
names=$($B --store "$store" import "$work"/src/* | xargs -n1 basename | tr '\n' ' ')
files=$(find "$work/src" -type f | wc -l)
bytes=$(find "$work/src" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%d", s}')
sync

cat > "$work/guest.sh" <<SCRIPT
cd /nix/store
find $names -type f -print0 | xargs -0 cat > /dev/null || { echo "WALK-ERROR"; exit 1; }
echo "CACHED-KIB: \$(awk '/^Cached:/ {print \$2}' /proc/meminfo)"
echo "WALKED"
sleep 20
SCRIPT

kib() { awk -v k="$1" '$1 == k":" {print $2}' "${2:-/proc/meminfo}"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }

echo "## bench/vm-density.sh: $vms guests at once, guest memory $mem, commit $commit"
echo
echo "$(date -u +%F), $(nproc) cores, TCG; trees: ${dirs[*]} ($files files, $(mib $((bytes / 1024))) MiB)"
echo
echo "| --cache | QEMU RSS sum (MiB) | of it shared memory (MiB) | guest page cache per VM (MiB) | host page cache growth (MiB) | total (MiB) |"
echo "| --- | --- | --- | --- | --- | --- |"
for policy in $policies; do
  sync
  echo 3 > /proc/sys/vm/drop_caches
  cached0=$(kib Cached)
  shmem0=$(kib Shmem)
  vm_pids=()
  for i in $(seq 1 "$vms"); do
    sock=$work/$policy.$i.sock
    "$B" --store "$store" virtiofs --socket-path "$sock" --cache "$policy" \
      > /dev/null 2> "$work/$policy.$i.daemon.log" &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
    vm-tests/run-vm.sh --socket "$sock" --script "$work/guest.sh" --mem "$mem" \
      --timeout "$timeout" > "$work/$policy.$i.console" 2> "$work/$policy.$i.err" &
    vm_pids+=($!)
    pids+=($!)
  done
  # all walked: measure while the guests sleep
  deadline=$((SECONDS + timeout))
  until [ "$(grep -ls '^WALKED' "$work/$policy".*.console | wc -l)" -ge "$vms" ]; do
    if grep -qs 'WALK-ERROR' "$work/$policy".*.console; then
      echo "a guest failed to walk; see $work" >&2
      exit 1
    fi
    [ "$SECONDS" -lt "$deadline" ] || { echo "timed out; see $work" >&2; exit 1; }
    sleep 1
  done
  rss=0 shmem=0
  for i in $(seq 1 "$vms"); do
    qpid=''
    for p in $(pgrep -f "$work/$policy.$i.sock"); do
      case $(cat "/proc/$p/comm" 2>/dev/null) in qemu-system*) qpid=$p ;; esac
    done
    [ -n "$qpid" ] || { echo "no QEMU process for VM $i; see $work" >&2; exit 1; }
    rss=$((rss + $(kib VmRSS "/proc/$qpid/status")))
    shmem=$((shmem + $(kib RssShmem "/proc/$qpid/status")))
  done
  # page cache growth without shared memory (the guests' RAM is memfd)
  grown=$(( $(kib Cached) - cached0 - ($(kib Shmem) - shmem0) ))
  # the guests' own Cached (their page cache), averaged
  guest=$(cat "$work/$policy".*.console | awk '/^CACHED-KIB:/ {s += $2; n++} END {printf "%d", s / n}')
  host=$grown
  echo "| $policy | $(mib $rss) | $(mib $shmem) | $(mib "$guest") | $(mib $host) | $(mib $((rss + host))) |"
  for p in "${vm_pids[@]}"; do wait "$p" || true; done
done
