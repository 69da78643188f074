#!/usr/bin/env bash
# What the write policy costs a gRPC upload: `import` of one tree through a
# daemon's writable TCP and unix listeners, with no trusted keys (open) and
# with --trusted-public-keys (each path info admitted only after its tree
# is rendered and hashed again on the daemon). Prints seconds and MiB/s.
# Usage: bench/write-policy.sh [TREE] [RUNS]   (default /usr/share/doc, 3)
set -euo pipefail
cd "$(dirname "$0")/.."
TREE=${1:-/usr/share/doc}
RUNS=${2:-3}
cargo build --release --locked -q
B=$PWD/target/release/tvix-virtiofsd
work=$(mktemp -d)
trap 'for p in $(jobs -p); do kill "$p" 2>/dev/null; done; rm -rf "$work"' EXIT
export NIX_REMOTE=
nix-store --generate-binary-cache-key bench-1 "$work/sk" "$work/pk"
bytes=$(du -sb "$TREE" | cut -f1)
echo "tree: $TREE, $((bytes >> 20)) MiB, $(find "$TREE" -type f | wc -l) files; $RUNS runs each, median"
printf '%-10s %-6s %10s %10s\n' policy via seconds MiB/s
for policy in open trusted; do
  for via in unix tcp; do
    times=()
    for r in $(seq "$RUNS"); do
      store="$work/store-$policy-$via-$r"
      port=$((20000 + RANDOM % 20000))
      keys=()
      [ "$policy" = trusted ] && keys=(--trusted-public-keys "$(cat "$work/pk")")
      if [ "$via" = unix ]; then
        listen="unix:$work/d-$r.sock"; addr="grpc+unix://$work/d-$r.sock"
      else
        listen="127.0.0.1:$port"; addr="grpc+http://127.0.0.1:$port"
      fi
      "$B" --store "local://$store" daemon --listen "$listen" --writable \
        --min-free-space 16M "${keys[@]}" 2> "$work/daemon.log" &
      pid=$!
      for _ in $(seq 200); do
        if [ "$via" = unix ]; then
          [ -S "$work/d-$r.sock" ] && break
        else
          (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        fi
        sleep 0.05
      done
      t0=$(date +%s.%N)
      "$B" --store "$addr" import --signing-key "$work/sk" "$TREE" > /dev/null
      t1=$(date +%s.%N)
      kill "$pid"; wait "$pid" 2>/dev/null || true
      rm -rf "$store" "$work/d-$r.sock"
      times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
    done
    med=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p")
    printf '%-10s %-6s %10.2f %10.1f\n' "$policy" "$via" "$med" "$(awk -v b="$bytes" -v m="$med" 'BEGIN { print b / 1048576 / m }')"
  done
done
