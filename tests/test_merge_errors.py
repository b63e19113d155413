"""on-error policies and the up-front space check, on a small full tmpfs."""
import contextlib
import errno
import os
import random
import time
import subprocess

import pytest

from helpers import (MiB, create_qcow2, job_info, mounted, qemu_img_check,
                     qemu_img_compare, qemu_io, to_raw, wait_for)
from test_merge_common import command, dir_hashes, layer_files, start, wait_state

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for tmpfs")


@contextlib.contextmanager
def tmpfs(path, size):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d" % size, "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path):
    """Fill the filesystem of path; return the filler file."""
    filler = os.path.join(str(path), "filler")
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\xaa" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def fill_while_paused(exp, fs):
    """Once the copy has started, pause the job, fill the filesystem and
    resume: the job's next write meets the full disk, however slow the
    machine (filling while it runs could let a loaded machine finish the
    copy first)."""
    wait_for(lambda: job_info(exp)["offset"] > 0, what="the copy to start")
    start(exp, "job.pause")
    info = wait_state(exp, ("paused", "completed"), timeout=30)
    assert info["state"] == "paused" and info["offset"] < info["len"], info
    filler = fill(fs)
    start(exp, "job.resume")
    return filler


def build(d):
    create_qcow2(d / "base.qcow2", 32 * MiB)
    create_qcow2(d / "snap1.qcow2", backing="base.qcow2")
    create_qcow2(d / "vm1.qcow2", backing="snap1.qcow2")
    qemu_io(d / "snap1.qcow2", "write -P 5 0 12M")
    qemu_io(d / "vm1.qcow2", "write -P 6 1M 1M")


@contextlib.contextmanager
def small_disk(tmp_path, flat=True):
    """A 48 MiB tmpfs holding build()'s chain: (its path, the image
    directory, the chain as raw outside it, or None)."""
    with tmpfs(tmp_path / "fs", 48 * MiB) as fs:
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
            start(exp, "commit", "top=snap1.qcow2 bandwidth=4M on-error=stop")
            filler = fill_while_paused(exp, fs)
            info = wait_for(lambda: job_info(exp)["error"] and job_info(exp),
                            what="the job to hit the full disk")
            assert info["state"] == "paused", info
            assert "No space left" in info["error"], info
            os.unlink(filler)
            start(exp, "job.resume")
            info = wait_state(exp, ("completed", "failed"), timeout=60)
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
            start(exp, "commit", "top=snap1.qcow2 bandwidth=4M")
            filler = fill_while_paused(exp, fs)
            info = wait_state(exp, ("failed", "completed"), timeout=60)
            assert info["state"] == "failed", info
            assert "No space left" in info["error"], info
            assert layer_files(exp) == ["vm1.qcow2", "snap1.qcow2", "base.qcow2"]
            os.unlink(filler)
            with open(exp, "rb") as f, open(flat, "rb") as g:
                assert f.read() == g.read()
        qemu_img_compare(d / "vm1.qcow2", flat, fmt_b="raw")


def test_commit_refused_up_front_without_room(tmp_path):
    with tmpfs(tmp_path / "fs", 40 * MiB) as fs:
        d = fs / "images"
        d.mkdir()
        build(d)
        filler = os.path.join(str(fs), "filler")
        # Leave less room than the 12 MiB the commit needs.
        st = os.statvfs(str(fs))
        with open(filler, "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - 4 * MiB))
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


@pytest.mark.parametrize("seed", range(8))
def test_disk_fills_at_a_random_moment_of_a_commit(tmp_path, seed):
    """The filesystem of base fills at a seeded moment of a commit, under a
    seeded on-error policy, while the guest writes: the daemon survives,
    nothing acknowledged is lost, and once room comes back the job ends
    with the chain correct (an ignored error is retried, never skipped)."""
    rng = random.Random(seed)
    policy = rng.choice(["report", "stop", "ignore"])
    with small_disk(tmp_path, flat=False) as (fs, d, _):
        with mounted_vm1(d, tmp_path) as exp:
            with open(exp, "rb") as f:
                model = bytearray(f.read())
            start(exp, "commit", "top=snap1.qcow2 bandwidth=%dM on-error=%s"
                  % (rng.choice([4, 8, 16]), policy))
            time.sleep(rng.uniform(0, 1.5))
            filler = fill(fs)
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
            time.sleep(rng.uniform(0, 1.5))
            os.unlink(filler)
            info = job_info(exp)
            if info.get("state") == "paused":
                start(exp, "job.resume")
            info = wait_state(exp, ("completed", "failed", "cancelled"), timeout=60)
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
    as QEMU's does, and then ends failed with the backing chain kept."""
    with small_disk(tmp_path) as (fs, d, flat):
        with mounted_vm1(d, tmp_path) as exp:
            filler = fill(fs)
            start(exp, "stream", "on-error=ignore")
            info = wait_state(exp, ("failed", "completed"), timeout=60)
            assert info["state"] == "failed", info
            assert "skipped" in info["error"] and "No space left" in info["error"], info
            assert layer_files(exp) == ["vm1.qcow2", "snap1.qcow2", "base.qcow2"]
            os.unlink(filler)
            with open(exp, "rb") as f, open(flat, "rb") as g:
                assert f.read() == g.read()
        qemu_img_check(d / "vm1.qcow2")
        qemu_img_compare(d / "vm1.qcow2", flat, fmt_b="raw")
