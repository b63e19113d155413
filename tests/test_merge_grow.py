"""A commit that grows base, or puts base in the place of a shorter layer,
never shows data the guest did not have (issue 11, "grow that never changes
the disk").

Past a layer's end the chain reads zeros and its backing file is not
consulted.  Chain bottom.qcow2 (64 MiB of 0xbb) <- base.qcow2 (32 MiB) <-
top.qcow2 (64 MiB) therefore reads 0x00 at 40 MiB; after base grew to
64 MiB for a commit, bottom's 0xbb would show there unless the grow zeroes
the new range.  The same for a committed layer shorter than the layers
above it: base 64 MiB <- mid 32 MiB <- top 64 MiB reads zeros past 32 MiB
where top holds nothing, and must go on doing so once base backs top.

The oracle is qemu-img: `qemu-img convert` of the chain before the
operation, `qemu-img compare` of the export (or of the chain after) with
it, and `qemu-img check` of every image written.
"""
import os

import pytest

from helpers import (MiB, KiB, create_qcow2, create_raw, mounted, qemu_img,
                     qemu_img_compare, qemu_img_info, qemu_io, to_raw)
from test_chainctl_common import ctl_ok
from test_merge_common import layer_files, start, wait_state

SIZE = 64 * MiB
SHORT = 32 * MiB
HOLE = 40 * MiB          # past the short layer's end, unwritten above it
BOTTOM_BYTE = 0xbb


def qemu_img_check(image):
    """`qemu-img check` exit 0: no corruption and no leaked cluster."""
    res = qemu_img("check", image, check=False)
    assert res.returncode == 0, "qemu-img check %s: rc=%d\n%s%s" % (
        image, res.returncode, res.stdout, res.stderr)


def read_at(path, off, n=4096):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def make_grow_chain(d, base_size=SHORT, compat="1.1", active="top.qcow2"):
    """bottom.qcow2 (64 MiB of 0xbb) <- base.qcow2 (base_size) <- top.qcow2
    (64 MiB), plus `vm1.qcow2` above top when active is "vm1.qcow2" (then
    top is an intermediate layer).  Some data in base and top, none of it
    at HOLE.  Returns the name of the chain's active image."""
    create_qcow2(d / "bottom.qcow2", SIZE, compat=compat)
    qemu_io(d / "bottom.qcow2", "write -P %d 0 %d" % (BOTTOM_BYTE, SIZE))
    create_qcow2(d / "base.qcow2", base_size, backing="bottom.qcow2", compat=compat)
    qemu_io(d / "base.qcow2", "write -P 0x11 1M 1M", "write -z 3M 64k")
    create_qcow2(d / "top.qcow2", SIZE, backing="base.qcow2", compat=compat)
    # Data past base's end (must survive the commit) and before it.
    qemu_io(d / "top.qcow2", "write -P 0x22 2M 128k", "write -P 0x33 48M 1M")
    if active == "vm1.qcow2":
        create_qcow2(d / "vm1.qcow2", SIZE, backing="top.qcow2", compat=compat)
        qemu_io(d / "vm1.qcow2", "write -P 0x44 5M 64k")
    return active


def snapshot_of(d, active, out):
    """The chain as qemu-img sees it, as a raw file, checked to read zeros
    at HOLE (else the test would not test anything)."""
    to_raw(d / active, out)
    assert read_at(out, HOLE) == bytes(4096)
    return out


def assert_reads_like(export, before):
    assert os.path.getsize(export) == os.path.getsize(before)
    assert read_at(export, HOLE) == bytes(4096), "lower-layer data exposed"
    qemu_img_compare(export, before, fmt_a="raw", fmt_b="raw")


# ------------------------------------------------------------ offline commit

