#!/bin/bash
# Run every chainfs benchmark side by side with qemu-img and
# qemu-storage-daemon, one after the other, and print their tables.
#
#   bench/run-all.sh [--quick]
#
# CHAINFS_BUILD_DIR (default: build-bench in the source tree) names the
# chainfs build; when it does not exist it is set up as a release build.
# A build that fails is reported and the chainfs columns read "n/a".
# --quick: shorter fio runs and smaller disks (well under 5 minutes).
# Benchmarks never fail on timing; the exit status is non-zero only when
# a benchmark could not run at all.
set -u

here=$(cd "$(dirname "$0")" && pwd)
src=$(dirname "$here")
export CHAINFS_BUILD_DIR=${CHAINFS_BUILD_DIR:-$src/build-bench}
quick=
for a in "$@"; do
    case $a in
    --quick) quick=--quick ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
    esac
done

child=
cleanup() {
    # Each benchmark cleans up its own mounts and scratch directory on
    # SIGTERM; forward it to the one running (our child, by PID).
    if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
        kill -TERM "$child" 2>/dev/null
        wait "$child" 2>/dev/null
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ ! -d "$CHAINFS_BUILD_DIR" ]; then
    meson setup "$CHAINFS_BUILD_DIR" "$src" --buildtype=release -Dwerror=false >/dev/null ||
        echo "bench: meson setup failed; chainfs columns will be n/a" >&2
fi
if [ -d "$CHAINFS_BUILD_DIR" ]; then
    ninja -C "$CHAINFS_BUILD_DIR" chainfs chainctl tests/chain-tool >/dev/null 2>&1 ||
        echo "bench: build of chainfs failed; the chainfs side may be missing or stale" >&2
fi

echo "chainfs benchmarks ${quick:+(quick) }$(date -u '+%Y-%m-%d %H:%M UTC')"
buildtype=$(meson introspect --buildoptions "$CHAINFS_BUILD_DIR" 2>/dev/null |
    /usr/bin/python3 -c 'import json, sys
print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "buildtype"))' 2>/dev/null)
echo "source $(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo '?') (work tree may differ)," \
     "build $CHAINFS_BUILD_DIR (${buildtype:-?})"
echo "$(nproc) CPUs, $(qemu-img --version | head -1), $(fio --version)"

status=0
for b in bench_read bench_fuse bench_commit bench_job_stall; do
    start=$SECONDS
    /usr/bin/python3 "$here/$b.py" $quick &
    child=$!
    wait "$child"
    rc=$?
    child=
    echo "  [$b: $((SECONDS - start)) s, exit $rc]"
    [ "$rc" -eq 0 ] || status=1
done
exit $status
