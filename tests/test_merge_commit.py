"""Intermediate commit through a real mount, and the offline commit.

Each test builds a chain with qemu-img/qemu-io, mounts it, runs a commit
while a seeded guest writes and reads the export, and checks the result
with qemu-img info / check / compare.
"""
import errno
import os

import pytest

from helpers import (CHAINCTL, MiB, create_qcow2, job_info, make_chain, mounted,
                     qemu_img, qemu_img_check, qemu_img_compare, qemu_img_info,
                     qemu_io, run, to_raw, wait_for)
from test_merge_common import (Guest, command, dir_hashes, layer_files, start,
                               wait_state)

SIZE = 32 * MiB


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_commit_intermediate_under_guest(image_dir, mountpoint, tmp_path, base_fmt):
    names = make_chain(image_dir, depth=4, size=SIZE, base_fmt=base_fmt, seed=11,
                       top_name="vm1.qcow2")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with Guest(exp, seed=12, size=SIZE) as guest:
            guest.wait_writes(5)
            start(exp, "commit", "top=snap2.qcow2 bandwidth=16M")
            info = wait_state(exp, ("completed", "failed"), timeout=60)
            guest.wait_writes(guest.writes + 5)
            guest.finish()
            assert info["state"] == "completed", info
            assert info["type"] == "commit"
            assert info["top"] == "snap2.qcow2" and info["base"] == names[0]
            assert info["offset"] == info["len"] == SIZE
            assert info["error"] is None
            assert layer_files(exp) == ["vm1.qcow2", names[0]]
            guest.check()
            model = guest.save_model(tmp_path / "model.raw")
    chain = qemu_img_info(image_dir / "vm1.qcow2", chain=True)
    assert [os.path.basename(c["filename"]) for c in chain] == ["vm1.qcow2", names[0]]
    assert chain[0]["full-backing-filename"] == str(image_dir / names[0])
    qemu_img_check(image_dir / "vm1.qcow2")
    if base_fmt == "qcow2":
        qemu_img_check(image_dir / names[0])
    qemu_img_compare(image_dir / "vm1.qcow2", model, fmt_b="raw")
    # The dropped layers are recorded and not exported at the next mount.
    state = (image_dir / ".chainfs-state").read_text()
    assert "snap1.qcow2" in state and "snap2.qcow2" in state
    with mounted(image_dir, mountpoint) as m:
        assert sorted(n for n in os.listdir(str(mountpoint)) if n != ".control") == ["vm1"]


def test_commit_shallow_keep_relative_delete(image_dir, mountpoint, tmp_path):
    make_chain(image_dir, depth=4, size=SIZE, base_fmt="qcow2", seed=21,
               top_name="vm1.qcow2")
    flat = to_raw(image_dir / "vm1.qcow2", tmp_path / "flat.raw")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        start(exp, "commit", "top=snap2.qcow2 shallow keep-relative delete")
        info = wait_state(exp, ("completed", "failed"))
        assert info["state"] == "completed", info
        assert info["base"] == "snap1.qcow2"
        assert layer_files(exp) == ["vm1.qcow2", "snap1.qcow2", "base.qcow2"]
    assert not (image_dir / "snap2.qcow2").exists()
    info = qemu_img_info(image_dir / "vm1.qcow2")
    assert info["backing-filename"] == "snap1.qcow2"
    qemu_img_check(image_dir / "snap1.qcow2")
    qemu_img_compare(image_dir / "vm1.qcow2", flat, fmt_b="raw")


