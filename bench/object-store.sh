#!/usr/bin/env bash
# The object storage tier beside the embedded store, in one run on the
# same trees: `import` of the trees into a fresh `local://` store and into
# a fresh prefix of a three-node Garage cluster (replication 3, loopback,
# started here), directly (`--store s3://...`) and through a writable
# store daemon over the bucket (`--store grpc+unix://...`); then the NAR
# of every imported path rendered back (`nar`) from each. The trees are
# read once first so every contender reads them from the page cache.
# Usage: bench/object-store.sh [TREE...] (default /usr/share/doc /usr/share/man; root)
# Environment: RUNS (3; medians reported); CARGO_TARGET_DIR is honoured
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
trees=("$@")
[ ${#trees[@]} -gt 0 ] || trees=(/usr/share/doc /usr/share/man)
export PATH="$HOME/.cargo/bin:$PATH"
command -v garage >/dev/null || { echo "needs garage: cargo install --locked garage --version 2.5.0" >&2; exit 1; }
# shellcheck source=bench/daemons.sh
. bench/daemons.sh
# shellcheck source=bench/garage.sh
. bench/garage.sh
cargo build --release --quiet
B=${CARGO_TARGET_DIR:-$PWD/target}/release/tvix-virtiofsd
work=$(mktemp -d /var/tmp/tvix-os.XXXXXX)
trap 'stop_all; rm -rf "$work"' EXIT

mkdir -p "$work/src"
for t in "${trees[@]}"; do cp -a "$t" "$work/src/"; done
bytes=$(find "$work/src" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%d", s}')
files=$(find "$work/src" -type f | wc -l)
tar cf - "$work/src" 2>/dev/null > /dev/null

# --- a three-node Garage cluster on loopback (bench/garage.sh) ---
start_garage "$work"
endpoint=${garage_endpoints[0]}

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
row() { # label, import seconds, nar seconds
  printf '| %s | %.2f | %.1f | %.2f | %.1f |\n' "$1" "$2" "$(echo "$bytes / 1048576 / $2" | bc -l)" "$3" "$(echo "$bytes / 1048576 / $3" | bc -l)"
}
run() { # label, store URL maker (takes the run number)
  local label=$1 mk=$2 ti=() tn=() url
  for r in $(seq "$RUNS"); do
    $mk "$r"
    local t0; t0=$(now)
    "$B" --store "$url" import "$work"/src/* > "$work/paths"
    ti+=("$(echo "$(now) - $t0" | bc -l)")
    t0=$(now)
    while read -r p; do "$B" --store "$url" nar "$p" > /dev/null; done < "$work/paths"
    tn+=("$(echo "$(now) - $t0" | bc -l)")
    cleanup_run
  done
  row "$label" "$(printf '%s\n' "${ti[@]}" | median)" "$(printf '%s\n' "${tn[@]}" | median)"
}
cleanup_run() { if [ -n "${dpid:-}" ]; then stop "$dpid"; dpid=; fi; }
# Each sets $url to a fresh store for run $1.
local_url() { url="local://$work/local-$1"; }
s3_url() { url="s3://tvix/run-$1?endpoint=$endpoint&region=garage"; }
daemon_url() {
  local sock=$work/d-$1/daemon.sock; mkdir -p "$work/d-$1"
  "$B" --store "s3://tvix/daemon-$1?endpoint=$endpoint&region=garage" daemon \
    --listen "unix:$sock" --min-free-space 16M > "$work/d-$1/log" 2>&1 & dpid=$!
  track "$dpid"
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
  url="grpc+unix://$sock"
}

echo "commit $(git rev-parse --short HEAD); trees ${trees[*]}: $files files, $((bytes / 1048576)) MiB; median of $RUNS runs"
echo
echo "| store | import s | import MiB/s | nar of every path s | nar MiB/s |"
echo "| --- | ---: | ---: | ---: | ---: |"
run "local:// (embedded)" local_url
run "s3:// (Garage, 3 nodes, direct)" s3_url
run "s3:// through a daemon (grpc+unix)" daemon_url
