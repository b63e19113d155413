"""SIGKILL of the daemon at random points of every job kind.

After each kill the next mount resumes the job by itself (shown in
user.chainfs.job); in the end the job finishes and the disk reads exactly
as before the job.  No guest writes here: test_merge_crash_guest.py kills
jobs while a guest writes and fsyncs, at random moments and at every
crash point (CHAINFS_CRASH_AT), and checks what survives.
"""
import os
import random

import pytest

from helpers import (MiB, create_qcow2, job_info, mounted, qemu_img_check,
                     qemu_img_compare, qemu_io, to_raw, wait_for)
from test_merge_common import layer_files, start, wait_state

SIZE = 32 * MiB
DATA = 16 * MiB
SPEED = 2 * MiB   # a job of ~12 MiB takes ~5 s: room for kills mid-job


def build(d, tmp_path):
    create_qcow2(d / "base.qcow2", SIZE)
    create_qcow2(d / "snap1.qcow2", backing="base.qcow2")
    create_qcow2(d / "snap2.qcow2", backing="snap1.qcow2")
    create_qcow2(d / "vm1.qcow2", backing="snap2.qcow2")
    qemu_io(d / "base.qcow2", "write -P 1 0 32M")
    qemu_io(d / "snap1.qcow2", "write -P 2 0 8M")
    qemu_io(d / "snap2.qcow2", "write -P 3 4M 8M")
    qemu_io(d / "vm1.qcow2", "write -P 4 2M 6M", "write -z 20M 1M")
    return to_raw(d / "vm1.qcow2", tmp_path / "flat.raw")


def run_with_kills(image_dir, mountpoint, tmp_path, kind, kills, seed):
    rng = random.Random(seed)
    flat = build(image_dir, tmp_path)
    words = {
        "commit": ("commit", "top=snap2.qcow2 bandwidth=%d" % SPEED),
        "active": ("commit", "active bandwidth=%d" % SPEED),
        "stream": ("stream", "bandwidth=%d" % SPEED),
    }[kind]
    done_states = ("ready",) if kind == "active" else ("completed",)
    started = False
    mid_job = 0
    for i in range(kills):
        m = mounted(image_dir, mountpoint).start()
        try:
            exp = m.path("vm1")
            if not started:
                start(exp, *words)
                started = True
            else:
                info = job_info(exp)
                # Resumed by itself at mount, unless the last kill came
                # after it had finished.
                assert info == {} or info["state"] in (
                    "running", "ready", "completed"), info
            # Kill at a random point a little further on (or at the end).
            target = rng.randrange(0, 6 * MiB)
            wait_for(lambda: job_info(exp) == {} or
                     job_info(exp).get("copied", 0) >= target or
                     job_info(exp).get("state") in done_states + ("failed",),
                     timeout=60, what="progress to %d" % target)
            info = job_info(exp)
            assert info.get("state") != "failed", info
            if info.get("state") == "running":
                mid_job += 1
        finally:
            m.kill()
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        info = job_info(exp)
        if kind == "active":
            if info != {} or layer_files(exp)[0] != "base.qcow2":
                info = wait_state(exp, ("ready", "failed"), timeout=60)
                assert info["state"] == "ready", info
                start(exp, "job.pivot")
                info = wait_state(exp, ("completed", "failed"))
            want = ["base.qcow2"]
        elif kind == "commit":
            want = ["vm1.qcow2", "base.qcow2"]
        else:
            want = ["vm1.qcow2"]
        if info != {}:
            info = wait_state(exp, ("completed", "failed"), timeout=60)
            assert info["state"] == "completed", info
        assert layer_files(exp) == want
        with open(exp, "rb") as f, open(flat, "rb") as g:
            assert f.read() == g.read()
    top = image_dir / want[0]
    qemu_img_check(top)
    qemu_img_check(image_dir / "base.qcow2")
    qemu_img_compare(top, flat, fmt_b="raw")
    return mid_job


@pytest.mark.parametrize("kind", ["commit", "active", "stream"])
def test_kill_during_job(image_dir, mountpoint, tmp_path, kind):
    run_with_kills(image_dir, mountpoint, tmp_path, kind, kills=2,
                   seed={"commit": 1, "active": 2, "stream": 3}[kind])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["commit", "active", "stream"])
