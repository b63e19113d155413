"""on-error policies and the up-front space check, on a real full disk.

Each test makes an ext4 filesystem of exact size on a loop device
(helpers.loop_ext4) holding the image directory.  The disk is filled to a
computed room while the job is paused part way (so that the up-front space
check passed, and exactly the rest of the copy runs out), and each test
asserts that ENOSPC happened in the phase it tests: the job's error names
it and the job's offset is past 0 and short of its length.  Nothing waits
for a fixed time: the job's bandwidth keeps the copy far from its end
until it is paused, and the remaining copy is checked to exceed the room
left before the disk is filled.
"""
import contextlib
import errno
import os
import random
from pathlib import Path

import pytest

from helpers import (job_stopped_on_error, MiB, create_qcow2, fill_fs_leaving, fs_free_bytes, job_info,
                     loop_ext4, mounted, qemu_img_check, qemu_img_compare, qemu_io,
                     to_raw, wait_for)
from test_merge_common import command, dir_hashes, layer_files, start, wait_state

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a loop mount")

DATA = 48 * MiB          # what the commit copies (snap1's data)
FS_SIZE = 160 * MiB      # the chain, the copy, and ext4's own blocks
ROOM = 1 * MiB           # left free once the copy is part way
# Copied by windows already in flight when the job pauses (3 workers of
# 1 MiB), plus the metadata the copy writes: the rest of the copy must
# exceed ROOM by more than this for the disk to fill during it.
IN_FLIGHT = 4 * MiB


def fill(path):
    """Fill the filesystem of path to the last block; return the filler."""
    filler = os.path.join(str(path), "filler")
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\xaa" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def allocated(path):
    return os.stat(str(path)).st_blocks * 512


def fill_while_paused(exp, fs, base, room=ROOM):
    """Once the copy has started, pause the job, check that more than room
    is left to copy, fill the filesystem to leave room, lift the speed
    limit and resume: the rest of the copy meets the full disk, however
    slow the machine."""
    wait_for(lambda: job_info(exp)["offset"] > 0, timeout=60, what="the copy to start")
    start(exp, "job.pause")
    info = wait_state(exp, ("paused", "completed"), timeout=30)
    assert info["state"] == "paused" and 0 < info["offset"] < info["len"], info
    left = DATA - allocated(base)
    assert left > room + IN_FLIGHT, (
        "the copy ran too far before it paused (%d bytes left): nothing "
        "would fill the disk" % left)
    filler = fill_fs_leaving(fs, room)
    start(exp, "job.speed", "0")
    start(exp, "job.resume")
    return filler


def assert_enospc_mid_copy(info):
    """The job met ENOSPC during the copy, not before it nor after."""
    assert info["error"] and "No space left" in info["error"], info
    assert 0 < info["offset"] < info["len"], info


def build(d):
    create_qcow2(d / "base.qcow2", 64 * MiB)
    create_qcow2(d / "snap1.qcow2", backing="base.qcow2")
    create_qcow2(d / "vm1.qcow2", backing="snap1.qcow2")
    qemu_io(d / "snap1.qcow2", "write -P 5 0 %d" % DATA)
    qemu_io(d / "vm1.qcow2", "write -P 6 1M 1M")


@contextlib.contextmanager
def small_disk(tmp_path, flat=True, size=FS_SIZE):
    """An ext4 of `size` bytes holding build()'s chain: (its path, the
    image directory, the chain as raw outside it, or None)."""
    with loop_ext4(tmp_path / "fs", size) as fs:
        fs = Path(fs)
        d = fs / "images"
        d.mkdir()
        build(d)
        yield fs, d, to_raw(d / "vm1.qcow2", tmp_path / "flat.raw") if flat else None


@contextlib.contextmanager
def mounted_vm1(d, tmp_path):
    """The export vm1 of d, mounted; the full disk may be logged."""
    with mounted(d, tmp_path / "mnt") as m:
        m.allowed_log.append("No space left")
        yield m.path("vm1")


def test_on_error_stop_pauses_then_resumes(tmp_path):
    with small_disk(tmp_path) as (fs, d, flat):
        with mounted_vm1(d, tmp_path) as exp:
            start(exp, "commit", "top=snap1.qcow2 bandwidth=2M on-error=stop")
            filler = fill_while_paused(exp, fs, d / "base.qcow2")
            info = wait_for(lambda: job_stopped_on_error(exp),
                            timeout=60, what="the job to hit the full disk")
            assert info["state"] == "paused", info
            assert_enospc_mid_copy(info)
            os.unlink(filler)
            start(exp, "job.resume")
            info = wait_state(exp, ("completed", "failed"), timeout=120)
            assert info["state"] == "completed", info
            assert info["error"] is None
            assert layer_files(exp) == ["vm1.qcow2", "base.qcow2"]
            with open(exp, "rb") as f, open(flat, "rb") as g:
                assert f.read() == g.read()
        qemu_img_check(d / "base.qcow2")
        qemu_img_compare(d / "vm1.qcow2", flat, fmt_b="raw")


