"""Live resize (issue 13): `truncate -s BIGGER MOUNTPOINT/NAME` and
`chainctl resize` grow the chain's active layer while the export is
served; the new range reads as zeros whatever the lower layers hold; a
smaller size is EPERM, a live job on the chain EBUSY, a read-only export
EROFS.  Offline `chainctl resize IMAGE SIZE` does the same on the files.

qemu-img is the oracle: `qemu-img info` for the virtual size, `qemu-img
check` exit 0 (no corruption, no leak), `qemu-img compare` of the grown
image with the chain as it was (compare treats the extra range of the
larger image as having to read zeros).
"""
import errno
import os

import pytest

from helpers import (KiB, MiB, create_qcow2, create_raw, getxattr, mounted, qemu_img,
                     qemu_img_compare, qemu_img_info, qemu_io, to_raw)
from test_chainctl_common import ctl, ctl_fails, ctl_ok
from test_merge_common import start, wait_state

SMALL = 32 * MiB
BIG = 64 * MiB
LOWER_BYTE = 0xbb


def qemu_img_check(image):
    """`qemu-img check` exit 0: no corruption and no leaked cluster."""
    res = qemu_img("check", image, check=False)
    assert res.returncode == 0, "qemu-img check %s: rc=%d\n%s%s" % (
        image, res.returncode, res.stdout, res.stderr)


def read_at(path, off, n=64 * KiB):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def make_short_top(d, top_size=SMALL, compat="1.1"):
    """base.qcow2 (64 MiB of 0xbb) <- vm1.qcow2 (top_size, some data): a
    top shorter than the layer below, whose bytes a careless grow shows."""
    create_qcow2(d / "base.qcow2", BIG, compat=compat)
    qemu_io(d / "base.qcow2", "write -P %d 0 %d" % (LOWER_BYTE, BIG))
    create_qcow2(d / "vm1.qcow2", top_size, backing="base.qcow2", compat=compat)
    qemu_io(d / "vm1.qcow2", "write -P 0x11 1M 1M")


def assert_grown(path, before, new_size):
    """path (an export or a raw image) reads like `before` up to its size
    and zeros after, new_size bytes in all."""
    assert os.path.getsize(path) == new_size
    old = os.path.getsize(before)
    assert read_at(path, old) == bytes(64 * KiB), "lower-layer data exposed"
    assert read_at(path, new_size - 64 * KiB) == bytes(64 * KiB)
    qemu_img_compare(path, before, fmt_a="raw", fmt_b="raw")


@pytest.mark.parametrize("compat,top_size", [
    ("1.1", SMALL),
    ("0.10", SMALL),
    # the old end inside a cluster: its head keeps base's bytes, the rest
    # of the cluster must read zeros
    ("1.1", SMALL + 5 * KiB),
])
def test_truncate_grows_with_zeros(image_dir, mountpoint, tmp_path, compat, top_size):
    make_short_top(image_dir, top_size, compat)
    before = to_raw(image_dir / "vm1.qcow2", tmp_path / "before.raw")
    assert os.path.getsize(before) == top_size
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        assert os.path.getsize(exp) == top_size
        os.truncate(exp, BIG)
        assert os.stat(exp).st_size == BIG
        assert_grown(exp, before, BIG)
        # The guest may write the new range at once.
        fd = os.open(exp, os.O_RDWR)
        try:
            assert os.pwrite(fd, b"\x77" * 4096, BIG - 8192) == 4096
            os.fsync(fd)
            assert os.pread(fd, 8192, BIG - 8192) == b"\x77" * 4096 + bytes(4096)
        finally:
            os.close(fd)
    qemu_img_check(image_dir / "vm1.qcow2")
    assert qemu_img_info(image_dir / "vm1.qcow2")["virtual-size"] == BIG
    after = to_raw(image_dir / "vm1.qcow2", tmp_path / "after.raw")
    assert read_at(after, BIG - 8192, 4096) == b"\x77" * 4096
    # A remount keeps the size and the content.
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        assert os.path.getsize(exp) == BIG
        with open(exp, "rb") as f, open(after, "rb") as g:
            assert f.read() == g.read()


def test_truncate_same_size_changes_nothing(image_dir, mountpoint):
    make_short_top(image_dir)
    with mounted(image_dir, mountpoint) as m:
        os.truncate(m.path("vm1"), SMALL)
        assert os.path.getsize(m.path("vm1")) == SMALL
    assert qemu_img_info(image_dir / "vm1.qcow2")["virtual-size"] == SMALL


def test_shrink_refused_eperm(image_dir, mountpoint):
    make_short_top(image_dir)
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log.append("resize refused")
        exp = m.path("vm1")
        with pytest.raises(OSError) as e:
            os.truncate(exp, SMALL - 1 * MiB)
        assert e.value.errno == errno.EPERM
        assert os.path.getsize(exp) == SMALL
        assert "cannot shrink" in getxattr(exp, "user.chainfs.last_error")
        # Not a multiple of 512 bytes: a disk is made of sectors.
        with pytest.raises(OSError) as e:
            os.truncate(exp, SMALL + 100)
        assert e.value.errno == errno.EINVAL
        assert os.path.getsize(exp) == SMALL
    qemu_img_check(image_dir / "vm1.qcow2")
    assert qemu_img_info(image_dir / "vm1.qcow2")["virtual-size"] == SMALL


def test_resize_of_read_only_export_erofs(image_dir, mountpoint):
    make_short_top(image_dir)
    with mounted(image_dir, mountpoint, "-o", "ro") as m:
        m.allowed_log.append("resize refused")
        with pytest.raises(OSError) as e:
            os.truncate(m.path("vm1"), BIG)
        assert e.value.errno == errno.EROFS
        assert os.path.getsize(m.path("vm1")) == SMALL
    assert qemu_img_info(image_dir / "vm1.qcow2")["virtual-size"] == SMALL


