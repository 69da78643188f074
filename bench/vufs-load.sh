#!/usr/bin/env bash
# Daemon-level virtio-fs load: benches/vufs_load.rs plays the VMM (vhost-user
# frontend) and the guest's FUSE client against each contender serving the
# same trees, at queue depths 1 and 64, with 128 KiB and 1 MiB reads.
#
# Contenders (STORES, all by default, measured in one run):
#   embedded     tvix-virtiofsd virtiofs over the embedded store (local://)
#   remote-unix  the deployment with a remote store (see bench/daemons.sh):
#                a remote store daemon over the embedded store, on a unix
#                socket; a host daemon with --cache-dir in front of it (the
#                filler); per VM, `virtiofs --store grpc+unix://HOST
#                --cache-dir CACHE` (sandboxed, reads hits from CACHE)
#   remote-tcp   the same with the remote on loopback TCP (grpc+http://)
#   remote-s3    the same as remote-unix with the remote store daemon over
#                a bucket (`daemon --store s3://tvix/vufs?endpoint=...`) of
#                a three-node Garage cluster on loopback (bench/garage.sh),
#                started by this script; the trees are imported into the
#                bucket once, before the first repetition (timed, and the
#                store paths checked to be those of the embedded store)
#   nix-http-xz  the same as remote-unix with a Nix binary cache as the
#                host daemon's upstream instead of a remote store daemon:
#                `daemon --store nix+http://127.0.0.1:PORT?trusted-public-
#                keys=...`, the cache's directory served by a static HTTP
#                server on loopback (HTTPD); its NARs xz-compressed. The
#                binary cache is made once, before the first repetition
#                (timed): our daemon serves the embedded store on
#                --http-listen, signing its narinfos (--signing-key), and
#                Debian's Nix copies the store paths from it (`nix copy
#                --from http://... --to file://DIR?compression=xz`)
#   nix-http-none the same with uncompressed NARs (compression=none)
#   virtiofsd    rust-vmm's virtiofsd --shared-dir of the same copies
#                (--readonly --cache=always --sandbox none)
# Each load-generator run walks the tree several times on one connection
# to a freshly started daemon: "cold", then "warm" (the same walk again,
# WARM_PASSES times; the median one counts). For the embedded store and
# virtiofsd that is one run per repetition. For a remote
# kind, each repetition starts the remote store and a host daemon with an
# EMPTY cache directory, then
#   first VM:  a fresh per-VM daemon, cold + warm (misses fetched through
#              the host daemon into the cache);
#   second VM: a NEW per-VM daemon on the now warm cache, cold + warm;
# the host daemon's tvix_virtiofsd_cache_fetched_bytes_total (its
# Prometheus /metrics) is read before and after each VM: the second VM must
# fetch 0 bytes. RssAnon (/proc/PID/status) of the per-VM serving process
# (the sandbox supervisor's child) and of the host daemon is read by the
# generator after each pass, while the VM is still connected, and the CPU
# time the serving process used during the pass (/proc/PID/stat).
# The page cache is dropped (DROP_CACHES) before each daemon start that
# begins a cold pass: embedded, virtiofsd, the remote's start (first VM)
# and the second VM (Garage's data and metadata included for remote-s3).
# For the remote kinds, the remote store daemon's metrics (its served
# BlobService/Read and DirectoryService/Get calls: count and summed time
# to their first message) and, for remote-s3, the CPU time of the Garage
# nodes are read before and after each VM: where a first VM's time goes.
# For the nix-http kinds, the host daemon's upstream counters (store paths
# read in from the binary cache, bytes carried) are read instead, and the
# CPU time of the host daemon and of the HTTP server during the cold pass.
#
# Usage: bench/vufs-load.sh [DIR...]  (default: /usr/share/doc /usr/share/man)
# Environment:
#   STORES      contenders, in this order in the table ("embedded remote-unix
#               remote-tcp virtiofsd"; remote-s3 only when asked for: it
#               needs `garage`, on PATH or in ~/.cargo/bin; nix-http-xz and
#               nix-http-none only when asked for: they need `nix` and
#               `nix-store`, e.g. Debian's nix-bin); ratios to a missing
#               one stay empty
#   RUNS        repetitions (3; medians reported; contenders interleaved,
#               in reverse order every other repetition)
#   WARM_PASSES warm passes per run (3); a run's warm figure is its median
#               one, the others are listed as warm1, warm2, ... at the end
#   DEPTHS      queue depths ("1 64")
#   QUEUES      request queue counts ("1"): each measurement is run once per
#               count N, our daemons (embedded and per-VM) started with
#               --request-queues N and the generator with --queues N (slot
#               s on queue 1 + s % N, like a guest's threads on N vCPUs; see
#               benches/vufs_load.rs: at depth 1 only queue 1 is used).
#               virtiofsd serves one request queue only: it is skipped for
#               N > 1, its ratio column stays empty there. With some N > 1,
#               the requests our daemons logged per queue at the VMM's
#               disconnect are listed at the end
#   READ_SIZES  READ sizes in bytes ("131072 1048576")
#   MAX_FILES   read at most this many files per pass (all)
#   POLL        1: the generator spins on the used ring instead of sleeping
#               on the call eventfd (0)
#   DROP_CACHES 1 (default when root): drop the page cache as said above
#   VIRTIOFSD   reference binary (/var/tmp/vmtest-virtiofsd/bin/virtiofsd;
#               installed if missing and asked for)
#   OURS_ARGS   extra virtiofs flags for ours (embedded and per-VM), e.g.
#               "--sandbox none --seccomp none" to measure the sandbox
#   TENANT      1: per-VM daemons of the remote kinds serve the trees as a
#               tenant's closure (--closure-file of all their store paths):
#               their connection to the host daemon is scoped, they see no
#               cache directory and get hits as passed descriptors (0)
#   HOST_ARGS   extra flags for the host daemon (after `daemon`), e.g.
#               "--cache-size 1G"
#   RTT_MS      a round trip in ms (a decimal) added between each host
#               daemon (the cache filler) and its remote store daemon, by a
#               relay (benches/relay.rs, a tokio TCP relay delaying each
#               direction by half of it: this kernel has no netem), so that
#               every cache miss pays it; 0: no relay (0). Only remote-tcp
#               and remote-s3 are relayed (remote-s3's remote store daemon
#               then listens on loopback TCP instead of a unix socket; the
#               link from it to Garage is not relayed); remote-unix runs
#               unrelayed, with a warning, and is refused when it is the
#               only remote kind; the nix-http kinds are never relayed
#   MBIT        the relayed link's bandwidth per direction in Mbit/s (a
#               decimal); 0: no cap (0). Nonzero relays even at RTT_MS=0
#   HTTPD       the nix-http kinds' static HTTP server: python (`python3 -m
#               http.server`, a thread per connection; the default) or
#               busybox (`busybox httpd`, a process per connection: the
#               CPU time of its children is not counted)
#   GARAGE_NODELAY 1: remote-s3's Garage nodes run with TCP_NODELAY on
#               their sockets (bench/nodelay.c preloaded; an experiment:
#               stock Garage 2.5 leaves Nagle's algorithm on)
#   KEEP        1: keep the work directory (logs, store, cache) at the end
#               (after a failure it is kept without its caches)
set -euo pipefail
shopt -s inherit_errexit
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(/usr/share/doc /usr/share/man)
stores=${STORES:-embedded remote-unix remote-tcp virtiofsd}
depths=${DEPTHS:-1 64}
queue_counts=${QUEUES:-1}
for q in $queue_counts; do
  [[ $q =~ ^[1-9][0-9]*$ ]] && [ "$q" -le 15 ] || { echo "QUEUES: '$q' is not a queue count 1..15" >&2; exit 2; }
