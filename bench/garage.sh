# Sourced (after bench/daemons.sh, whose track/fail it uses) by the
# benchmarks of the object storage tier: a three-node Garage 2.5 cluster
# on loopback, configured as tests/common/garage.rs does (replication 3,
# sqlite metadata, one RPC, S3 and admin port per node, the same RPC
# secret), formed (every pair of nodes connected both ways, layout
# assigned and applied), each node waited for until its admin API says
# "fully operational", then the bucket `tvix` and a key that may read,
# write and own it, waited for until every node accepts a write with it.
# shellcheck shell=bash

# free_port: a TCP port nothing listens on now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# GARAGE_NODELAY=1: the nodes run with bench/nodelay.c preloaded (built
# here with cc), which sets TCP_NODELAY on their TCP sockets: Garage 2.5
# sets it on none, and on loopback a third of its GETs then wait 40-60 ms
# for a delayed ACK (see BENCHMARKS.md). GARAGE_NODELAY=s3: the same on
# the sockets of their S3 API only (not their RPC between nodes).
# GARAGE_PRELOAD: another library to preload into the nodes.
# GARAGE_DB (sqlite): the nodes' metadata engine (sqlite or lmdb).
# GARAGE_COMPRESSION: the nodes' `compression_level` (Garage's default,
# zstd level 1, when unset; "none" stores blocks as they come).
# GARAGE_CONSISTENCY: the nodes' `consistency_mode` (Garage's default,
# "consistent", when unset; "degraded" reads from one node).
#
# start_garage DIR: the cluster under DIR/garage (node N in DIR/garage/nN,
# its log nN/log). Sets garage_pids (one per node, also tracked),
# garage_endpoints (http://127.0.0.1:PORT of each node's S3 API, node 1
# first), garage_cfg (node 1's config, for `garage -c`) and garage_root, and exports
# AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the bucket.
start_garage() {
  local root=$1/garage secret n d id i j ids=() key ok
  command -v garage > /dev/null || fail "needs garage (~/.cargo/bin is searched): cargo install --locked garage --version 2.5.0"
  garage --version 2>/dev/null | grep -q ' cargo:2\.5\.\| v2\.5\.' ||
    echo "note: $(command -v garage) is $(garage --version 2>/dev/null | head -n1), not Garage 2.5" >&2
  if [ "${GARAGE_NODELAY:-0}" != 0 ]; then
    mkdir -p "$root"
    cc -O2 -shared -fPIC -o "$root/nodelay.so" "$(dirname "${BASH_SOURCE[0]}")/nodelay.c" -ldl ||
      fail "cannot build bench/nodelay.c (GARAGE_NODELAY=1)"
    GARAGE_PRELOAD=$root/nodelay.so
  fi
  secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  garage_pids=()
  garage_endpoints=()
  for n in 1 2 3; do
    d=$root/n$n
    mkdir -p "$d/meta" "$d/data"
    local rpc s3 admin
    rpc=$(free_port) s3=$(free_port) admin=$(free_port)
    cat > "$d/g.toml" <<EOF
metadata_dir = "$d/meta"
data_dir = "$d/data"
db_engine = "${GARAGE_DB:-sqlite}"
replication_factor = 3
${GARAGE_COMPRESSION:+compression_level = \"$GARAGE_COMPRESSION\"}
${GARAGE_CONSISTENCY:+consistency_mode = \"$GARAGE_CONSISTENCY\"}
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$admin"
EOF
    echo "$admin" > "$d/admin-port"
    garage_endpoints+=("http://127.0.0.1:$s3")
    NODELAY_ACCEPTED_PORTS=$([ "${GARAGE_NODELAY:-0}" != s3 ] || echo "$s3") \
      LD_PRELOAD=${GARAGE_PRELOAD:-} garage -c "$d/g.toml" server > "$d/log" 2>&1 &
    garage_pids+=($!)
    track $!
  done
  garage_cfg=$root/n1/g.toml
  garage_root=$root
  for n in 1 2 3; do
    for i in $(seq 100); do
      id=$(garage -c "$root/n$n/g.toml" node id -q 2> /dev/null) && break
      kill -0 "${garage_pids[n - 1]}" 2>/dev/null || fail "garage node $n died at start" "$root/n$n/log"
      [ "$i" = 100 ] && fail "garage node $n: no node id after 10 s" "$root/n$n/log"
      sleep 0.1
    done
    ids+=("$id")
  done
  # Every pair, both ways: a node counts a peer up only once its own
  # outgoing connection stands (see tests/common/garage.rs).
  for i in 0 1 2; do
    for j in 0 1 2; do
      [ "$i" = "$j" ] && continue
      for n in $(seq 100); do
        garage -c "$root/n$((i + 1))/g.toml" node connect "${ids[j]}" > /dev/null 2>&1 && break
        [ "$n" = 100 ] && fail "garage: node $((i + 1)) cannot connect to node $((j + 1))" "$root/n$((i + 1))/log"
        sleep 0.2
      done
    done
  done
  for id in "${ids[@]}"; do
    garage -c "$garage_cfg" layout assign -z dc1 -c 1GB "${id%%@*}" > /dev/null
  done
  garage -c "$garage_cfg" layout apply --version 1 > /dev/null
  for n in 1 2 3; do
    ok=
    for i in $(seq 600); do
      if curl -s --max-time 5 "http://127.0.0.1:$(cat "$root/n$n/admin-port")/health" | grep -q 'fully operational'; then
        ok=1
        break
      fi
      sleep 0.1
    done
    [ -n "$ok" ] || fail "garage node $n: not fully operational after 60 s" "$root/n$n/log"
  done
  for i in $(seq 100); do
    garage -c "$garage_cfg" bucket create tvix > /dev/null 2>&1 && break
    [ "$i" = 100 ] && fail "garage: cannot create the bucket" "$root/n1/log"
    sleep 0.2
  done
  key=$(garage -c "$garage_cfg" key create bench)
  AWS_ACCESS_KEY_ID=$(sed -n 's/.*Key ID: *//p' <<< "$key" | head -n1)
  AWS_SECRET_ACCESS_KEY=$(sed -n 's/.*Secret key: *//p' <<< "$key" | head -n1)
  export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
  [ -n "$AWS_ACCESS_KEY_ID" ] && [ -n "$AWS_SECRET_ACCESS_KEY" ] || fail "garage: no key in: $key"
  garage -c "$garage_cfg" bucket allow --read --write --owner tvix --key bench > /dev/null
  # The key and bucket tables are replicated too: wait until every node
  # takes a write with the key.
  for n in 1 2 3; do
    ok=
    for i in $(seq 300); do
      if garage_s3 "$n" PUT .bench-probe -d probe -o /dev/null -w '%{http_code}' 2>/dev/null | grep -q '^200$'; then
        ok=1
        break
      fi
      sleep 0.2
    done
    [ -n "$ok" ] || fail "garage node $n: no S3 write accepted after 60 s" "$root/n$n/log"
    garage_s3 "$n" DELETE .bench-probe -o /dev/null
  done
}

# garage_s3 NODE METHOD KEY [CURL ARGS...]: one signed S3 request to the
# bucket through node NODE (1-3).
garage_s3() {
  local n=$1 method=$2 key=$3
  shift 3
  curl -sf -X "$method" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 "aws:amz:garage:s3" \
    --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "${garage_endpoints[n - 1]}/tvix/$key" "$@"
}

# garage_alive: every node still runs.
garage_alive() {
  local n
  for n in 1 2 3; do
    alive "${garage_pids[n - 1]}" "garage node $n" "$garage_root/n$n/log"
  done
}

# garage_cpu_ms: CPU time (user + system) the three nodes have used, in ms.
garage_cpu_ms() {
  local p t=0 v
  for p in "${garage_pids[@]}"; do
    v=$(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null || echo 0)
    t=$((t + v))
  done
  echo $((t * 1000 / $(getconf CLK_TCK)))
}
