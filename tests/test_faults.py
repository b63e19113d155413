"""Failing disks, through the fault-injection shim (tests/faultinject.c).

The daemon runs with the shim preloaded; each test arms a rule at the
phase it tests (after the guest wrote, once a job copies) and proves from
the shim's log that the fault fired there, on the file it names.  Then
the usual checks: every byte a successful fsync covered reads back through
a fresh mount, `qemu-img check` finds no corruption, and jobs end as their
on-error policy says.

Latched flush errors: after one failed fdatasync of an image, every later
flush of the export fails with EIO (Linux marks the pages whose write-back
failed clean: a later fsync that returned 0 would lie), the image takes no
metadata writes, `user.chainfs.chain` names the error, and only a restart
of the daemon clears it.  An EIO of one pread or pwrite fails that request
only.
"""
import errno
import os

import pytest

from helpers import (FaultInjector, MiB, chain_info, create_qcow2, job_info,
                     mounted, qemu_img_check, qemu_img_compare, qemu_io, to_raw,
                     wait_for)
from test_merge_common import layer_files, start, wait_state

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE")

LATCH_LOG = ("latched", "flush failed", "flush at shutdown failed",
             "flushing", "cannot flush", "Input/output error",
             "No space left")


def fault_mount(d, tmp_path, fi, name="mnt"):
    m = mounted(d, tmp_path / name, env=fi.env())
    m.allowed_log.extend(LATCH_LOG)
    return m


def fsync_errno(fd):
    try:
        os.fsync(fd)
        return 0
    except OSError as e:
        return e.errno


def pwrite_errno(fd, data, off):
    try:
        assert os.pwrite(fd, data, off) == len(data)
        return 0
    except OSError as e:
        return e.errno


def pread_errno(fd, n, off):
    try:
        os.pread(fd, n, off)
        return 0
    except OSError as e:
        return e.errno


# ------------------------------------------------------------ latched flush

@pytest.mark.parametrize("errname", ["EIO", "ENOSPC"])
def test_failed_fdatasync_is_latched_until_restart(tmp_path, errname):
    d = tmp_path / "images"
    d.mkdir()
    create_qcow2(d / "base.qcow2", 16 * MiB)
    qemu_io(d / "base.qcow2", "write -P 1 0 4M")
    create_qcow2(d / "vm1.qcow2", backing="base.qcow2")
    qemu_io(d / "vm1.qcow2", "write -P 2 0 1M")   # allocated: written in place
    fi = FaultInjector(tmp_path / "fi")
    m = fault_mount(d, tmp_path, fi)
    with m:
        exp = m.path("vm1")
        fd = os.open(exp, os.O_RDWR)
        try:
            assert pwrite_errno(fd, b"\x33" * 65536, 0) == 0
            assert fsync_errno(fd) == 0
            assert "io_error" not in chain_info(exp)
            # The guest writes, then its fsync meets a failed write-back.
            assert pwrite_errno(fd, b"\x44" * 65536, 65536) == 0
            fi.arm("fdatasync:vm1.qcow2:1:%s" % errname)
            assert fsync_errno(fd) == getattr(errno, errname)
            fired = fi.fired("fdatasync", "vm1.qcow2")
            assert len(fired) == 1 and fired[0][2] == errname, fired
            fi.disarm()
            # Latched: every later flush fails, after more writes too, and
            # although the shim fails nothing any more.
            assert fsync_errno(fd) == errno.EIO
            # The export is read-only from now on (design.md): a write in
            # place fails too, and the flush after it still fails.
            assert pwrite_errno(fd, b"\x55" * 4096, 8192) == errno.EROFS
            assert fsync_errno(fd) == errno.EIO
        finally:
            os.close(fd)
        fd = os.open(exp, os.O_RDWR)
        try:
            assert fsync_errno(fd) == errno.EIO   # a new open too
            # No writes that could allocate: a new cluster is refused too.
            assert pwrite_errno(fd, b"\x66" * 65536, 8 * MiB) == errno.EROFS
        finally:
            os.close(fd)
        info = chain_info(exp)
        top = info["layers"][0]
        assert top["file"] == "vm1.qcow2"
        assert "fdatasync" in top["io_error"] and "vm1.qcow2" in top["io_error"], info
        assert info["io_error"] == top["io_error"]
        assert info["writable"] is False and "fdatasync" in info["reason"], info
        assert "io_error" not in info["layers"][1]
        assert len(fi.fired()) == 1
        m.expect_clean = False   # its flush at shutdown fails, as it must
    log = m.read_log()
    latched = [line for line in log.splitlines() if "latched" in line]
    assert len(latched) == 1 and "vm1.qcow2" in latched[0] and "fdatasync" in latched[0], log
    # Nothing written after the latch corrupts the image (unused clusters
    # of its last batch may leak: their release is a metadata write too).
    qemu_img_check(d / "vm1.qcow2")
    qemu_img_check(d / "base.qcow2")

    # A restart clears it: flushes work again and what they cover stays.
    with mounted(d, tmp_path / "mnt2") as m2:
        exp = m2.path("vm1")
        assert "io_error" not in chain_info(exp)
        fd = os.open(exp, os.O_RDWR)
        try:
            assert pwrite_errno(fd, b"\x77" * 65536, 8 * MiB) == 0
            assert fsync_errno(fd) == 0
        finally:
            os.close(fd)
    with mounted(d, tmp_path / "mnt3") as m3:
        with open(m3.path("vm1"), "rb") as f:
            f.seek(8 * MiB)
            assert f.read(65536) == b"\x77" * 65536
            f.seek(4 * MiB)
            assert f.read(65536) == b"\0" * 65536
    qemu_img_check(d / "vm1.qcow2")