done
read_sizes=${READ_SIZES:-131072 1048576}
max_files=${MAX_FILES:-}
runs=${RUNS:-3}
warm_passes=${WARM_PASSES:-3}
poll=${POLL:-0}
drop_caches=${DROP_CACHES:-$([ -w /proc/sys/vm/drop_caches ] && echo 1 || echo 0)}
virtiofsd=${VIRTIOFSD:-/var/tmp/vmtest-virtiofsd/bin/virtiofsd}
read -r -a ours_args <<< "${OURS_ARGS:-}"
read -r -a host_args <<< "${HOST_ARGS:-}"
rtt_ms=${RTT_MS:-0}
mbit=${MBIT:-0}
for v in "RTT_MS=$rtt_ms" "MBIT=$mbit"; do
  [[ ${v#*=} =~ ^[0-9]+(\.[0-9]*)?$ ]] || { echo "$v: not a decimal number >= 0" >&2; exit 2; }
done
shaped=$(awk -v r="$rtt_ms" -v b="$mbit" 'BEGIN {print (r > 0 || b > 0) ? 1 : 0}')
tenant_args=()
for s in $stores; do
  case $s in
    embedded | remote-unix | remote-tcp | remote-s3 | nix-http-xz | nix-http-none | virtiofsd) ;;
    *) echo "STORES: unknown contender '$s' (embedded remote-unix remote-tcp remote-s3 nix-http-xz nix-http-none virtiofsd)" >&2; exit 2 ;;
  esac
done
has() { [[ " $stores " == *" $1 "* ]]; }
multi=0
for q in $queue_counts; do [ "$q" -gt 1 ] && multi=1; done
queue_note=
if [ "$multi" = 1 ] && has virtiofsd; then
  queue_note="virtiofsd not run with more than one request queue (it offers one);"
  echo "QUEUES: $queue_note" >&2
fi
if [ "$shaped" = 1 ]; then
  if ! has remote-tcp && ! has remote-s3; then
    echo "RTT_MS/MBIT shape the link to the remote store daemon of remote-tcp and remote-s3 only; STORES has neither" >&2
    exit 2
  fi
  has remote-unix && echo "WARNING: RTT_MS/MBIT: remote-unix is not relayed (its remote store stays on a unix socket)" >&2
  if has nix-http-xz || has nix-http-none; then
    echo "WARNING: RTT_MS/MBIT: the nix-http kinds are not relayed (their HTTP server is reached directly)" >&2
  fi
fi
has_nix=0
if has nix-http-xz || has nix-http-none; then has_nix=1; fi
cd "$(dirname "$0")/.."
# shellcheck source=bench/daemons.sh
. bench/daemons.sh
# shellcheck source=bench/garage.sh
. bench/garage.sh
export PATH="$PATH:$HOME/.cargo/bin"
if has remote-s3 && ! command -v garage > /dev/null; then
  echo "remote-s3 needs garage: cargo install --locked garage --version 2.5.0" >&2
  exit 1
fi

if [ "$has_nix" = 1 ]; then
  for c in nix nix-store curl; do
    command -v "$c" > /dev/null || { echo "the nix-http kinds need $c (Debian: nix-bin)" >&2; exit 1; }
  done
  case $httpd in
    python) command -v python3 > /dev/null || { echo "HTTPD=python needs python3" >&2; exit 1; } ;;
    busybox) busybox --list 2>/dev/null | grep -qx httpd || { echo "HTTPD=busybox needs busybox with httpd" >&2; exit 1; } ;;
    *) echo "HTTPD: '$httpd' is not python or busybox" >&2; exit 2 ;;
  esac