@pytest.mark.parametrize("compat,base_size", [
    ("1.1", SHORT),
    ("0.10", SHORT),
    # base's end inside a cluster: [32M, 32M+5K) shows bottom's bytes, the
    # rest of that cluster must read zeros once base grows.
    ("1.1", SHORT + 5 * KiB),
    ("0.10", SHORT + 5 * KiB),
])
def test_offline_commit_grow_keeps_zeros(image_dir, mountpoint, tmp_path, compat,
                                         base_size):
    active = make_grow_chain(image_dir, base_size=base_size, compat=compat)
    before = snapshot_of(image_dir, active, tmp_path / "before.raw")
    if base_size % (64 * KiB):
        # bottom's bytes show in the partial cluster below base's end.
        assert read_at(before, SHORT, 512) == bytes([BOTTOM_BYTE]) * 512
    ctl_ok("commit", image_dir / "top.qcow2", "--base", "base.qcow2")
    assert qemu_img_info(image_dir / "base.qcow2")["virtual-size"] == SIZE
    for n in ("base.qcow2", "top.qcow2"):
        qemu_img_check(image_dir / n)
    after = to_raw(image_dir / "top.qcow2", tmp_path / "after.raw")
    assert_reads_like(after, before)
    # base on its own (with bottom below) now reads what top showed.
    base_view = to_raw(image_dir / "base.qcow2", tmp_path / "base.raw")
    assert_reads_like(base_view, before)
    with mounted(image_dir, mountpoint) as m:
        assert_reads_like(m.path("top"), before)


# ------------------------------------------------------------- online commit

def test_online_commit_grow_keeps_zeros(image_dir, mountpoint, tmp_path):
    active = make_grow_chain(image_dir, active="vm1.qcow2")
    before = snapshot_of(image_dir, active, tmp_path / "before.raw")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        assert_reads_like(exp, before)
        start(exp, "commit", "top=top.qcow2 base=base.qcow2")
        info = wait_state(exp, ("completed", "failed"))
        assert info["state"] == "completed", info
        assert layer_files(exp) == ["vm1.qcow2", "base.qcow2", "bottom.qcow2"]
        assert_reads_like(exp, before)
    for n in ("base.qcow2", "vm1.qcow2"):
        qemu_img_check(image_dir / n)
    assert_reads_like(to_raw(image_dir / active, tmp_path / "after.raw"), before)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_active_commit_pivot_grow_keeps_zeros(image_dir, mountpoint, tmp_path, compat):
    active = make_grow_chain(image_dir, compat=compat)
    before = snapshot_of(image_dir, active, tmp_path / "before.raw")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("top")
        start(exp, "commit", "active base=base.qcow2")
        info = wait_state(exp, ("ready", "failed"))
        assert info["state"] == "ready", info
        # In ready base is the disk in sync: as a disk of its own it must
        # read like the export already.
        assert_reads_like(exp, before)
        start(exp, "job.pivot")
        info = wait_state(exp, ("completed", "failed"))
        assert info["state"] == "completed", info
        assert layer_files(exp) == ["base.qcow2", "bottom.qcow2"]
        assert_reads_like(exp, before)
    qemu_img_check(image_dir / "base.qcow2")
    assert_reads_like(to_raw(image_dir / "base.qcow2", tmp_path / "after.raw"), before)
    # And after a remount, served from base.
    with mounted(image_dir, mountpoint) as m:
        assert_reads_like(m.path("top"), before)


def test_active_commit_cancelled_in_ready_grow_keeps_zeros(image_dir, mountpoint,
                                                           tmp_path):
    active = make_grow_chain(image_dir)
    before = snapshot_of(image_dir, active, tmp_path / "before.raw")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("top")
        start(exp, "commit", "active base=base.qcow2")
        assert wait_state(exp, ("ready", "failed"))["state"] == "ready"
        start(exp, "job.cancel")
        info = wait_state(exp, ("cancelled", "failed"))
        assert info["state"] == "cancelled", info
        assert layer_files(exp) == ["top.qcow2", "base.qcow2", "bottom.qcow2"]
        assert_reads_like(exp, before)
    for n in ("base.qcow2", "top.qcow2"):
        qemu_img_check(image_dir / n)
    # base stays grown and in sync: as a disk it reads like the export did.
    assert qemu_img_info(image_dir / "base.qcow2")["virtual-size"] == SIZE
    assert_reads_like(to_raw(image_dir / "base.qcow2", tmp_path / "base.raw"), before)
    assert_reads_like(to_raw(image_dir / "top.qcow2", tmp_path / "top.raw"), before)


# ------------------------------------------------- a shorter committed layer

