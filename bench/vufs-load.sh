#!/usr/bin/env bash
# Daemon-level virtio-fs load: benches/vufs_load.rs plays the VMM (vhost-user
# frontend) and the guest's FUSE client, against tvix-virtiofsd and against
# rust-vmm's reference virtiofsd serving the same trees, at queue depth 1 and
# 64, with 128 KiB and 1 MiB reads; each run is a freshly started daemon
# ("cold" pass) and then the same connection again ("warm" pass).
# Usage: bench/vufs-load.sh [DIR...]  (default: /usr/share/doc /usr/share/man)
# Environment: RUNS (3 repetitions; medians reported), DEPTHS ("1 64"), READ_SIZES ("131072 1048576"), MAX_FILES
# (all), POLL (1: the generator spins on the used ring instead of sleeping
# on the call eventfd), DROP_CACHES (1 when root: drop the page cache before each run),
# VIRTIOFSD (/var/tmp/vmtest-virtiofsd/bin/virtiofsd; installed if missing),
# OURS_ARGS (extra virtiofs flags, e.g. "--sandbox none --seccomp none" to
# measure what the sandbox costs).
set -euo pipefail
shopt -s inherit_errexit
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(/usr/share/doc /usr/share/man)
depths=${DEPTHS:-1 64}
read_sizes=${READ_SIZES:-131072 1048576}
max_files=${MAX_FILES:-}
runs=${RUNS:-3}
poll=${POLL:-0}
drop_caches=${DROP_CACHES:-$([ -w /proc/sys/vm/drop_caches ] && echo 1 || echo 0)}
virtiofsd=${VIRTIOFSD:-/var/tmp/vmtest-virtiofsd/bin/virtiofsd}
cd "$(dirname "$0")/.."

if [ ! -x "$virtiofsd" ]; then
  echo "installing the reference virtiofsd into $(dirname "$(dirname "$virtiofsd")")" >&2
  if ! pkg-config --exists libseccomp libcap-ng 2>/dev/null; then
    apt-get install -y libseccomp-dev libcap-ng-dev pkg-config >&2
  fi
  cargo install virtiofsd --locked --root "$(dirname "$(dirname "$virtiofsd")")" >&2
fi

cargo build --release --quiet
gen=$(cargo bench --bench vufs_load --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[ -x "$gen" ] || { echo "cannot find the vufs_load bench executable" >&2; exit 1; }

work=$(mktemp -d /var/tmp/tvix-vufsload.XXXXXX)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
# Private copies of both programs (a concurrent build cannot swap them
# mid-run) and of the trees (packages installed meanwhile cannot change them).
cp "$gen" "$work/vufs_load"
cp target/release/tvix-virtiofsd "$work/tvix-virtiofsd"
gen=$work/vufs_load
B=$work/tvix-virtiofsd
mkdir -p "$work/src"
for d in "${dirs[@]}"; do cp -a "$d" "$work/src/"; done
store="local://$work/store"
$B --store "$store" import "$work"/src/* > "$work/store-paths"
xargs -n1 basename < "$work/store-paths" > "$work/names-ours"
(cd "$work/src" && ls -1) > "$work/names-ref"
entries=$(find "$work/src" -mindepth 1 | wc -l)
files=$(find "$work/src" -type f | wc -l)
bytes=$(find "$work/src" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%d", s}')

start_daemon() { # which socket
  rm -f "$2"
  if [ "$1" = ours ]; then
    # shellcheck disable=SC2086 # OURS_ARGS is a list of flags
    $B --store "$store" --log-level warn virtiofs --socket-path "$2" ${OURS_ARGS:-} >> "$work/ours.log" 2>&1 &
  else
    "$virtiofsd" --socket-path "$2" --shared-dir "$work/src" --readonly \
      --cache=always --sandbox none --log-level warn >> "$work/ref.log" 2>&1 &
  fi
  pid=$!
  for _ in $(seq 200); do [ -S "$2" ] && return; sleep 0.05; done
  echo "$1: no socket at $2" >&2
  exit 1
}

summaries=$work/summaries
: > "$summaries"
# Repetitions interleave the two daemons, so drift in the host's load
# (other builds) hits both alike.
for rep in $(seq "$runs"); do
  for rs in $read_sizes; do
    for depth in $depths; do
      for which in ours ref; do
        sock=$work/$which.sock
        [ "$drop_caches" = 1 ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
        start_daemon "$which" "$sock"
        args=(--socket "$sock" --paths "$work/names-$which" --depth "$depth" --read-size "$rs" --label "$which")
        [ -n "$max_files" ] && args+=(--max-files "$max_files")
        [ "$poll" = 1 ] && args+=(--poll)
        "$gen" "${args[@]}" > "$work/out" 2> "$work/err" || { cat "$work/err" "$work/$which.log" >&2; exit 1; }
        [ "$rep" = 1 ] && cat "$work/out"
        grep '^SUMMARY ' "$work/err" | sed "s/\$/ read_size=$rs rep=$rep/" >> "$summaries"
        # Both daemons exit when their one frontend disconnects.
        wait "$pid" || { echo "$which daemon exited with $?" >&2; cat "$work/$which.log" >&2; }
        pid=
      done
    done
  done
done

# median FIELD LABEL DEPTH PASS READ_SIZE: over the repetitions
median() {
  grep "label=$2 depth=$3 pass=$4 .* read_size=$5 " "$summaries" |
    sed -n "s/.* $1=\([^ ]*\).*/\1/p" | sort -g |
    awk '{a[NR] = $1} END {if (NR) print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}
echo
echo "tree: ${dirs[*]}: $entries entries, $files files, $((bytes / 1048576)) MiB;" \
  "page cache dropped before each cold run: $([ "$drop_caches" = 1 ] && echo yes || echo no);" \
  "$(nproc) CPUs; host load at the end: $(cut -d' ' -f1-3 /proc/loadavg);" \
  "per-op tables above: repetition 1; below: median of $runs"
echo
echo "| read size | depth | pass | ours ops/s | ref ops/s | ours/ref | ours MiB/s | ref MiB/s | ours/ref | READ p50/p99 µs ours | ref |"
echo "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for rs in $read_sizes; do
  for depth in $depths; do
    for pass in cold warm; do
      m() { median "$1" "$2" "$depth" "$pass" "$rs"; }
      oo=$(m ops_per_s ours); ro=$(m ops_per_s ref)
      if [ -z "$oo" ] || [ -z "$ro" ]; then continue; fi
      om=$(m mib_per_s ours); rm=$(m mib_per_s ref)
      printf '| %d KiB | %s | %s | %s | %s | %.2f | %s | %s | %.2f | %s / %s | %s / %s |\n' \
        $((rs / 1024)) "$depth" "$pass" "$oo" "$ro" "$(bc -l <<< "$oo / $ro")" \
        "$om" "$rm" "$(bc -l <<< "$om / $rm")" \
        "$(m read_p50_us ours)" "$(m read_p99_us ours)" \
        "$(m read_p50_us ref)" "$(m read_p99_us ref)"
    done
  done
done
echo
echo "raw per-run summaries:"
sed 's/^SUMMARY /    /' "$summaries"
