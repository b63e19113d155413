"""Owner and mode of an export, as libvirt's DAC driver sets them (issue 13,
"A libvirt guest"): chown and chmod of MOUNTPOINT/NAME go to the chain's
active layer file, follow the disk to a new overlay (snapshot) and to base
(pivot), and are what the export shows after a remount.  With allow_other,
the user they name reads and writes the disk with O_DIRECT (cache='none')."""
import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from helpers import (MiB, create_qcow2, image_dir, mounted, mountpoint,  # noqa: F401
                     qemu_img_check, qemu_io, to_raw)
from test_merge_common import layer_files, start, wait_state

QEMU_UID, QEMU_GID = 65534, 65534   # nobody:nogroup stand in for libvirt-qemu
SIZE = 32 * MiB


def owner(path):
    st = os.stat(str(path))
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def make_chain(d):
    create_qcow2(d / "base.qcow2", SIZE)
    qemu_io(d / "base.qcow2", "write -P 0x61 0 4M")
    create_qcow2(d / "vm.qcow2", backing="base.qcow2")
    qemu_io(d / "vm.qcow2", "write -P 0x62 1M 1M")


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@needs_root
def test_chown_chmod_persist_to_active_layer_and_remount(image_dir, mountpoint):
    make_chain(image_dir)
    base_before = owner(image_dir / "base.qcow2")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        assert owner(exp) == owner(image_dir / "vm.qcow2")
        os.chown(exp, QEMU_UID, QEMU_GID)
        os.chmod(exp, 0o600)
        assert owner(exp) == (QEMU_UID, QEMU_GID, 0o600)
        assert owner(image_dir / "vm.qcow2") == (QEMU_UID, QEMU_GID, 0o600)
        assert owner(image_dir / "base.qcow2") == base_before
    with mounted(image_dir, mountpoint) as m:
        assert owner(m.path("vm")) == (QEMU_UID, QEMU_GID, 0o600)


@needs_root
def test_owner_follows_snapshot_and_pivot(image_dir, mountpoint, tmp_path):
    make_chain(image_dir)
    expected = to_raw(image_dir / "vm.qcow2", tmp_path / "expected.raw")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        os.chown(exp, QEMU_UID, QEMU_GID)
        os.chmod(exp, 0o660)
        start(exp, "snapshot", "vm-snap.qcow2")
        assert layer_files(exp)[0] == "vm-snap.qcow2"
        assert owner(image_dir / "vm-snap.qcow2") == (QEMU_UID, QEMU_GID, 0o660)
        assert owner(exp) == (QEMU_UID, QEMU_GID, 0o660)
        start(exp, "commit", "active")
        assert wait_state(exp, ("ready", "failed"))["state"] == "ready"
        start(exp, "job.pivot")
        assert wait_state(exp, ("completed", "failed"))["state"] == "completed"
        assert layer_files(exp) == ["base.qcow2"]
        assert owner(image_dir / "base.qcow2") == (QEMU_UID, QEMU_GID, 0o660)
        assert owner(exp) == (QEMU_UID, QEMU_GID, 0o660)
        with open(exp, "rb") as f, open(expected, "rb") as e:
            assert f.read() == e.read()
    with mounted(image_dir, mountpoint) as m:
        assert owner(m.path("vm")) == (QEMU_UID, QEMU_GID, 0o660)
    qemu_img_check(image_dir / "base.qcow2")


@pytest.fixture
def world_mountpoint():
    """A mount point another user can reach (pytest's tmp dirs are 0700)."""
    d = tempfile.mkdtemp(prefix="chainfs-owner-")
    os.chmod(d, 0o755)
    mnt = os.path.join(d, "mnt")
    os.mkdir(mnt)
    yield mnt
    shutil.rmtree(d, ignore_errors=True)


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv")
def test_qemu_user_uses_the_disk_it_owns(image_dir, world_mountpoint):
    make_chain(image_dir)
    with mounted(image_dir, world_mountpoint, "-o", "allow_other") as m:
        exp = m.path("vm")
        as_qemu = ["setpriv", "--reuid=%d" % QEMU_UID, "--regid=%d" % QEMU_GID,
                   "--clear-groups"]
        dd = as_qemu + ["dd", "if=/dev/zero", "of=" + exp, "bs=64k", "count=4",
                        "seek=100", "oflag=direct", "conv=notrunc,fsync", "status=none"]
        os.chmod(exp, 0o600)   # root's: the qemu user may not open it
        r = subprocess.run(dd, capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
        os.chown(exp, QEMU_UID, QEMU_GID)   # what libvirt does at domain start
        r = subprocess.run(dd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(as_qemu + ["dd", "if=" + exp, "bs=64k", "count=1", "skip=16",
                                      "iflag=direct", "status=none"], capture_output=True)
        assert r.returncode == 0 and r.stdout == b"\x62" * 65536
    qemu_img_check(image_dir / "vm.qcow2")
    qemu_io(image_dir / "vm.qcow2", "read -P 0 %d 256k" % (100 * 65536))
