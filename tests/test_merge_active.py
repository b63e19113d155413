"""Active commit and stream through a real mount, under a seeded guest."""
import errno
import json
import os

import pytest

from helpers import (MiB, create_qcow2, job_info, make_chain, mounted,
                     qemu_img_check, qemu_img_compare, qemu_img_info, qemu_io,
                     run, to_raw)
from test_merge_common import Guest, command, layer_files, start, wait_state

SIZE = 32 * MiB


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_active_commit_pivot_under_guest(image_dir, mountpoint, tmp_path, base_fmt):
    names = make_chain(image_dir, depth=3, size=SIZE, base_fmt=base_fmt, seed=101,
                       top_name="vm1.qcow2")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with Guest(exp, seed=102, size=SIZE) as guest:
            guest.wait_writes(5)
            start(exp, "commit", "active delete")
            info = wait_state(exp, ("ready", "failed"), timeout=60)
            assert info["state"] == "ready", info
            assert info["type"] == "active-commit"
            # Guest writes in ready reach base as well.
            guest.wait_writes(guest.writes + 20)
            start(exp, "job.pivot")
            info = wait_state(exp, ("completed", "failed"))
            assert info["state"] == "completed", info
            guest.wait_writes(guest.writes + 20)
            guest.finish()
            guest.check()
            assert layer_files(exp) == [names[0]]
            model = guest.save_model(tmp_path / "model.raw")
    for n in names[1:]:
        assert not (image_dir / n).exists(), n
    assert "vm1=" + names[0] in (image_dir / ".chainfs-state").read_text()
    if base_fmt == "qcow2":
        qemu_img_check(image_dir / names[0])
    qemu_img_compare(image_dir / names[0], model, fmt_b="raw")
    # The export keeps its name, now served from base.
    with mounted(image_dir, mountpoint) as m:
        assert layer_files(m.path("vm1")) == [names[0]]
        with open(m.path("vm1"), "rb") as f:
            assert f.read() == open(model, "rb").read()


def test_active_commit_cancel_in_ready_keeps_top(image_dir, mountpoint, tmp_path):
    names = make_chain(image_dir, depth=3, size=SIZE, base_fmt="qcow2", seed=111,
                       top_name="vm1.qcow2")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with Guest(exp, seed=112, size=SIZE) as guest:
            start(exp, "commit", "active base=snap1.qcow2")
            assert wait_state(exp, ("ready", "failed"))["state"] == "ready"
            guest.wait_writes(guest.writes + 20)
            guest.finish()
            start(exp, "job.cancel")
            info = wait_state(exp, ("cancelled", "failed"))
            assert info["state"] == "cancelled", info
            assert layer_files(exp) == names[::-1]
            guest.check()
            model = guest.save_model(tmp_path / "model.raw")
            # After a cancel the same chain takes a new job.
            start(exp, "commit", "active base=snap1.qcow2")
            assert wait_state(exp, ("ready", "failed"))["state"] == "ready"
            start(exp, "job.cancel")
            wait_state(exp, ("cancelled",))
    # base (snap1) is in sync with what the guest saw: as a disk of its own
    # it reads like the export.
    qemu_img_compare(image_dir / "snap1.qcow2", model, fmt_b="raw")
    qemu_img_compare(image_dir / "vm1.qcow2", model, fmt_b="raw")
    qemu_img_check(image_dir / "snap1.qcow2")
    qemu_img_check(image_dir / "vm1.qcow2")
    assert qemu_img_info(image_dir / "vm1.qcow2")["backing-filename"] == "snap1.qcow2"


def test_active_commit_ready_with_guest_faster_than_bandwidth(image_dir, mountpoint):
    size = 8 * MiB
    create_qcow2(image_dir / "base.qcow2", size)
    create_qcow2(image_dir / "vm1.qcow2", backing="base.qcow2")
    qemu_io(image_dir / "vm1.qcow2", "write -P 3 0 2M")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with Guest(exp, seed=121, size=size, max_len=64 * 1024) as guest:
            guest.wait_writes(10)
            # 1 MiB/s: the guest writes far faster than that, all over the
            # disk; copying alone would never catch up with it.
            start(exp, "commit", "active bandwidth=1M")
            info = wait_state(exp, ("ready", "failed"), timeout=60)
            assert info["state"] == "ready", info
            assert info["speed"] == MiB
            # In ready the guest's writes are mirrored as they come, however
            # far they outrun the bandwidth: 100 more leave the job ready.
            # (Counted from ready, not asserted as a total: ready may come
            # before or after any number of writes.)
            guest.wait_writes(guest.writes + 100)
            info = job_info(exp)
            assert info["state"] == "ready" and info["error"] is None, info
            err, msg = command(exp, "job.pause")
            assert err == 0, msg
            assert job_info(exp)["state"] == "paused"
            err, msg = command(exp, "job.pivot")
            assert err == errno.EBUSY and "cannot pivot" in msg, msg
            start(exp, "job.resume")
            assert job_info(exp)["state"] == "ready"
            start(exp, "job.pivot")
            assert wait_state(exp, ("completed", "failed"))["state"] == "completed"
            guest.finish()
            guest.check()
            assert layer_files(exp) == ["base.qcow2"]
    qemu_img_check(image_dir / "base.qcow2")


