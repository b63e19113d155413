"""The daemon under the hard cases: killed during writes (every
fsync-acknowledged write survives, no corruption), SIGTERM (clean exit 0),
image locks against QEMU and a second chainfs, broken chains left out
with a logged line while the others mount."""
import os
import signal
import struct
import subprocess
import sys

import pytest

from helpers import (CHAINFS, KiB, MiB, create_qcow2, is_mounted, make_chain, mounted,
                     qemu_img, qemu_img_check, qemu_img_compare, qemu_io, run, wait_for)
from test_daemon_common import export_names, pattern, pread_all, pwrite_all

SIZE = 32 * MiB
BLOCK = 64 * KiB
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Writes block-sized patterns to distinct blocks in a seeded order, fsyncs
# every K writes and then prints "acked N": writes 1..N are durable.
WRITER = r"""
import os, random, sys
sys.path.insert(0, %(tests)r)
from test_daemon_common import pattern
path, seed, count, k, block, nblocks = sys.argv[1], *map(int, sys.argv[2:7])
order = list(range(nblocks))
random.Random(seed).shuffle(order)
fd = os.open(path, os.O_WRONLY)
for i in range(count):
    os.pwrite(fd, pattern(i, block), order[i] * block)
    if (i + 1) %% k == 0:
        os.fsync(fd)
        print("acked", i + 1, flush=True)
"""


def test_sigkill_during_writes(image_dir, mountpoint, tmp_path):
    make_chain(image_dir, depth=2, size=SIZE, base_fmt="raw", top_name="vm.qcow2", seed=21)
    nblocks = SIZE // BLOCK
    seed, count, k = 77, nblocks, 8
    m = mounted(image_dir, mountpoint).start()
    try:
        w = subprocess.Popen([sys.executable, "-c", WRITER % {"tests": TESTS_DIR},
                              m.path("vm"), str(seed), str(count), str(k), str(BLOCK),
                              str(nblocks)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        acked = 0
        try:
            # Kill once a good share is acknowledged, with writes in flight.
            for line in w.stdout:
                acked = int(line.split()[1])
                if acked >= 96:
                    break
            m.kill(signal.SIGKILL)
            rest, _ = w.communicate(timeout=60)
        finally:
            if w.poll() is None:
                w.kill()
                w.wait()
        for line in rest.splitlines():
            acked = max(acked, int(line.split()[1]))
        assert acked >= 96
    finally:
        m.stop()
    top = image_dir / "vm.qcow2"
    qemu_img_check(top)
    import random
    order = list(range(nblocks))
    random.Random(seed).shuffle(order)
    with mounted(image_dir, mountpoint) as m2:
        for i in range(acked):
            got = pread_all(m2.path("vm"), order[i] * BLOCK, BLOCK)
            assert got == pattern(i, BLOCK), "acknowledged write %d lost" % (i + 1)
    qemu_img_check(top)


def test_sigterm_exits_clean(image_dir, mountpoint, tmp_path):
    make_chain(image_dir, depth=2, size=SIZE, base_fmt="qcow2", top_name="vm.qcow2", seed=22)
    model = tmp_path / "model.raw"
    run(["qemu-img", "convert", "-O", "raw", str(image_dir / "vm.qcow2"), str(model)])
    with mounted(image_dir, mountpoint) as m:
        data = pattern(5, 3 * MiB + 1234)
        pwrite_all(m.path("vm"), 7 * MiB + 99, data)   # no fsync: shutdown flushes
        with open(str(model), "r+b") as f:
            f.seek(7 * MiB + 99)
            f.write(data)
        m.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: m.proc.poll() is not None, timeout=30, what="chainfs to exit")
        assert m.proc.returncode == 0, m.read_log()
        assert not is_mounted(m.mountpoint)
    qemu_img_check(image_dir / "vm.qcow2")
    qemu_img_compare(image_dir / "vm.qcow2", model, fmt_b="raw")


def test_images_locked_while_mounted(image_dir, mountpoint, tmp_path):
    make_chain(image_dir, depth=2, size=SIZE, base_fmt="qcow2", top_name="vm.qcow2", seed=23)
    with mounted(image_dir, mountpoint) as m:
        for img in ("vm.qcow2", "base.qcow2"):
            res = run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(image_dir / img)],
                      check=False)
            out = res.stdout + res.stderr
            assert res.returncode != 0 and 'Failed to get "write" lock' in out, out
        # reading with -U (share) still works
        qemu_img("info", "-U", str(image_dir / "vm.qcow2"))
        # a second chainfs leaves the locked chain out, with a message
        mnt2 = tmp_path / "mnt2"
        with mounted(image_dir, mnt2) as m2:
            m2.allowed_log = ["vm"]
            assert export_names(mnt2) == []
        assert "vm" in m2.read_log()
        assert export_names(m.mountpoint) == ["vm"]
        pwrite_all(m.path("vm"), 0, b"still writable" * 100, fsync=True)
    # unlocked once unmounted
    qemu_io(image_dir / "vm.qcow2", "write -P 7 0 4k", fmt="qcow2")


def test_broken_chains_left_out(image_dir, mountpoint, tmp_path):
    d = str(image_dir)
    create_qcow2(os.path.join(d, "good.qcow2"), 16 * MiB)
    qemu_io(os.path.join(d, "good.qcow2"), "write -P 3 0 1M")
    # missing backing file
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "nothere.qcow2", "-F", "qcow2",
             os.path.join(d, "missing.qcow2"), "16M")
    # a loop below a top: looptop -> loopb -> loopa -> loopb
    create_qcow2(os.path.join(d, "loopa.qcow2"), 16 * MiB)
    create_qcow2(os.path.join(d, "loopb.qcow2"), backing="loopa.qcow2")
    create_qcow2(os.path.join(d, "looptop.qcow2"), backing="loopb.qcow2")
    qemu_img("rebase", "-u", "-b", "loopb.qcow2", "-F", "qcow2", os.path.join(d, "loopa.qcow2"))
    # backing outside the image directory
    outside = tmp_path / "outside.qcow2"
    create_qcow2(outside, 16 * MiB)
    create_qcow2(os.path.join(d, "escape.qcow2"), backing=str(outside))
    # corrupt header: impossible cluster_bits
    corrupt = os.path.join(d, "corrupt.qcow2")
    create_qcow2(corrupt, 16 * MiB)
    with open(corrupt, "r+b") as f:
        f.seek(20)
        f.write(struct.pack(">I", 99))
    bad = ["missing.qcow2", "looptop.qcow2", "escape.qcow2", "corrupt.qcow2"]
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log = bad + ["loop", "nothere", "outside"]
        assert export_names(m.mountpoint) == ["good"]
        assert pread_all(m.path("good"), 0, MiB) == b"\x03" * MiB
    log = m.read_log()
    warn_lines = [line for line in log.splitlines() if "warning" in line.lower()]
    for name in bad:
        assert any(name in line for line in warn_lines), (name, log)
