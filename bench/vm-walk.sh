#!/usr/bin/env bash
# In-guest figures, ours beside rust-vmm's virtiofsd in the same run: time
# from QEMU start to the guest's first command, and `find` + `cat` of a tree
# inside a TCG microVM (vm-tests/). Guest reads under TCG top out near
# 16 MB/s whatever serves them, so these show the guest's view, not the
# daemon's speed (bench/vufs-load.sh measures that).
# Usage: bench/vm-walk.sh [DIR...]  (default /usr/share/doc /usr/share/man; root)
set -euo pipefail
shopt -s inherit_errexit
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(/usr/share/doc /usr/share/man)
cd "$(dirname "$0")/.."
cargo build --release --quiet
B=$PWD/target/release/tvix-virtiofsd
VFSD=${VIRTIOFSD:-/var/tmp/vmtest-virtiofsd/bin/virtiofsd}
if [ ! -x "$VFSD" ]; then
  apt-get install -y -q libseccomp-dev libcap-ng-dev >/dev/null
  cargo install --quiet virtiofsd --version 1.14.0 --root /var/tmp/vmtest-virtiofsd
fi
work=$(mktemp -d /var/tmp/tvix-vmbench.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
for d in "${dirs[@]}"; do cp -a "$d" "$work/src/"; done
paths=$($B --store "local://$work/store" import "$work"/src/*)
ours_names=$(for p in $paths; do basename "$p"; done | tr '\n' ' ')
ref_names=$(ls "$work/src" | tr '\n' ' ')
files=$(find "$work/src" -type f | wc -l)
bytes=$(find "$work/src" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%d", s}')

guest_script() {  # $@: names below /nix/store
  cat <<SCRIPT
up() { cut -d' ' -f1 /proc/uptime; }
echo "FIRST: \$(up)"
cd /nix/store
t0=\$(up); n=\$(find $* | wc -l); t1=\$(up)
find $* -type f -print0 | xargs -0 cat > /dev/null; t2=\$(up)
echo "FIND: \$n \$(awk "BEGIN {print \$t1 - \$t0}")"
echo "CAT: \$(awk "BEGIN {print \$t2 - \$t1}")"
SCRIPT
}

run() {  # label, daemon command..., names via $names
  local label=$1; shift
  local sock=$work/$label.sock
  "$@" --socket-path "$sock" >/dev/null 2>&1 &
  local pid=$!
  guest_script $names > "$work/$label.sh"
  local t0; t0=$(date +%s.%N)
  vm-tests/run-vm.sh --socket "$sock" --script "$work/$label.sh" --timeout 900 > "$work/$label.out" 2>/dev/null || true
  local t1; t1=$(date +%s.%N)
  wait "$pid" 2>/dev/null || true
  first=$(sed -n 's/^FIRST: //p' "$work/$label.out")
  find_s=$(sed -n 's/^FIND: [0-9]* //p' "$work/$label.out")
  cat_s=$(sed -n 's/^CAT: //p' "$work/$label.out")
  total=$(echo "$t1 - $t0" | bc -l)
  printf '| %s | %s s | %s s | %s s | %.1f s |\n' "$label" "$first" "$find_s" "$cat_s" "$total"
}

echo "tree: ${dirs[*]}: $files files, $((bytes / 1048576)) MiB; TCG guest, 1 vCPU, 1 GiB"
echo "| daemon | boot to first command (guest uptime) | find | cat all | whole run |"
echo "| --- | --- | --- | --- | --- |"
names=$ours_names run tvix-virtiofsd $B --store "local://$work/store" virtiofs
names=$ref_names run virtiofsd "$VFSD" --shared-dir "$work/src" --readonly --cache=always --sandbox none