fi

if has virtiofsd && [ ! -x "$virtiofsd" ]; then
  echo "installing the reference virtiofsd into $(dirname "$(dirname "$virtiofsd")")" >&2
  if ! pkg-config --exists libseccomp libcap-ng 2>/dev/null; then
    apt-get install -y libseccomp-dev libcap-ng-dev pkg-config >&2
  fi
  cargo install virtiofsd --version 1.14.0 --locked --root "$(dirname "$(dirname "$virtiofsd")")" >&2
fi

target_dir=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet
gen=$(cargo bench --bench vufs_load --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[ -x "$gen" ] || { echo "cannot find the vufs_load bench executable" >&2; exit 1; }
if [ "$shaped" = 1 ]; then
  relay_bin=$(cargo bench --bench relay --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
  [ -x "$relay_bin" ] || { echo "cannot find the relay bench executable" >&2; exit 1; }
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"

work=$(mktemp -d /var/tmp/tvix-vufsload.XXXXXX)
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_all
  if [ "${KEEP:-0}" = 1 ]; then
    echo "work directory kept: $work" >&2
  elif [ "$rc" != 0 ]; then
    # The logs tell what failed; the caches set aside (gigabytes) do not.
    rm -rf "$work"/trash.* "$work/cache" "$work"/garage/n*/data
    echo "work directory kept (without its caches): $work" >&2
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
drop() { if [ "$drop_caches" = 1 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi; }

# Private copies of both programs (a concurrent build cannot swap them
# mid-run) and of the trees (packages installed meanwhile cannot change them).
cp "$gen" "$work/vufs_load"
cp "$target_dir/release/tvix-virtiofsd" "$work/tvix-virtiofsd"
gen=$work/vufs_load
B=$work/tvix-virtiofsd
link_note=
if [ "$shaped" = 1 ]; then
  cp "$relay_bin" "$work/relay"
  relay_bin=$work/relay
  relay_flags="--rtt-ms $rtt_ms --mbit $mbit"
  link_note="host daemon to remote store daemon (remote-tcp, remote-s3): through a relay adding RTT $rtt_ms ms,"
  link_note="$link_note $([ "$(awk -v b="$mbit" 'BEGIN {print (b > 0)}')" = 1 ] && echo "$mbit Mbit/s per direction" || echo "no bandwidth cap");"
  echo "$link_note" >&2
elif has remote-tcp || has remote-s3; then
  link_note="host daemon to remote store daemon: direct (RTT_MS 0, no relay);"
fi
mkdir -p "$work/src" "$work/logs"
for d in "${dirs[@]}"; do cp -a "$d" "$work/src/"; done
store="local://$work/store"
$B --store "$store" import "$work"/src/* > "$work/store-paths"
xargs -n1 basename < "$work/store-paths" > "$work/names-ours"
[ "${TENANT:-0}" = 1 ] && tenant_args=(--closure-file "$work/store-paths")
(cd "$work/src" && ls -1) > "$work/names-ref"
# Every first VM fills a new cache, and the caches stay until the end (see
# start_remote in bench/daemons.sh): a run that cannot hold them all would
# fail late, so it is refused now.
fills=0
for s in $stores; do case $s in remote-* | nix-http-*) fills=$((fills + 1)) ;; esac; done
fills=$((fills * runs * $(wc -w <<< "$depths") * $(wc -w <<< "$read_sizes") * $(wc -w <<< "$queue_counts")))
store_kib=$(du -sk "$work/store" | cut -f1)
need_kib=$((fills * store_kib + (1 << 20)))
free_kib=$(df -Pk "$work" | awk 'NR == 2 {print $4}')
if [ "$free_kib" -lt "$need_kib" ]; then
  echo "$fills cache fills of $((store_kib >> 10)) MiB each (and 1 GiB to spare) need $((need_kib >> 20)) GiB" \
    "free in /var/tmp; it has $((free_kib >> 20)) GiB: lower RUNS, DEPTHS or READ_SIZES, or make room" >&2
  rm -rf "$work"
  trap - EXIT
  exit 1
fi
# The bucket holds three copies (replication 3) of what the embedded
# store holds.
# A binary cache holds at most what the embedded store holds (uncompressed
# NARs), plus its narinfos.
for s in nix-http-xz nix-http-none; do
  has "$s" && need_kib=$((need_kib + store_kib + (64 << 10)))
done
if [ "$free_kib" -lt "$need_kib" ]; then
  echo "the runs' cache fills and binary caches need $((need_kib >> 20)) GiB free in /var/tmp;" \
    "it has $((free_kib >> 20)) GiB" >&2
  rm -rf "$work"
  trap - EXIT
  exit 1
fi
if has remote-s3; then
  need_kib=$((need_kib + 3 * store_kib))
  if [ "$free_kib" -lt "$need_kib" ]; then
    echo "the bucket's three replicas need $((3 * store_kib >> 20)) GiB more free in /var/tmp" >&2
    rm -rf "$work"
    trap - EXIT
    exit 1
  fi
fi
s3_note=
if has remote-s3; then
  start_garage "$work"
  s3_store="s3://tvix/vufs?endpoint=${garage_endpoints[0]}&region=garage"
  t0=$(date +%s.%N)
  $B --store "$s3_store" --log-level warn import "$work"/src/* > "$work/s3-paths" 2> "$work/logs/s3-import.log" ||
    fail "importing the trees into the bucket failed" "$work/logs/s3-import.log"
  t1=$(date +%s.%N)
  cmp -s "$work/store-paths" "$work/s3-paths" ||
    fail "the bucket's import gave other store paths than the embedded store's: $(paste -d' ' "$work/store-paths" "$work/s3-paths")"
  garage_alive
  s3_note="bucket filled by \`import\` in $(printf '%.1f' "$(bc -l <<< "$t1 - $t0")") s ($(garage --version 2>/dev/null | head -n1 | cut -d' ' -f1-2), 3 nodes, replication 3, node 1's S3 endpoint$(case ${GARAGE_NODELAY:-0} in 1) echo ", TCP_NODELAY preloaded into its nodes" ;; s3) echo ", TCP_NODELAY preloaded into their S3 API only" ;; esac));"
  echo "$s3_note" >&2
fi
# The nix-http kinds' binary caches: our daemon serves the embedded store
# as a Nix binary cache on loopback, signing its narinfos with a key made
# for this run, and Nix copies the store paths from it into one file://
# cache per compression (timed). Nix gets a store of its own nowhere: both
# ends of `nix copy` are binary caches (NIX_REMOTE empty, its narinfo disk
# cache under a private XDG_CACHE_HOME).
nix_note=
nix_query=
nar_total=0
if [ "$has_nix" = 1 ]; then
  mkdir -p "$work/nix"
  nix-store --generate-binary-cache-key vufs-bench-1 "$work/nix/sk" "$work/nix/pk"
  nix_query="trusted-public-keys=$(cat "$work/nix/pk")"
  serve_log=$work/logs/nix-serve.log
  $B --store "$store" daemon --listen "unix:$work/nix/serve.sock" --http-listen 127.0.0.1:0 \
    --signing-key "$work/nix/sk" > "$serve_log" 2>&1 &
  serve_pid=$!
  track "$serve_pid"
  serve_addr=$(wait_log '.* Nix binary cache on http:\/\/\([^ ]*\) .*' "$serve_pid" "binary cache daemon" "$serve_log")
  mapfile -t nix_paths < "$work/store-paths"
  nix_note="binary caches made once by \`nix copy\` ($(nix --version | sed 's/^nix (Nix) /Nix /')) of ${#nix_paths[@]} store paths from our daemon's --http-listen on the embedded store:"
  for s in nix-http-xz nix-http-none; do
    has "$s" || continue
    c=${s#nix-http-}
    t0=$(date +%s.%N)
    NIX_REMOTE='' XDG_CACHE_HOME=$work/nix/xdg-$c nix --extra-experimental-features nix-command \
      copy --from "http://$serve_addr" --to "file://$work/nix/cache-$c?compression=$c" "${nix_paths[@]}" \
      > "$work/nix/copy-$c.log" 2>&1 || fail "nix copy into the $c binary cache failed" "$work/nix/copy-$c.log" "$serve_log"
    t1=$(date +%s.%N)
    n=$(find "$work/nix/cache-$c" -maxdepth 1 -name '*.narinfo' | wc -l)
    [ "$n" = ${#nix_paths[@]} ] || fail "the $c binary cache has $n narinfos for ${#nix_paths[@]} store paths" "$work/nix/copy-$c.log"
    nar_total=$(cat "$work/nix/cache-$c"/*.narinfo | awk '$1 == "NarSize:" {s += $2} END {printf "%d", s}')
    file_bytes=$(find "$work/nix/cache-$c/nar" -type f -printf '%s\n' | awk '{s += $1} END {printf "%d", s}')
    nix_note="$nix_note $c in $(printf '%.1f' "$(bc -l <<< "$t1 - $t0")") s ($((file_bytes >> 20)) MiB of NAR files),"
  done
  stop "$serve_pid"
  nix_note="$nix_note $((nar_total >> 20)) MiB of NAR;"
  case $httpd in
    python) nix_note="$nix_note served by \`python3 -m http.server\` ($(python3 --version)) on loopback;" ;;
    busybox) nix_note="$nix_note served by \`busybox httpd\` ($(busybox 2>&1 | head -n1 | cut -d' ' -f1-2)) on loopback;" ;;
  esac
  echo "$nix_note" >&2
fi
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
  local args=(--socket "$sock" --paths "$names" --depth "$depth" --read-size "$rs" --queues "$nq" --label "$label" "$@")
  [ -n "$max_files" ] && args+=(--max-files "$max_files")
  [ "$poll" = 1 ] && args+=(--poll)
  "$gen" "${args[@]}" --passes $((1 + warm_passes)) > "$work/out" 2> "$work/err" ||
    fail "load generator failed ($label)" "$work/err" "$log"
  grep -v '^SUMMARY ' "$work/err" >&2 || true
  [ "$rep" = 1 ] && cat "$work/out"
  grep '^SUMMARY ' "$work/err" | sed "s/\$/$suffix read_size=$rs queues=$nq rep=$rep/" > "$work/sum"
  # This run's warm figure is its median warm pass (by ops/s): a warm
  # pass is short (under a second at depth 64), and one slow spell of the
  # machine would otherwise decide it.
  local mid
  mid=$(sed -n 's/.* pass=\(warm[0-9]*\) .*ops_per_s=\([^ ]*\).*/\2 \1/p' "$work/sum" | sort -g |
    awk '{a[NR] = $2} END {if (NR) print a[int((NR + 1) / 2)]}')
  [ -z "$mid" ] || sed -i "s/ pass=$mid / pass=warm /" "$work/sum"
  cat "$work/sum" >> "$summaries"
}
# queue_line WHICH LOG: the requests our daemon logged per request queue at
# the VMM's disconnect, kept for the listing at the end.
queue_line() {
  [ "$multi" = 1 ] || return 0
  echo "$1 rs=$rs depth=$depth queues=$nq rep=$rep: $(sed -n 's/.*requests served per request queue: //p' "$2" | tail -n1)" >> "$work/queue-lines"
}
# One run of ours over the embedded store or of virtiofsd.
run_plain() { # embedded|virtiofsd
  local which=$1 sock=$work/$1/vfs.sock log=$work/logs/$1.r$rep.rs$rs.d$depth.q$nq.log names
  mkdir -p "$work/$which"
  drop
  if [ "$which" = embedded ]; then
    # warn, but info for the vhost-user device: its per-queue request
    # counts at the VMM's disconnect (and connect/disconnect lines).
    start_virtiofs "$B" "$sock" "$log" --store "$store" \
      --log-level warn,tvix_virtiofsd::serve::vhost_user=info virtiofs --request-queues "$nq" "${ours_args[@]}"
    names=$work/names-ours
  else
    start_virtiofs "$virtiofsd" "$sock" "$log" --shared-dir "$work/src" --readonly \
      --cache=always --sandbox none --log-level warn
    names=$work/names-ref
  fi
  gen_run "$which" "$sock" "$names" "$log" "" --rss "vm=$vm_srv"
  finish "$vm_sup" "$vm_srv" "$which" "$log"
  [ "$which" = virtiofsd ] || queue_line "$which" "$log"
}

# remote_calls: "Read-count Read-seconds Get-count Get-seconds
# Batch-count Batch-seconds" of the remote store daemon's served
# BlobService/Read, DirectoryService/Get and CacheService/ReadBlobs calls
# (seconds to each call's first message, summed).
remote_calls() {
  local m
  m=$(curl -sf "http://$remote_metrics_addr/metrics") || fail "cannot read http://$remote_metrics_addr/metrics" "$remote_log"
  awk '
    /^tvix_virtiofsd_grpc_call_seconds_count\{method="tvix.castore.v1.BlobService\/Read"\}/ {rc = $2}
    /^tvix_virtiofsd_grpc_call_seconds_sum\{method="tvix.castore.v1.BlobService\/Read"\}/ {rs = $2}
    /^tvix_virtiofsd_grpc_call_seconds_count\{method="tvix.castore.v1.DirectoryService\/Get"\}/ {gc = $2}
    /^tvix_virtiofsd_grpc_call_seconds_sum\{method="tvix.castore.v1.DirectoryService\/Get"\}/ {gs = $2}
    /^tvix_virtiofsd_grpc_call_seconds_count\{method="tvix_virtiofsd.cache.v1.CacheService\/ReadBlobs"\}/ {bc = $2}
    /^tvix_virtiofsd_grpc_call_seconds_sum\{method="tvix_virtiofsd.cache.v1.CacheService\/ReadBlobs"\}/ {bs = $2}
    END {printf "%d %.6f %d %.6f %d %.6f\n", rc, rs, gc, gs, bc, bs}' <<< "$m"
}
# upstream_counts: "paths carried-bytes NAR-bytes" the host daemon read in
# from its Nix binary cache upstream (its /metrics; NAR bytes from its
# log's "fetched" lines).
upstream_counts() {
  local p c
  p=$(metric tvix_virtiofsd_cache_upstream_paths_total)
  c=$(metric tvix_virtiofsd_cache_upstream_carried_bytes_total)
  echo "$p $c $(sed -n 's/.*: fetched .*: \([0-9]*\) NAR bytes, .*/\1/p' "$host_log" | awk '{s += $1} END {printf "%d", s}')"
}
# One repetition of a remote kind: remote store (or the HTTP server of a
# Nix binary cache), host daemon on an empty cache, first VM, second VM.
run_remote() { # remote-unix|remote-tcp|remote-s3|nix-http-xz|nix-http-none
  local kind=$1 base=$work/logs/$1.r$rep.rs$rs.d$depth.q$nq vm vlog f0 f1 sock=$work/vm/vfs.sock
  local rstore=$store c0 c1 g0 g1 remote
  [ "$kind" = remote-s3 ] && rstore=$s3_store
  [[ $kind == nix-http-* ]] && rstore="$work/nix/cache-${kind#nix-http-}?$nix_query"
  mkdir -p "$work/vm"
  drop
  start_remote "$kind" "$B" "$rstore" "$work" "$base" "${host_args[@]}"
  for vm in 1 2; do
    vlog=$base.vm$vm.log
    [ "$vm" = 2 ] && drop
    f0=$(metric tvix_virtiofsd_cache_fetched_bytes_total)
    if [[ $kind == nix-http-* ]]; then c0=$(upstream_counts); else c0=$(remote_calls); fi
    g0=-1
    [ "$kind" = remote-s3 ] && g0=$(garage_cpu_ms)
    start_virtiofs "$B" "$sock" "$vlog" --store "grpc+unix://$host_sock" --cache-dir "$work/cache" \
      --log-level info virtiofs --request-queues "$nq" "${ours_args[@]}" "${tenant_args[@]}"
    # The bytes this VM made the host fetch are known only after it ran:
    # its SUMMARY lines get a placeholder, filled in below.
    gen_run "$kind-vm$vm" "$sock" "$work/names-ours" "$vlog" " fetched_bytes=FETCHED" \
      --rss "vm=$vm_srv" --rss "host=$host_pid" --rss "remote=$remote_pid"
    finish "$vm_sup" "$vm_srv" "per-VM daemon (VM $vm)" "$vlog"
    queue_line "$kind-vm$vm" "$vlog"
    remote_alive
    f1=$(metric tvix_virtiofsd_cache_fetched_bytes_total)
    if [[ $kind == nix-http-* ]]; then c1=$(upstream_counts); else c1=$(remote_calls); fi
    g1=-1
    if [ "$kind" = remote-s3 ]; then
      garage_alive
      g1=$(garage_cpu_ms)
    fi
    # what the remote served during this VM (all its passes; only the cold
    # one asks it anything)
    if [[ $kind == nix-http-* ]]; then
      remote=$(paste -d' ' <(tr ' ' '\n' <<< "$c0") <(tr ' ' '\n' <<< "$c1") |
        awk '{d[NR] = $2 - $1} END {printf "upstream_paths=%d upstream_carried=%d upstream_nar=%d", d[1], d[2], d[3]}')
    else
      remote=$(paste -d' ' <(tr ' ' '\n' <<< "$c0") <(tr ' ' '\n' <<< "$c1") |
        awk '{d[NR] = $2 - $1} END {printf "remote_reads=%d remote_read_s=%.3f remote_gets=%d remote_get_s=%.3f remote_batches=%d remote_batch_s=%.3f", d[1], d[2], d[3], d[4], d[5], d[6]}')
    fi
    [ "$g0" -ge 0 ] && remote="$remote garage_cpu_ms=$((g1 - g0))"
    sed -i "s/ fetched_bytes=FETCHED / fetched_bytes=$((f1 - f0)) $remote /" "$summaries"
    if [ "$vm" = 2 ] && [ "$f1" != "$f0" ]; then
      echo "WARNING: $kind: the host daemon fetched $((f1 - f0)) bytes from the remote during the second VM" \
        "(read size $rs, depth $depth, queues $nq, repetition $rep)$([ -n "$max_files" ] && [ "$depth" != 1 ] &&
          echo "; with MAX_FILES at depth > 1 the files read depend on reply order, so the second VM may read files the first did not")" >&2
    fi
    echo "$kind rs=$rs depth=$depth queues=$nq rep=$rep VM $vm: $(cache_line "$vlog")" >> "$work/cache-lines"
  done
  curl -sf "http://$metrics_addr/metrics" | grep -v '^#' |
    sed "s/^/$kind rs=$rs depth=$depth queues=$nq rep=$rep host: /" >> "$work/host-metrics" || true
  stop_remote
  echo "$kind rs=$rs depth=$depth queues=$nq rep=$rep host daemon at exit: $(cache_line "$host_log")" >> "$work/cache-lines"
  [ -z "$relay_pid" ] ||
    echo "$kind rs=$rs depth=$depth queues=$nq rep=$rep relay at exit: $(sed -n 's/^relay at exit: //p' "$relay_log" | tail -n1)" >> "$work/cache-lines"
}

