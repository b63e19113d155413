#!/usr/bin/env bash
# Configure (once) and build chainfs into BUILD_DIR (default: build).
# BUILD_DIR=build-asan SANITIZE=1 builds with AddressSanitizer + UBSan.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${BUILD_DIR:-build}
if [ ! -f "$dir/build.ninja" ]; then
  if [ "${SANITIZE:-0}" = 1 ]; then
    meson setup "$dir" -Db_sanitize=address,undefined -Db_lundef=false >/dev/null
  else
    meson setup "$dir" >/dev/null
  fi
fi
ninja -C "$dir" >/dev/null