def test_commit_refusals_change_nothing(image_dir, mountpoint):
    make_chain(image_dir, depth=3, size=SIZE, base_fmt="qcow2", seed=31,
               top_name="vm1.qcow2")
    before = dir_hashes(image_dir)
    cases = [
        ("top=nosuch.qcow2", errno.ENOENT, "nosuch.qcow2"),
        ("base=nosuch.qcow2", errno.ENOENT, "nosuch.qcow2"),
        ("top=snap1.qcow2 base=snap1.qcow2", errno.EINVAL, "same layer"),
        ("top=base.qcow2 base=snap1.qcow2", errno.EINVAL, "above"),
        ("top=snap1.qcow2 shallow base=base.qcow2", errno.EINVAL, "shallow"),
        ("top=vm1.qcow2", errno.EINVAL, "active"),
        ("", errno.EINVAL, "active"),
        ("top=snap1.qcow2 active", errno.EINVAL, "not the active"),
        ("top=base.qcow2", errno.EINVAL, "no backing"),
        ("top=snap1.qcow2 on-error=sometimes", errno.EINVAL, "on-error"),
        ("top=snap1.qcow2 frobnicate", errno.EINVAL, "frobnicate"),
        ("top=snap1.qcow2 bandwidth=lots", errno.EINVAL, "bandwidth"),
    ]
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        for words, want, text in cases:
            err, msg = command(exp, "commit", words)
            assert err == want, (words, errno.errorcode.get(err), msg)
            assert text in msg, (words, msg)
        assert job_info(exp) == {}
        for verb in ("job.pivot", "job.cancel", "job.pause", "job.resume"):
            err, msg = command(exp, verb)
            assert err == errno.EINVAL and "no job" in msg, (verb, err, msg)
        assert dir_hashes(image_dir) == before
        # A running job: a second command is EBUSY; illegal verbs say why.
        start(exp, "commit", "top=snap1.qcow2 bandwidth=64K")
        err, msg = command(exp, "commit", "top=snap1.qcow2")
        assert err == errno.EBUSY, msg
        err, msg = command(exp, "job.pivot")
        assert err == errno.EBUSY
        assert msg == "job in state running cannot pivot", msg
        err, msg = command(exp, "job.resume")
        assert err == errno.EBUSY and "cannot resume" in msg, msg
        start(exp, "job.pause")
        assert job_info(exp)["state"] == "paused"
        err, msg = command(exp, "job.pause")
        assert err == errno.EBUSY and msg == "job in state paused cannot pause"
        # Slow enough that the cancel below finds the job still copying
        # (what is left of snap1 takes ~10 s at 32 KiB/s).
        start(exp, "job.speed", "32K")
        assert job_info(exp)["speed"] == 32 * 1024
        start(exp, "job.resume")
        start(exp, "job.cancel")
        info = wait_state(exp, ("cancelled",))
        assert info["error"] is None
    # The cancelled commit wrote into base, nothing else changed; the
    # layers and their references are the same.
    after = dir_hashes(image_dir)
    for name in ("vm1.qcow2", "snap1.qcow2"):
        assert before[name] == after[name], name
    assert qemu_img_info(image_dir / "vm1.qcow2")["backing-filename"] == "snap1.qcow2"


def test_commit_refuses_shared_base(image_dir, mountpoint, tmp_path):
    make_chain(image_dir, depth=3, size=SIZE, base_fmt="qcow2", seed=41,
               top_name="vm1.qcow2")
    # vm2 shares snap1 and base with vm1.
    create_qcow2(image_dir / "vm2.qcow2", backing="snap1.qcow2")
    qemu_io(image_dir / "vm2.qcow2", "write -P 9 0 1M")
    flat2 = to_raw(image_dir / "vm2.qcow2", tmp_path / "vm2.raw")
    before = dir_hashes(image_dir)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        err, msg = command(exp, "commit", "top=snap1.qcow2")
        assert err == errno.EBUSY, msg
        assert "vm2.qcow2" in msg and "force" in msg, msg
        assert dir_hashes(image_dir) == before
        # Committing vm1 into snap1 (shallow) leaves snap1 shared too.
        err, msg = command(exp, "commit", "top=vm1.qcow2 active shallow")
        assert err == errno.EBUSY, msg
        assert dir_hashes(image_dir) == before
        with open(m.path("vm2"), "rb") as f:
            assert f.read(MiB) == bytes([9]) * MiB
    qemu_img_compare(image_dir / "vm2.qcow2", flat2, fmt_b="raw")


def test_commit_cancel_resumes_from_checkpoint(image_dir, mountpoint, tmp_path):
    # 32 MiB of data in snap1 at 2 MiB/s: the cancel is sent once 12 MiB
    # are copied, which leaves the test ~10 s to send it before the commit
    # could finish on its own, however slow the machine (a sanitizer build
    # under load polls far more slowly than the 20 ms it asks for).
    create_qcow2(image_dir / "base.qcow2", SIZE)
    create_qcow2(image_dir / "snap1.qcow2", backing="base.qcow2")
    create_qcow2(image_dir / "vm1.qcow2", backing="snap1.qcow2")
    qemu_io(image_dir / "snap1.qcow2", "write -P 7 0 32M")
    qemu_io(image_dir / "vm1.qcow2", "write -P 8 4M 1M")
    flat = to_raw(image_dir / "vm1.qcow2", tmp_path / "flat.raw")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        start(exp, "commit", "top=snap1.qcow2 bandwidth=2M")

        def progressed():
            info = job_info(exp)
            assert info["state"] == "running", info
            return info["offset"] >= 12 * MiB
        wait_for(progressed, timeout=60, what="12 MiB of the commit")
        start(exp, "job.cancel")
        cancelled = wait_state(exp, ("cancelled",))
        assert cancelled["copied"] >= 12 * MiB
        # The same commit again resumes where the checkpoint says.
        start(exp, "commit", "top=snap1.qcow2")
        info = wait_state(exp, ("completed", "failed"))
        assert info["state"] == "completed", info
        # Checkpoints come every second: at most ~1 s of copying (2 MiB),
        # the windows in flight and what a slow flush let through are
        # copied again.  Copying everything again would exceed both
        # bounds, as cancelled["copied"] >= 12 MiB > 9 MiB.
        assert info["copied"] <= 32 * MiB - cancelled["copied"] + 9 * MiB, (cancelled, info)
        assert info["copied"] + cancelled["copied"] < 32 * MiB + 9 * MiB
        assert layer_files(exp) == ["vm1.qcow2", "base.qcow2"]
    qemu_img_check(image_dir / "base.qcow2")
    qemu_img_compare(image_dir / "vm1.qcow2", flat, fmt_b="raw")


