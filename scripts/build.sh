#!/usr/bin/env bash
# Configure (once) and build chainfs into BUILD_DIR (default: build).
# BUILD_DIR=build-asan SANITIZE=1 builds with AddressSanitizer + UBSan.
# BUILD_DIR=build-tsan TSAN=1 builds with ThreadSanitizer (clang).
# BUILD_DIR=build-fuzz FUZZ=1 builds the libFuzzer targets (clang,
#   -Dfuzzing=true: every library with coverage, ASan and UBSan).
# Every build here is a test build: crash points on (-Dcrash_points=true).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${BUILD_DIR:-build}
if [ ! -f "$dir/build.ninja" ]; then
  if [ "${SANITIZE:-0}" = 1 ]; then
    meson setup "$dir" -Dcrash_points=true -Db_sanitize=address,undefined -Db_lundef=false >/dev/null
  elif [ "${TSAN:-0}" = 1 ]; then
    # clang, as for the fuzz build.  It calls a g_autoptr(GMutexLocker)
    # scoped lock an unused variable; the gcc builds keep that warning.
    CC=${CC:-clang} meson setup "$dir" -Dcrash_points=true -Db_sanitize=thread -Db_lundef=false \
      -Dc_args=-Wno-unused-variable >/dev/null
  elif [ "${FUZZ:-0}" = 1 ]; then
    CC=${CC:-clang} meson setup "$dir" -Dcrash_points=true -Dfuzzing=true -Db_lundef=false >/dev/null
  else
    meson setup "$dir" -Dcrash_points=true >/dev/null
  fi
elif ! meson configure "$dir" 2>/dev/null | grep -qE '^ *crash_points +true'; then
  # A build directory configured before the option existed.
  meson configure "$dir" -Dcrash_points=true >/dev/null
fi
if [ "${FUZZ:-0}" = 1 ]; then
  # Only the fuzz targets: the rest of that build is the ASan build again.
  ninja -C "$dir" tests/fuzz/fuzz-qcow2 tests/fuzz/fuzz-control tests/fuzz/fuzz-words >/dev/null
else
  ninja -C "$dir" >/dev/null
fi
