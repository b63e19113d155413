"""Shared pieces of the daemon suites (test_daemon_*.py): real chainfs
mounts of chains built with qemu-img, checked against qemu-img.  This
module holds no tests of its own."""
import os

from helpers import (KiB, MiB, create_qcow2, file_sha256, qemu_img, qemu_io, run,
                     to_raw)


def export_names(mnt):
    return sorted(n for n in os.listdir(str(mnt)) if n not in (".control", ".events"))


def assert_export_equals_image(export_path, image, workdir, fmt=None):
    """The export reads, byte for byte, as `qemu-img convert -O raw` of image."""
    exp = os.path.join(str(workdir), os.path.basename(str(image)) + ".expected.raw")
    to_raw(image, exp, fmt=fmt)
    assert os.path.getsize(str(export_path)) == os.path.getsize(exp)
    got = file_sha256(str(export_path))
    want = file_sha256(exp)
    if got != want:
        # Find the first differing MiB for a useful message.
        with open(str(export_path), "rb") as fg, open(exp, "rb") as fe:
            off = 0
            while True:
                a, b = fg.read(MiB), fe.read(MiB)
                if a != b:
                    i = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
                    raise AssertionError("%s differs from %s at byte %d" % (
                        export_path, image, off + i))
                if not a:
                    break
                off += len(a)
    os.unlink(exp)


def pattern(seed, length):
    """Deterministic bytes for a write: seed (0..255-ish) and length."""
    block = bytes(((seed * 131 + i * 7) & 0xFF) for i in range(4096))
    return (block * (length // 4096 + 1))[:length]


def pwrite_all(path, offset, data, fsync=False, flags=0):
    fd = os.open(str(path), os.O_WRONLY | flags)
    try:
        done = 0
        while done < len(data):
            n = os.pwrite(fd, data[done:], offset + done)
            assert n > 0
            done += n
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def pread_all(path, offset, length):
    fd = os.open(str(path), os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def qemu_img_map(image):
    """`qemu-img map --output=json` of image (its whole chain)."""
    import json
    return json.loads(qemu_img("map", "-U", "--output=json", str(image)).stdout)


def map_at(entries, offset):
    for ent in entries:
        if ent["start"] <= offset < ent["start"] + ent["length"]:
            return ent
    raise AssertionError("offset %d not in map" % offset)


__all__ = [n for n in dir() if not n.startswith("_")] + [
    "KiB", "MiB", "create_qcow2", "qemu_img", "qemu_io", "run", "to_raw", "file_sha256"]
