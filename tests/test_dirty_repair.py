"""Dirty images (lazy refcounts left unwritten by a killed QEMU): repaired
before they are written, read as they are otherwise (issue 11, item 5).

Every dirty image here is made the way real hosts make them: qemu-img
creates it with lazy_refcounts=on, qemu-io writes into it and then aborts,
so the dirty bit stays set and `qemu-img check` finds clusters in use at
refcount 0.  The oracle is qemu-img: after chainfs wrote such an image,
`qemu-img check` exits 0 and the content is what qemu-img read before,
plus the writes made through the export.
"""
import errno
import os

import pytest

from helpers import (KiB, MiB, chain_info, create_qcow2, file_sha256, image_dir,  # noqa: F401
                     mounted, mountpoint, qemu_img, qemu_img_check, qemu_io, run, to_raw)
from test_chain_common import INCOMPAT_DIRTY, qcow2_field
from test_hostile_qcow2 import direct_read, log_lines, write_errno
from test_merge_common import command, layer_files, start, wait_state

SIZE = 64 * MiB
HDR_INCOMPAT = 72
REBUILT = "rebuilt the refcounts of a dirty image"


def make_dirty(path, *writes, opts=(), clean=()):
    """A qcow2 image a killed QEMU left dirty: the writes `clean` are made
    and closed cleanly, then the last qemu-io `writes` land in its tables
    and their refcounts never reach the file."""
    create_qcow2(path, SIZE, extra_opts=["lazy_refcounts=on"] + list(opts))
    if clean:
        qemu_io(path, *clean)
    cmd = ["qemu-io", "-f", "qcow2"]
    for w in writes:
        cmd += ["-c", w]
    r = run(cmd + ["-c", "abort", str(path)], check=False)
    assert r.returncode != 0, "qemu-io did not abort"
    assert is_dirty(path)
    res = qemu_img("check", path, check=False)
    assert res.returncode == 2 and "refcount=0 reference=1" in res.stdout + res.stderr, (
        "not a dirty image with stale refcounts:\n" + res.stdout)


def is_dirty(path):
    return bool(qcow2_field(str(path), HDR_INCOMPAT, "Q") & INCOMPAT_DIRTY)


def write_fsync(path, offset, data):
    fd = os.open(str(path), os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_all(path):
    with open(str(path), "rb") as f:
        return f.read()


@pytest.mark.parametrize("opts", [[], ["cluster_size=512"], ["refcount_bits=1"],
                                  ["refcount_bits=64", "cluster_size=4096"]],
                         ids=["default", "512b-clusters", "refcount1", "refcount64"])
def test_dirty_top_is_repaired_when_mounted(opts, image_dir, mountpoint, tmp_path):
    p = image_dir / "vm.qcow2"
    # A compressed cluster too (qemu-io writes those with their refcounts).
    make_dirty(p, "write -P 0x11 0 4M", "write -P 0x13 20M 1M", opts=opts,
               clean=["write -c -P 0x12 8M 64k"])
    before = read_all(to_raw(p, tmp_path / "before.raw"))
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        info = chain_info(exp)
        assert info["writable"] is True, info
        assert len(log_lines(m, str(p), REBUILT)) == 1, m.read_log()
        assert read_all(exp) == before
        # Writes allocate on the rebuilt refcounts: new clusters past the
        # ones the tables use, never over them.
        write_fsync(exp, 40 * MiB, b"\x77" * MiB)
        write_fsync(exp, 2 * MiB, b"\x78" * (64 * KiB))
    assert not is_dirty(p)
    qemu_img_check(p)  # exit 0: no corruption, no leaks
    expected = bytearray(before)
    expected[40 * MiB:41 * MiB] = b"\x77" * MiB
    expected[2 * MiB:2 * MiB + 64 * KiB] = b"\x78" * (64 * KiB)
    assert read_all(to_raw(p, tmp_path / "after.raw")) == bytes(expected)


def test_dirty_top_with_internal_snapshot_keeps_it(image_dir, mountpoint, tmp_path):
    p = image_dir / "vm.qcow2"
    create_qcow2(p, SIZE, extra_opts=["lazy_refcounts=on"])
    qemu_io(p, "write -P 0x21 0 2M")
    qemu_img("snapshot", "-c", "s1", p)
    snap_raw = tmp_path / "s1.raw"
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", p, snap_raw)
    r = run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 2M", "-c", "abort", str(p)],
            check=False)
    assert r.returncode != 0 and is_dirty(p)
    before = read_all(to_raw(p, tmp_path / "before.raw"))
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        assert read_all(exp) == before
        write_fsync(exp, 0, b"\x23" * (64 * KiB))  # into a cluster the snapshot shares
    qemu_img_check(p)
    assert "s1" in qemu_img("snapshot", "-l", p).stdout
    again = tmp_path / "s1-after.raw"
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", p, again)
    assert read_all(again) == read_all(snap_raw)
    expected = bytearray(before)
    expected[0:64 * KiB] = b"\x23" * (64 * KiB)
    assert read_all(to_raw(p, tmp_path / "after.raw")) == bytes(expected)