: > "$work/cache-lines"
: > "$work/host-metrics"
: > "$work/queue-lines"
# Repetitions interleave the contenders, so drift in the host's load
# (other builds) hits all alike, and every other repetition takes them in
# reverse order: a contender's place in the sequence (right after another
# one's first VM has written a whole cache, say) must not count for or
# against it.
reversed=$(printf '%s\n' $stores | tac | xargs)
for rep in $(seq "$runs"); do
  order=$stores
  [ $((rep % 2)) = 0 ] && order=$reversed
  for rs in $read_sizes; do
    for depth in $depths; do
      for nq in $queue_counts; do
        for which in $order; do
          case $which in
            virtiofsd) [ "$nq" -gt 1 ] || run_plain "$which" ;;
            embedded) run_plain "$which" ;;
            *) run_remote "$which" ;;
          esac
        done
      done
    done
  done
done

# median FIELD LABEL DEPTH PASS READ_SIZE QUEUES: over the repetitions
median() {
  { grep "label=$2 depth=$3 pass=$4 .* read_size=$5 queues=$6 " "$summaries" || true; } |
    sed -n "s/.* $1=\([^ ]*\).*/\1/p" | sort -g |
    awk '{a[NR] = $1} END {if (NR) print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}
# maximum FIELD LABEL DEPTH PASS READ_SIZE QUEUES: over the repetitions
maximum() {
  { grep "label=$2 depth=$3 pass=$4 .* read_size=$5 queues=$6 " "$summaries" || true; } |
    sed -n "s/.* $1=\([^ ]*\).*/\1/p" | sort -g | tail -n1
}
ratio() { if [ -n "$1" ] && [ -n "$2" ]; then printf '%.2f' "$(bc -l <<< "$1 / $2")"; fi; }
# paired LABEL REFERENCE DEPTH PASS READ_SIZE QUEUES: the median over the
# repetitions of LABEL's ops/s over REFERENCE's in the same repetition. The
# two ran back to back, so a slow spell of the host (other tenants, disk)
# that hits both cancels out, where a ratio of two medians keeps it.
paired() {
  { grep "depth=$3 pass=$4 .* read_size=$5 queues=$6 " "$summaries" || true; } |
    sed -n 's/.*label=\([^ ]*\) .* ops_per_s=\([^ ]*\) .* rep=\([0-9]*\).*/\3 \1 \2/p' |
    awk -v l="$1" -v r="$2" '$2 == l {a[$1] = $3} $2 == r {b[$1] = $3}
      END {for (k in a) if ((k in b) && b[k] > 0) print a[k] / b[k]}' | sort -g |
    awk '{a[NR] = $1} END {if (NR) printf "%.2f", (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}
# both OPS REF_OPS LABEL REFERENCE DEPTH PASS READ_SIZE QUEUES: "ratio of
# the medians (median of the paired ratios)"
both() {
  local r
  r=$(ratio "$1" "$2")
  [ -n "$r" ] || return 0
  printf '%s (%s)' "$r" "$(paired "$3" "$4" "$5" "$6" "$7" "$8")"
}
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
  "$(nproc) CPUs; host load at the end: $(cut -d' ' -f1-3 /proc/loadavg); commit $commit;" $s3_note $nix_note \
  $link_note $queue_note \
  "per-VM daemons of the remote kinds scoped to a tenant's closure: $([ ${#tenant_args[@]} -gt 0 ] && echo yes || echo no);" \
  "per-op tables above: repetition 1; below: median of $runs;" \
  "ratios: of the medians (in brackets: the median of the per-repetition ratios)"
echo
echo "| store | read size | depth | queues | pass | ops/s | MiB/s | / virtiofsd | / embedded | READ p50/p99 µs | CPU s, serving process |"
echo "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for rs in $read_sizes; do
  for depth in $depths; do
    for nq in $queue_counts; do
      for pass in cold warm; do
        m() { median "$1" "$2" "$depth" "$pass" "$rs" "$nq"; }
        ref_ops=$(m ops_per_s virtiofsd)
        emb_ops=$(m ops_per_s embedded)
        for row in "${rows[@]}"; do
          IFS=: read -r store label pname <<< "$row"
          ops=$(m ops_per_s "$label")
          [ -n "$ops" ] || continue
          cpu=$(m cpu_vm_ms "$label")
          case $cpu in '' | -*) ;; *) cpu=$(printf '%.2f' "$(bc -l <<< "$cpu / 1000")") ;; esac
          printf '| %s | %d KiB | %s | %s | %s | %s | %s | %s | %s | %s / %s | %s |\n' \
            "$store" $((rs / 1024)) "$depth" "$nq" "$pname$pass" "$ops" "$(m mib_per_s "$label")" \
            "$(both "$ops" "$ref_ops" "$label" virtiofsd "$depth" "$pass" "$rs" "$nq")" \
            "$(both "$ops" "$emb_ops" "$label" embedded "$depth" "$pass" "$rs" "$nq")" \
            "$(m read_p50_us "$label")" "$(m read_p99_us "$label")" "$cpu"
        done
      done
    done
  done