def test_on_error_report_fails_and_keeps_chain(tmp_path):
    with small_disk(tmp_path) as (fs, d, flat):
        with mounted_vm1(d, tmp_path) as exp:
            start(exp, "commit", "top=snap1.qcow2 bandwidth=2M")
            filler = fill_while_paused(exp, fs, d / "base.qcow2")
            info = wait_state(exp, ("failed", "completed"), timeout=120)
            assert info["state"] == "failed", info
            assert_enospc_mid_copy(info)
            assert layer_files(exp) == ["vm1.qcow2", "snap1.qcow2", "base.qcow2"]
            os.unlink(filler)
            with open(exp, "rb") as f, open(flat, "rb") as g:
                assert f.read() == g.read()
        qemu_img_check(d / "base.qcow2")
        qemu_img_compare(d / "vm1.qcow2", flat, fmt_b="raw")


def test_commit_refused_up_front_without_room(tmp_path):
    with small_disk(tmp_path, flat=False) as (fs, d, _):
        # Leave less room than the DATA bytes the commit needs.
        filler = fill_fs_leaving(fs, DATA - 4 * MiB)
        before = dir_hashes(d)
        mnt = tmp_path / "mnt"
        with mounted(d, mnt) as m:
            exp = m.path("vm1")
            err, msg = command(exp, "commit", "top=snap1.qcow2")
            assert err == errno.ENOSPC, msg
            assert "base.qcow2" in msg and "free" in msg, msg
            assert job_info(exp) == {}
        after = dir_hashes(d)
        assert before == after
        os.unlink(filler)


@pytest.mark.parametrize("seed", range(8))
def test_disk_fills_at_a_seeded_point_of_a_commit(tmp_path, seed):
    """The filesystem of base fills at a seeded offset of a commit (the job
    paused there), leaving a seeded room, under a seeded on-error policy,
    while the guest writes: the daemon survives, the job meets ENOSPC
    during the copy, nothing acknowledged is lost, and once room comes
    back the job ends with the chain correct (an ignored error is
    retried, never skipped)."""
    rng = random.Random(seed)
    policy = rng.choice(["report", "stop", "ignore"])
    at = rng.randrange(1, 8) * MiB
    room = rng.randrange(0, 2 * MiB, 4096)
    with small_disk(tmp_path, flat=False) as (fs, d, _):
        with mounted(d, tmp_path / "mnt") as m:
            m.allowed_log.append("No space left")
            exp = m.path("vm1")
            with open(exp, "rb") as f:
                model = bytearray(f.read())
            start(exp, "commit", "top=snap1.qcow2 bandwidth=2M on-error=%s" % policy)
            wait_for(lambda: job_info(exp)["offset"] >= at, timeout=120,
                     what="the copy to reach %d" % at)
            filler = fill_while_paused(exp, fs, d / "base.qcow2", room)
            # The guest overwrites clusters it owns already: no new room.
            fd = os.open(exp, os.O_RDWR)
            try:
                for _ in range(20):
                    off = rng.randrange(1 * MiB, 2 * MiB - 4096, 512)
                    data = rng.randbytes(4096)
                    assert os.pwrite(fd, data, off) == len(data)
                    model[off:off + len(data)] = data
                os.fsync(fd)
            finally:
                os.close(fd)
            if policy == "ignore":
                # Nothing in the job's status: the daemon logs each retry.
                wait_for(lambda: "ignoring error" in m.read_log() and
                         "No space left" in m.read_log(), timeout=60,
                         what="the job to hit the full disk")
                info = job_info(exp)
                assert info["state"] == "running" and info["offset"] < info["len"], info
            else:
                info = wait_for(lambda: job_stopped_on_error(exp),
                                timeout=60, what="the job to hit the full disk")
                assert_enospc_mid_copy(info)
                assert info["state"] == ("failed" if policy == "report" else "paused"), info
            os.unlink(filler)
            if policy == "stop":
                start(exp, "job.resume")
            info = wait_state(exp, ("completed", "failed", "cancelled"), timeout=120)
            if policy != "report":
                assert info["state"] == "completed", info
            if info["state"] == "completed":
                assert layer_files(exp) == ["vm1.qcow2", "base.qcow2"]
            else:
                assert layer_files(exp) == ["vm1.qcow2", "snap1.qcow2", "base.qcow2"]
            with open(exp, "rb") as f:
                assert f.read() == bytes(model)
        for img in ("vm1.qcow2", "base.qcow2"):
            qemu_img_check(d / img)
        flat = tmp_path / "flat.raw"
        flat.write_bytes(bytes(model))
        qemu_img_compare(d / "vm1.qcow2", flat, fmt_b="raw")


def test_stream_ignoring_errors_keeps_the_layers(tmp_path):
    """on-error=ignore lets a stream go on past a range it could not copy,
    as QEMU's does, and then ends failed with the backing chain kept.  The
    disk is full before the stream starts: every range it copies fails."""
    with small_disk(tmp_path) as (fs, d, flat):
        with mounted_vm1(d, tmp_path) as exp:
            filler = fill(fs)
            assert fs_free_bytes(fs) < 1 * MiB
            start(exp, "stream", "on-error=ignore")
            info = wait_state(exp, ("failed", "completed"), timeout=120)
            assert info["state"] == "failed", info
            assert "skipped" in info["error"] and "No space left" in info["error"], info
            assert layer_files(exp) == ["vm1.qcow2", "snap1.qcow2", "base.qcow2"]
            os.unlink(filler)
            with open(exp, "rb") as f, open(flat, "rb") as g:
                assert f.read() == g.read()
        qemu_img_check(d / "vm1.qcow2")
        qemu_img_compare(d / "vm1.qcow2", flat, fmt_b="raw")
