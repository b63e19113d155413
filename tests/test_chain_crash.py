"""Crash consistency of src/chain writes: SIGKILL during random writes.

chain-tool randwrite --flush-every K prints "acked N" once writes 1..N are
flushed.  The test kills it with SIGKILL at seeded random instants and then
checks, every time:
  - `qemu-img check` finds no corruption (leaked clusters are fine);
  - every acknowledged write reads back through qemu-img, and bytes no
    write in flight touched are exactly the model's (chain-tool crashcheck
    regenerates the model of writes 1..N from the seed; the writes
    N+1..N+K that may have started may or may not have landed, byte by
    byte, but nothing else may appear);
  - the library reads the crashed image exactly as qemu-img does, and can
    write on to it (the result again checked against a model).
"""
import os
import random
import select
import signal
import subprocess
import time

import pytest

from helpers import CHAIN_TOOL, qemu_img_check, qemu_img_compare
from test_chain_common import (MiB, assert_same_file, copy_image, create_qcow2, create_raw,
                               dir_hashes, fill, qemu_img, to_raw, tool)

SIZE = 16 * MiB
COUNT = 300
MAX_LEN = 70000
ZERO_PCT = 15


def _build(d, compat, snapshot=False):
    create_raw(d / "base.img", SIZE)
    fill(d / "base.img", ["write -P 0x11 0 %d" % (6 * MiB)], fmt="raw")
    create_qcow2(d / "mid.qcow2", backing="base.img", backing_fmt="raw", compat=compat)
    fill(d / "mid.qcow2", ["write -P 0x22 %d 2m" % (5 * MiB),
                           "write -c -P 0x23 %d 64k" % (9 * MiB)])
    create_qcow2(d / "top.qcow2", backing="mid.qcow2", compat=compat)
    fill(d / "top.qcow2", ["write -P 0x33 %d 1m" % (1 * MiB)])
    if snapshot:
        # Clusters shared with an internal snapshot (refcount 2) must be
        # copied on write; a crash must not free or corrupt them.
        fill(d / "top.qcow2", ["write -P 0x34 %d 4m" % (3 * MiB),
                               "write -c -P 0x35 %d 64k" % (12 * MiB)])
        qemu_img("snapshot", "-c", "s1", d / "top.qcow2")
    return "top.qcow2"


class _LineReader:
    """Lines of a pipe, read with a deadline (never blocks past it)."""

    def __init__(self, pipe):
        self.fd = pipe.fileno()
        self.buf = b""
        self.eof = False

    def lines(self, deadline):
        """Yield complete lines until EOF; raise when the deadline passes."""
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                yield line.decode()
            if self.eof:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("chain-tool produced no output in time")
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    self.eof = True
                self.buf += chunk


def _acked(lines, acked):
    for line in lines:
        if line.startswith("acked "):
            acked = max(acked, int(line.split()[1]))
    return acked


def _one_crash(d, workdir, top, pristine, init_raw, seed):
    rng = random.Random(seed)
    flush_every = rng.randint(1, 8)
    # Kill once this many writes were acknowledged (sometimes before any).
    target = rng.choice([0] + [rng.randint(1, COUNT - flush_every) for _ in range(5)])
    extra_us = rng.randint(0, 1500)
    top_path = str(d / top)
    copy_image(pristine, top_path)

    proc = subprocess.Popen(
        [CHAIN_TOOL, "randwrite", top_path, "--seed", str(seed), "--count", str(COUNT),
         "--max-len", str(MAX_LEN), "--zero-pct", str(ZERO_PCT),
         "--flush-every", str(flush_every)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    acked = 0
    try:
        reader = _LineReader(proc.stdout)
        deadline = time.monotonic() + 60
        if target > 0:
            for line in reader.lines(deadline):
                acked = _acked([line], acked)
                if acked >= target:
                    break
        # A seeded busy-wait of up to 1.5 ms moves the kill to a different
        # point of the write or flush in progress; nothing waits on it.
        t_end = time.perf_counter() + extra_us / 1e6
        while time.perf_counter() < t_end:
            pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        acked = _acked(reader.lines(time.monotonic() + 30), acked)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode in (0, -signal.SIGKILL), \
        "chain-tool failed before the kill (rc %s): %s" % (proc.returncode, stderr)
    killed = proc.returncode != 0
    if not killed:
        assert acked == COUNT, "finished without acknowledging every write"

    qemu_img_check(top_path)
    actual = os.path.join(str(workdir), "actual.raw")
    to_raw(top_path, actual)
    res = tool("crashcheck", actual, "--initial", init_raw, "--seed", seed,
               "--count", COUNT, "--acked", acked, "--flush-every", flush_every,
               "--max-len", MAX_LEN, "--zero-pct", ZERO_PCT, check=False)
    assert res.returncode == 0, "seed %d, K=%d, acked %d: %s%s" % (
        seed, flush_every, acked, res.stdout, res.stderr)

    # The library reads what it left exactly as qemu-img does...
    got = os.path.join(str(workdir), "got.raw")
    tool("read", top_path, got, "--seed", seed)
    assert_same_file(got, actual, "chain-tool read of the crashed image (seed %d)" % seed)
    # ...and writes on to it correctly.
    tool("randwrite", top_path, "--seed", seed + 1, "--count", 60, "--max-len", MAX_LEN,
         "--model", actual)
    qemu_img_check(top_path)
    qemu_img_compare(top_path, actual, fmt_b="raw")
    return acked, killed


def _crash_loop(d, workdir, compat, iterations, seed0, snapshot=False):
    top = _build(d, compat, snapshot)
    snap_raw = None
    if snapshot:
        snap_raw = os.path.join(str(workdir), "s1.raw")
        qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", d / top, snap_raw)
    pristine = os.path.join(str(workdir), "pristine.qcow2")
    copy_image(d / top, pristine)
    init_raw = os.path.join(str(workdir), "init.raw")
    to_raw(d / top, init_raw)
    lower = {k: v for k, v in dir_hashes(d).items() if k != top}
    seen = []
    for i in range(iterations):
        seen.append(_one_crash(d, workdir, top, pristine, init_raw, seed0 + i))
        if snap_raw:
            now = os.path.join(str(workdir), "s1-now.raw")
            qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", d / top, now)
            assert_same_file(now, snap_raw, "snapshot s1 after crash %d" % i)
    after = dir_hashes(d)
    for name, h in lower.items():
        assert after[name] == h, "lower layer %s changed" % name
    # The kills must have landed at different points, mostly mid-run (not
    # all before the first ack, nor after the last write).
    acks = [a for a, _k in seen]
    assert len(set(acks)) > 1, seen
    assert sum(1 for a, k in seen if k and 0 < a < COUNT) >= iterations // 2, seen


VARIANTS = {
    # name: (compat, internal snapshot in the top, kills in the normal run)
    "v3": ("1.1", False, 3),
    "v2": ("0.10", False, 3),
    "v3-snapshot": ("1.1", True, 2),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_crash_during_writes(variant, image_dir, tmp_path):
    compat, snapshot, kills = VARIANTS[variant]
    _crash_loop(image_dir, tmp_path, compat, kills, 1000 + 1000 * sorted(VARIANTS).index(variant),
                snapshot=snapshot)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_crash_during_writes_many(variant, image_dir, tmp_path):
    compat, snapshot, _kills = VARIANTS[variant]
    _crash_loop(image_dir, tmp_path, compat, 30, 5000 + 1000 * sorted(VARIANTS).index(variant),
                snapshot=snapshot)