done

echo
echo "Remote bytes the host daemon fetched (median; second VM: the largest of the $runs runs, must be 0)" \
  "and RssAnon in KiB after the warm pass (median): the VM's serving process and the host daemon."
echo
echo "| store | read size | depth | queues | fetched, first VM | fetched, second VM | RssAnon serving, first VM | second VM | RssAnon host daemon, after first VM | after second VM |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for rs in $read_sizes; do
  for depth in $depths; do
    for nq in $queue_counts; do
      m() { median "$1" "$2" "$depth" warm "$rs" "$nq"; }
      for s in $stores; do
        case $s in
          embedded | virtiofsd)
            v=$(m rss_vm_kb "$s")
            [ -n "$v" ] || continue
            printf '| %s | %d KiB | %s | %s | | | %s | | | |\n' "$s" $((rs / 1024)) "$depth" "$nq" "$v" ;;
          *)
            f1=$(m fetched_bytes "$s-vm1")
            [ -n "$f1" ] || continue
            printf '| %s | %d KiB | %s | %s | %.1f MiB | %s B | %s | %s | %s | %s |\n' "$s" $((rs / 1024)) "$depth" "$nq" \
              "$(bc -l <<< "$f1 / 1048576")" "$(maximum fetched_bytes "$s-vm2" "$depth" warm "$rs" "$nq")" \
              "$(m rss_vm_kb "$s-vm1")" "$(m rss_vm_kb "$s-vm2")" \
              "$(m rss_host_kb "$s-vm1")" "$(m rss_host_kb "$s-vm2")" ;;
        esac
      done
    done
  done