def test_read_only_mount_leaves_a_dirty_image_as_it_is(image_dir, mountpoint, tmp_path):
    p = image_dir / "vm.qcow2"
    make_dirty(p, "write -P 0x31 0 1M")
    before = read_all(to_raw(p, tmp_path / "before.raw"))
    digest = file_sha256(str(p))
    with mounted(image_dir, mountpoint, "-o", "ro") as m:
        exp = m.path("vm")
        assert read_all(exp) == before
        with pytest.raises(OSError) as ei:
            os.open(exp, os.O_WRONLY)
        assert ei.value.errno == errno.EROFS
        assert not log_lines(m, REBUILT), m.read_log()
    assert file_sha256(str(p)) == digest
    assert is_dirty(p)


def test_commit_into_dirty_base_repairs_it_first(image_dir, mountpoint, tmp_path):
    """A dirty backing file is read as it is; the commit that must write it
    reopens it read-write, which rebuilds its refcounts first."""
    base = image_dir / "base.qcow2"
    make_dirty(base, "write -P 0x5a 0 4M")
    create_qcow2(image_dir / "vm1.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(image_dir / "vm1.qcow2", "write -P 0x21 1M 1M", "write -P 0x22 30M 64k")
    expected = read_all(to_raw(image_dir / "vm1.qcow2", tmp_path / "expected.raw"))
    digest = file_sha256(str(base))
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        assert read_all(exp) == expected
        assert file_sha256(str(base)) == digest  # reading changed nothing
        start(exp, "commit", "active")
        assert wait_state(exp, ("ready", "failed"))["state"] == "ready"
        command(exp, "job.pivot")
        assert wait_state(exp, ("completed", "failed"))["state"] == "completed"
        assert layer_files(exp) == ["base.qcow2"]
        assert len(log_lines(m, str(base), REBUILT)) == 1, m.read_log()
        assert read_all(exp) == expected
    assert not is_dirty(base)
    qemu_img_check(base)
    assert read_all(to_raw(base, tmp_path / "after.raw")) == expected


def test_dirty_image_with_bitmaps_is_served_read_only(image_dir, mountpoint):
    """Its bitmap tables are not walked by the rebuild: refused for
    writing with the tool to run, served read-only, left unchanged."""
    p = image_dir / "vm.qcow2"
    create_qcow2(p, SIZE, extra_opts=["lazy_refcounts=on"])
    qemu_io(p, "write -P 0x11 0 1M")
    qemu_img("bitmap", "--add", p, "b0")
    r = run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 1M 64k", "-c", "abort", str(p)],
            check=False)
    assert r.returncode != 0 and is_dirty(p)
    digest = file_sha256(str(p))
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log = ["served read-only"]
        exp = m.path("vm")
        info = chain_info(exp)
        assert info["writable"] is False, info
        assert "bitmaps" in info["reason"] and "qemu-img check -r all" in info["reason"], info
        assert write_errno(exp, 0, b"z" * 4096) == errno.EROFS
        assert direct_read(exp, 0, 4096) == b"\x11" * 4096
    assert file_sha256(str(p)) == digest


def test_dirty_image_with_corrupt_table_is_not_rebuilt(image_dir, mountpoint):
    """An L2 entry past the end of the file: the rebuild would count a
    cluster that is not there; it refuses and nothing is written."""
    from qcow2craft import Qcow2
    p = image_dir / "vm.qcow2"
    make_dirty(p, "write -P 0x11 0 1M")
    q = Qcow2(p)
    q.set_l2(2 * MiB, (1 << 63) | (1 << 40))  # a data cluster far past the end
    digest = file_sha256(str(p))
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log = ["served read-only", "refused", "past the end"]
        exp = m.path("vm")
        info = chain_info(exp)
        assert info["writable"] is False, info
        assert "cannot be rebuilt" in info["reason"] and "past the end" in info["reason"], info
        assert write_errno(exp, 0, b"z" * 4096) == errno.EROFS
        assert direct_read(exp, 0, 4096) == b"\x11" * 4096
        assert not log_lines(m, REBUILT), m.read_log()
    assert file_sha256(str(p)) == digest
