# Sourced by bench/vufs-load.sh and bench/vm-walk.sh: starting, watching
# and ending the daemons a benchmark runs, including the remote-store
# deployment:
#   remote store: tvix-virtiofsd --store local://STORE daemon
#                 (unix socket, or loopback TCP with grpc+http://), or
#                 --store s3://BUCKET/PREFIX?endpoint=... (remote-s3: a
#                 Garage cluster, bench/garage.sh; unix socket)
#   host daemon:  tvix-virtiofsd --store REMOTE --cache-dir CACHE daemon
#                 --metrics-listen 127.0.0.1:0 (the one filler of CACHE)
#   per-VM:       tvix-virtiofsd --store grpc+unix://HOST --cache-dir CACHE
#                 virtiofs (sandboxed; reads hits from CACHE itself)
#   relay:        optional, between the host daemon and the remote store
#                 daemon (see start_remote): a link with a round trip and
#                 a bandwidth cap (benches/relay.rs; no netem here)
#   Nix cache:    instead of the remote store daemon (nix-http-*), a static
#                 HTTP server on loopback serving a Nix binary cache's
#                 directory; the host daemon's store is then
#                 nix+http://127.0.0.1:PORT?trusted-public-keys=...
# Every process started is in `pids` until it has ended, so that the
# caller's EXIT trap (`stop_all`) ends whatever still runs and never
# signals a recycled PID. Errors are loud: `fail` prints the message and
# the tail of the logs named, and exits 1.
# shellcheck shell=bash

# Log lines without colour escapes, so they can be parsed.
export NO_COLOR=1

