#!/usr/bin/env bash
# Daemon-level virtio-fs load: benches/vufs_load.rs plays the VMM (vhost-user
# frontend) and the guest's FUSE client against each contender serving the
# same trees, at queue depths 1 and 64, with 128 KiB and 1 MiB reads.
#
# Contenders (STORES, all by default, measured in one run):
#   embedded     tvix-virtiofsd virtiofs over the embedded store (local://)
#   remote-unix  the deployment with a remote store, the remote reached over
#                a unix socket:
#                  remote store: tvix-virtiofsd --store local://STORE daemon
#                  host daemon:  tvix-virtiofsd --store grpc+unix://REMOTE
#                                --cache-dir CACHE daemon (the filler)
#                  per-VM:       tvix-virtiofsd --store grpc+unix://HOST
#                                --cache-dir CACHE virtiofs (sandboxed)
#   remote-tcp   the same with the remote on loopback TCP (grpc+http://)
#   virtiofsd    rust-vmm's virtiofsd --shared-dir of the same copies
#                (--readonly --cache=always --sandbox none)
# Each load-generator run is two passes on one connection to a freshly
# started daemon: "cold", then "warm" (the same walk again). For the
# embedded store and virtiofsd that is one run per repetition. For a remote
# kind, each repetition starts the remote store and a host daemon with an
# EMPTY cache directory, then
#   first VM:  a fresh per-VM daemon, cold + warm (misses fetched through
#              the host daemon into the cache);
#   second VM: a NEW per-VM daemon on the now warm cache, cold + warm;
# the host daemon's tvix_virtiofsd_cache_fetched_bytes_total (its
# Prometheus /metrics) is read before and after each VM: the second VM must
# fetch 0 bytes. RssAnon (/proc/PID/status) of the per-VM serving process
# (the sandbox supervisor's child) and of the host daemon is read by the
# generator after each pass, while the VM is still connected.
# The page cache is dropped (DROP_CACHES) before each daemon start that
# begins a cold pass: embedded, virtiofsd, the remote's start (first VM)
# and the second VM.
#
# Usage: bench/vufs-load.sh [DIR...]  (default: /usr/share/doc /usr/share/man)
# Environment:
#   STORES      contenders, in this order in the table ("embedded remote-unix
#               remote-tcp virtiofsd"); ratios to a missing one stay empty
#   RUNS        repetitions (3; medians reported, contenders interleaved)
#   DEPTHS      queue depths ("1 64")
#   READ_SIZES  READ sizes in bytes ("131072 1048576")
#   MAX_FILES   read at most this many files per pass (all)
#   POLL        1: the generator spins on the used ring instead of sleeping
#               on the call eventfd (0)
#   DROP_CACHES 1 (default when root): drop the page cache as said above
#   VIRTIOFSD   reference binary (/var/tmp/vmtest-virtiofsd/bin/virtiofsd;
#               installed if missing and asked for)
#   OURS_ARGS   extra virtiofs flags for ours (embedded and per-VM), e.g.
#               "--sandbox none --seccomp none" to measure the sandbox
#   HOST_ARGS   extra flags for the host daemon (after `daemon`), e.g.
#               "--cache-size 1G"
#   KEEP        1: keep the work directory (logs, store, cache) at the end
set -euo pipefail
shopt -s inherit_errexit
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(/usr/share/doc /usr/share/man)
stores=${STORES:-embedded remote-unix remote-tcp virtiofsd}
depths=${DEPTHS:-1 64}
read_sizes=${READ_SIZES:-131072 1048576}
max_files=${MAX_FILES:-}
runs=${RUNS:-3}
poll=${POLL:-0}
drop_caches=${DROP_CACHES:-$([ -w /proc/sys/vm/drop_caches ] && echo 1 || echo 0)}
virtiofsd=${VIRTIOFSD:-/var/tmp/vmtest-virtiofsd/bin/virtiofsd}
read -r -a ours_args <<< "${OURS_ARGS:-}"
read -r -a host_args <<< "${HOST_ARGS:-}"
for s in $stores; do
  case $s in
    embedded | remote-unix | remote-tcp | virtiofsd) ;;
    *) echo "STORES: unknown contender '$s' (embedded remote-unix remote-tcp virtiofsd)" >&2; exit 2 ;;
  esac
