#!/usr/bin/env bash
# Coverage-guided fuzzing of the targets in src/fuzz.rs (a FUSE session, raw
# virtqueue memory, directories and directory graphs, path infos, NARs,
# path-info JSON) with libFuzzer, on stable Rust: fuzz/ is built with
# sanitizer-coverage instrumentation passed as plain rustc flags (what
# cargo-fuzz passes, minus the nightly-only sanitizers).
#
# Each target starts from the seeds of tvix_virtiofsd::fuzz::seeds() and
# the inputs kept in fuzz/regressions/TARGET/, runs for SECS seconds, and
# any input that crashed, hung (> 10 s) or blew the memory limit (2 GiB) is
# copied into fuzz/regressions/TARGET/, which `cargo test` replays
# (tests/fuzz_regressions.rs). The table gives executions, speed, the
# coverage libFuzzer reached (edges, features) and the corpus size.
#
# Usage: bench/fuzz.sh [TARGET...]   (default: every target)
# Environment:
#   SECS   seconds per target (300)
#   WORK   corpus, build and logs (/var/tmp/tvix-virtiofsd-fuzz; the corpus
#          carries over between runs)
set -euo pipefail
shopt -s inherit_errexit nullglob
cd "$(dirname "$0")/.."
repo=$PWD
secs=${SECS:-300}
work=${WORK:-/var/tmp/tvix-virtiofsd-fuzz}
mkdir -p "$work"
command -v cargo >/dev/null || . "$HOME/.cargo/env"

commit="$(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
# An explicit --target keeps the flags off build scripts and proc macros.
triple=$(rustc -vV | awk '/^host:/ { print $2 }')
echo "building the instrumented harness..." >&2
RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
  -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
  -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares \
  -Cdebug-assertions -Coverflow-checks" \
  cargo build --release --manifest-path fuzz/Cargo.toml --target-dir "$work/target" \
  --target "$triple" >&2
bin=$work/target/$triple/release/tvix-virtiofsd-fuzz

echo "writing the seeds..." >&2
rm -rf "$work/seeds"
FUZZ_SEEDS_DIR=$work/seeds cargo test --release --test fuzz_regressions write_seeds \
  -- --ignored --exact >&2

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for d in "$work"/seeds/*/; do targets+=("$(basename "$d")"); done
fi

rows=()
found=0
for t in "${targets[@]}"; do
  [ -d "$work/seeds/$t" ] || { echo "no such target: $t" >&2; exit 2; }
  corpus=$work/corpus/$t
  arts=$work/artifacts/$t
  kept=$repo/fuzz/regressions/$t
  mkdir -p "$corpus" "$arts" "$kept"
  log=$work/$t.log
  echo "fuzzing $t for ${secs}s (log: $log)" >&2
  set +e
  FUZZ_TARGET=$t "$bin" "$corpus" "$work/seeds/$t" "$kept" \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -artifact_prefix="$arts/" -print_final_stats=1 > "$log" 2>&1
  rc=$?
  set -e
  stat() { awk -v k="stat::$1:" '$1 == k { print $2 }' "$log" | tail -1; }
  execs=$(stat number_of_executed_units)
  speed=$(stat average_exec_per_sec)
  rss=$(stat peak_rss_mb)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 | awk '{print $2" / "$4}')
  n_corpus=$(find "$corpus" -type f | wc -l)
  crashes=0
  for a in "$arts"/*; do
    cp "$a" "$kept/$(basename "$a")"
    crashes=$((crashes + 1))
  done
  rm -f "$arts"/*
  if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
    echo "$t: libFuzzer exited $rc without an artifact; see $log" >&2
    crashes="exit $rc"
  fi
  [ "$crashes" = 0 ] || found=1
  rows+=("| $t | $secs | ${execs:-?} | ${speed:-?} | ${cov:-?} | $n_corpus | ${rss:-?} | $crashes |")
done

echo
echo "libFuzzer on $(nproc) CPUs, one job per target; built at commit $commit"
echo
echo "| target | seconds | executions | exec/s | coverage: edges / features | corpus | peak RSS MiB | found (kept in fuzz/regressions/) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
printf '%s\n' "${rows[@]}"
exit "$found"