@pytest.mark.parametrize("with_base", [False, True])
def test_stream_under_guest(image_dir, mountpoint, tmp_path, with_base):
    names = make_chain(image_dir, depth=4, size=SIZE, base_fmt="qcow2", seed=131,
                       top_name="vm1.qcow2")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with Guest(exp, seed=132, size=SIZE) as guest:
            guest.wait_writes(5)
            start(exp, "stream", "base=snap1.qcow2 bandwidth=32M" if with_base else "")
            info = wait_state(exp, ("completed", "failed"), timeout=60)
            assert info["state"] == "completed", info
            assert info["type"] == "stream"
            guest.wait_writes(guest.writes + 5)
            guest.finish()
            guest.check()
            want = ["vm1.qcow2", "snap1.qcow2", "base.qcow2"] if with_base else ["vm1.qcow2"]
            assert layer_files(exp) == want
            model = guest.save_model(tmp_path / "model.raw")
    info = qemu_img_info(image_dir / "vm1.qcow2")
    if with_base:
        assert info["backing-filename"] == "snap1.qcow2"
    else:
        assert "backing-filename" not in info
    qemu_img_check(image_dir / "vm1.qcow2")
    qemu_img_compare(image_dir / "vm1.qcow2", model, fmt_b="raw")


def test_stream_refusals(image_dir, mountpoint):
    make_chain(image_dir, depth=3, size=SIZE, base_fmt="qcow2", seed=141,
               top_name="vm1.qcow2")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        for words, want in (("base=nosuch.qcow2", errno.ENOENT),
                            ("base=vm1.qcow2", errno.EINVAL),
                            ("top=snap1.qcow2", errno.EINVAL),
                            ("bandwidth=x", errno.EINVAL)):
            err, msg = command(exp, "stream", words)
            assert err == want, (words, err, msg)
            assert msg
        assert job_info(exp) == {}
        assert layer_files(exp) == ["vm1.qcow2", "snap1.qcow2", "base.qcow2"]


@pytest.mark.parametrize("verb,words,extra", [
    ("commit", "active bandwidth=2M", ["--pivot", "--writes-before-pivot", "200"]),
    ("commit", "active base=snap1.qcow2", ["--cancel-at-ready"]),
    ("stream", "bandwidth=8M", []),
])
def test_engine_without_fuse(image_dir, verb, words, extra):
    """The engine driven by tests/merge-tool: zeroing writes (write hook
    without data) and writes through chain_pwrite, checked against a model."""
    from test_merge_common import merge_tool
    make_chain(image_dir, depth=3, size=SIZE, base_fmt="qcow2", seed=151,
               top_name="vm1.qcow2")
    want = "cancelled" if "--cancel-at-ready" in extra else "completed"
    res = merge_tool(image_dir, "vm1.qcow2", verb, words, "--writer", "152",
                     "--expect", want, *extra, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [json.loads(l) for l in res.stdout.splitlines()]
    writer = [l for l in lines if l.get("event") == "writer"][0]
    assert writer["failures"] == 0 and writer["writes"] > 0
    assert lines[-2]["state"] == want
    for f in os.listdir(str(image_dir)):
        if f.endswith(".qcow2"):
            qemu_img_check(image_dir / f)


def resident_bytes(path):
    """Bytes of path in the page cache (util-linux fincore)."""
    out = run(["fincore", "-b", "-n", "-o", "RES", str(path)]).stdout
    return int(out.split()[0])


def test_jobs_leave_the_guest_layers_out_of_the_page_cache(image_dir, mountpoint):
    """The copy of an active commit and of a stream goes through the page
    cache in 1 MiB requests; once the guest writes those images alone,
    their clean pages are dropped (large folios made the guest's 4 KiB
    writes into them 8x slower).  No guest runs here, so what stays
    resident is the little metadata read since."""
    make_chain(image_dir, depth=2, size=SIZE, base_fmt="qcow2", seed=111,
               top_name="vm1.qcow2")
    qemu_io(image_dir / "vm1.qcow2", "write -P 0x33 0 24M")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        start(exp, "commit", "active")
        assert wait_state(exp, ("ready", "failed"))["state"] == "ready"
        for name in ("base.qcow2", "vm1.qcow2"):
            assert resident_bytes(image_dir / name) < 2 * MiB, name
        start(exp, "job.cancel")
        assert wait_state(exp, ("cancelled", "failed"))["state"] == "cancelled"

        # base now holds what vm1 holds: stream it into vm1, reading base.
        run(["dd", "if=%s" % (image_dir / "vm1.qcow2"), "of=/dev/null", "bs=1M",
             "status=none"])
        start(exp, "stream")
        assert wait_state(exp, ("completed", "failed"))["state"] == "completed"
        assert resident_bytes(image_dir / "vm1.qcow2") < 2 * MiB
    qemu_img_check(image_dir / "vm1.qcow2")