def test_kill_during_job_many(image_dir, mountpoint, tmp_path, kind):
    mid_job = run_with_kills(image_dir, mountpoint, tmp_path, kind, kills=20,
                             seed=1000 + len(kind))
    assert mid_job >= 10


def test_unmount_stops_job_and_next_mount_resumes(image_dir, mountpoint, tmp_path):
    flat = build(image_dir, tmp_path)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        # 1 MiB/s: the unmount must come while the job still copies, ~8 s
        # after the 4 MiB the first windows copy at once.
        start(exp, "commit", "top=snap2.qcow2 bandwidth=%d" % MiB)
        wait_for(lambda: job_info(exp)["copied"] >= 4 * MiB, timeout=30,
                 what="4 MiB copied")
    # Clean exit (checked by mounted), progress kept for the next mount.
    state = (image_dir / ".chainfs-state").read_text()
    assert "[job vm1]" in state and "cancelled=false" in state, state
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        info = wait_for(lambda: job_info(exp) or None, timeout=30, what="resumed job")
        assert info["type"] == "commit" and info["top"] == "snap2.qcow2", info
        info = wait_state(exp, ("completed", "failed"))
        assert info["state"] == "completed", info
        # Resumed from the checkpoint: what was copied before the unmount
        # is not copied again.
        assert info["copied"] <= 12 * MiB - 4 * MiB, info
        assert layer_files(exp) == ["vm1.qcow2", "base.qcow2"]
        with open(exp, "rb") as f, open(flat, "rb") as g:
            assert f.read() == g.read()
    assert "[job vm1]" not in (image_dir / ".chainfs-state").read_text()
    qemu_img_check(image_dir / "base.qcow2")


def test_crash_between_rewrite_and_record(image_dir, mountpoint, tmp_path):
    """A crash after the backing references were rewritten but before the
    state file recorded the dropped layers: the next mount records them."""
    flat = build(image_dir, tmp_path)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        start(exp, "commit", "top=snap2.qcow2")
        assert wait_state(exp, ("completed", "failed"))["state"] == "completed"
    # Put the state file back as it was at that instant.
    (image_dir / ".chainfs-state").write_text(
        "[job vm1]\ntype=commit\ntop=snap2.qcow2\nbase=base.qcow2\n"
        "options=top=snap2.qcow2 base=base.qcow2 on-error=report\n"
        "offset=%d\ncancelled=false\nlayers=snap2.qcow2;snap1.qcow2;\n" % SIZE)
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log.append("left out")
        assert layer_files(m.path("vm1")) == ["vm1.qcow2", "base.qcow2"]
    state = (image_dir / ".chainfs-state").read_text()
    assert "snap1.qcow2=1" in state and "snap2.qcow2=1" in state, state
    assert "[job vm1]" not in state
    with mounted(image_dir, mountpoint) as m:
        names = sorted(n for n in os.listdir(str(mountpoint)) if n not in (".control", ".events"))
        assert names == ["vm1"]
        with open(m.path("vm1"), "rb") as f, open(flat, "rb") as g:
            assert f.read() == g.read()


def test_crash_after_stream_rewrite(image_dir, mountpoint, tmp_path):
    flat = build(image_dir, tmp_path)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        start(exp, "stream", "base=snap1.qcow2")
        assert wait_state(exp, ("completed", "failed"))["state"] == "completed"
    (image_dir / ".chainfs-state").write_text(
        "[job vm1]\ntype=stream\ntop=vm1.qcow2\nbase=snap1.qcow2\n"
        "options=base=snap1.qcow2 on-error=report\noffset=0\n"
        "cancelled=false\nlayers=snap2.qcow2;\n")
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log.append("left out")
        assert layer_files(m.path("vm1")) == ["vm1.qcow2", "snap1.qcow2", "base.qcow2"]
    assert "snap2.qcow2=1" in (image_dir / ".chainfs-state").read_text()
    with mounted(image_dir, mountpoint) as m:
        names = sorted(n for n in os.listdir(str(mountpoint)) if n not in (".control", ".events"))
        assert names == ["vm1"]
        with open(m.path("vm1"), "rb") as f, open(flat, "rb") as g:
            assert f.read() == g.read()
