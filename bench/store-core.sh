#!/usr/bin/env bash
# Store-core throughput beside Nix, on the same data in the same run:
#  - import of a large tree: `tvix-virtiofsd import` vs `nix-store --add`
#  - NAR rendering: `tvix-virtiofsd nar` vs `nix-store --dump`
#  - the same import and rendering through `daemon` over a unix socket.
# The tree is read once first so every contender reads it from the page
# cache: this measures the programs, not the disk.
# Usage: bench/store-core.sh [TREE] [RUNS]   (default /usr/share, 3 runs; root, Nix)
set -euo pipefail
shopt -s inherit_errexit
TREE=${1:-/usr/share}
RUNS=${2:-3}
export NIX_REMOTE=
cd "$(dirname "$0")/.."
cargo build --release --quiet
B=$PWD/target/release/tvix-virtiofsd
work=$(mktemp -d /var/tmp/tvix-bench.XXXXXX)
trap '[ -n "${daemon:-}" ] && kill $daemon 2>/dev/null; rm -rf "$work"' EXIT

# a private copy, so packages installed meanwhile cannot change the input
mkdir -p "$work/src"
cp -a "$TREE" "$work/src/"
TREE="$work/src/$(basename "$TREE")"
bytes=$(find "$TREE" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%d", s}')
files=$(find "$TREE" -type f | wc -l)
tar cf - "$TREE" 2>/dev/null > /dev/null   # warm the page cache

now() { date +%s.%N; }
# median of RUNS timings of "$@" (stdout discarded); a setup hook runs before each
median() {
  local setup=$1; shift
  local ts=()
  for _ in $(seq "$RUNS"); do
    eval "$setup"
    local t0; t0=$(now)
    "$@" > /dev/null
    ts+=("$(echo "$(now) - $t0" | bc -l)")
  done
  printf '%s\n' "${ts[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
mibs() { echo "scale=1; $1 / 1048576 / $2" | bc -l; }

ours_store="local://$work/store"
# store path and NAR size, from a first import (not timed)
path=$($B --store "$ours_store" import "$TREE")
nar_size=$($B --store "$ours_store" path-info --json "$path" | sed -n 's/.*"narSize": \([0-9]*\).*/\1/p')

t_ours=$(median "rm -rf $work/store" $B --store "$ours_store" import "$TREE")
nix_path=$(nix-store --add "$TREE")
[ "$nix_path" = "$path" ] || { echo "store paths differ: $nix_path vs $path" >&2; exit 1; }
t_nix=$(median "nix-store --delete $path >/dev/null 2>&1 || true" nix-store --add "$TREE")

$B --store "$ours_store" import "$TREE" > /dev/null
t_ours_nar=$(median ":" $B --store "$ours_store" nar "$path")
t_nix_nar=$(median ":" nix-store --dump "$path")

# through the daemon: a fresh daemon and store per run (started outside any
# command substitution, which would wait for the daemon's stdout to close)
ts=()
for i in $(seq "$RUNS"); do
  [ -n "${daemon:-}" ] && { kill "$daemon"; wait "$daemon" 2>/dev/null || true; }
  $B --store "local://$work/dstore$i" daemon --listen "unix:$work/d$i.sock" >/dev/null 2>&1 &
  daemon=$!
  for _ in $(seq 100); do [ -S "$work/d$i.sock" ] && break; sleep 0.1; done
  t0=$(now)
  $B --store "grpc+unix://$work/d$i.sock" import "$TREE" > /dev/null
  ts+=("$(echo "$(now) - $t0" | bc -l)")
done
t_grpc=$(printf '%s\n' "${ts[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
grpc="grpc+unix://$work/d$RUNS.sock"
t_grpc_nar=$(median ":" $B --store "$grpc" nar "$path")

cat <<OUT
tree: $TREE, $files files, $(mibs "$bytes" 1) MiB of file data, NAR $(mibs "$nar_size" 1) MiB; median of $RUNS runs
| operation | tvix-virtiofsd | Nix | ratio |
| --- | --- | --- | --- |
| import (local store / nix-store --add) | $(mibs "$bytes" "$t_ours") MiB/s (${t_ours%???????} s) | $(mibs "$bytes" "$t_nix") MiB/s (${t_nix%???????} s) | $(echo "scale=2; $t_nix / $t_ours" | bc -l)x |
| NAR render (nar / nix-store --dump) | $(mibs "$nar_size" "$t_ours_nar") MiB/s (${t_ours_nar%???????} s) | $(mibs "$nar_size" "$t_nix_nar") MiB/s (${t_nix_nar%???????} s) | $(echo "scale=2; $t_nix_nar / $t_ours_nar" | bc -l)x |
| import through daemon (grpc+unix) | $(mibs "$bytes" "$t_grpc") MiB/s (${t_grpc%???????} s) | | |
| NAR render through daemon (grpc+unix) | $(mibs "$nar_size" "$t_grpc_nar") MiB/s (${t_grpc_nar%???????} s) | | |
OUT
