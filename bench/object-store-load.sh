#!/usr/bin/env bash
# Requests per second store daemons serve from a bucket, and how that
# scales from one daemon to two over the same bucket: benches/store_load.rs
# reads every blob of the trees once (in the order of their digests), with
# CONCURRENCY reads in flight, as BlobService/Read calls over gRPC (what
# host caches send when they fill misses), against:
#   direct    no daemon: the bucket read in the load generator's own process
#             (the same S3 client and checks a daemon runs): what the
#             bucket gives
#   one       one store daemon over the bucket (`daemon --store s3://...`,
#             loopback TCP, read-only), through Garage node 1
#   two       two such daemons, through Garage nodes 1 and 2; the requests
#             take turns between them
#   two-node1 (only when asked for) two daemons, both through node 1
#   local     one store daemon over the embedded store (`local://`) holding
#             the same trees: the daemon without a bucket
# Each measurement starts its daemons afresh after dropping the page cache
# (Garage's files included). Contenders are interleaved within each
# repetition, in reverse order every other one. The CPU time of the
# daemons, the three Garage nodes and the load generator during the timed
# part is read from /proc. Then, once per contender (daemons started
# afresh, page cache dropped), `--op tree`: the recursive
# DirectoryService/Get of each tree, as a host cache asks it the first
# time a store path is looked up (`direct`: the same walk in-process, and
# a breadth-first walk with TREE_CONCURRENCY directory GETs in flight).
#
# The trees are imported into a local:// store and into the bucket of a
# three-node Garage 2.5 cluster on loopback (bench/garage.sh) first.
#
# Usage: bench/object-store-load.sh [DIR...]  (default /usr/share/doc /usr/share/man; root)
# Environment:
#   CONTENDERS  (direct one two local), in this order
#   CONCURRENCY reads in flight, one measurement each ("8 64 256")
#   CONNECTIONS gRPC connections to each daemon (1)
#   RUNS        repetitions (3; medians reported)
#   TREES       1: also the recursive Get of each tree (1)
#   TREE_CONCURRENCY  directory GETs in flight of the in-process walks
#               besides the store's own (one at a time) ("16")
#   DROP_CACHES 1 (default when root)
#   GARAGE_NODELAY 1: the Garage nodes run with TCP_NODELAY on their
#               sockets (bench/nodelay.c preloaded; an experiment)
#   KEEP        1: keep the work directory
set -euo pipefail
shopt -s inherit_errexit
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(/usr/share/doc /usr/share/man)
contenders=${CONTENDERS:-direct one two local}
concurrency=${CONCURRENCY:-8 64 256}
connections=${CONNECTIONS:-1}
runs=${RUNS:-3}
trees=${TREES:-1}
tree_concurrency=${TREE_CONCURRENCY:-16}
drop_caches=${DROP_CACHES:-$([ -w /proc/sys/vm/drop_caches ] && echo 1 || echo 0)}
for c in $contenders; do
  case $c in
    direct | one | two | two-node1 | local) ;;
    *) echo "CONTENDERS: unknown '$c' (direct one two two-node1 local)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
# shellcheck source=bench/daemons.sh
. bench/daemons.sh
# shellcheck source=bench/garage.sh
. bench/garage.sh
export PATH="$PATH:$HOME/.cargo/bin"
command -v garage > /dev/null || { echo "needs garage: cargo install --locked garage --version 2.5.0" >&2; exit 1; }