def test_snapshot_commit_repeated(image_dir, mountpoint):
    """snapshot + commit 20 times: the chain never grows past 3 layers."""
    create_qcow2(image_dir / "base.qcow2", 16 * MiB)
    create_qcow2(image_dir / "vm1.qcow2", backing="base.qcow2")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with Guest(exp, seed=51, size=16 * MiB, max_len=64 * 1024) as guest:
            for i in range(20):
                guest.wait_writes(guest.writes + 3)
                old_top = layer_files(exp)[0]
                start(exp, "snapshot", "s%d.qcow2" % i)
                layers = layer_files(exp)
                assert layers[0] == "s%d.qcow2" % i and len(layers) == 3, layers
                start(exp, "commit", "top=%s delete" % old_top)
                info = wait_state(exp, ("completed", "failed"))
                assert info["state"] == "completed", info
                assert layer_files(exp) == ["s%d.qcow2" % i, "base.qcow2"]
                assert not (image_dir / old_top).exists()
            guest.finish()
            guest.check()
    qemu_img_check(image_dir / "base.qcow2")
    qemu_img_check(image_dir / "s19.qcow2")


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_offline_commit_equals_qemu_img(tmp_path, base_fmt):
    ours = tmp_path / "ours"
    theirs = tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    names = make_chain(ours, depth=5, size=SIZE, base_fmt=base_fmt, seed=61,
                       writes_per_layer=12)
    make_chain(theirs, depth=5, size=SIZE, base_fmt=base_fmt, seed=61,
               writes_per_layer=12)
    top = names[-1]
    run([CHAINCTL, "commit", str(ours / top), "--base", names[0]])
    qemu_img("commit", "-q", "-b", names[0], str(theirs / top))
    qemu_img_compare(ours / names[0], theirs / names[0])
    qemu_img_compare(ours / top, theirs / top)
    if base_fmt == "qcow2":
        qemu_img_check(ours / names[0])
    qemu_img_check(ours / top)
    chain = qemu_img_info(ours / top, chain=True)
    assert [os.path.basename(c["filename"]) for c in chain] == [top, names[0]]


