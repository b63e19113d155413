#!/usr/bin/env bash
# run-fuzz.sh BUILD_DIR SECONDS [TARGET...]
#
# Run each libFuzzer target of BUILD_DIR (configured with -Dfuzzing=true,
# CC=clang; scripts/build.sh does it with FUZZ=1) for SECONDS, after
# replaying its regression inputs (tests/fuzz/regressions/TARGET/).  The
# corpus is the seeds (tests/fuzz/seeds/TARGET/, and for fuzz-qcow2 the
# images make-seeds.sh makes with qemu-img) plus what earlier runs found,
# kept in $FUZZ_WORK (default BUILD_DIR/fuzz-work).  One fuzzer process at
# a time.  A crash, leak, timeout or sanitizer report fails the run; its
# input is kept as $FUZZ_WORK/artifacts/TARGET-crash-* (or -leak-,
# -timeout-, -oom-), and the script prints how to replay it.  Prints one
# stats line per target: "fuzz TARGET: N runs in S s".
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$(cd "${1:?usage: run-fuzz.sh BUILD_DIR SECONDS [TARGET...]}" && pwd)
seconds=${2:?usage: run-fuzz.sh BUILD_DIR SECONDS [TARGET...]}
shift 2
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fuzz-qcow2 fuzz-control fuzz-words)
work=${FUZZ_WORK:-$build/fuzz-work}
mkdir -p "$work/artifacts"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

if [ ! -d "$work/seeds-qcow2" ]; then
  "$here/make-seeds.sh" "$work/seeds-qcow2.tmp" && mv "$work/seeds-qcow2.tmp" "$work/seeds-qcow2" ||
    { echo "run-fuzz: making the qcow2 seeds failed"; exit 1; }
fi

fail=0
for t in "${targets[@]}"; do
  exe=$build/tests/fuzz/$t
  short=${t#fuzz-}
  [ -x "$exe" ] || { echo "run-fuzz: $exe missing (configure with -Dfuzzing=true)"; fail=1; continue; }
  corpus=$work/corpus-$short
  mkdir -p "$corpus"
  dirs=("$corpus")
  [ -d "$here/seeds/$short" ] && dirs+=("$here/seeds/$short")
  [ "$short" = qcow2 ] && dirs+=("$work/seeds-qcow2")
  regressions=$here/regressions/$short
  opts=(-timeout=10 -rss_limit_mb=2048 -print_final_stats=1
        "-artifact_prefix=$work/artifacts/$t-")
  [ -f "$here/$short.dict" ] && opts+=("-dict=$here/$short.dict")
  # qcow2 inputs: room for a 64 KiB-cluster image with some data.
  [ "$short" = qcow2 ] && opts+=(-max_len=1048576)

  if [ -d "$regressions" ] && [ -n "$(ls -A "$regressions")" ]; then
    echo "=== $t: replaying $(ls "$regressions" | wc -l) regression inputs"
    if ! "$exe" "${opts[@]}" "$regressions"/* >"$work/$t-replay.log" 2>&1; then
      echo "run-fuzz: $t fails on a regression input:"; tail -40 "$work/$t-replay.log"
      fail=1; continue
    fi
  fi
  [ "$seconds" -gt 0 ] || continue
  echo "=== $t: fuzzing for $seconds s"
  log=$work/$t.log
  start=$(date +%s)
  nice "$exe" "${opts[@]}" -max_total_time="$seconds" "${dirs[@]}" >"$log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  echo "fuzz $t: ${runs:-?} runs in $(( $(date +%s) - start )) s"
  if [ $rc -ne 0 ]; then
    echo "run-fuzz: $t failed (exit $rc):"
    grep -E "ERROR|runtime error|SUMMARY|Test unit written|==[0-9]+==" "$log" | head -20
    tail -5 "$log"
    echo "replay: $exe $work/artifacts/$t-<file>"
    fail=1
  fi
done
exit $fail