done

if [[ " $stores " == *" remote-"* ]]; then
  echo
  echo "Where a first VM's time goes (medians over the $runs runs): its cold pass; the remote store daemon's" \
    "served BlobService/Read, DirectoryService/Get and CacheService/ReadBlobs calls (batches) during the VM, with their mean time to the first" \
    "message (a Read's first message comes once the whole blob is fetched and checked) and the Reads in flight" \
    "on average over the cold pass (summed Read time / pass time); CPU seconds of the remote daemon and (remote-s3)" \
    "of the three Garage nodes during the cold pass or the VM; the longest single request of the pass."
  echo
  echo "| store | read size | depth | queues | cold pass s | remote Reads | Read mean ms | Reads in flight | remote dir Gets | Get mean ms | remote batches | batch mean ms | CPU s remote daemon | CPU s Garage | longest request ms |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for rs in $read_sizes; do
    for depth in $depths; do
      for nq in $queue_counts; do
        for s in $stores; do
          case $s in embedded | virtiofsd | nix-http-*) continue ;; esac
          m() { median "$1" "$s-vm1" "$depth" cold "$rs" "$nq"; }
          secs=$(m secs)
          [ -n "$secs" ] || continue
          rd=$(m remote_reads) rds=$(m remote_read_s) gt=$(m remote_gets) gts=$(m remote_get_s)
          bt=$(m remote_batches) bts=$(m remote_batch_s)
          gcpu=$(m garage_cpu_ms)
          printf '| %s | %d KiB | %s | %s | %.2f | %s | %s | %s | %s | %s | %s | %s | %.2f | %s | %.0f |\n' "$s" $((rs / 1024)) "$depth" "$nq" "$secs" \
            "$rd" "$([ "${rd:-0}" -gt 0 ] && printf '%.2f' "$(bc -l <<< "$rds * 1000 / $rd")")" \
            "$(printf '%.1f' "$(bc -l <<< "$rds / $secs")")" \
            "$gt" "$([ "${gt:-0}" -gt 0 ] && printf '%.2f' "$(bc -l <<< "$gts * 1000 / $gt")")" \
            "${bt:-0}" "$([ "${bt:-0}" -gt 0 ] && printf '%.2f' "$(bc -l <<< "$bts * 1000 / $bt")")" \
            "$(bc -l <<< "$(m cpu_remote_ms) / 1000")" \
            "$([ -n "$gcpu" ] && printf '%.2f' "$(bc -l <<< "$gcpu / 1000")")" \
            "$(bc -l <<< "$(m all_max_us) / 1000")"
        done
      done
    done
  done
