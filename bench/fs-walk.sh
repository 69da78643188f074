#!/usr/bin/env bash
# `find` and `cat` of a large tree through the FUSE mount, beside the same
# walk on the real directories, cold (page cache dropped, fresh mount) and
# warm (again, same mount), in one run.
# Usage: bench/fs-walk.sh [DIR...]  (default /usr/share /usr/lib/x86_64-linux-gnu /usr/include; root)
set -euo pipefail
shopt -s inherit_errexit
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(/usr/share /usr/lib/x86_64-linux-gnu /usr/include)
cd "$(dirname "$0")/.."
cargo build --release --quiet
B=$PWD/target/release/tvix-virtiofsd
work=$(mktemp -d /var/tmp/tvix-fsbench.XXXXXX)
mnt=$work/mnt
mkdir -p "$mnt"
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; sleep 0.5; umount -l "$mnt" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# a private copy, so packages installed meanwhile cannot change the input
mkdir -p "$work/src"
copies=()
for d in "${dirs[@]}"; do cp -a "$d" "$work/src/"; copies+=("$work/src/$(basename "$d")"); done
dirs=("${copies[@]}")
store="local://$work/store"
paths=$($B --store "$store" import "${dirs[@]}")
through=()
for p in $paths; do through+=("$mnt/$(basename "$p")"); done
files=$(find "${dirs[@]}" -type f | wc -l)
entries=$(find "${dirs[@]}" | wc -l)
bytes=$(find "${dirs[@]}" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%d", s}')

mount_fresh() {
  [ -n "$pid" ] && { kill "$pid"; wait "$pid" 2>/dev/null || true; }
  $B --store "$store" mount "$mnt" >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -q " $mnt " /proc/self/mountinfo && break; sleep 0.1; done
}
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
timed() { local t0; t0=$(now); "$@" > /dev/null; echo "$(now) - $t0" | bc -l; }
walk_find() { find "$@" > /dev/null; }
walk_cat() { find "$@" -type f -print0 | xargs -0 cat > /dev/null; }

drop; real_find_cold=$(timed walk_find "${dirs[@]}")
real_find_warm=$(timed walk_find "${dirs[@]}")
drop; real_cat_cold=$(timed walk_cat "${dirs[@]}")
real_cat_warm=$(timed walk_cat "${dirs[@]}")

mount_fresh; drop; fuse_find_cold=$(timed walk_find "${through[@]}")
fuse_find_warm=$(timed walk_find "${through[@]}")
mount_fresh; drop; fuse_cat_cold=$(timed walk_cat "${through[@]}")
fuse_cat_warm=$(timed walk_cat "${through[@]}")
rss=$(awk '/RssAnon/ {print $2, $3}' /proc/$pid/status)

r() { printf '%.2f' "$1"; }
x() { echo "scale=1; $1 / $2" | bc -l; }
cat <<OUT
tree: ${dirs[*]}: $entries entries, $files files, $((bytes / 1048576)) MiB
| walk | real directory | FUSE mount | mount / real |
| --- | --- | --- | --- |
| find, cold | $(r "$real_find_cold") s | $(r "$fuse_find_cold") s | $(x "$fuse_find_cold" "$real_find_cold")x |
| find, warm | $(r "$real_find_warm") s | $(r "$fuse_find_warm") s | $(x "$fuse_find_warm" "$real_find_warm")x |
| cat all, cold | $(r "$real_cat_cold") s | $(r "$fuse_cat_cold") s | $(x "$fuse_cat_cold" "$real_cat_cold")x |
| cat all, warm | $(r "$real_cat_warm") s | $(r "$fuse_cat_warm") s | $(x "$fuse_cat_warm" "$real_cat_warm")x |
mount process RssAnon after the walks: $rss
OUT
