#!/usr/bin/env bash
# Head-to-head runs of our own serving process, one daemon at a time, for
# differences of a few percent that vufs-load.sh's repetitions cannot
# show: this machine has slow spells lasting minutes (see BENCHMARKS.md),
# and contenders run seconds apart share them. Each repetition runs every
# contender once, in an order rotated per repetition, with the page cache
# dropped before each start: one cold pass and three warm ones (at DEPTH),
# the warm figure being their median. At the end, per PAIRS, the geometric
# mean of the per-repetition ratios with a 90% bootstrap interval.
#
# Usage: bench/alternate.sh [TREE...]   (default /usr/share/doc /usr/share/man)
# Environment:
#   CONTENDERS  "LABEL:BINARY:MODE[:FLAG,FLAG...] ..." with MODE embedded
#               (the tree's local:// store) or reader (a per-VM daemon on a
#               cache directory the host daemon filled first); e.g.
#               "new-e:target/release/tvix-virtiofsd:embedded
#                poll0:target/release/tvix-virtiofsd:embedded:--poll-max-us,0"
#               (default: this tree's build, embedded and reader)
#   PAIRS       "A/B ..." ratios to report (default: every contender to the first)
#   REPS        repetitions (24); READ_SIZES ("131072 1048576", alternating);
#   DEPTH       requests in flight (64)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(/usr/share/doc /usr/share/man)
reps=${REPS:-24}
depth=${DEPTH:-64}
read -r -a sizes <<< "${READ_SIZES:-131072 1048576}"
cargo build --release --quiet
gen=$(cargo bench --bench vufs_load --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[ -x "$gen" ] || { echo "cannot find the vufs_load bench executable" >&2; exit 1; }
me=target/release/tvix-virtiofsd
read -r -a contenders <<< "${CONTENDERS:-ours-e:$me:embedded ours-r:$me:reader}"
if [ -z "${PAIRS:-}" ]; then
  PAIRS=""
  first=${contenders[0]%%:*}
  for c in "${contenders[@]:1}"; do PAIRS+="${c%%:*}/$first "; done
fi
[ -w /proc/sys/vm/drop_caches ] || { echo "needs root (drops the page cache)" >&2; exit 1; }

# shellcheck source=bench/daemons.sh
. bench/daemons.sh
work=$(mktemp -d /var/tmp/tvix-alternate.XXXXXX)
trap 'stop_all; rm -rf "$work"' EXIT
mkdir -p "$work/src" "$work/logs" "$work/bin"
for d in "${dirs[@]}"; do cp -a "$d" "$work/src/"; done
# Private copies of the binaries: a build meanwhile cannot swap them.
cp "$gen" "$work/bin/vufs_load"
gen=$work/bin/vufs_load
for i in "${!contenders[@]}"; do
  IFS=: read -r label bin mode flags <<< "${contenders[$i]}"
  case $mode in embedded | reader) ;; *) echo "$label: MODE must be embedded or reader" >&2; exit 2 ;; esac
  cp "$bin" "$work/bin/$label"