def test_resize_refused_ebusy_while_a_job_runs(image_dir, mountpoint, tmp_path):
    create_qcow2(image_dir / "base.qcow2", SMALL)
    create_qcow2(image_dir / "mid.qcow2", backing="base.qcow2")
    qemu_io(image_dir / "mid.qcow2", "write -P 0x22 0 8M")
    create_qcow2(image_dir / "vm1.qcow2", backing="mid.qcow2")
    before = to_raw(image_dir / "vm1.qcow2", tmp_path / "before.raw")
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log.append("resize refused")
        exp = m.path("vm1")
        # A commit slow enough to be running for minutes (8 MiB at 4 KiB/s).
        start(exp, "commit", "top=mid.qcow2 bandwidth=4K")
        assert wait_state(exp, ("running", "completed", "failed"))["state"] == "running"
        with pytest.raises(OSError) as e:
            os.truncate(exp, BIG)
        assert e.value.errno == errno.EBUSY
        assert "a job is already" in getxattr(exp, "user.chainfs.last_error")
        # Paused is live too.
        start(exp, "job.pause")
        assert wait_state(exp, ("paused",))["state"] == "paused"
        with pytest.raises(OSError) as e:
            os.truncate(exp, BIG)
        assert e.value.errno == errno.EBUSY
        start(exp, "job.cancel")
        assert wait_state(exp, ("cancelled", "failed"))["state"] == "cancelled"
        # An active commit in ready is live until its pivot or cancel.
        start(exp, "commit", "active base=mid.qcow2")
        assert wait_state(exp, ("ready", "failed"))["state"] == "ready"
        with pytest.raises(OSError) as e:
            os.truncate(exp, BIG)
        assert e.value.errno == errno.EBUSY
        assert os.path.getsize(exp) == SMALL
        start(exp, "job.cancel")
        assert wait_state(exp, ("cancelled", "failed"))["state"] == "cancelled"
        # Once the job has ended the resize goes through.
        os.truncate(exp, BIG)
        assert_grown(exp, before, BIG)
    for n in ("vm1.qcow2", "mid.qcow2", "base.qcow2"):
        qemu_img_check(image_dir / n)


# ------------------------------------------------------------- chainctl

def test_chainctl_resize_online(image_dir, mountpoint, tmp_path):
    make_short_top(image_dir)
    before = to_raw(image_dir / "vm1.qcow2", tmp_path / "before.raw")
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log.append("resize refused")
        exp = m.path("vm1")
        out = ctl_ok("resize", exp, "+16M")
        assert "Resized vm1 from %d to %d bytes" % (SMALL, SMALL + 16 * MiB) in out
        assert os.path.getsize(exp) == SMALL + 16 * MiB
        ctl_ok("resize", exp, "64M")
        assert_grown(exp, before, BIG)
        err = ctl_fails("resize", exp, "40M")
        assert "use --shrink" in err, err
        err = ctl_fails("resize", exp, "40M", "--shrink")
        assert "shrinking is not supported" in err, err
        assert os.path.getsize(exp) == BIG
        # A refusal of the daemon reaches the user with its message.
        err = ctl_fails("resize", exp, "%d" % (BIG + 100))
        assert "multiple of 512" in err, err
    qemu_img_check(image_dir / "vm1.qcow2")
    assert qemu_img_info(image_dir / "vm1.qcow2")["virtual-size"] == BIG


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_chainctl_resize_offline(image_dir, mountpoint, tmp_path, compat):
    make_short_top(image_dir, compat=compat)
    before = to_raw(image_dir / "vm1.qcow2", tmp_path / "before.raw")
    out = ctl_ok("resize", image_dir / "vm1.qcow2", "64M")
    assert "Resized vm1.qcow2 from %d to %d bytes" % (SMALL, BIG) in out
    qemu_img_check(image_dir / "vm1.qcow2")
    assert qemu_img_info(image_dir / "vm1.qcow2")["virtual-size"] == BIG
    after = to_raw(image_dir / "vm1.qcow2", tmp_path / "after.raw")
    assert_grown(after, before, BIG)
    err = ctl_fails("resize", image_dir / "vm1.qcow2", "--", "-1M")
    assert "use --shrink" in err, err
    err = ctl_fails("resize", image_dir / "vm1.qcow2", "--shrink", "--", "-1M")
    assert "shrinking is not supported" in err, err
    assert qemu_img_info(image_dir / "vm1.qcow2")["virtual-size"] == BIG
    with mounted(image_dir, mountpoint) as m:
        assert_grown(m.path("vm1"), before, BIG)


def test_chainctl_resize_offline_raw(image_dir, tmp_path):
    create_raw(image_dir / "disk.img", 1 * MiB)
    qemu_io(image_dir / "disk.img", "write -P 0x33 0 1M", fmt="raw")
    ctl_ok("resize", image_dir / "disk.img", "+1M")
    assert os.path.getsize(image_dir / "disk.img") == 2 * MiB
    assert read_at(image_dir / "disk.img", 0, 1 * MiB) == b"\x33" * MiB
    assert read_at(image_dir / "disk.img", 1 * MiB, 1 * MiB) == bytes(MiB)


@pytest.mark.parametrize("size", ["fast", "0", "1T"])
def test_chainctl_resize_bad_size_is_usage_error(size):
    rc, out, err = ctl("resize", "x", size)
    assert rc == 2, (rc, out, err)
    assert "bad SIZE" in err, err


def test_chainctl_help_lists_resize():
    assert "\n  resize " in ctl_ok("--help")
    out = ctl_ok("resize", "--help")
    assert "chainctl resize" in out and "--shrink" in out
