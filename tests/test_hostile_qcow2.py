"""Hostile and corrupt qcow2 metadata, and read-only exports.

Images are made by qemu-img and qemu-io, then broken one entry at a time
with qcow2craft.  chainfs must never write over metadata (QEMU's overlap
check: the request fails with EIO, the image is marked corrupt and goes
read-only), never serve metadata or zeros where a table points somewhere
it cannot (that read fails with EIO and one log line; the rest of the
disk still reads), refuse at open an image whose header-level tables
cannot be trusted (naming the image and the table), and serve an image
it cannot write read-only (EROFS) instead of leaving it out.
"""
import ctypes
import errno
import mmap
import os
import pytest

from helpers import (KiB, MiB, chain_info, create_qcow2, file_sha256, image_dir,  # noqa: F401
                     mounted, mountpoint, qemu_img, qemu_img_info, qemu_io, run, to_raw)
from qcow2craft import COPIED, HDR_INCOMPAT, INCOMPAT_CORRUPT, EXT_BITMAPS, Qcow2
from test_chainctl_common import ctl, ctl_fails, ctl_ok

CS = 4 * KiB            # small clusters: one L2 table covers 2 MiB
SIZE = 16 * MiB         # eight L2 ranges
SPAN = 2 * MiB
NAME = "vm.qcow2"
EXPORT = "vm"
CHUNK = 64 * KiB


def make_image(d, name=NAME):
    """Data in L2 ranges 0, 1, 2 and 4; range 3 and the rest empty."""
    p = d / name
    create_qcow2(p, SIZE, cluster_size=CS)
    qemu_io(p, "write -P 0x11 0 1M", "write -P 0x22 2M 1M", "write -P 0x33 4M 1M",
            "write -P 0x44 8M 64k")
    return p


def reference(image, tmp_path):
    out = tmp_path / "reference.raw"
    to_raw(image, out)
    with open(out, "rb") as f:
        data = f.read()
    out.unlink()
    return data


