#!/usr/bin/env bash
# The whole test suite of chainfs, on a fresh Debian 12 machine:
# installs what is missing, builds twice (normal, and AddressSanitizer +
# UndefinedBehaviorSanitizer), runs the C unit tests and the pytest suites
# against real FUSE mounts in both builds; then a ThreadSanitizer build
# (clang) runs the unit tests and the concurrency tests of the daemon, and
# a libFuzzer build (clang) runs each fuzz target for FUZZ_SECONDS (30)
# over its seeds and kept regression inputs.  Exit 0 only if all pass.
set -uo pipefail
cd "$(dirname "$0")"
bash scripts/install-deps.sh || exit 1
modprobe fuse 2>/dev/null || true

fail=0
passed=0
failed=0

run_suite() { # build-dir label pytest-args...
  local dir=$1 label=$2; shift 2
  echo "=== $label: unit tests"
  if meson test -C "$dir" --suite unit --print-errorlogs --num-processes 2; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1)); fail=1
  fi
  echo "=== $label: pytest $*"
  if CHAINFS_BUILD_DIR="$PWD/$dir" /usr/bin/python3 -m pytest -p no:cacheprovider -q "$@" tests; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1)); fail=1
  fi
}

BUILD_DIR=build scripts/build.sh || { echo "build failed"; exit 1; }
BUILD_DIR=build-asan SANITIZE=1 scripts/build.sh || { echo "sanitizer build failed"; exit 1; }
BUILD_DIR=build-tsan TSAN=1 scripts/build.sh || { echo "thread sanitizer build failed"; exit 1; }
BUILD_DIR=build-fuzz FUZZ=1 scripts/build.sh || { echo "fuzz build failed"; exit 1; }

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
run_suite build "normal build"
# The sanitizer build runs everything but the long seeded stress tests.
run_suite build-asan "asan+ubsan build" -m "not slow"

# Once: build the .deb, install it, run the demo, mount(8) and fstab through
# the installed binaries, purge it (tests/test_install.py, marker install).
echo "=== Debian package: build, install, demo, mount -t fuse.chainfs, fstab, purge"
if CHAINFS_INSTALL_TESTS=1 CHAINFS_BUILD_DIR="$PWD/build" /usr/bin/python3 -m pytest -p no:cacheprovider -q -m install tests/test_install.py; then
  passed=$((passed + 1))
else
  failed=$((failed + 1)); fail=1
fi

# The tests that drive many requests and jobs at once: concurrent guest
# I/O (threads racing on clusters), active commit, stream and commit under
# a guest writer, snapshots racing jobs, two chains' jobs at once,
# shutdown with I/O in flight.  Each one is a real mount of the TSan
# chainfs; a report makes it exit 66 (halt_on_error), which fails the test.
tsan_tests=(
  tests/test_daemon_io.py::test_fio_randwrite_verify
  "tests/test_chain_write.py::test_randwrite_matches_model[threads]"
  "tests/test_chain_write.py::test_randwrite_matches_model[threads-striped]"
  "tests/test_merge_active.py::test_active_commit_pivot_under_guest[qcow2]"
  tests/test_merge_active.py::test_active_commit_cancel_in_ready_keeps_top
  tests/test_merge_active.py::test_active_commit_ready_with_guest_faster_than_bandwidth
  "tests/test_merge_active.py::test_stream_under_guest[True]"
  tests/test_daemon_control.py::test_live_snapshot_under_writer
  tests/test_daemon_control.py::test_snapshot_and_job_start_race
  tests/test_daemon_control.py::test_snapshot_refused_while_job_runs
  tests/test_daemon_control.py::test_jobs_through_control_file
  "tests/test_merge_commit.py::test_commit_intermediate_under_guest[qcow2]"
  tests/test_merge_commit.py::test_jobs_on_two_chains_in_parallel
  tests/test_merge_commit.py::test_commit_cancel_resumes_from_checkpoint
  tests/test_daemon_robust.py::test_sigterm_exits_clean
  tests/test_chainctl_online.py::test_commit_active_pivot
  tests/test_daemon_counters.py::test_concurrent_writers_leave_nothing_in_flight
  tests/test_dirty_repair.py::test_commit_into_dirty_base_repairs_it_first
)
# GLib's futex locks are invisible to TSan: preload pthread ones (see
# tests/tsan/glib-locks.c).  tests/tsan.supp names only GLib and libfuse.
# GSlice hands blocks between threads under its own futex lock too.
tsan_env=(LD_PRELOAD="$PWD/build-tsan/tests/tsan/libtsan-glib-locks.so" G_SLICE=always-malloc
          TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$PWD/tests/tsan.supp")
echo "=== thread sanitizer build: unit tests"
# TSan runs the unit tests 2-3x slower than the normal build.
if env "${tsan_env[@]}" meson test -C build-tsan --suite unit --print-errorlogs --num-processes 2 \
     --timeout-multiplier 3; then
  passed=$((passed + 1))
else
  failed=$((failed + 1)); fail=1
fi
echo "=== thread sanitizer build: concurrency tests"
if env "${tsan_env[@]}" CHAINFS_BUILD_DIR="$PWD/build-tsan" \
     /usr/bin/python3 -m pytest -p no:cacheprovider -q "${tsan_tests[@]}"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1)); fail=1
fi

# Each fuzz target over its seeds (tests/fuzz/seeds, and qcow2 images
# that make-seeds.sh makes) and, first, every kept regression input.
fuzz_seconds=${FUZZ_SECONDS:-30}
echo "=== fuzzing: $fuzz_seconds s per target"
if tests/fuzz/run-fuzz.sh build-fuzz "$fuzz_seconds"; then
  passed=$((passed + 1))
else
  failed=$((failed + 1)); fail=1
fi

echo "suites: $passed passed, $failed failed"
exit $fail