done
has() { [[ " $stores " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
# Log lines without colour escapes, so they can be parsed.
export NO_COLOR=1

if has virtiofsd && [ ! -x "$virtiofsd" ]; then
  echo "installing the reference virtiofsd into $(dirname "$(dirname "$virtiofsd")")" >&2
  if ! pkg-config --exists libseccomp libcap-ng 2>/dev/null; then
    apt-get install -y libseccomp-dev libcap-ng-dev pkg-config >&2
  fi
  cargo install virtiofsd --version 1.14.0 --locked --root "$(dirname "$(dirname "$virtiofsd")")" >&2
fi

cargo build --release --quiet
gen=$(cargo bench --bench vufs_load --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[ -x "$gen" ] || { echo "cannot find the vufs_load bench executable" >&2; exit 1; }
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"

work=$(mktemp -d /var/tmp/tvix-vufsload.XXXXXX)
# Every process we started and that may still run, so that the trap can
# end them all: daemons (supervisors and their serving children). A process
# is dropped from the list once it has ended, so that a recycled PID is
# never signalled.
pids=()
untrack() { # PID...
  local p q keep=()
  for q in "${pids[@]}"; do
    for p in "$@"; do [ "$p" = "$q" ] && continue 2; done
    keep+=("$q")
  done
  pids=("${keep[@]}")
}
stop() { # PID...: SIGTERM, up to 5 s, then SIGKILL
  local p n
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  for p in "$@"; do
    for n in $(seq 50); do kill -0 "$p" 2>/dev/null || break; [ "$n" = 50 ] && kill -9 "$p" 2>/dev/null; sleep 0.1; done
    wait "$p" 2>/dev/null || true
  done
  untrack "$@"
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ ${#pids[@]} -eq 0 ] || stop "${pids[@]}"
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
fail() { # message, log files to show
  echo "vufs-load: $1" >&2
  shift
  local f
  for f in "$@"; do [ -f "$f" ] && { echo "--- $f (last 40 lines)" >&2; tail -n 40 "$f" >&2; }; done
  exit 1
}
# alive PID NAME LOG: fail loudly when a daemon that should run is gone.
alive() { kill -0 "$1" 2>/dev/null || fail "$2 (pid $1) died" "$3"; }
# wait_socket PATH PID NAME LOG: the daemon's socket appears, or it dies
# (fail), or 10 s pass (fail).
wait_socket() {
  local n
  for n in $(seq 200); do
    [ -S "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || fail "$3 (pid $2) died before creating $1" "$4"
    sleep 0.05
  done
  fail "$3: no socket at $1 after 10 s" "$4"
}
# wait_log REGEX PID NAME LOG: prints the group of the first log line REGEX
# (a sed regex with one group) matches, waiting as wait_socket does.
wait_log() {
  local n v
  for n in $(seq 200); do
    v=$(sed -n "s/$1/\1/p" "$4" | head -n1)
    [ -n "$v" ] && { echo "$v"; return 0; }
    kill -0 "$2" 2>/dev/null || fail "$3 (pid $2) died before logging '$1'" "$4"
    sleep 0.05
  done
  fail "$3: no '$1' in its log after 10 s" "$4"
}
# serving PID: the process that serves the VMM. Our daemon (and virtiofsd)
# fork at start; the supervisor's child serves.
serving() {
  local n c
  for n in $(seq 100); do
    c=$(pgrep -P "$1" | head -n1 || true)
    [ -n "$c" ] && { echo "$c"; return 0; }
    kill -0 "$1" 2>/dev/null || return 1
    sleep 0.05
  done
  echo "$1" # no child after 5 s: it serves itself
}
drop() { if [ "$drop_caches" = 1 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi; }

# Private copies of both programs (a concurrent build cannot swap them
# mid-run) and of the trees (packages installed meanwhile cannot change them).
cp "$gen" "$work/vufs_load"
cp target/release/tvix-virtiofsd "$work/tvix-virtiofsd"
gen=$work/vufs_load
B=$work/tvix-virtiofsd
mkdir -p "$work/src" "$work/logs"
for d in "${dirs[@]}"; do cp -a "$d" "$work/src/"; done
store="local://$work/store"
$B --store "$store" import "$work"/src/* > "$work/store-paths"
xargs -n1 basename < "$work/store-paths" > "$work/names-ours"
(cd "$work/src" && ls -1) > "$work/names-ref"
entries=$(find "$work/src" -mindepth 1 | wc -l)
files=$(find "$work/src" -type f | wc -l)
bytes=$(find "$work/src" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%d", s}')

summaries=$work/summaries
: > "$summaries"
# gen_run LABEL SOCKET NAMES LOG SUFFIX [generator args]: one connection, cold
# + warm; its SUMMARY lines get SUFFIX appended.
gen_run() {
  local label=$1 sock=$2 names=$3 log=$4 suffix=$5
  shift 5
  local args=(--socket "$sock" --paths "$names" --depth "$depth" --read-size "$rs" --label "$label" "$@")
  [ -n "$max_files" ] && args+=(--max-files "$max_files")
  [ "$poll" = 1 ] && args+=(--poll)
  "$gen" "${args[@]}" > "$work/out" 2> "$work/err" || fail "load generator failed ($label)" "$work/err" "$log"
  grep -v '^SUMMARY ' "$work/err" >&2 || true
  [ "$rep" = 1 ] && cat "$work/out"
  grep '^SUMMARY ' "$work/err" | sed "s/\$/$suffix read_size=$rs rep=$rep/" >> "$summaries"
}
# finish SUPERVISOR SERVING NAME LOG: the daemon exits 0 once its frontend
# is gone.
finish() {
  local rc=0
  wait "$1" || rc=$?
  # The serving child ends first: the supervisor exits with its status.
  if [ "$2" != "$1" ] && kill -0 "$2" 2>/dev/null; then
    sleep 1
    kill -0 "$2" 2>/dev/null && fail "$3: the serving process (pid $2) outlived its supervisor" "$4"
  fi
  untrack "$1" "$2"
  [ "$rc" = 0 ] || fail "$3 (pid $1) exited with status $rc after the run" "$4"
}

# One run of ours over the embedded store or of virtiofsd.
run_plain() { # embedded|virtiofsd
  local which=$1 sock=$work/$1/vfs.sock log=$work/logs/$1.r$rep.rs$rs.d$depth.log sup srv names
  mkdir -p "$work/$which"
  rm -f "$sock"
  drop
  if [ "$which" = embedded ]; then
    $B --store "$store" --log-level warn virtiofs --socket-path "$sock" "${ours_args[@]}" > "$log" 2>&1 &
    names=$work/names-ours
  else
    "$virtiofsd" --socket-path "$sock" --shared-dir "$work/src" --readonly \
      --cache=always --sandbox none --log-level warn > "$log" 2>&1 &
    names=$work/names-ref
  fi
  sup=$!
  pids+=("$sup")
  wait_socket "$sock" "$sup" "$which" "$log"
  srv=$(serving "$sup") || fail "$which (pid $sup) died at start" "$log"
  pids+=("$srv")
  gen_run "$which" "$sock" "$names" "$log" "" --rss "vm=$srv"
  finish "$sup" "$srv" "$which" "$log"
}

# metric ADDR NAME: one value from the host daemon's /metrics.
metric() {
  local v
  v=$(curl -sf "http://$1/metrics" | awk -v n="$2" '$1 == n {print $2}') || true
  [ -n "$v" ] || fail "cannot read $2 from http://$1/metrics" "$hlog"
  echo "$v"
}

# One repetition of a remote kind: remote store, host daemon on an empty
# cache, first VM, second VM.
run_remote() { # remote-unix|remote-tcp
  local kind=$1 base=$work/logs/$1.r$rep.rs$rs.d$depth
  local rlog=$base.remote.log rurl rpid hpid maddr vm sup srv vlog f0 f1 sock=$work/vm/vfs.sock
  hlog=$base.host.log
  rm -rf "$work/cache" "$work/remote" "$work/host" "$work/vm"
  mkdir -p "$work/remote" "$work/host" "$work/vm"
  drop
  if [ "$kind" = remote-unix ]; then
    $B --store "$store" daemon --listen "unix:$work/remote/remote.sock" > "$rlog" 2>&1 &
    rpid=$!
    pids+=("$rpid")
    wait_socket "$work/remote/remote.sock" "$rpid" "remote store daemon" "$rlog"
    rurl=grpc+unix://$work/remote/remote.sock
  else
    $B --store "$store" daemon --listen 127.0.0.1:0 > "$rlog" 2>&1 &
    rpid=$!
    pids+=("$rpid")
    rurl=grpc+http://$(wait_log '.* listening on \(127\.0\.0\.1:[0-9]*\).*' "$rpid" "remote store daemon" "$rlog")
  fi
  $B --store "$rurl" --cache-dir "$work/cache" daemon --listen "unix:$work/host/daemon.sock" \
    --metrics-listen 127.0.0.1:0 "${host_args[@]}" > "$hlog" 2>&1 &
  hpid=$!
  pids+=("$hpid")
  wait_socket "$work/host/daemon.sock" "$hpid" "host daemon" "$hlog"
  maddr=$(wait_log '.* metrics on http:\/\/\([^/]*\)\/metrics.*' "$hpid" "host daemon" "$hlog")
  for vm in 1 2; do
    vlog=$base.vm$vm.log
    rm -f "$sock"
    [ "$vm" = 2 ] && drop
    f0=$(metric "$maddr" tvix_virtiofsd_cache_fetched_bytes_total)
    $B --store "grpc+unix://$work/host/daemon.sock" --cache-dir "$work/cache" --log-level info \
      virtiofs --socket-path "$sock" "${ours_args[@]}" > "$vlog" 2>&1 &
    sup=$!
    pids+=("$sup")
    wait_socket "$sock" "$sup" "per-VM daemon (VM $vm)" "$vlog"
    srv=$(serving "$sup") || fail "per-VM daemon (pid $sup) died at start" "$vlog"
    pids+=("$srv")
    # The fetched bytes of this VM are known only after it ran: the
    # generator's SUMMARY lines get a placeholder, filled in below.
    gen_run "$kind-vm$vm" "$sock" "$work/names-ours" "$vlog" " fetched_bytes=FETCHED" --rss "vm=$srv" --rss "host=$hpid"
    finish "$sup" "$srv" "per-VM daemon (VM $vm)" "$vlog"
    alive "$hpid" "host daemon" "$hlog"
    alive "$rpid" "remote store daemon" "$rlog"
    f1=$(metric "$maddr" tvix_virtiofsd_cache_fetched_bytes_total)
    sed -i "s/ fetched_bytes=FETCHED / fetched_bytes=$((f1 - f0)) /" "$summaries"
    if [ "$vm" = 2 ] && [ "$f1" != "$f0" ]; then
      echo "WARNING: $kind: the host daemon fetched $((f1 - f0)) bytes from the remote during the second VM" \
        "(read size $rs, depth $depth, repetition $rep)$([ -n "$max_files" ] && [ "$depth" != 1 ] &&
          echo "; with MAX_FILES at depth > 1 the files read depend on reply order, so the second VM may read files the first did not")" >&2
    fi
    {
      echo "$kind rs=$rs depth=$depth rep=$rep VM $vm: $(sed -n 's/.* cache [^ ]*: \(hits: .*\)/\1/p' "$vlog")"
    } >> "$work/cache-lines"
  done
  curl -sf "http://$maddr/metrics" | grep -v '^#' | sed "s/^/$kind rs=$rs depth=$depth rep=$rep host: /" >> "$work/host-metrics"
  stop "$hpid" "$rpid"
  grep -h 'cache .*: hits:' "$hlog" | sed "s/.* cache [^ ]*: /$kind rs=$rs depth=$depth rep=$rep host daemon at exit: /" >> "$work/cache-lines" || true
}

: > "$work/cache-lines"
: > "$work/host-metrics"
# Repetitions interleave the contenders, so drift in the host's load
# (other builds) hits all alike.
for rep in $(seq "$runs"); do
  for rs in $read_sizes; do
    for depth in $depths; do
      for which in $stores; do
        case $which in
          embedded | virtiofsd) run_plain "$which" ;;
          *) run_remote "$which" ;;
        esac
      done
    done
  done
done

# median FIELD LABEL DEPTH PASS READ_SIZE: over the repetitions
median() {
  { grep "label=$2 depth=$3 pass=$4 .* read_size=$5 " "$summaries" || true; } |
    sed -n "s/.* $1=\([^ ]*\).*/\1/p" | sort -g |
    awk '{a[NR] = $1} END {if (NR) print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}
# maximum FIELD LABEL DEPTH PASS READ_SIZE: over the repetitions
maximum() {
  { grep "label=$2 depth=$3 pass=$4 .* read_size=$5 " "$summaries" || true; } |
    sed -n "s/.* $1=\([^ ]*\).*/\1/p" | sort -g | tail -n1
}
ratio() { if [ -n "$1" ] && [ -n "$2" ]; then printf '%.2f' "$(bc -l <<< "$1 / $2")"; fi; }
# The table's rows: label and pass name per contender.
rows=()
for s in $stores; do
  case $s in
    embedded | virtiofsd) rows+=("$s:$s:") ;;
    *) rows+=("$s:$s-vm1:first VM " "$s:$s-vm2:second VM ") ;;
  esac
done

echo
echo "tree: ${dirs[*]}: $entries entries, $files files, $((bytes / 1048576)) MiB;" \
  "page cache dropped before each cold start: $([ "$drop_caches" = 1 ] && echo yes || echo no);" \
  "$(nproc) CPUs; host load at the end: $(cut -d' ' -f1-3 /proc/loadavg); commit $commit;" \
  "per-op tables above: repetition 1; below: median of $runs"
echo
echo "| store | read size | depth | pass | ops/s | MiB/s | / virtiofsd | / embedded | READ p50/p99 µs |"
echo "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"
for rs in $read_sizes; do
  for depth in $depths; do
    for pass in cold warm; do
      m() { median "$1" "$2" "$depth" "$pass" "$rs"; }
      ref_ops=$(m ops_per_s virtiofsd)
      emb_ops=$(m ops_per_s embedded)
      for row in "${rows[@]}"; do
        IFS=: read -r store label pname <<< "$row"
        ops=$(m ops_per_s "$label")
        [ -n "$ops" ] || continue
        printf '| %s | %d KiB | %s | %s | %s | %s | %s | %s | %s / %s |\n' \
          "$store" $((rs / 1024)) "$depth" "$pname$pass" "$ops" "$(m mib_per_s "$label")" \
          "$(ratio "$ops" "$ref_ops")" "$(ratio "$ops" "$emb_ops")" \
          "$(m read_p50_us "$label")" "$(m read_p99_us "$label")"
      done
    done
  done
done

echo
echo "Remote bytes the host daemon fetched (median; second VM: the largest of the $runs runs, must be 0)" \
  "and RssAnon in KiB after the warm pass (median): the VM's serving process and the host daemon."
echo
echo "| store | read size | depth | fetched, first VM | fetched, second VM | RssAnon serving, first VM | second VM | RssAnon host daemon, after first VM | after second VM |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for rs in $read_sizes; do
  for depth in $depths; do
    m() { median "$1" "$2" "$depth" warm "$rs"; }
    for s in $stores; do
      case $s in
        embedded | virtiofsd)
          v=$(m rss_vm_kb "$s")
          [ -n "$v" ] || continue
          printf '| %s | %d KiB | %s | | | %s | | | |\n' "$s" $((rs / 1024)) "$depth" "$v" ;;
        *)
          f1=$(m fetched_bytes "$s-vm1")
          [ -n "$f1" ] || continue
          printf '| %s | %d KiB | %s | %.1f MiB | %s B | %s | %s | %s | %s |\n' "$s" $((rs / 1024)) "$depth" \
            "$(bc -l <<< "$f1 / 1048576")" "$(maximum fetched_bytes "$s-vm2" "$depth" warm "$rs")" \
            "$(m rss_vm_kb "$s-vm1")" "$(m rss_vm_kb "$s-vm2")" \
            "$(m rss_host_kb "$s-vm1")" "$(m rss_host_kb "$s-vm2")" ;;
      esac
    done
  done
done

echo
echo "raw per-run summaries:"
sed 's/^SUMMARY /    /' "$summaries"
if [ -s "$work/cache-lines" ]; then
  echo
  echo "cache counters (per-VM daemons at exit, host daemons at exit):"
  sed 's/^/    /' "$work/cache-lines"
fi
# Our daemons' complaints (virtiofsd's own, e.g. about RLIMIT_NOFILE, are
# left in its logs).
ours_logs=()
for f in "$work"/logs/*.log; do [[ $f == */virtiofsd.r* ]] || ours_logs+=("$f"); done
if [ ${#ours_logs[@]} -gt 0 ] && grep -q -E ' (WARN|ERROR) ' "${ours_logs[@]}"; then
  echo
  echo "warnings and errors in our daemons' logs (first 100):"
  grep -H -E ' (WARN|ERROR) ' "${ours_logs[@]}" | sed "s|^$work/logs/|    |" | head -n 100
fi