pids=()
track() { pids+=("$@"); }
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
    for n in $(seq 50); do
      kill -0 "$p" 2>/dev/null || break
      [ "$n" = 50 ] && kill -9 "$p" 2>/dev/null
      sleep 0.1
    done
    wait "$p" 2>/dev/null || true
  done
  untrack "$@"
}
stop_all() { [ ${#pids[@]} -eq 0 ] || stop "${pids[@]}"; }

fail() { # MESSAGE [LOG...]
  echo "$(basename "$0"): $1" >&2
  shift
  local f
  for f in "$@"; do
    [ -f "$f" ] && { echo "--- $f (last 40 lines)" >&2; tail -n 40 "$f" >&2; }
  done
  exit 1
}
# alive PID NAME LOG: a daemon that should run still does.
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
# serving PID: the process that serves the VMM. Ours (and virtiofsd) fork
# at start: the supervisor's child serves. Nonzero when PID is gone.
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
# finish SUPERVISOR SERVING NAME LOG: a vhost-user daemon exits 0 once its
# frontend is gone.
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
# rss_anon PID: RssAnon in KiB (empty when the process is gone).
rss_anon() { sed -n 's/^RssAnon:[[:space:]]*\([0-9]*\) kB$/\1/p' "/proc/$1/status" 2>/dev/null || true; }

# start_remote KIND BIN STORE DIR LOG-PREFIX [HOST-DAEMON-FLAGS...]: the
# remote store daemon (KIND remote-unix, remote-tcp, or remote-s3 whose
# STORE is a bucket, on a unix socket) over STORE and a host daemon in
# front of it with an empty cache DIR/cache; sockets in DIR/remote/ and
# DIR/host/. Both serve their metrics on loopback. Sets remote_pid,
# host_pid, host_sock, metrics_addr (the host daemon's), remote_metrics_addr,
# and remote_log, host_log (LOG-PREFIX.remote.log, .host.log).
# With relay_bin set (the relay program; relay_flags its shaping flags,
# e.g. "--rtt-ms 10 --mbit 0"), KIND remote-tcp or remote-s3 gets the
# relay between the host daemon and the remote store daemon: the remote
# listens on loopback TCP (remote-s3 too, instead of its unix socket) and
# the host daemon connects to the relay, which connects to it; remote-unix
# and nix-http-* are never relayed. Sets relay_pid (empty when not
# relayed) and relay_log (LOG-PREFIX.relay.log).
# KIND nix-http-* (a Nix binary cache as the host daemon's upstream):
# STORE is DIR?QUERY, a binary cache's directory (what `nix copy --to
# file://DIR` wrote) and the query of the host daemon's address (e.g.
# trusted-public-keys=NAME:KEY); a static HTTP server (start_httpd) serves
# DIR on a loopback port and takes the remote store daemon's place:
# remote_pid is the server's, remote_log its log, remote_metrics_addr empty.
# The host daemon's store is nix+http://127.0.0.1:PORT?QUERY.
relay_bin=${relay_bin:-}
relay_flags=${relay_flags:-}
relay_pid=
# The static HTTP server of the nix-http-* kinds: python (python3 -m
# http.server, a ThreadingHTTPServer: a thread per connection) or busybox
# (busybox httpd, a process per connection).
httpd=${HTTPD:-python}
# start_httpd DIR LOG: serves DIR on 127.0.0.1, an ephemeral port; sets
# httpd_pid and httpd_addr (127.0.0.1:PORT).
start_httpd() {
  local dir=$1 log=$2 port n
  case $httpd in
    python)
      # -u: the line with the port it bound is written at once
      python3 -u -m http.server --bind 127.0.0.1 --directory "$dir" 0 > "$log" 2>&1 &
      httpd_pid=$!
      track "$httpd_pid"
      port=$(wait_log '^Serving HTTP on [^ ]* port \([0-9]*\) .*' "$httpd_pid" "python3 -m http.server" "$log")
      ;;
    busybox)
      # busybox httpd binds the port it is given: a free one, asked of
      # the kernel (a race with other programs binding ports is possible,
      # and fails loudly below).
      port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
      busybox httpd -f -v -p "127.0.0.1:$port" -h "$dir" > "$log" 2>&1 &
      httpd_pid=$!
      track "$httpd_pid"
      for n in $(seq 200); do
        curl -sf -o /dev/null "http://127.0.0.1:$port/nix-cache-info" && break
        kill -0 "$httpd_pid" 2>/dev/null || fail "busybox httpd (pid $httpd_pid) died at start" "$log"
        [ "$n" = 200 ] && fail "busybox httpd: no answer on 127.0.0.1:$port after 10 s" "$log"
        sleep 0.05
      done
      ;;
    *) fail "HTTPD: '$httpd' is not python or busybox" ;;
  esac
  httpd_addr=127.0.0.1:$port
}
start_remote() {
  local kind=$1 bin=$2 store=$3 dir=$4 url addr relayed=0 flags
  remote_log=$5.remote.log
  host_log=$5.host.log
  relay_log=$5.relay.log
  shift 5
  relay_pid=
  case $kind in remote-tcp | remote-s3) [ -n "$relay_bin" ] && relayed=1 ;; esac
  # The previous cache is moved aside, not deleted: ext4 skips inodes
  # deleted within the last minutes when it allocates new ones, and tens of
  # thousands deleted just before would slow the next fill down (the work
  # directory, trash included, goes at the end of the run: on ext4 without
  # a journal, wait a few minutes before the next run, whose first VM
  # would pay for that deletion; see BENCHMARKS.md).
  [ -e "$dir/cache" ] && mv "$dir/cache" "$(mktemp -u "$dir/trash.XXXXXX")"
  rm -rf "$dir/remote" "$dir/host"
  mkdir -p "$dir/remote" "$dir/host"
  remote_metrics_addr=
  if [[ $kind == nix-http-* ]]; then
    start_httpd "${store%%\?*}" "$remote_log"
    remote_pid=$httpd_pid
    url="nix+http://$httpd_addr?${store#*\?}"
  elif [ "$kind" = remote-tcp ] || [ "$relayed" = 1 ]; then
    "$bin" --store "$store" daemon --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 > "$remote_log" 2>&1 &
    remote_pid=$!
    track "$remote_pid"
    addr=$(wait_log '.* listening on \(127\.0\.0\.1:[0-9]*\).*' "$remote_pid" "remote store daemon" "$remote_log")
    url=grpc+http://$addr
    if [ "$relayed" = 1 ]; then
      read -r -a flags <<< "$relay_flags"
      "$relay_bin" --to "$addr" "${flags[@]}" > "$relay_log" 2>&1 &
      relay_pid=$!
      track "$relay_pid"
      url=grpc+http://$(wait_log '^listening \(127\.0\.0\.1:[0-9]*\)$' "$relay_pid" "relay" "$relay_log")
    fi
  else
    "$bin" --store "$store" daemon --listen "unix:$dir/remote/remote.sock" --metrics-listen 127.0.0.1:0 \
      > "$remote_log" 2>&1 &
    remote_pid=$!
    track "$remote_pid"
    wait_socket "$dir/remote/remote.sock" "$remote_pid" "remote store daemon" "$remote_log"
    url=grpc+unix://$dir/remote/remote.sock
  fi
  [[ $kind == nix-http-* ]] ||
    remote_metrics_addr=$(wait_log '.* metrics on http:\/\/\([^/]*\)\/metrics.*' "$remote_pid" "remote store daemon" "$remote_log")
  host_sock=$dir/host/daemon.sock
  "$bin" --store "$url" --cache-dir "$dir/cache" daemon --listen "unix:$host_sock" \
    --metrics-listen 127.0.0.1:0 "$@" > "$host_log" 2>&1 &
  host_pid=$!
  track "$host_pid"
  wait_socket "$host_sock" "$host_pid" "host daemon" "$host_log"
  metrics_addr=$(wait_log '.* metrics on http:\/\/\([^/]*\)\/metrics.*' "$host_pid" "host daemon" "$host_log")
}
# remote_alive: both remote-deployment daemons (or the host daemon and the
# HTTP server; and the relay) still run.
remote_alive() {
  alive "$host_pid" "host daemon" "$host_log"
  alive "$remote_pid" "remote store daemon (or HTTP server)" "$remote_log"
  [ -z "$relay_pid" ] || alive "$relay_pid" "relay" "$relay_log"
}
# stop_remote: ends both (the host daemon first when relayed, so that the
# relay's counters, logged at exit, are the host daemon's whole traffic);
# the host daemon logs its cache counters at exit.
stop_remote() {
  if [ -n "$relay_pid" ]; then
    stop "$host_pid"
    stop "$relay_pid" "$remote_pid"
  else
    stop "$host_pid" "$remote_pid"
  fi
}
# metric NAME: one value from the host daemon's /metrics.
metric() {
  local v
  v=$(curl -sf "http://$metrics_addr/metrics" | awk -v n="$1" '$1 == n {print $2}') || true
  [ -n "$v" ] || fail "cannot read $1 from http://$metrics_addr/metrics" "$host_log"
  echo "$v"
}
# cache_line LOG: the cache counters a daemon of ours logged at exit.
cache_line() { sed -n 's/.* cache [^ ]*: \(hits: .*\)/\1/p' "$1" | tail -n1; }

# start_virtiofs BIN SOCK LOG FLAGS...: `BIN FLAGS... --socket-path SOCK`
# (FLAGS include the subcommand; the same works for virtiofsd); sets vm_sup
# (the supervisor) and vm_srv (the serving process).
start_virtiofs() {
  local bin=$1 sock=$2 log=$3
  shift 3
  rm -f "$sock"
  "$bin" "$@" --socket-path "$sock" > "$log" 2>&1 &
  vm_sup=$!
  track "$vm_sup"
  wait_socket "$sock" "$vm_sup" "$(basename "$bin") $*" "$log"
  vm_srv=$(serving "$vm_sup") || fail "$bin (pid $vm_sup) died at start" "$log"
  track "$vm_srv"
}

# our_complaints LOG...: WARN and ERROR lines of our daemons' logs.
our_complaints() {
  if grep -q -E ' (WARN|ERROR) ' "$@"; then
    echo
    echo "warnings and errors in our daemons' logs (first 100):"
    grep -H -E ' (WARN|ERROR) ' "$@" | sed 's|^[^:]*/\([^/:]*\):|    \1: |' | head -n 100
  fi
}
