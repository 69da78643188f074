#!/usr/bin/env bash
# Nix's binary cache protocol, in one run: `nix copy --to` into our daemon
# (--http-listen, --http-writable, embedded store) beside `nix copy --to
# file://` (Nix's own file cache), then `nix copy --from` each into an
# empty chroot store, on the same closure, with Debian's Nix. Uploads run
# with Nix's default compression (xz, which Nix's own compressing bounds)
# and with compression=none (what the receiving end costs); our NARs are
# sent uncompressed.
# Each step runs RUNS times (fresh destination each time); the table gives
# the median wall time and the closure's NAR bytes per second.
#
# Usage: bench/binary-cache.sh [DIR...]  (default /usr/share/doc
#        /usr/lib/python3.11, added to this host's /nix/store with
#        nix-store --add)
# Environment: RUNS (3), BIN (default target/release/tvix-virtiofsd, built)
set -euo pipefail
shopt -s inherit_errexit
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(/usr/share/doc /usr/lib/python3.11)
runs=${RUNS:-3}
cd "$(dirname "$0")/.."
[ -n "${BIN:-}" ] || cargo build --release --quiet
bin=${BIN:-target/release/tvix-virtiofsd}
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"
export NIX_REMOTE=
nixc() { nix --extra-experimental-features nix-command "$@"; }

work=$(mktemp -d /var/tmp/tvix-bcbench.XXXXXX)
daemon=''
cleanup() {
  local rc=$?
  [ -z "$daemon" ] || kill "$daemon" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
cp "$bin" "$work/tvix-virtiofsd"
paths=()
for d in "${dirs[@]}"; do paths+=("$(nix-store --add "$d")"); done
mapfile -t closure < <(nix-store -qR "${paths[@]}")
nar_bytes=$(nixc path-info --json "${closure[@]}" | python3 -c \
  'import json,sys; print(sum(e["narSize"] for e in json.load(sys.stdin)))')
nix-store --generate-binary-cache-key bench-1 "$work/sk" "$work/pk"
pk=$(cat "$work/pk")

# times CMD...: wall seconds of one run
times() { local t0; t0=$(date +%s.%N); "$@" > /dev/null 2>&1; awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}'; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
row() {  # name seconds...
  local name=$1; shift
  local m; m=$(median "$@")
  echo "| $name | $m | $(awk -v b="$nar_bytes" -v s="$m" 'BEGIN {printf "%.1f", b / s / 1048576}') | $* |"
}

up_ours=() up_file=() down_ours=() down_file=() raw_ours=() raw_file=()
for i in $(seq 1 "$runs"); do
  port=$((20000 + RANDOM % 20000))
  rm -rf "$work/store" "$work/store2" "$work/xdg-up" "$work/xdg-down" "$work/filecache" \
    "$work/filecache2" "$work/root"*
  "$work/tvix-virtiofsd" --store "local://$work/store" daemon --listen "unix:$work/d.sock" \
    --http-listen "127.0.0.1:$port" --http-writable --sign-unverified-uploads --signing-key "$work/sk" \
    > "$work/daemon.log" 2>&1 &
  daemon=$!
  for _ in $(seq 100); do (exec 3<> "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
  up_ours+=("$(XDG_CACHE_HOME=$work/xdg-up times nixc copy --to "http://127.0.0.1:$port" "${paths[@]}")")
  up_file+=("$(XDG_CACHE_HOME=$work/xdg-up times nixc copy --to "file://$work/filecache?secret-key=$work/sk" "${paths[@]}")")
  down_ours+=("$(XDG_CACHE_HOME=$work/xdg-down times nixc copy --from "http://127.0.0.1:$port" \
    --to "$work/root-ours" --option trusted-public-keys "$pk" "${paths[@]}")")
  down_file+=("$(XDG_CACHE_HOME=$work/xdg-down times nixc copy --from "file://$work/filecache" \
    --to "$work/root-file" --option trusted-public-keys "$pk" "${paths[@]}")")
  kill "$daemon"; wait "$daemon" 2>/dev/null || true
  "$work/tvix-virtiofsd" --store "local://$work/store2" daemon --listen "unix:$work/d2.sock" \
    --http-listen "127.0.0.1:$port" --http-writable > "$work/daemon2.log" 2>&1 &
  daemon=$!
  for _ in $(seq 100); do (exec 3<> "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
  raw_ours+=("$(XDG_CACHE_HOME=$work/xdg-raw times nixc copy --to "http://127.0.0.1:$port?compression=none" "${paths[@]}")")
  raw_file+=("$(XDG_CACHE_HOME=$work/xdg-raw times nixc copy --to "file://$work/filecache2?compression=none" "${paths[@]}")")
  rm -rf "$work/xdg-raw"
  [ -d "$work/root-ours/nix/store" ] && [ -d "$work/root-file/nix/store" ] || {
    echo "a copy --from failed" >&2; exit 1; }
  kill "$daemon"; wait "$daemon" 2>/dev/null || true; daemon=''
done

echo "## bench/binary-cache.sh: RUNS=$runs, commit $commit"
echo
echo "$(date -u +%F), $(nproc) cores, $(nix --version); ${#closure[@]} store paths, $(awk -v b="$nar_bytes" 'BEGIN {printf "%.1f", b / 1048576}') MiB of NAR (${dirs[*]})"
echo
echo "| step | median s | NAR MiB/s | runs (s) |"
echo "| --- | --- | --- | --- |"
row "nix copy --to http:// (ours, xz upload)" "${up_ours[@]}"
row "nix copy --to file:// (Nix, xz)" "${up_file[@]}"
row "nix copy --to http://?compression=none (ours)" "${raw_ours[@]}"
row "nix copy --to file://?compression=none (Nix)" "${raw_file[@]}"
row "nix copy --from http:// (ours, uncompressed NARs)" "${down_ours[@]}"
row "nix copy --from file:// (Nix, xz)" "${down_file[@]}"