fi

if [ "$has_nix" = 1 ]; then
  echo
  echo "Where a first VM's time goes over a Nix binary cache (medians over the $runs runs), beside the remote kinds:" \
    "its cold pass; the store paths the host daemon read in from the binary cache during the VM, the bytes" \
    "the HTTP server carried for them (NAR files as stored: compressed or not) and the NAR bytes they" \
    "made, each over the cold pass's time; CPU seconds during the cold pass of the host daemon (fetch," \
    "decompression, NAR parsing and hashing, writing blobs and directories into the cache) and of its" \
    "upstream (the HTTP server, or the remote store daemon); the longest single request of the pass."
  echo
  echo "| store | read size | depth | queues | cold pass s | paths read in | carried MiB | carried MiB/s | NAR MiB/s | CPU s host daemon | CPU s upstream | longest request ms |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for rs in $read_sizes; do
    for depth in $depths; do
      for nq in $queue_counts; do
        for s in $stores; do
          case $s in embedded | virtiofsd) continue ;; esac
          m() { median "$1" "$s-vm1" "$depth" cold "$rs" "$nq"; }
          secs=$(m secs)
          [ -n "$secs" ] || continue
          up=$(m upstream_paths) car=$(m upstream_carried) nar=$(m upstream_nar)
          printf '| %s | %d KiB | %s | %s | %.2f | %s | %s | %s | %s | %.2f | %.2f | %.0f |\n' "$s" $((rs / 1024)) "$depth" "$nq" "$secs" \
            "$up" "$([ -n "$car" ] && printf '%.1f' "$(bc -l <<< "$car / 1048576")")" \
            "$([ -n "$car" ] && printf '%.1f' "$(bc -l <<< "$car / 1048576 / $secs")")" \
            "$([ -n "$nar" ] && printf '%.1f' "$(bc -l <<< "$nar / 1048576 / $secs")")" \
            "$(bc -l <<< "$(m cpu_host_ms) / 1000")" "$(bc -l <<< "$(m cpu_remote_ms) / 1000")" \
            "$(bc -l <<< "$(m all_max_us) / 1000")"
        done
      done
    done
  done
fi

echo
echo "raw per-run summaries:"
sed 's/^SUMMARY /    /' "$summaries"
if [ -s "$work/queue-lines" ]; then
  echo
  echo "requests our daemons served per request queue (their logs, at the VMM's disconnect; all passes):"
  sed 's/^/    /' "$work/queue-lines"
fi
if [ -s "$work/cache-lines" ]; then
  echo
  echo "cache counters (per-VM daemons at exit, host daemons at exit; relays' counters at exit):"
  sed 's/^/    /' "$work/cache-lines"
fi
# Ours only: virtiofsd's own warnings (e.g. about RLIMIT_NOFILE) stay in its logs.
ours_logs=()
# The nix-http kinds' "remote" logs are their HTTP servers'.
for f in "$work"/logs/*.log; do [[ $f == */virtiofsd.r* || $f == */nix-http-*.remote.log ]] || ours_logs+=("$f"); done
[ ${#ours_logs[@]} -eq 0 ] || our_complaints "${ours_logs[@]}"
