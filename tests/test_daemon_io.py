"""Guest I/O through a real chainfs mount: hypervisor-style O_DIRECT
patterns (qemu-io), fio with verification, dd, two exports at once, sparse
operations (SEEK_DATA/SEEK_HOLE, punch hole, zero range), size refusals;
after unmount the images pass `qemu-img check` and equal a model."""
import errno
import fcntl
import os
import random
import shutil
import threading

import pytest

from helpers import (KiB, MiB, create_qcow2, create_raw, make_chain, mounted, qemu_img,
                     qemu_img_check, qemu_img_compare, qemu_io, run)
from test_daemon_common import (map_at, pattern, pread_all, pwrite_all, qemu_img_map)

SIZE = 32 * MiB

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(path, mode, offset, length):
    """fallocate(2) through ctypes (os.posix_fallocate has no mode)."""
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(str(path), os.O_RDWR)
    try:
        if libc.fallocate(fd, mode, offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


@pytest.fixture
def vm(image_dir, tmp_path):
    """vm.qcow2 over base.img, plus a raw model of the chain's content."""
    make_chain(image_dir, depth=2, size=SIZE, base_fmt="raw", top_name="vm.qcow2", seed=11)
    model = tmp_path / "model.raw"
    run(["qemu-img", "convert", "-O", "raw", str(image_dir / "vm.qcow2"), str(model)])
    return image_dir / "vm.qcow2", model


def apply_model(model, offset, data):
    with open(str(model), "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_qemu_io_direct_patterns(vm, image_dir, mountpoint, tmp_path):
    top, model = vm
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        qemu_io(exp, "write -P 0xa1 0 64k", "write -P 0xa2 1M 1M", "write -P 0xa3 100001 10000",
                "write -P 0xa4 31M 1M", fmt="raw", cache="none")
        qemu_io(exp, "read -P 0xa1 0 64k", "read -P 0xa2 1M 1M", "read -P 0xa3 100001 10000",
                "read -P 0xa4 31M 1M", fmt="raw", cache="none")
        # writeback (page cache) reads see the same
        qemu_io(exp, "read -P 0xa2 1M 1M", fmt="raw", cache="writeback")
        for off, ln, p in ((0, 64 * KiB, 0xa1), (MiB, MiB, 0xa2), (100001, 10000, 0xa3),
                           (31 * MiB, MiB, 0xa4)):
            apply_model(model, off, bytes([p]) * ln)
        # qemu-img convert of the export as a raw disk
        out = tmp_path / "conv.raw"
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", exp, str(out)])
        run(["cmp", str(out), str(model)])
    qemu_img_check(top)
    qemu_img_compare(top, model, fmt_b="raw")


def test_fio_randwrite_verify(vm, image_dir, mountpoint):
    top, _ = vm
    with mounted(image_dir, mountpoint) as m:
        res = run(["fio", "--name=verify", "--filename=" + m.path("vm"), "--rw=randwrite",
                   "--bs=16k", "--size=%d" % SIZE, "--direct=1", "--ioengine=psync",
                   "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                   "--fallocate=none", "--randseed=7", "--verify_state_save=0", "--output-format=terse"],
                  timeout=240)
        # terse field 5 is the error code of the job
        fields = res.stdout.strip().splitlines()[-1].split(";")
        assert fields[4] == "0", res.stdout
    qemu_img_check(top)


def test_dd_and_two_exports_at_once(image_dir, mountpoint, tmp_path):
    for name in ("a", "b"):
        create_qcow2(image_dir / ("%s-base.qcow2" % name), SIZE)
        qemu_io(image_dir / ("%s-base.qcow2" % name), "write -P 5 0 4M")
        create_qcow2(image_dir / ("%s.qcow2" % name), backing="%s-base.qcow2" % name)
    src = tmp_path / "src.raw"
    rng = random.Random(5)
    with open(str(src), "wb") as f:
        f.write(rng.randbytes(3 * MiB))
    models = {}
    for name in ("a", "b"):
        models[name] = tmp_path / ("%s.model" % name)
        to = str(models[name])
        run(["qemu-img", "convert", "-O", "raw", str(image_dir / ("%s.qcow2" % name)), to])

    errors = []

    def writer(name, seed):
        try:
            r = random.Random(seed)
            path = os.path.join(str(mountpoint), name)
            fd = os.open(path, os.O_WRONLY)
            try:
                for i in range(200):
                    ln = r.choice([512, 4096, 65536, 300000])
                    off = r.randrange(0, SIZE - ln)
                    data = pattern(seed + i, ln)
                    assert os.pwrite(fd, data, off) == ln
                    apply_model(models[name], off, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except Exception as e:  # reported by the main thread
            errors.append(e)

    with mounted(image_dir, mountpoint) as m:
        run(["dd", "if=%s" % src, "of=%s" % m.path("a"), "bs=64k", "seek=16",
             "conv=notrunc,fsync", "status=none"])
        apply_model(models["a"], 16 * 64 * KiB, open(str(src), "rb").read())
        threads = [threading.Thread(target=writer, args=(n, s)) for n, s in (("a", 1), ("b", 2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        for name in ("a", "b"):
            run(["cmp", m.path(name), str(models[name])])
    for name in ("a", "b"):
        qemu_img_check(image_dir / ("%s.qcow2" % name))
        qemu_img_compare(image_dir / ("%s.qcow2" % name), models[name], fmt_b="raw")
        # nothing written into the base
        qemu_io(image_dir / ("%s-base.qcow2" % name), "read -P 5 0 4M")


def test_size_is_fixed(vm, image_dir, mountpoint):
    # Growing is a resize (tests/test_daemon_resize.py); shrinking never.
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        with pytest.raises(OSError) as ei:
            os.truncate(exp, SIZE - MiB)
        assert ei.value.errno == errno.EPERM
        with pytest.raises(OSError) as ei:
            os.truncate(exp, 0)
        assert ei.value.errno == errno.EPERM
        with pytest.raises(OSError) as ei:
            os.open(exp, os.O_WRONLY | os.O_TRUNC)
        assert ei.value.errno == errno.EPERM
        # writes past the end are refused, not grown
        fd = os.open(exp, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"x" * 4096, SIZE)
            assert ei.value.errno in (errno.ENOSPC, errno.EFBIG)
            n = os.pwrite(fd, b"y" * 4096, SIZE - 1024)
            assert n == 1024
        finally:
            os.close(fd)
        assert os.stat(exp).st_size == SIZE
        assert pread_all(exp, SIZE - 1024, 4096) == b"y" * 1024
        # chmod and utime are accepted as on a disk file
        os.chmod(exp, 0o600)
        assert os.stat(exp).st_mode & 0o777 == 0o600
        os.utime(exp, (1000000000, 1000000000))
        assert int(os.stat(exp).st_mtime) == 1000000000


def test_mtime_changes_only_with_content(vm, image_dir, mountpoint):
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        os.utime(exp, (1000000000, 1000000000))
        pread_all(exp, 0, MiB)
        assert int(os.stat(exp).st_mtime) == 1000000000
        pwrite_all(exp, 0, b"z" * 4096)
        assert int(os.stat(exp).st_mtime) > 1000000000


def test_seek_data_hole_punch_and_zero(image_dir, mountpoint):
    """Sparse layout comes from the chain; punch hole and zero range make
    zero clusters in the active layer (qemu-img map)."""
    create_qcow2(image_dir / "base.qcow2", SIZE)
    qemu_io(image_dir / "base.qcow2", "write -P 1 4M 1M")
    create_qcow2(image_dir / "vm.qcow2", backing="base.qcow2")
    qemu_io(image_dir / "vm.qcow2", "write -P 2 8M 64k", "write -P 3 20M 2M")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        fd = os.open(exp, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 4 * MiB
            assert os.lseek(fd, 4 * MiB, os.SEEK_HOLE) == 5 * MiB
            assert os.lseek(fd, 5 * MiB, os.SEEK_DATA) == 8 * MiB
            assert os.lseek(fd, 8 * MiB, os.SEEK_HOLE) == 8 * MiB + 64 * KiB
            assert os.lseek(fd, 21 * MiB, os.SEEK_DATA) == 21 * MiB
            assert os.lseek(fd, 22 * MiB, os.SEEK_HOLE) == 22 * MiB
            with pytest.raises(OSError) as ei:
                os.lseek(fd, 23 * MiB, os.SEEK_DATA)
            assert ei.value.errno == errno.ENXIO
            assert os.lseek(fd, 23 * MiB, os.SEEK_HOLE) == 23 * MiB
            with pytest.raises(OSError) as ei:
                os.lseek(fd, SIZE, os.SEEK_HOLE)
            assert ei.value.errno == errno.ENXIO
        finally:
            os.close(fd)

        # Punch the base's data (4M..5M) and part of the top's (20M + 1M).
        fallocate(exp, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4 * MiB, MiB)
        fallocate(exp, FALLOC_FL_ZERO_RANGE, 20 * MiB, MiB)
        assert pread_all(exp, 4 * MiB, MiB) == bytes(MiB)
        assert pread_all(exp, 20 * MiB, MiB) == bytes(MiB)
        assert pread_all(exp, 21 * MiB, MiB) == b"\x03" * MiB
        fd = os.open(exp, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 8 * MiB
            assert os.lseek(fd, 20 * MiB, os.SEEK_DATA) == 21 * MiB
        finally:
            os.close(fd)
        # Other modes are refused.
        with pytest.raises(OSError) as ei:
            fallocate(exp, 0, 0, MiB)
        assert ei.value.errno == errno.EOPNOTSUPP
    top = image_dir / "vm.qcow2"
    qemu_img_check(top)
    entries = qemu_img_map(top)
    for off in (4 * MiB, 4 * MiB + 512 * KiB, 20 * MiB, 20 * MiB + 999 * KiB):
        ent = map_at(entries, off)
        assert ent["zero"] is True and ent["data"] is False and ent["depth"] == 0, ent
    ent = map_at(entries, 21 * MiB)
    assert ent["data"] is True and ent["depth"] == 0
    qemu_io(top, "read -P 0 4M 1M", "read -P 0 20M 1M", "read -P 3 21M 1M", "read -P 2 8M 64k")


def test_statfs(vm, image_dir, mountpoint):
    with mounted(image_dir, mountpoint) as m:
        sv = os.statvfs(m.mountpoint)
        real = os.statvfs(str(image_dir))
        assert sv.f_bsize == real.f_bsize
        assert sv.f_blocks == real.f_blocks