target_dir=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet
gen=$(cargo bench --bench store_load --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[ -x "$gen" ] || { echo "cannot find the store_load bench executable" >&2; exit 1; }
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"

work=$(mktemp -d /var/tmp/tvix-osload.XXXXXX)
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_all
  if [ "${KEEP:-0}" = 1 ]; then
    echo "work directory kept: $work" >&2
  elif [ "$rc" != 0 ]; then
    rm -rf "$work"/garage/n*/data "$work/store" "$work/src"
    echo "work directory kept (without its data): $work" >&2
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
drop() { if [ "$drop_caches" = 1 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi; }

cp "$gen" "$work/store_load"
cp "$target_dir/release/tvix-virtiofsd" "$work/tvix-virtiofsd"
gen=$work/store_load
B=$work/tvix-virtiofsd
mkdir -p "$work/src" "$work/logs"
for d in "${dirs[@]}"; do cp -a "$d" "$work/src/"; done
files=$(find "$work/src" -type f | wc -l)
bytes=$(find "$work/src" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%d", s}')
local_store="local://$work/store"
$B --store "$local_store" import "$work"/src/* > "$work/store-paths"

start_garage "$work"
s3() { echo "s3://tvix/load?endpoint=${garage_endpoints[$1 - 1]}&region=garage"; }
t0=$(date +%s.%N)
$B --store "$(s3 1)" --log-level warn import "$work"/src/* > "$work/s3-paths" 2> "$work/logs/s3-import.log" ||
  fail "importing the trees into the bucket failed" "$work/logs/s3-import.log"
t1=$(date +%s.%N)
cmp -s "$work/store-paths" "$work/s3-paths" || fail "the bucket's import gave other store paths than the embedded store's"
import_s=$(bc -l <<< "$t1 - $t0")
echo "bucket filled by import in $(printf '%.1f' "$import_s") s" >&2

# start_daemons CONTENDER: the daemons CONTENDER reads through; sets
# targets (store_load --target arguments), cpu (--cpu arguments) and
# dpids.
start_daemons() {
  local c=$1 n i store log addr
  targets=() cpu=() dpids=() dlogs=()
  case $c in
    direct) targets=(--target "$(s3 1)"); return 0 ;;
    one) n=1 ;;
    two | two-node1) n=2 ;;
    local) n=1 ;;
  esac
  for i in $(seq "$n"); do
    case $c in
      local) store=$local_store ;;
      two-node1) store=$(s3 1) ;;
      *) store=$(s3 "$i") ;;
    esac
    log=$work/logs/$c.$i.$(date +%s%N).log
    "$B" --store "$store" daemon --read-only --listen 127.0.0.1:0 > "$log" 2>&1 &
    dpids+=($!)
    dlogs+=("$log")
    track $!
    addr=$(wait_log '.* listening on \(127\.0\.0\.1:[0-9]*\).*' "$!" "store daemon $i ($c)" "$log")
    targets+=(--target "grpc+http://$addr")
    cpu+=(--cpu "daemons=$!")
  done
}
stop_daemons() { [ ${#dpids[@]} -eq 0 ] || stop "${dpids[@]}"; }
garage_cpu=()
for p in "${garage_pids[@]}"; do garage_cpu+=(--cpu "garage=$p"); done

summaries=$work/summaries
: > "$summaries"
# measure CONTENDER OP [store_load args...]
measure() {
  local c=$1 op=$2
  shift 2
  drop
  start_daemons "$c"
  "$gen" --list "$local_store" "${targets[@]}" --op "$op" --connections "$connections" --label "$c" \
    "${cpu[@]}" "${garage_cpu[@]}" "$@" > "$work/out" 2> "$work/err" ||
    fail "store_load failed ($c, $op $*)" "$work/err" "${dlogs[@]}"
  grep -v '^store_load: .* listed from ' "$work/err" >&2 || true
  [ -s "$summaries" ] || sed -n 's/^store_load: \(.* listed from\).*/\1 the embedded store/p' "$work/err" > "$work/listed"
  garage_alive
  local i
  for i in "${!dpids[@]}"; do alive "${dpids[i]}" "store daemon $((i + 1)) ($c)" "${dlogs[i]}"; done
  stop_daemons
  sed -n "s/^SUMMARY .*/& rep=$rep/p" "$work/out" >> "$summaries"
}

reversed=$(printf '%s\n' $contenders | tac | xargs)
for rep in $(seq "$runs"); do
  order=$contenders
  [ $((rep % 2)) = 0 ] && order=$reversed
  for conc in $concurrency; do
    for c in $order; do
      measure "$c" read --concurrency "$conc"
    done
  done
done
if [ "$trees" = 1 ]; then
  rep=1
  for c in $contenders; do
    [ "$c" = two ] || [ "$c" = two-node1 ] && continue # one tree at a time: one daemon answers it
    measure "$c" tree --concurrency 1
    if [ "$c" = direct ]; then
      for tc in $tree_concurrency; do measure "$c" tree --concurrency "$tc"; done
    fi
  done
fi

median() { # FIELD LABEL OP CONCURRENCY
  { grep "label=$2 op=$3 .* concurrency=$4 " "$summaries" || true; } |
    sed -n "s/.* $1=\([^ ]*\).*/\1/p" | sort -g |
    awk '{a[NR] = $1} END {if (NR) print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}
# paired LABEL REFERENCE CONCURRENCY: median over the repetitions of
# LABEL's req/s over REFERENCE's in the same repetition
paired() {
  { grep "op=read .* concurrency=$3 " "$summaries" || true; } |
    sed -n 's/.*label=\([^ ]*\) .* req_per_s=\([^ ]*\) .* rep=\([0-9]*\).*/\3 \1 \2/p' |
    awk -v l="$1" -v r="$2" '$2 == l {a[$1] = $3} $2 == r {b[$1] = $3}
      END {for (k in a) if ((k in b) && b[k] > 0) print a[k] / b[k]}' | sort -g |
    awk '{a[NR] = $1} END {if (NR) printf "%.2f", (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}
secs() { [ -n "$1" ] && printf '%.2f' "$(bc -l <<< "$1 / 1000")"; }

echo
echo "commit $commit; trees ${dirs[*]}: $files files, $((bytes / 1048576)) MiB; $(cat "$work/listed" 2>/dev/null);" \
  "bucket filled by \`import\` in $(printf '%.1f' "$import_s") s; $(garage --version 2>/dev/null | head -n1 | cut -d' ' -f1-2)," \
  "3 nodes on loopback, replication 3$(case ${GARAGE_NODELAY:-0} in 1) echo ", TCP_NODELAY preloaded into its nodes" ;; s3) echo ", TCP_NODELAY preloaded into their S3 API only" ;; esac); $(nproc) CPUs; host load at the end: $(cut -d' ' -f1-3 /proc/loadavg);" \
  "page cache dropped before each measurement: $([ "$drop_caches" = 1 ] && echo yes || echo no);" \
  "$connections gRPC connection(s) per daemon; medians of $runs"
echo
echo "| contender | in flight | reads/s | MiB/s | / one daemon | p50 / p99 ms | CPU s: daemons | Garage (3 nodes) | load generator | wall s |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for conc in $concurrency; do
  for c in $contenders; do
    m() { median "$1" "$c" read "$conc"; }
    rps=$(m req_per_s)
    [ -n "$rps" ] || continue
    ref=$(median req_per_s one read "$conc")
    printf '| %s | %s | %s | %s | %s | %s / %s | %s | %s | %s | %s |\n' "$c" "$conc" "$rps" "$(m mib_per_s)" \
      "$([ -n "$ref" ] && [ "$c" != one ] && printf '%.2f (%s)' "$(bc -l <<< "$rps / $ref")" "$(paired "$c" one "$conc")")" \
      "$(secs "$(m p50_us)")" "$(secs "$(m p99_us)")" \
      "$(secs "$(m cpu_daemons_ms)")" "$(secs "$(m cpu_garage_ms)")" "$(secs "$(m cpu_client_ms)")" \
      "$(printf '%.2f' "$(m secs)")"
  done
done
if [ "$trees" = 1 ]; then
  echo
  echo "Recursive DirectoryService/Get of each tree (one at a time), page cache dropped, fresh daemon:"
  echo
  echo "| contender | GETs in flight | trees | seconds, all trees | longest tree s | CPU s: daemon | Garage (3 nodes) |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  for c in $contenders; do
    for tc in 1 $tree_concurrency; do
      m() { median "$1" "$c" tree "$tc"; }
      s=$(m secs)
      [ -n "$s" ] || continue
      printf '| %s | %s | %s | %.2f | %.2f | %s | %s |\n' "$c" "$([ "$c" = direct ] && echo "$tc" || echo "1 (the daemon's walk)")" \
        "$(m requests)" "$s" "$(bc -l <<< "$(m max_us) / 1000000")" \
        "$(secs "$(m cpu_daemons_ms)")" "$(secs "$(m cpu_garage_ms)")"
    done
  done
fi
echo
echo "raw summaries:"
sed 's/^SUMMARY /    /' "$summaries"
our_complaints "$work"/logs/*.log || true
