"""Persistent bitmaps of images chainfs opens but does not write (issue 11,
item 3): opening or mounting never changes an image that is not written.

An incremental-backup host keeps dirty bitmaps in its qcow2 images.
chainfs does not maintain bitmaps yet (a guest write clears the autoclear
bit, as the spec asks of an editor lacking bitmap support: see the
"bitmap" scenario of test_chain_write.py), but a mount with no write must
leave the image byte for byte as it was, so that QEMU still trusts the
bitmaps: `qemu-img check` exit 0 and the bitmap listed without "in-use".
"""
import json
import os

from helpers import (MiB, create_qcow2, file_sha256, image_dir, mounted,  # noqa: F401
                     mountpoint, qemu_img, qemu_io, to_raw)
from test_chain_common import qcow2_field

HDR_AUTOCLEAR = 88


def bitmaps(path):
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    return info.get("format-specific", {}).get("data", {}).get("bitmaps", [])


def make_top_with_bitmap(d):
    create_qcow2(d / "base.qcow2", 64 * MiB)
    qemu_io(d / "base.qcow2", "write -P 0x41 0 8M")
    create_qcow2(d / "vm.qcow2", backing="base.qcow2")
    qemu_io(d / "vm.qcow2", "write -P 0x42 4M 2M")
    qemu_img("bitmap", "--add", d / "vm.qcow2", "b0")
    qemu_img("bitmap", "--add", "-g", "128K", d / "base.qcow2", "full")
    for p in (d / "vm.qcow2", d / "base.qcow2"):
        assert [b["flags"] for b in bitmaps(p)] == [["auto"]]
    return d / "vm.qcow2", d / "base.qcow2"


def test_mount_without_writes_keeps_bitmaps(image_dir, mountpoint, tmp_path):
    top, base = make_top_with_bitmap(image_dir)
    expected = to_raw(top, tmp_path / "expected.raw")
    digests = {p: file_sha256(str(p)) for p in (top, base)}
    with mounted(image_dir, mountpoint) as m:
        with open(m.path("vm"), "rb") as f, open(expected, "rb") as e:
            assert f.read() == e.read()
        # A flush with nothing written writes nothing either.
        fd = os.open(m.path("vm"), os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for p, digest in digests.items():
        assert file_sha256(str(p)) == digest, "%s changed by a mount without writes" % p
        res = qemu_img("check", p, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        assert [b["flags"] for b in bitmaps(p)] == [["auto"]], bitmaps(p)


def test_read_only_mount_keeps_bitmaps(image_dir, mountpoint):
    top, base = make_top_with_bitmap(image_dir)
    digests = {p: file_sha256(str(p)) for p in (top, base)}
    with mounted(image_dir, mountpoint, "-o", "ro") as m:
        with open(m.path("vm"), "rb") as f:
            while f.read(4 * MiB):
                pass
    for p, digest in digests.items():
        assert file_sha256(str(p)) == digest


def test_guest_write_leaves_lower_layer_bitmaps_alone(image_dir, mountpoint):
    """The write clears the top's autoclear bit (its bitmap is no longer
    kept); the base, only read, keeps its bitmap valid."""
    top, base = make_top_with_bitmap(image_dir)
    digest = file_sha256(str(base))
    with mounted(image_dir, mountpoint) as m:
        fd = os.open(m.path("vm"), os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x43" * 65536, 20 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert file_sha256(str(base)) == digest
    assert [b["flags"] for b in bitmaps(base)] == [["auto"]]
    assert qcow2_field(str(top), HDR_AUTOCLEAR, "Q") & 1 == 0
    res = qemu_img("check", top, check=False)
    assert res.returncode in (0, 3) and "ERROR" not in res.stdout + res.stderr