def make_short_middle_chain(d, base_fmt):
    """base (64 MiB of 0xbb, raw or qcow2) <- mid.qcow2 (32 MiB) <-
    top.qcow2 (64 MiB): zeros past 32 MiB where top holds nothing."""
    if base_fmt == "raw":
        base = "base.img"
        create_raw(d / base, SIZE)
        with open(d / base, "r+b") as f:
            f.write(bytes([BOTTOM_BYTE]) * SIZE)
    else:
        base = "base.qcow2"
        create_qcow2(d / base, SIZE)
        qemu_io(d / base, "write -P %d 0 %d" % (BOTTOM_BYTE, SIZE))
    create_qcow2(d / "mid.qcow2", SHORT, backing=base,
                 backing_fmt="raw" if base_fmt == "raw" else "qcow2")
    qemu_io(d / "mid.qcow2", "write -P 0x55 4M 1M")
    create_qcow2(d / "top.qcow2", SIZE, backing="mid.qcow2")
    qemu_io(d / "top.qcow2", "write -P 0x66 50M 1M")
    return base


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_commit_of_shorter_middle_keeps_zeros(image_dir, mountpoint, tmp_path,
                                              base_fmt):
    base = make_short_middle_chain(image_dir, base_fmt)
    before = snapshot_of(image_dir, "top.qcow2", tmp_path / "before.raw")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("top")
        start(exp, "commit", "top=mid.qcow2 base=%s" % base)
        info = wait_state(exp, ("completed", "failed"))
        assert info["state"] == "completed", info
        assert layer_files(exp) == ["top.qcow2", base]
        assert_reads_like(exp, before)
    qemu_img_check(image_dir / "top.qcow2")
    if base_fmt == "qcow2":
        qemu_img_check(image_dir / base)
    assert_reads_like(to_raw(image_dir / "top.qcow2", tmp_path / "after.raw"), before)
    with mounted(image_dir, mountpoint) as m:
        assert_reads_like(m.path("top"), before)


def test_offline_commit_of_shorter_middle_keeps_zeros(image_dir, tmp_path):
    base = make_short_middle_chain(image_dir, "qcow2")
    before = snapshot_of(image_dir, "top.qcow2", tmp_path / "before.raw")
    ctl_ok("commit", image_dir / "top.qcow2", "--top", "mid.qcow2", "--base", base)
    assert qemu_img_info(image_dir / "top.qcow2")["backing-filename"].endswith(base)
    for n in ("top.qcow2", base):
        qemu_img_check(image_dir / n)
    assert_reads_like(to_raw(image_dir / "top.qcow2", tmp_path / "after.raw"), before)


# ------------------------------------------- a base with a persistent bitmap

def test_grown_base_with_bitmap_stays_openable(image_dir, tmp_path):
    """base.qcow2 (20 GiB) with a persistent bitmap under an empty 40 GiB
    top: after the commit grew base, its bitmap table no longer fits the
    size, and QEMU refused base outright ("doesn't satisfy the
    constraints").  The grow clears the bitmaps' autoclear bit first, as
    any write of chainfs does, so QEMU opens base and only ignores the
    stale bitmap (keeping bitmaps in step is issue 11's bitmap work)."""
    create_qcow2(image_dir / "base.qcow2", 20 * 1024 * MiB)
    qemu_img("bitmap", "--add", image_dir / "base.qcow2", "b0")
    create_qcow2(image_dir / "top.qcow2", 40 * 1024 * MiB, backing="base.qcow2")
    qemu_io(image_dir / "top.qcow2", "write -P 0x21 1M 64k")
    ctl_ok("commit", image_dir / "top.qcow2")
    res = qemu_img("info", "--output=json", image_dir / "base.qcow2", check=False)
    assert res.returncode == 0, res.stderr
    assert qemu_img_info(image_dir / "base.qcow2")["virtual-size"] == 40 * 1024 * MiB
    res = qemu_img("check", image_dir / "base.qcow2", check=False)
    assert res.returncode in (0, 3), res.stdout + res.stderr   # 3: leaks only
    qemu_io(image_dir / "top.qcow2", "read -P 0x21 1M 64k", "read -P 0 2M 64k")