def test_latched_lower_layer_fails_every_export_using_it(tmp_path):
    """A golden base shared by two chains, committed into (with force) and
    its fdatasync failed: both exports' flushes fail from then on."""
    d = tmp_path / "images"
    d.mkdir()
    create_qcow2(d / "gold.qcow2", 16 * MiB)
    qemu_io(d / "gold.qcow2", "write -P 1 0 2M")
    for vm in ("vm1", "vm2"):
        create_qcow2(d / ("%s-snap.qcow2" % vm), backing="gold.qcow2")
        create_qcow2(d / ("%s.qcow2" % vm), backing="%s-snap.qcow2" % vm)
    qemu_io(d / "vm1-snap.qcow2", "write -P 3 0 4M")
    fi = FaultInjector(tmp_path / "fi", "fdatasync:gold.qcow2:1:EIO:0")
    m = fault_mount(d, tmp_path, fi)
    with m:
        exp1, exp2 = m.path("vm1"), m.path("vm2")
        start(exp1, "commit", "top=vm1-snap.qcow2 force")
        info = wait_state(exp1, ("failed", "completed"), timeout=120)
        assert info["state"] == "failed", info
        assert fi.fired("fdatasync", "gold.qcow2"), fi.fired()
        assert layer_files(exp1) == ["vm1.qcow2", "vm1-snap.qcow2", "gold.qcow2"]
        fi.disarm()
        for exp in (exp1, exp2):
            fd = os.open(exp, os.O_RDWR)
            try:
                assert fsync_errno(fd) == errno.EIO, exp
            finally:
                os.close(fd)
            info = chain_info(exp)
            assert "gold.qcow2" in info["io_error"], info
        m.expect_clean = False
    for img in ("gold.qcow2", "vm1.qcow2", "vm1-snap.qcow2", "vm2.qcow2"):
        qemu_img_check(d / img)


# ------------------------------------------------------------ one range

def test_eio_of_one_range_fails_that_request_only(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    create_qcow2(d / "base.qcow2", 16 * MiB)
    qemu_io(d / "base.qcow2", "write -P 1 0 16M")
    create_qcow2(d / "vm1.qcow2", backing="base.qcow2")
    qemu_io(d / "vm1.qcow2", "write -P 2 4M 1M")
    fi = FaultInjector(tmp_path / "fi")
    m = fault_mount(d, tmp_path, fi)
    with m:
        exp = m.path("vm1")
        fd = os.open(exp, os.O_RDWR | os.O_DIRECT)   # no page cache
        try:
            # A read of the base fails once; the next one is served.
            fi.arm("pread:base.qcow2:1:EIO")
            assert pread_errno(fd, 65536, 0) == errno.EIO
            assert fi.fired("pread", "base.qcow2")
            fi.disarm()
            assert os.pread(fd, 65536, 0) == b"\x01" * 65536
            # A write in place fails once; the next one lands.
            fi.arm("pwrite:vm1.qcow2:1:EIO")
            assert pwrite_errno(fd, b"\x09" * 65536, 4 * MiB) == errno.EIO
            assert fi.fired("pwrite", "vm1.qcow2")
            fi.disarm()
            assert pwrite_errno(fd, b"\x09" * 65536, 4 * MiB) == 0
            # Nothing latched: flushes work.
            assert fsync_errno(fd) == 0
            assert "io_error" not in chain_info(exp)
            assert os.pread(fd, 65536, 4 * MiB) == b"\x09" * 65536
        finally:
            os.close(fd)
        assert len(fi.fired()) == 2
    qemu_img_check(d / "vm1.qcow2")
    with mounted(d, tmp_path / "mnt2") as m2:
        with open(m2.path("vm1"), "rb") as f:
            f.seek(4 * MiB)
            assert f.read(65536) == b"\x09" * 65536
