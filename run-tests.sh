#!/usr/bin/env bash
# The whole test suite of chainfs, on a fresh Debian 12 machine:
# installs what is missing, builds twice (normal, and AddressSanitizer +
# UndefinedBehaviorSanitizer), runs the C unit tests and the pytest suites
# against real FUSE mounts in both builds.  Exit 0 only if all pass.
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

echo "suites: $passed passed, $failed failed"
exit $fail
