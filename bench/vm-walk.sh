#!/usr/bin/env bash
# In-guest figures, all contenders in the same run: time from QEMU start to
# the guest's first command, then `find` + `cat` of a tree inside a TCG
# microVM (vm-tests/), then the same walk again after the guest dropped its
# own caches (`echo 3 > /proc/sys/vm/drop_caches` in the guest: every
# request reaches the daemon again, whose caches are warm). Guest reads
# under TCG top out near 16 MB/s whatever serves them, so these show the
# guest's view, not the daemon's speed (bench/vufs-load.sh measures that).
#
# Contenders (STORES):
#   embedded     tvix-virtiofsd virtiofs over the embedded store (local://)
#   remote-unix  a remote store daemon (unix socket), a host daemon with an
#                EMPTY --cache-dir in front of it, and per VM a `virtiofs
#                --store grpc+unix://HOST --cache-dir CACHE` (see
#                bench/daemons.sh); two VMs one after the other: the first
#                on the empty cache, the second with a NEW per-VM daemon on
#                the cache the first filled
#   remote-tcp   the same with the remote on loopback TCP (grpc+http://)
#   virtiofsd    rust-vmm's virtiofsd --shared-dir of the same copies
#                (--readonly --cache=always --sandbox none)
# After the walks the guest prints a marker and waits 2 s; meanwhile the
# script reads RssAnon (/proc/PID/status) of the VM's serving process (the
# sandbox supervisor's child) and of the host daemon. For the remote kinds
# the host daemon's tvix_virtiofsd_cache_fetched_bytes_total (/metrics) is
# read before and after each VM: the second VM must fetch 0 bytes.
#
# Usage: bench/vm-walk.sh [DIR...]  (default /usr/share/doc /usr/share/man; root)
# Environment:
#   STORES      contenders, in this order ("embedded remote-unix virtiofsd";
#               add remote-tcp for the remote over loopback TCP)
#   OURS_ARGS   extra virtiofs flags for ours (embedded and per-VM)
#   HOST_ARGS   extra flags for the host daemon (after `daemon`)
#   TIMEOUT     seconds a VM may run, boot included (900)
#   VIRTIOFSD   reference binary (/var/tmp/vmtest-virtiofsd/bin/virtiofsd;
#               installed if missing and asked for)
#   RTT_MS      remote-tcp's host daemon reaches the remote store daemon
#               through the shaping relay (benches/relay.rs, as in
#               bench/vufs-load.sh) adding this round trip in ms (0: direct)
#   KEEP        1: keep the work directory (logs, consoles, cache) at the end
#   BIN         our binary (default: target/release/tvix-virtiofsd, built
#               first), e.g. an older build to compare with
set -euo pipefail
shopt -s inherit_errexit
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(/usr/share/doc /usr/share/man)
stores=${STORES:-embedded remote-unix virtiofsd}
timeout=${TIMEOUT:-900}
read -r -a ours_args <<< "${OURS_ARGS:-}"
read -r -a host_args <<< "${HOST_ARGS:-}"
for s in $stores; do
  case $s in
    embedded | remote-unix | remote-tcp | virtiofsd) ;;
    *) echo "STORES: unknown contender '$s' (embedded remote-unix remote-tcp virtiofsd)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
# shellcheck source=bench/daemons.sh
. bench/daemons.sh
[ -n "${BIN:-}" ] || cargo build --release --quiet
bin=${BIN:-target/release/tvix-virtiofsd}
VFSD=${VIRTIOFSD:-/var/tmp/vmtest-virtiofsd/bin/virtiofsd}
if [[ " $stores " == *" virtiofsd "* ]] && [ ! -x "$VFSD" ]; then
  apt-get install -y -q libseccomp-dev libcap-ng-dev >/dev/null
  cargo install --quiet virtiofsd --version 1.14.0 --locked --root "$(dirname "$(dirname "$VFSD")")"