def test_offline_commit_dry_run_changes_nothing(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    names = make_chain(d, depth=3, size=SIZE, base_fmt="qcow2", seed=71)
    before = dir_hashes(d)
    res = run([CHAINCTL, "commit", str(d / names[-1]), "--dry-run"])
    assert res.stdout.strip()
    assert dir_hashes(d) == before


def test_commit_grows_smaller_base(image_dir, mountpoint, tmp_path):
    create_qcow2(image_dir / "base.qcow2", 16 * MiB)
    qemu_io(image_dir / "base.qcow2", "write -P 1 0 16M")
    create_qcow2(image_dir / "snap1.qcow2", 32 * MiB, backing="base.qcow2")
    qemu_io(image_dir / "snap1.qcow2", "write -P 2 12M 8M", "write -P 3 30M 1M")
    create_qcow2(image_dir / "vm1.qcow2", backing="snap1.qcow2")
    flat = to_raw(image_dir / "vm1.qcow2", tmp_path / "flat.raw")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        start(exp, "commit", "top=snap1.qcow2")
        assert wait_state(exp, ("completed", "failed"))["state"] == "completed"
        assert layer_files(exp) == ["vm1.qcow2", "base.qcow2"]
        with open(exp, "rb") as f, open(flat, "rb") as g:
            assert f.read() == g.read()
    assert qemu_img_info(image_dir / "base.qcow2")["virtual-size"] == 32 * MiB
    qemu_img_check(image_dir / "base.qcow2")
    qemu_img_compare(image_dir / "vm1.qcow2", flat, fmt_b="raw")


@pytest.mark.skipif(os.geteuid() != 0, reason="chattr needs root")
def test_commit_refused_when_base_cannot_be_written(image_dir, mountpoint):
    make_chain(image_dir, depth=3, size=SIZE, base_fmt="qcow2", seed=81,
               top_name="vm1.qcow2")
    before = dir_hashes(image_dir)
    base = str(image_dir / "base.qcow2")
    if run(["chattr", "+i", base], check=False).returncode != 0:
        pytest.skip("no immutable attribute here")
    try:
        with mounted(image_dir, mountpoint) as m:
            exp = m.path("vm1")
            for words in ("top=snap1.qcow2", "active"):
                err, msg = command(exp, "commit", words)
                assert err in (errno.EACCES, errno.EROFS), (words, err, msg)
                assert "base.qcow2" in msg, msg
                assert job_info(exp) == {}
            # Guest I/O goes on untouched.
            with open(exp, "r+b") as f:
                f.write(b"x" * 4096)
                f.flush()
                os.fsync(f.fileno())
    finally:
        run(["chattr", "-i", base])
    after = dir_hashes(image_dir)
    assert before["base.qcow2"] == after["base.qcow2"]
    assert before["snap1.qcow2"] == after["snap1.qcow2"]


def test_dirty_backing_layer_is_read_as_it_is_by_stream(image_dir, mountpoint, tmp_path):
    """A backing file QEMU left dirty (lazy refcounts, process killed: its
    refcounts are stale) serves reads, as QEMU serves them; a stream, which
    only reads it, goes through and leaves it as it was.  (A commit into
    it repairs it first: tests/test_dirty_repair.py.)"""
    base = image_dir / "base.qcow2"
    create_qcow2(base, SIZE, extra_opts=["lazy_refcounts=on"])
    # qemu-io's abort leaves the dirty bit set and the refcounts unwritten.
    r = run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4M", "-c", "abort", str(base)],
            check=False)
    assert r.returncode != 0
    assert qemu_img("check", base, check=False).returncode != 0  # stale refcounts
    create_qcow2(image_dir / "vm1.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(image_dir / "vm1.qcow2", "write -P 0x21 1M 1M")
    expected = to_raw(image_dir / "vm1.qcow2", tmp_path / "expected.raw")
    before = dir_hashes(image_dir)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with open(exp, "rb") as f, open(expected, "rb") as e:
            assert f.read() == e.read()
        start(exp, "stream")
        assert wait_state(exp, ("completed", "failed"))["state"] == "completed"
        assert layer_files(exp) == ["vm1.qcow2"]
        with open(exp, "rb") as f, open(expected, "rb") as e:
            assert f.read() == e.read()
    assert dir_hashes(image_dir)["base.qcow2"] == before["base.qcow2"]
    qemu_img_check(image_dir / "vm1.qcow2")
    qemu_img_compare(image_dir / "vm1.qcow2", expected, fmt_b="raw")


def test_jobs_on_two_chains_in_parallel(image_dir, mountpoint):
    make_chain(image_dir, depth=3, size=SIZE, base_fmt="qcow2", seed=91,
               prefix="a-", top_name="vm1.qcow2")
    make_chain(image_dir, depth=3, size=SIZE, base_fmt="raw", seed=92,
               prefix="b-", top_name="vm2.qcow2")
    with mounted(image_dir, mountpoint) as m:
        e1, e2 = m.path("vm1"), m.path("vm2")
        with Guest(e1, seed=93, size=SIZE) as g1, Guest(e2, seed=94, size=SIZE) as g2:
            start(e1, "commit", "active bandwidth=32M")
            start(e2, "stream", "bandwidth=32M")
            assert wait_state(e1, ("ready", "failed"))["state"] == "ready"
            assert wait_state(e2, ("completed", "failed"))["state"] == "completed"
            start(e1, "job.pivot")
            assert wait_state(e1, ("completed", "failed"))["state"] == "completed"
            g1.wait_writes(g1.writes + 10)
            g2.wait_writes(g2.writes + 10)
            g1.finish()
            g2.finish()
            g1.check()
            g2.check()
        assert layer_files(e1) == ["a-base.qcow2"]
        assert layer_files(e2) == ["vm2.qcow2"]
    qemu_img_check(image_dir / "a-base.qcow2")
    qemu_img_check(image_dir / "vm2.qcow2")
