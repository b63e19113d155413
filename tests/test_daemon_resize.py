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
import hashlib
import os
import shutil

import pytest

import test_power_loss as pl
from helpers import (KiB, MiB, Mount, create_qcow2, create_raw, getxattr, mounted,
                     qemu_img, qemu_img_compare, qemu_img_info, qemu_io, to_raw)
from powerloss import crash_points, write_state
from test_chainctl_common import ctl, ctl_fails, ctl_ok
from test_merge_common import layer_files, start, wait_state

SMALL = 32 * MiB
BIG = 64 * MiB
LOWER_BYTE = 0xbb
PL_SIZE = 4 * MiB     # the power-loss guest's disk (test_power_loss.SIZE)
PL_BIG = 8 * MiB


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


# ------------------------------------------------------------- power loss

class ResizeCase:
    """A case for test_power_loss.record: vm.qcow2 (4 MiB, the size the
    power-loss guest writes in) over an 8 MiB base full of 0xbb; the job
    grows the export to 8 MiB between guest writes."""

    def __init__(self, compat):
        self.name = "resize-%s" % compat
        self.compat = compat

    def build(self, d):
        create_qcow2(d / "base.qcow2", PL_BIG, compat=self.compat)
        qemu_io(d / "base.qcow2", "write -P %d 0 %d" % (LOWER_BYTE, PL_BIG))
        create_qcow2(d / "vm.qcow2", PL_SIZE, backing="base.qcow2", compat=self.compat)
        qemu_io(d / "vm.qcow2", "write -P 0x11 64k 64k")

    def job(self, exp, guest):
        os.truncate(exp, PL_BIG)
        assert os.path.getsize(exp) == PL_BIG
        guest.round(8)


@pytest.mark.slow
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_power_loss_during_resize(image_dir, mountpoint, tmp_path, compat):
    """Replay of every flush and write of a live resize under a guest
    (tests/test_power_loss.py has the machinery): at each crash point the
    images pass `qemu-img check`, and the export is 4 MiB or 8 MiB, reads
    what the guest was acknowledged below 4 MiB, and zeros above, never
    base's 0xbb."""
    if not os.path.exists(pl.IORECORD):
        pytest.skip("no %s" % pl.IORECORD)
    assert pl.SIZE == PL_SIZE
    case = ResizeCase(compat)
    seed = int(hashlib.sha1(case.name.encode()).hexdigest()[:8], 16) + pl.SEED
    work = tmp_path / "work"
    work.mkdir()
    rec, guest, initial = pl.record(case, image_dir, mountpoint, work, seed)
    acks, issues = rec.markers("ACK"), rec.markers("ISSUE")
    state_dir = str(image_dir)
    seen, checked, sizes = set(), set(), set()
    for k, state_seed in crash_points(rec, pl.STATES_PER_CASE, seed):
        state = rec.crash_state(k, state_seed)
        key = tuple(sorted((name, f.signature()) for name, f in state.items()))
        acked, issued = pl.last_marker(acks, k), pl.last_marker(issues, k)
        if (key, acked, issued) in seen:
            continue
        seen.add((key, acked, issued))
        what = "%s: crash at record %d of %d (%r), seed %d" % (
            case.name, k, len(rec.records), rec.records[k - 1], state_seed)
        shutil.rmtree(state_dir, ignore_errors=True)
        os.mkdir(state_dir)
        write_state(state, state_dir)
        pl.check_images(state_dir, state, checked, what)
        m = Mount(state_dir, str(mountpoint))
        m.expect_clean = False
        with m:
            exp = m.path(pl.EXPORT)
            assert os.path.exists(exp), "%s: no export\n%s" % (what, m.read_log())
            assert layer_files(exp) == ["vm.qcow2", "base.qcow2"], what
            with open(exp, "rb") as f:
                got = f.read()
        log = m.read_log().lower()
        assert "sanitizer" not in log and "runtime error" not in log, what
        assert len(got) in (PL_SIZE, PL_BIG), "%s: size %d" % (what, len(got))
        sizes.add(len(got))
        assert got[PL_SIZE:] == bytes(len(got) - PL_SIZE), (
            "%s: the grown range shows lower-layer data" % what)
        disk, allowed = pl.expected_blocks(initial, guest.writes, acked, issued)
        for b in range(PL_SIZE // pl.BLOCK):
            blk = got[b * pl.BLOCK:(b + 1) * pl.BLOCK]
            ok = (blk in allowed[b]) if b in allowed else (
                blk == disk[b * pl.BLOCK:(b + 1) * pl.BLOCK])
            assert ok, "%s: block %d reads %r..." % (what, b, blk[:8])
    # The replay saw both sides of the resize (else it tested half of it).
    assert sizes == {PL_SIZE, PL_BIG}, sizes
