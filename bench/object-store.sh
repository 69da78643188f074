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
cargo build --release --quiet
B=${CARGO_TARGET_DIR:-$PWD/target}/release/tvix-virtiofsd
work=$(mktemp -d /var/tmp/tvix-os.XXXXXX)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"' EXIT

mkdir -p "$work/src"
for t in "${trees[@]}"; do cp -a "$t" "$work/src/"; done
bytes=$(find "$work/src" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%d", s}')
files=$(find "$work/src" -type f | wc -l)
tar cf - "$work/src" 2>/dev/null > /dev/null

# --- a three-node Garage cluster on loopback ---
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
for n in 1 2 3; do
  d=$work/garage/n$n; mkdir -p "$d"
  cat > "$d/g.toml" <<EOF
metadata_dir = "$d/meta"
data_dir = "$d/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$(port)"
rpc_secret = "$secret"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$(port)"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$(port)"
EOF
  sed -i "s/^rpc_bind_addr = \"\(.*\)\"/rpc_bind_addr = \"\1\"\nrpc_public_addr = \"\1\"/" "$d/g.toml"
  garage -c "$d/g.toml" server > "$d/log" 2>&1 & pids+=($!)
done
g() { garage -c "$work/garage/n1/g.toml" "$@"; }
for _ in $(seq 100); do g status > /dev/null 2>&1 && break; sleep 0.1; done
for n in 2 3; do
  id=$(garage -c "$work/garage/n$n/g.toml" node id -q 2>/dev/null)
  g node connect "$id" > /dev/null
done
for id in $(g status | grep -oE '^[0-9a-f]{16}'); do g layout assign -z dc1 -c 1GB "$id" > /dev/null; done
g layout apply --version 1 > /dev/null
for _ in $(seq 100); do g bucket create tvix > /dev/null 2>&1 && break; sleep 0.2; done
key=$(g key create bench)
export AWS_ACCESS_KEY_ID=$(echo "$key" | sed -n 's/.*Key ID: *//p' | head -1)
export AWS_SECRET_ACCESS_KEY=$(echo "$key" | sed -n 's/.*Secret key: *//p' | head -1)
g bucket allow --read --write --owner tvix --key bench > /dev/null
endpoint=http://$(sed -n 's/^api_bind_addr = "\(.*\)"/\1/p' "$work/garage/n1/g.toml" | head -1)

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
cleanup_run() { if [ -n "${dpid:-}" ]; then kill "$dpid"; wait "$dpid" 2>/dev/null || true; dpid=; fi; }
# Each sets $url to a fresh store for run $1.
local_url() { url="local://$work/local-$1"; }
s3_url() { url="s3://tvix/run-$1?endpoint=$endpoint&region=garage"; }
daemon_url() {
  local sock=$work/d-$1/daemon.sock; mkdir -p "$work/d-$1"
  "$B" --store "s3://tvix/daemon-$1?endpoint=$endpoint&region=garage" daemon \
    --listen "unix:$sock" --min-free-space 16M > "$work/d-$1/log" 2>&1 & dpid=$!
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
