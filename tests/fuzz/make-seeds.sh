#!/usr/bin/env bash
# make-seeds.sh OUTDIR: the seed corpus of fuzz-qcow2, made by qemu-img and
# qemu-io at run time (no binaries in git).  Small images of every feature
# chainfs reads or must refuse: qcow2 v2 and v3, cluster sizes 512 B to
# 2 MiB, a backing file (base.raw, which fuzz-qcow2 provides), compressed
# clusters, internal snapshots, zero clusters, persistent bitmaps, lazy
# refcounts, refcount widths, extended L2, the dirty bit, and raw.
set -euo pipefail
out=$1
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

qemu-img create -q -f raw base.raw 1M
qemu-io -f raw -c "write -P 0x42 0 1M" base.raw >/dev/null

# seed NAME QEMU-IMG-CREATE-OPTIONS [QEMU-IO COMMANDS...]
seed() {
  local name=$1 opts=$2; shift 2
  # shellcheck disable=SC2086
  qemu-img create -q -f qcow2 $opts "$name.qcow2" 1M
  for c in "$@"; do
    qemu-io -f qcow2 -c "$c" "$name.qcow2" >/dev/null
  done
}

seed v2-512 "-o compat=0.10,cluster_size=512" "write -P 0x11 0 4k" "write -P 0x12 600k 1k"
seed v3-512 "-o cluster_size=512" "write -P 0x21 0 3k" "write -z 64k 4k"
seed v3-4k-backing "-o cluster_size=4k -b base.raw -F raw" "write -P 0x31 2k 6k"
# A backing file that fuzz-qcow2 does not provide: refused (ENOENT).
seed v3-4k-backing-missing "-o cluster_size=4k -b v3-512.qcow2 -F qcow2" "write -P 0x32 0 4k"
seed v3-64k-zero "-o cluster_size=64k" "write -P 0x41 0 64k" "write -z 128k 128k" \
     "write -P 0x42 300k 10k"
seed v3-1k-refcount1 "-o cluster_size=1k,refcount_bits=1" "write -P 0x51 0 8k"
seed v3-1k-refcount64 "-o cluster_size=1k,refcount_bits=64" "write -P 0x52 0 8k"
seed v3-2k-lazy "-o cluster_size=2k,lazy_refcounts=on" "write -P 0x61 0 8k"
seed v3-extl2 "-o cluster_size=16k,extended_l2=on" "write -P 0x71 0 4k"
seed v3-2m "-o cluster_size=2M" "write -P 0x81 0 8k"

# Compressed clusters: convert -c from a raw file with a pattern.
qemu-img create -q -f raw plain.raw 1M
qemu-io -f raw -c "write -P 0x91 0 256k" -c "write -P 0x92 512k 64k" plain.raw >/dev/null
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4k plain.raw v3-4k-compressed.qcow2
qemu-img convert -q -c -f raw -O qcow2 -o compat=0.10,cluster_size=1k plain.raw v2-1k-compressed.qcow2
if qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4k,compression_type=zstd \
     plain.raw v3-4k-zstd.qcow2 2>/dev/null; then :; fi

# Internal snapshots.
seed v3-1k-snapshot "-o cluster_size=1k" "write -P 0xa1 0 4k"
qemu-img snapshot -c snap1 v3-1k-snapshot.qcow2
qemu-io -f qcow2 -c "write -P 0xa2 0 2k" v3-1k-snapshot.qcow2 >/dev/null
seed v2-512-snapshot "-o compat=0.10,cluster_size=512" "write -P 0xa3 0 2k"
qemu-img snapshot -c s1 v2-512-snapshot.qcow2

# Persistent bitmaps.
seed v3-4k-bitmap "-o cluster_size=4k" "write -P 0xb1 0 8k"
qemu-img bitmap --add v3-4k-bitmap.qcow2 bm0
qemu-img bitmap --add -g 64k v3-4k-bitmap.qcow2 bm1
qemu-io -f qcow2 -c "write -P 0xb2 64k 8k" v3-4k-bitmap.qcow2 >/dev/null

# The dirty bit (incompatible bit 0 at byte 79) on a lazy-refcount image.
cp v3-2k-lazy.qcow2 v3-2k-dirty.qcow2
printf '\x01' | dd of=v3-2k-dirty.qcow2 bs=1 seek=79 conv=notrunc status=none

# A raw image (probed as raw).
head -c 16k plain.raw > raw-16k.raw

rm -f base.raw plain.raw
mv ./* "$out"/