def direct_read(path, offset, length):
    """One O_DIRECT read: exactly one request reaches the daemon."""
    buf = mmap.mmap(-1, length)
    fd = os.open(str(path), os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


def read_errno(path, offset, length):
    try:
        direct_read(path, offset, length)
        return 0
    except OSError as e:
        return e.errno


def assert_reads(export, ref, bad):
    """Chunks overlapping a bad range fail with EIO (cluster by cluster);
    every other byte of the disk reads as the reference."""
    for off in range(0, SIZE, CHUNK):
        if not any(s < off + CHUNK and off < e for s, e in bad):
            assert direct_read(export, off, CHUNK) == ref[off:off + CHUNK], \
                "healthy range at %d reads wrong" % off
            continue
        for c in range(off, off + CHUNK, CS):
            if any(s < c + CS and c < e for s, e in bad):
                assert read_errno(export, c, CS) == errno.EIO, "read at %d" % c
            else:
                assert direct_read(export, c, CS) == ref[c:c + CS], \
                    "healthy cluster at %d reads wrong" % c


def write_errno(path, offset, data):
    fd = os.open(str(path), os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


FALLOC_PUNCH_HOLE_KEEP_SIZE = 0x03


def fallocate_errno(fd, mode, offset, length):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, offset, length) != 0:
        return ctypes.get_errno()
    return 0


def log_lines(m, *words):
    return [line for line in m.read_log().splitlines() if all(w in line for w in words)]


# ---------------------------------------------------------------- overlap

def test_write_onto_refcount_block_is_prevented(image_dir, mountpoint, tmp_path):
    """The issue's case: an L2 entry (COPIED) pointing at the refcount
    block; a 64 KiB guest write through the export fails with EIO, the
    refcount block keeps its bytes, the image is marked corrupt and the
    export goes read-only."""
    p = make_image(image_dir)
    q = Qcow2(p)
    rb = q.refcount_block(0)
    guest = 6 * MiB                       # range 3: its own L2 table
    qemu_io(p, "write -P 0x55 %d 64k" % guest)
    rb_bytes = q._read(rb, CS)
    q.set_l2(guest, rb | COPIED)
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log = ["image marked corrupt", "refused"]
        exp = m.path(EXPORT)
        assert chain_info(exp)["writable"] is True
        assert write_errno(exp, guest, b"\xee" * (64 * KiB)) == errno.EIO
        lines = log_lines(m, str(p), "host offset %d" % rb, "refcount block")
        assert len(lines) == 1, m.read_log()
        info = chain_info(exp)
        assert info["writable"] is False
        assert NAME in info["reason"] and "refcount block" in info["reason"], info
        # Read-only from now on, everywhere; reads of healthy ranges go on.
        assert write_errno(exp, 0, b"\x01" * 4096) == errno.EROFS
        assert direct_read(exp, 0, 4096) == b"\x11" * 4096
        out = ctl_ok("info", exp)
        assert "read-only:" in out and "refcount block" in out, out
    q = Qcow2(p)
    assert q._read(rb, CS) == rb_bytes, "the refcount block was overwritten"
    assert q.incompat & INCOMPAT_CORRUPT, "corrupt bit not set"
    assert qemu_img_info(p)["format-specific"]["data"]["corrupt"] is True
    # Undo the crafted entry and the bit: the refcounts are as they were.
    q.set_l2(guest, 0)
    q.patch_header(HDR_INCOMPAT, "Q", q.incompat & ~INCOMPAT_CORRUPT)
    res = qemu_img("check", "--output=json", p, check=False)
    assert res.returncode in (0, 3), res.stdout + res.stderr   # a leak at most


def test_corrupt_image_is_served_read_only_after_remount(image_dir, mountpoint, tmp_path):
    p = make_image(image_dir)
    qemu_io(p, "write -P 0x55 6M 64k")
    q = Qcow2(p)
    q.set_l2(6 * MiB, q.rt_offset | COPIED)
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log = ["image marked corrupt", "refused"]
        assert write_errno(m.path(EXPORT), 6 * MiB, b"x" * 4096) == errno.EIO
    ref_after = file_sha256(str(p))
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log = ["served read-only", "refused"]
        exp = m.path(EXPORT)
        info = chain_info(exp)
        assert info["writable"] is False and "corrupt" in info["reason"], info
        assert write_errno(exp, 0, b"x" * 4096) == errno.EROFS
        assert direct_read(exp, 0, 4096) == b"\x11" * 4096
    assert file_sha256(str(p)) == ref_after


# ------------------------------------------------ corrupt tables, read side

def _l1_to(target):
    def craft(q):
        q.set_l1(0, target(q) | COPIED)
        return [(0, SPAN)]
    return craft


def _l2_to(target):
    def craft(q):
        q.set_l2(0, target(q) | COPIED)
        return [(0, CS)]
    return craft


def _l1_to_other_l2(q):
    # Range 0 and range 1 now name one table: neither can be trusted.
    q.set_l1(0, q.l1(1))
    return [(0, 2 * SPAN)]


def _l2_compressed_on_header(q):
    q.set_l2(0, q.make_compressed(0, 1))
    return [(0, CS)]


READ_CASES = {
    # what the L1 entry of range 0 points at
    "l1-past-eof": (_l1_to(lambda q: q.file_size() + 100 * CS), "past the end"),
    "l1-at-header": (_l1_to(lambda q: 512), "header"),
    "l1-at-l1": (_l1_to(lambda q: q.l1_offset), "L1 table"),
    "l1-at-other-l2": (_l1_to_other_l2, "L2 table"),
    "l1-at-refcount-table": (_l1_to(lambda q: q.rt_offset), "refcount table"),
    "l1-at-refcount-block": (_l1_to(lambda q: q.refcount_block(0)), "refcount block"),
    "l1-misaligned": (_l1_to(lambda q: q.l2_offset(0) + 512), "misaligned"),
    # what the L2 entry of guest cluster 0 points at
    "l2-past-eof": (_l2_to(lambda q: q.file_size() + 100 * CS), "past the end"),
    "l2-at-header": (_l2_compressed_on_header, "header"),
    "l2-at-l1": (_l2_to(lambda q: q.l1_offset), "L1 table"),
    "l2-at-other-l2": (_l2_to(lambda q: q.l2_offset(1)), "L2 table"),
    "l2-at-refcount-table": (_l2_to(lambda q: q.rt_offset), "refcount table"),
    "l2-at-refcount-block": (_l2_to(lambda q: q.refcount_block(0)), "refcount block"),
    "l2-misaligned": (_l2_to(lambda q: q.host_offset(CS) + 512), "misaligned"),
}


@pytest.mark.parametrize("case", sorted(READ_CASES))
def test_corrupt_table_fails_its_reads_only(case, image_dir, mountpoint, tmp_path):
    p = make_image(image_dir)
    ref = reference(p, tmp_path)
    craft, word = READ_CASES[case]
    bad = craft(Qcow2(p))
    before = file_sha256(str(p))
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log = ["refused"]
        exp = m.path(EXPORT)
        assert_reads(exp, ref, bad)
        lines = log_lines(m, str(p), "read of guest offset", word)
        assert lines, "no log line naming %s and %r:\n%s" % (p, word, m.read_log())
        assert all("host offset" in line for line in lines), lines
        # SEEK_DATA still answers: the broken range is this layer's.
        fd = os.open(exp, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        finally:
            os.close(fd)
        assert chain_info(exp)["writable"] is True
    assert file_sha256(str(p)) == before, "a read-only session wrote the image"
    # Offline, the chain opens the same way (the damage is met on reads).
    ctl_ok("info", p)
    assert file_sha256(str(p)) == before


def test_write_through_corrupt_l2_table_marks_corrupt(image_dir, mountpoint):
    p = make_image(image_dir)
    q = Qcow2(p)
    rt_bytes = q._read(q.rt_offset, CS)
    q.set_l1(0, q.rt_offset | COPIED)
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log = ["image marked corrupt", "refused"]
        exp = m.path(EXPORT)
        assert write_errno(exp, 4096, b"w" * 4096) == errno.EIO
        assert log_lines(m, str(p), "corrupt L2 table", "refcount table")
        assert chain_info(exp)["writable"] is False
        assert direct_read(exp, 4 * MiB, 4096) == b"\x33" * 4096
    q = Qcow2(p)
    assert q._read(q.rt_offset, CS) == rt_bytes
    assert q.incompat & INCOMPAT_CORRUPT


def test_compressed_cluster_past_end_of_truncated_file(image_dir, mountpoint, tmp_path):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        for i in range(SIZE // CS):
            f.write(bytes([(i * 7) & 0xFF]) * 1024 + os.urandom(64) + bytes(CS - 1088))
    p = image_dir / NAME
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
             "cluster_size=%d" % CS, src, p)
    q = Qcow2(p)
    entries = []
    for g in range(0, SIZE, CS):
        e = q.l2(g)
        host, length = q.compressed(e)
        entries.append((host, length, g))
    host, length, last_guest = max(entries)
    metadata = [q.l1_offset, q.rt_offset] + [q.l2_offset(i) for i in range(q.l1_size)] + \
        [q.refcount_block(i) for i in range(2) if q.rt(i)]
    if max(metadata) > host:
        pytest.skip("qemu-img placed metadata after the last compressed cluster")
    with open(src, "rb") as f:
        ref = f.read()
    os.truncate(p, host + length // 2 - 512 if length > 1024 else host + 16)
    before = file_sha256(str(p))
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log = ["refused", "cannot decompress"]
        exp = m.path(EXPORT)
        assert read_errno(exp, last_guest, CS) == errno.EIO
        assert log_lines(m, str(p), "guest offset %d" % last_guest) or \
            log_lines(m, str(p), "host offset %d" % host), m.read_log()
        for g in (0, CS, SIZE // 2, last_guest - CS):
            assert direct_read(exp, g, CS) == ref[g:g + CS]
    assert file_sha256(str(p)) == before


# ------------------------------------------------------- refused at open

def _patch(off, fmt, value):
    def craft(q):
        q.patch_header(off, fmt, value(q) if callable(value) else value)
    return craft


def _snapshot(q):
    qemu_img("snapshot", "-c", "s1", q.path)
    return Qcow2(q.path)


def _snap_extra_huge(q):
    q = _snapshot(q)
    pos = q.snapshot_entries()[0][0]
    q.write(pos + 36, (1 << 20).to_bytes(4, "big"))


def _snap_count_past_eof(q):
    q = _snapshot(q)
    q.patch_header(60, "I", 1000)         # 1000 entries do not fit the file


def _snap_l1_past_eof(q):
    q = _snapshot(q)
    pos = q.snapshot_entries()[0][0]
    q.write_u64(pos, q.file_size() + 64 * CS)


def _bitmap_dir_past_eof(q):
    qemu_img("bitmap", "--add", q.path, "b0")
    q = Qcow2(q.path)
    data, _ = q.extensions()[EXT_BITMAPS]
    q.write_u64(data + 16, q.file_size() + 64 * CS)


def _bitmap_table_at_l1(q):
    qemu_img("bitmap", "--add", q.path, "b0")
    q = Qcow2(q.path)
    data, _ = q.extensions()[EXT_BITMAPS]
    directory = q.read_u64(data + 16)
    q.write_u64(directory, q.l1_offset)
    q.write(directory + 8, (1).to_bytes(4, "big"))


OPEN_CASES = {
    "l1-misaligned": (_patch(40, "Q", lambda q: q.l1_offset + 512), "L1 table"),
    "l1-past-eof": (_patch(40, "Q", lambda q: q.file_size() + 64 * CS), "L1 table"),
    "l1-huge": (_patch(36, "I", 0x7FFFFFFF), "L1 table"),
    "l1-on-refcount-table": (_patch(40, "Q", lambda q: q.rt_offset), "refcount table"),
    "rt-misaligned": (_patch(48, "Q", lambda q: q.rt_offset + 512), "refcount table"),
    "rt-huge": (_patch(56, "I", 0x7FFFFFFF), "refcount table"),
    "rt-on-header": (_patch(48, "Q", 0), "refcount table"),
    "snapshots-too-many": (_patch(60, "I", 70000), "snapshot table"),
    "snapshots-misaligned": (lambda q: (_snapshot(q), _patch(64, "Q", lambda q: q.snapshots_offset
                                                              + 8)(Qcow2(q.path))),
                             "snapshot table"),
    "snapshots-past-eof": (lambda q: (_snapshot(q), _patch(64, "Q", lambda q: q.file_size()
                                                            + 64 * CS)(Qcow2(q.path))),
                           "snapshot table"),
    "snapshots-count-past-eof": (_snap_count_past_eof, "snapshot table"),
    "snapshots-on-l1": (lambda q: (_snapshot(q), _patch(64, "Q", lambda q: q.l1_offset)(
        Qcow2(q.path))), "snapshot"),
    "snapshot-extra-huge": (_snap_extra_huge, "snapshot"),
    "snapshot-l1-past-eof": (_snap_l1_past_eof, "L1 table of snapshot"),
    "bitmap-directory-past-eof": (_bitmap_dir_past_eof, "bitmap directory"),
    "bitmap-table-on-l1": (_bitmap_table_at_l1, "bitmap table"),
}


@pytest.mark.parametrize("case", sorted(OPEN_CASES))
def test_bad_header_table_refuses_the_chain(case, image_dir, mountpoint):
    p = make_image(image_dir)
    make_image(image_dir, "good.qcow2")
    craft, word = OPEN_CASES[case]
    craft(Qcow2(p))
    before = file_sha256(str(p))
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log = ["left out"]
        assert sorted(os.listdir(str(mountpoint))) == [".control", "good"]
        lines = log_lines(m, "left out", str(p))
        assert len(lines) == 1, m.read_log()
        assert word.lower() in lines[0].lower(), lines
        assert direct_read(m.path("good"), 0, 4096) == b"\x11" * 4096
    err = ctl_fails("info", p)
    assert str(p) in err and word.lower() in err.lower(), err
    assert file_sha256(str(p)) == before, "a refused image was written"


def test_snapshots_within_limits_still_open(image_dir, mountpoint, tmp_path):
    p = make_image(image_dir)
    qemu_img("snapshot", "-c", "s1", p)
    qemu_io(p, "write -P 0x66 0 64k")
    qemu_img("snapshot", "-c", "s2", p)
    ref = reference(p, tmp_path)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path(EXPORT)
        assert_reads(exp, ref, [])
        with open(exp, "r+b") as f:        # copies the shared L2 table
            f.seek(3 * MiB)
            f.write(b"\x77" * 8192)
            f.flush()
            os.fsync(f.fileno())
    res = qemu_img("check", p, check=False)
    assert res.returncode in (0, 3), res.stdout + res.stderr


# ----------------------------------------------------- read-only exports

def assert_read_only_export(exp, words):
    info = chain_info(exp)
    assert info["writable"] is False, info
    for w in words:
        assert w in info["reason"], info
    assert write_errno(exp, 0, b"z" * 4096) == errno.EROFS
    fd = os.open(exp, os.O_RDWR)
    try:
        assert fallocate_errno(fd, FALLOC_PUNCH_HOLE_KEEP_SIZE, 0, 4096) == errno.EROFS
        with pytest.raises(OSError) as ei:
            os.ftruncate(fd, SIZE * 2)
        assert ei.value.errno == errno.EROFS
    finally:
        os.close(fd)
    assert direct_read(exp, 0, 4096) == b"\x11" * 4096
    out = ctl_ok("info", exp)
    assert out.startswith("read-only: "), out


def test_corrupt_flag_top_is_served_read_only(image_dir, mountpoint):
    p = make_image(image_dir)
    q = Qcow2(p)
    q.patch_header(HDR_INCOMPAT, "Q", q.incompat | INCOMPAT_CORRUPT)
    before = file_sha256(str(p))
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log = ["served read-only"]
        assert_read_only_export(m.path(EXPORT), [NAME, "corrupt"])
    assert file_sha256(str(p)) == before
    # Offline info reports the same.
    out = ctl_ok("info", p)
    assert out.startswith("read-only: ") and "corrupt" in out, out


# A dirty top (lazy refcounts) is repaired, not served read-only:
# tests/test_dirty_repair.py.


def test_immutable_file_is_served_read_only(image_dir, mountpoint):
    p = make_image(image_dir)
    if os.geteuid() != 0 or run(["chattr", "+i", str(p)], check=False).returncode != 0:
        pytest.skip("no immutable attribute here")
    try:
        before = file_sha256(str(p))
        with mounted(image_dir, mountpoint) as m:
            m.allowed_log = ["served read-only"]
            assert_read_only_export(m.path(EXPORT), [NAME, "not permitted"])
        assert file_sha256(str(p)) == before
    finally:
        run(["chattr", "-i", str(p)])


def test_read_only_filesystem_is_served_read_only(image_dir, mountpoint, tmp_path):
    make_image(image_dir)
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or run(["mount", "--bind", str(image_dir), str(ro)],
                                check=False).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        if run(["mount", "-o", "remount,ro,bind", str(ro)], check=False).returncode != 0:
            pytest.skip("cannot remount read-only here")
        with mounted(ro, mountpoint) as m:
            m.allowed_log = ["served read-only"]
            assert_read_only_export(m.path(EXPORT), [NAME, "Read-only file system"])
        out = ctl_ok("info", ro / NAME)
        assert out.startswith("read-only: "), out
    finally:
        run(["umount", str(ro)], check=False)


@pytest.mark.parametrize("where", ["past-eof", "on-l1"])
def test_bad_refcount_block_makes_the_image_read_only(where, image_dir, mountpoint, tmp_path):
    """Reads never go through refcounts: the disk is served whole, but
    nothing can be allocated, so it is served read-only."""
    p = make_image(image_dir)
    ref = reference(p, tmp_path)
    q = Qcow2(p)
    target = q.file_size() + 64 * CS if where == "past-eof" else q.l1_offset
    q.write_u64(q.rt_offset, target)
    before = file_sha256(str(p))
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log = ["served read-only"]
        exp = m.path(EXPORT)
        assert_read_only_export(exp, [NAME, "refcount block 0",
                                      "host offset %d" % target])
        assert_reads(exp, ref, [])
    assert file_sha256(str(p)) == before
