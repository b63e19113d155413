"""Shared pieces of the chain library's end-to-end suites (test_chain_*.py).

These suites drive src/chain directly through tests/chain-tool (no FUSE):
every byte it reads must equal `qemu-img convert -O raw`, every write it
makes must pass `qemu-img check` and `qemu-img compare` against a model.
This module holds no tests of its own.
"""
import os
import shutil
import struct

from helpers import (CHAIN_TOOL, KiB, MiB, create_qcow2, create_raw, file_sha256,
                     qemu_img, qemu_io, run, to_raw)

QCOW2_MAGIC = 0x514649FB

# qcow2 header offsets (docs/interop/qcow2.txt), all big-endian.
HDR_MAGIC = 0
HDR_VERSION = 4
HDR_CLUSTER_BITS = 20
HDR_CRYPT_METHOD = 32
HDR_INCOMPAT = 72
HDR_COMPAT = 80
HDR_AUTOCLEAR = 88

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1


def tool(*args, check=True, timeout=300):
    """Run chain-tool with args; return the CompletedProcess."""
    return run([CHAIN_TOOL] + [str(a) for a in args], check=check, timeout=timeout)


def dir_hashes(d):
    """sha256 of every regular file under d (to prove nothing was written)."""
    out = {}
    for root, _dirs, files in os.walk(str(d)):
        for f in files:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                out[os.path.relpath(p, str(d))] = file_sha256(p)
    return out


def first_difference(a, b):
    """Offset of the first byte where files a and b differ (None if equal)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x = fa.read(1 * MiB)
            y = fb.read(1 * MiB)
            if x != y:
                n = min(len(x), len(y))
                for i in range(n):
                    if x[i] != y[i]:
                        return off + i
                return off + n
            if not x:
                return None
            off += len(x)


def assert_same_file(got, expected, what):
    diff = first_difference(got, expected)
    if diff is not None:
        with open(got, "rb") as fg, open(expected, "rb") as fe:
            fg.seek(diff)
            fe.seek(diff)
            g = fg.read(16).hex()
            e = fe.read(16).hex()
        raise AssertionError("%s: first difference at byte %d (0x%x): got %s expected %s "
                             "(sizes %d / %d)" % (what, diff, diff, g, e, os.path.getsize(got),
                                                  os.path.getsize(expected)))


def assert_reads_like_qemu(image, workdir, seed=1):
    """chain-tool read of image's chain == qemu-img convert -O raw, byte for byte."""
    exp = os.path.join(str(workdir), "expected.raw")
    got = os.path.join(str(workdir), "got.raw")
    to_raw(image, exp)
    tool("read", image, got, "--seed", seed)
    assert_same_file(got, exp, "chain-tool read %s vs qemu-img convert" % image)
    return exp


def qcow2_patch(path, offset, fmt, value):
    """Overwrite one big-endian header field of a qcow2 file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">" + fmt, value))


def qcow2_field(path, offset, fmt):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">" + fmt, f.read(struct.calcsize(fmt)))[0]


def status_runs(image):
    """chain-tool status: list of (offset, length, 'data'|'hole')."""
    runs = []
    for line in tool("status", image).stdout.splitlines():
        off, length, kind = line.split()
        runs.append((int(off), int(length), kind))
    return runs


def kind_at(runs, pos):
    """Kind of the run covering pos (runs sorted and tiling the disk)."""
    import bisect
    i = bisect.bisect_right(runs, (pos, float("inf"), "")) - 1
    if i >= 0:
        off, length, kind = runs[i]
        if off <= pos < off + length:
            return kind
    raise AssertionError("no run covers %d" % pos)


def check_status(image, expected_raw, against_map=True):
    """chain-tool status of image: runs tile the disk, every hole reads as
    zeros in expected_raw, and (against_map: a chain of qcow2 layers only)
    what `qemu-img map` calls data (not zero) is data and what it calls
    not data is a hole.  Returns the runs."""
    import json
    size = os.path.getsize(expected_raw)
    runs = status_runs(image)
    assert runs, "no runs"
    pos = 0
    for off, length, kind in runs:
        assert off == pos and length > 0, runs
        assert kind in ("data", "hole")
        pos += length
    assert pos == size, "runs end at %d, disk is %d" % (pos, size)
    with open(expected_raw, "rb") as f:
        for off, length, kind in runs:
            if kind == "hole":
                f.seek(off)
                left = length
                while left:
                    chunk = f.read(min(left, 1 * MiB))
                    assert chunk.count(0) == len(chunk), \
                        "hole run at %d+%d holds data" % (off, length)
                    left -= len(chunk)
    if against_map:
        m = json.loads(qemu_img("map", "-U", "--output=json", image).stdout)
        for ent in m:
            probes = {ent["start"], ent["start"] + ent["length"] - 1,
                      ent["start"] + ent["length"] // 2}
            for p in probes:
                kind = kind_at(runs, p)
                if ent["data"] and not ent["zero"]:
                    assert kind == "data", (p, ent)
                elif not ent["data"]:
                    assert kind == "hole", (p, ent)
    return runs


def fill(image, cmds, fmt=None):
    """qemu-io writes (strings) on image; no-op for an empty list."""
    if cmds:
        qemu_io(image, *cmds, fmt=fmt)


def copy_image(src, dst):
    shutil.copyfile(str(src), str(dst))


__all__ = [n for n in dir() if not n.startswith("_")] + [
    "KiB", "MiB", "create_qcow2", "create_raw", "qemu_img", "qemu_io", "to_raw"]