fi
rtt_ms=${RTT_MS:-0}
if [ "$rtt_ms" != 0 ]; then
  relay_bin=$(cargo bench --bench relay --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
  [ -x "$relay_bin" ] || { echo "cannot find the relay bench executable" >&2; exit 1; }
  relay_flags="--rtt-ms $rtt_ms"
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"

work=$(mktemp -d /var/tmp/tvix-vmbench.XXXXXX)
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_all
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then
    echo "work directory kept: $work" >&2
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# A private copy of the program (a concurrent build cannot swap it mid-run)
# and of the trees.
cp "$bin" "$work/tvix-virtiofsd"
B=$work/tvix-virtiofsd
mkdir -p "$work/src" "$work/logs" "$work/vm"
for d in "${dirs[@]}"; do cp -a "$d" "$work/src/"; done
store=local://$work/store
paths=$($B --store "$store" import "$work"/src/*)
# The copies and the import leave dirty pages: written back now, not
# during the first contender's walk; and every contender's files (the
# copies virtiofsd serves, the store ours does) are read once, so the first
# one does not pay for a cold page cache the others find warm.
sync
find "$work/src" "$work/store" -type f -print0 | xargs -0 cat > /dev/null
ours_names=$(for p in $paths; do basename "$p"; done | tr '\n' ' ')
ref_names=$(find "$work/src" -mindepth 1 -maxdepth 1 -printf '%f ')
entries=$(find "$work/src" -mindepth 1 | wc -l)
files=$(find "$work/src" -type f | wc -l)
bytes=$(find "$work/src" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%d", s}')

guest_script() {  # $@: names below /nix/store
  cat <<SCRIPT
up() { cut -d' ' -f1 /proc/uptime; }
echo "FIRST: \$(up)"
cd /nix/store
walk() {
  t0=\$(up); n=\$(find $* | wc -l); t1=\$(up)
  find $* -type f -print0 | xargs -0 cat > /dev/null || { echo "WALK-ERROR: cat failed"; exit 1; }
  t2=\$(up)
  echo "FIND\$1: \$n \$(awk "BEGIN {print \$t1 - \$t0}")"
  echo "CAT\$1: \$(awk "BEGIN {print \$t2 - \$t1}")"
}
walk ""
sync; echo 3 > /proc/sys/vm/drop_caches
walk _AGAIN
echo "SNAP-RSS"
sleep 2
SCRIPT
}

# run_vm ROW VM NAMES LOG: boots a guest on $work/vm/vfs.sock (served by
# vm_sup/vm_srv), walks NAMES, reads RssAnon at the guest's marker, checks
# that every daemon survived, prints the table row.
run_vm() {
  local row=$1 vm=$2 names=$3 log=$4 out rss_vm='' rss_host='' vmpid rc=0 t0 t1
  local f0='' f1='' fetched=''
  [ -n "${host_pid:-}" ] && f0=$(metric tvix_virtiofsd_cache_fetched_bytes_total)
  out=$work/logs/$row$([ "$vm" = - ] || echo ".vm$vm").console
  : > "$out"
  # shellcheck disable=SC2086 # names is a list
  guest_script $names > "$work/$row.vm$vm.sh"
  t0=$(date +%s.%N)
  vm-tests/run-vm.sh --socket "$work/vm/vfs.sock" --script "$work/$row.vm$vm.sh" \
    --timeout "$timeout" > "$out" 2> "$out.err" &
  vmpid=$!
  track "$vmpid"
  while kill -0 "$vmpid" 2>/dev/null; do
    if [ -z "$rss_vm" ] && grep -qs '^SNAP-RSS$' "$out"; then
      rss_vm=$(rss_anon "$vm_srv")
      [ -n "${host_pid:-}" ] && rss_host=$(rss_anon "$host_pid")
    fi
    # The per-VM daemon ends with the VM; until the marker it must run.
    [ -n "$rss_vm" ] || alive "$vm_sup" "$row daemon (VM $vm)" "$log"
    [ -z "${host_pid:-}" ] || remote_alive
    sleep 0.1
  done
  wait "$vmpid" || rc=$?
  untrack "$vmpid"
  t1=$(date +%s.%N)
  [ "$rc" = 0 ] || fail "$row VM $vm: run-vm.sh exited with $rc" "$out" "$out.err" "$log"
  [ -n "$rss_vm" ] || fail "$row VM $vm: no RssAnon read (marker missed or serving process gone)" "$out" "$log"
  finish "$vm_sup" "$vm_srv" "$row daemon (VM $vm)" "$log"
  if [ -n "${host_pid:-}" ]; then
    remote_alive
    f1=$(metric tvix_virtiofsd_cache_fetched_bytes_total)
    fetched=$((f1 - f0))
    if [ "$vm" = 2 ] && [ "$fetched" != 0 ]; then
      echo "WARNING: $row: the host daemon fetched $fetched bytes from the remote during the second VM" >&2
    fi
    echo "$row VM $vm: $(cache_line "$log")" >> "$work/cache-lines"
  fi
  local first find_s cat_s n find2 cat2 n2
  first=$(sed -n 's/^FIRST: //p' "$out")
  n=$(sed -n 's/^FIND: \([0-9]*\) .*/\1/p' "$out")
  find_s=$(sed -n 's/^FIND: [0-9]* //p' "$out")
  cat_s=$(sed -n 's/^CAT: //p' "$out")
  n2=$(sed -n 's/^FIND_AGAIN: \([0-9]*\) .*/\1/p' "$out")
  find2=$(sed -n 's/^FIND_AGAIN: [0-9]* //p' "$out")
  cat2=$(sed -n 's/^CAT_AGAIN: //p' "$out")
  if [ "$n" != "$entries" ] || [ "$n2" != "$entries" ]; then
    fail "$row VM $vm: the guest's find saw '$n' then '$n2' entries, expected $entries" "$out"
  fi
  printf '| %s | %s | %s s | %s s | %s s | %s s | %s s | %.1f s | %s | %s | %s |\n' \
    "$row" "$vm" "$first" "$find_s" "$cat_s" "$find2" "$cat2" "$(echo "$t1 - $t0" | bc -l)" \
    "$rss_vm" "${rss_host:--}" "${fetched:--}"
}

echo "tree: ${dirs[*]}: $files files, $((bytes / 1048576)) MiB; TCG guest, 1 vCPU, 1 GiB; commit $commit; remote-tcp through a relay adding RTT ${rtt_ms} ms"
echo
echo "| daemon | VM | boot to first command (guest uptime) | find | cat all | find, guest caches dropped | cat all, guest caches dropped | whole run | RssAnon serving (KiB) | RssAnon host daemon (KiB) | bytes fetched from the remote |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: |"
: > "$work/cache-lines"
for which in $stores; do
  log=$work/logs/$which.log
  case $which in
    embedded)
      host_pid=
      start_virtiofs "$B" "$work/vm/vfs.sock" "$log" --store "$store" virtiofs "${ours_args[@]}"
      run_vm "$which" - "$ours_names" "$log" ;;
    virtiofsd)
      host_pid=
      start_virtiofs "$VFSD" "$work/vm/vfs.sock" "$log" --shared-dir "$work/src" --readonly \
        --cache=always --sandbox none
      run_vm "$which" - "$ref_names" "$log" ;;
    *)
      start_remote "$which" "$B" "$store" "$work" "$work/logs/$which" "${host_args[@]}"
      for vm in 1 2; do
        log=$work/logs/$which.vm$vm.log
        start_virtiofs "$B" "$work/vm/vfs.sock" "$log" --store "grpc+unix://$host_sock" \
          --cache-dir "$work/cache" --log-level info virtiofs "${ours_args[@]}"
        run_vm "$which" "$vm" "$ours_names" "$log"
      done
      stop_remote
      echo "$which host daemon at exit: $(cache_line "$host_log")" >> "$work/cache-lines"
      host_pid= ;;
  esac
done

if [ -s "$work/cache-lines" ]; then
  echo
  echo "cache counters (per-VM daemons at exit, host daemons at exit):"
  sed 's/^/    /' "$work/cache-lines"
fi
ours_logs=()
for f in "$work"/logs/*.log; do [[ $f == */virtiofsd.log ]] || ours_logs+=("$f"); done
[ ${#ours_logs[@]} -eq 0 ] || our_complaints "${ours_logs[@]}"