done
store=local://$work/store
"$me" --store "$store" import "$work"/src/* | xargs -n1 basename > "$work/names"
# The host daemon in front of the store fills the readers' cache: one
# first VM walks the tree through it.
start_remote remote-unix "$me" "$store" "$work" "$work/logs/setup"
start_virtiofs "$me" "$work/vm.sock" "$work/logs/fill.log" --store "grpc+unix://$host_sock" \
  --cache-dir "$work/cache" --log-level warn virtiofs
"$gen" --socket "$work/vm.sock" --paths "$work/names" --depth 64 --read-size 131072 --passes 1 > /dev/null 2>&1
finish "$vm_sup" "$vm_srv" "filling VM" "$work/logs/fill.log"

sums=$work/summaries
: > "$sums"
one() { # LABEL MODE FLAGS
  local label=$1 mode=$2 extra=()
  [ -n "$3" ] && IFS=, read -r -a extra <<< "$3"
  local args=(--store "$store")
  [ "$mode" = reader ] && args=(--store "grpc+unix://$host_sock" --cache-dir "$work/cache")
  sync
  echo 3 > /proc/sys/vm/drop_caches
  start_virtiofs "$work/bin/$label" "$work/vm.sock" "$work/logs/$label.log" "${args[@]}" \
    --log-level warn virtiofs "${extra[@]}"
  "$gen" --socket "$work/vm.sock" --paths "$work/names" --depth "$depth" --read-size "$rs" --label "$label" \
    --passes 4 --rss "vm=$vm_srv" 2> "$work/err" > /dev/null || fail "load generator failed ($label)" "$work/err"
  grep '^SUMMARY ' "$work/err" | sed "s/\$/ rep=$rep/" >> "$sums"
  finish "$vm_sup" "$vm_srv" "$label" "$work/logs/$label.log"
}
n=${#contenders[@]}
for rep in $(seq "$reps"); do
  rs=${sizes[$((rep % ${#sizes[@]}))]}
  for k in $(seq 0 $((n - 1))); do
    IFS=: read -r label _ mode flags <<< "${contenders[$(((k + rep) % n))]}"
    one "$label" "$mode" "$flags"
  done
  echo "repetition $rep of $reps done" >&2
done
stop_remote

echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); tree ${dirs[*]}; depth $depth;" \
  "$reps repetitions; contenders: ${contenders[*]}"
echo
echo "| pair | pass | repetitions | median of paired ratios | geometric mean (90%) | CPU per pass, geometric mean |"
echo "| --- | --- | ---: | ---: | ---: | ---: |"
for pair in $PAIRS; do
  for pass in cold warm; do
    # Per repetition: the contender's cold pass, or its median warm pass.
    awk -v a="${pair%/*}" -v b="${pair#*/}" -v want="$pass" '
      function val(s, k,   i, f) { for (i = 1; i <= NF; i++) { split($i, f, "="); if (f[1] == k) return f[2] } }
      {
        lab = val($0, "label"); p = val($0, "pass"); r = val($0, "rep")
        if ((want == "cold") != (p == "cold")) next
        if (lab != a && lab != b) next
        k = lab SUBSEP r; n[k]++; ops[k, n[k]] = val($0, "ops_per_s"); cpu[k, n[k]] = val($0, "cpu_vm_ms"); reps[r] = 1
      }
      function med(k, arr,   i, j, t, v, m) {
        m = n[k]; for (i = 1; i <= m; i++) v[i] = arr[k, i]
        for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
        return v[int((m + 1) / 2)]
      }
      END {
        m = 0
        for (r in reps) {
          ka = a SUBSEP r; kb = b SUBSEP r
          if (!(ka in n) || !(kb in n)) continue
          m++; x[m] = log(med(ka, ops) / med(kb, ops)); c[m] = log(med(ka, cpu) / med(kb, cpu))
        }
        if (m == 0) exit
        for (i = 1; i <= m; i++) { s += x[i]; cs += c[i]; y[i] = x[i] }
        for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (y[j] < y[i]) { t = y[i]; y[i] = y[j]; y[j] = t }
        mid = (m % 2) ? y[(m + 1) / 2] : (y[m / 2] + y[m / 2 + 1]) / 2
        srand(1)
        for (bi = 1; bi <= 2000; bi++) { t = 0; for (i = 1; i <= m; i++) t += x[int(rand() * m) + 1]; g[bi] = t / m }
        for (i = 1; i <= 2000; i++) for (j = i + 1; j <= 2000; j++) if (g[j] < g[i]) { t = g[i]; g[i] = g[j]; g[j] = t }
        printf "| %s / %s | %s | %d | %.3f | %.3f (%.3f-%.3f) | %.3f |\n", a, b, want, m, exp(mid), exp(s / m), exp(g[100]), exp(g[1900]), exp(cs / m)
      }' "$sums"
  done
done
