"""The control surface of a real mount: the user.chainfs.* attributes, the
control file, live snapshot under a running writer, and refusals with
their errno and last_error."""
import errno
import json
import os
import random
import threading

import pytest

from helpers import (KiB, MiB, chain_info, create_qcow2, getxattr, job_info, make_chain,
                     mounted, qemu_img, qemu_img_check, qemu_img_info, qemu_io, run,
                     setxattr, setxattr_errno, to_raw, wait_job)
from test_daemon_common import map_at, pattern, pread_all, pwrite_all, qemu_img_map

SIZE = 32 * MiB
BLOCK = 64 * KiB


@pytest.fixture
def vm(image_dir):
    make_chain(image_dir, depth=2, size=SIZE, base_fmt="qcow2", top_name="vm.qcow2", seed=3)
    return image_dir / "vm.qcow2"


def last_error(path):
    return getxattr(path, "user.chainfs.last_error")


def test_read_attributes(vm, image_dir, mountpoint):
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        names = os.listxattr(exp)
        for a in ("user.chainfs.chain", "user.chainfs.job", "user.chainfs.last_error"):
            assert a in names
        info = chain_info(exp)
        assert info == {"name": "vm", "writable": True,
                        "image_dir": os.path.realpath(str(image_dir)),
                        "layers": info["layers"]}
        files = [layer["file"] for layer in info["layers"]]
        assert files == ["vm.qcow2", "base.qcow2"]
        top = info["layers"][0]
        assert top["format"] == "qcow2" and top["virtual_size"] == SIZE
        assert top["backing"] == "base.qcow2"
        # design.md's fields, plus what `chainctl info` shows besides.
        assert set(top) == {"file", "format", "virtual_size", "allocated", "backing",
                            "cluster_size", "backing_format"}
        assert top["cluster_size"] == 65536 and top["backing_format"] == "qcow2"
        assert info["layers"][1]["backing"] is None
        assert job_info(exp) == {}
        assert last_error(exp) == ""
        # unknown names
        with pytest.raises(OSError) as ei:
            os.getxattr(exp, "user.chainfs.nope")
        assert ei.value.errno == errno.ENODATA
        # Outside user.chainfs.*: no file here holds one (libvirt's DAC
        # driver reads that as "no xattrs here", see test_guest_qemu.py).
        for name in ("user.other", "trusted.libvirt.security.ref_dac"):
            with pytest.raises(OSError) as ei:
                os.getxattr(exp, name)
            assert ei.value.errno == errno.ENOTSUP, name
        assert setxattr_errno(exp, "user.chainfs.nope", "x") == errno.ENOTSUP
        assert setxattr_errno(exp, "user.whatever", "x") == errno.ENOTSUP
        assert setxattr_errno(exp, "user.chainfs.chain", "x") == errno.ENOTSUP
        assert setxattr_errno(m.mountpoint, "user.chainfs.snapshot", "x.qcow2") in (
            errno.ENOTSUP, errno.EPERM)
        # a too small buffer
        assert len(os.getxattr(exp, "user.chainfs.chain")) > 10


def test_live_snapshot_under_writer(vm, image_dir, mountpoint):
    """Writes go on while the snapshot is taken; none is lost, the new layer
    holds the later ones, the export keeps its name, also after a remount."""
    nblocks = 128
    stop = threading.Event()
    written = {}
    errors = []

    def writer():
        try:
            fd = os.open(os.path.join(str(mountpoint), "vm"), os.O_WRONLY)
            try:
                i = 0
                while not stop.is_set() or i < 40:
                    blk = i % nblocks
                    data = pattern(i, BLOCK)
                    assert os.pwrite(fd, data, blk * BLOCK) == BLOCK
                    written[blk] = data
                    i += 1
            finally:
                os.close(fd)
        except Exception as e:
            errors.append(e)

    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        t = threading.Thread(target=writer)
        t.start()
        try:
            setxattr(exp, "user.chainfs.snapshot", "snap1.qcow2")
        finally:
            stop.set()
            t.join(timeout=60)
        assert not errors, errors
        assert os.path.exists(str(image_dir / "snap1.qcow2"))
        info = chain_info(exp)
        assert [layer["file"] for layer in info["layers"]] == [
            "snap1.qcow2", "vm.qcow2", "base.qcow2"]
        assert info["name"] == "vm"
        assert sorted(n for n in os.listdir(m.mountpoint) if n != ".control") == ["vm"]
        # a write after the snapshot lands in the new layer only
        late = pattern(200, BLOCK)
        pwrite_all(exp, 200 * BLOCK, late, fsync=True)
        for blk, data in written.items():
            assert pread_all(exp, blk * BLOCK, BLOCK) == data, blk
    snap = image_dir / "snap1.qcow2"
    qemu_img_check(snap)
    qemu_img_check(image_dir / "vm.qcow2")
    info = qemu_img_info(snap)
    assert info["backing-filename"] == "vm.qcow2"
    assert info["format-specific"]["data"]["compat"] == "1.1"
    ent = map_at(qemu_img_map(snap), 200 * BLOCK)
    assert ent["depth"] == 0 and ent["data"] is True, ent
    # the old layer kept the late write out
    old_raw = image_dir.parent / "old.raw"
    to_raw(image_dir / "vm.qcow2", old_raw)
    with open(str(old_raw), "rb") as f:
        f.seek(200 * BLOCK)
        assert f.read(BLOCK) != late
    os.unlink(str(old_raw))
    # remount: same export name, new top, same content
    with mounted(image_dir, mountpoint) as m:
        assert sorted(n for n in os.listdir(m.mountpoint) if n != ".control") == ["vm"]
        assert chain_info(m.path("vm"))["layers"][0]["file"] == "snap1.qcow2"
        assert pread_all(m.path("vm"), 200 * BLOCK, BLOCK) == late
        for blk, data in written.items():
            assert pread_all(m.path("vm"), blk * BLOCK, BLOCK) == data, blk


def test_snapshot_refusals(vm, image_dir, mountpoint):
    create_qcow2(image_dir / "other.qcow2", SIZE)
    before = sorted(os.listdir(str(image_dir)))
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        # an existing file
        assert setxattr_errno(exp, "user.chainfs.snapshot", "base.qcow2") in (
            errno.EEXIST, errno.EINVAL)
        msg = last_error(exp)
        assert "base.qcow2" in msg
        # a path leaving the directory, an empty name
        assert setxattr_errno(exp, "user.chainfs.snapshot", "../x.qcow2") == errno.EINVAL
        assert "x.qcow2" in last_error(exp)
        assert setxattr_errno(exp, "user.chainfs.snapshot", "") == errno.EINVAL
        # the chain did not change
        assert [layer["file"] for layer in chain_info(exp)["layers"]] == [
            "vm.qcow2", "base.qcow2"]
        # verbs with no job
        for verb in ("pivot", "cancel", "pause", "resume"):
            assert setxattr_errno(exp, "user.chainfs.job." + verb) == errno.EINVAL
            assert "vm" in last_error(exp)
        assert setxattr_errno(exp, "user.chainfs.job.speed", "bogus") == errno.EINVAL
        # bad commit words
        assert setxattr_errno(exp, "user.chainfs.commit", "frobnicate") == errno.EINVAL
        assert "frobnicate" in last_error(exp)
        assert job_info(exp) == {}
    assert sorted(os.listdir(str(image_dir))) == before
    log = m.read_log()
    assert log.count("refused") >= 5, log


def test_control_file(vm, image_dir, mountpoint):
    with mounted(image_dir, mountpoint) as m:
        ctl = m.path(".control")
        with open(ctl) as f:
            status = json.loads(f.read())
        assert [e["name"] for e in status["exports"]] == ["vm"]
        e = status["exports"][0]
        assert e["file"] == "vm.qcow2" and e["size"] == SIZE
        assert e["job"] == {}
        assert [layer["file"] for layer in e["chain"]["layers"]] == ["vm.qcow2", "base.qcow2"]

        fd = os.open(ctl, os.O_RDWR)
        try:
            os.write(fd, b"snapshot vm s2.qcow2\n")
            reply = json.loads(os.pread(fd, 65536, 0))
            assert reply["ok"] is True
            with pytest.raises(OSError) as ei:
                os.write(fd, b"snapshot nosuch s3.qcow2")
            assert ei.value.errno == errno.ENOENT
            reply = json.loads(os.pread(fd, 65536, 0))
            assert reply["ok"] is False and "nosuch" in reply["error"]
            with pytest.raises(OSError) as ei:
                os.write(fd, b"frobnicate vm")
            assert ei.value.errno == errno.EINVAL
            with pytest.raises(OSError) as ei:
                os.write(fd, b"snapshot vm s2.qcow2")
            assert ei.value.errno in (errno.EEXIST, errno.EINVAL)
            reply = json.loads(os.pread(fd, 65536, 0))
            assert reply["ok"] is False and "s2.qcow2" in reply["error"]
            assert reply["errno"] == ei.value.errno
        finally:
            os.close(fd)
        assert "s2.qcow2" in last_error(m.path("vm"))
        assert chain_info(m.path("vm"))["layers"][0]["file"] == "s2.qcow2"
        with open(ctl) as f:
            status = json.loads(f.read())
        assert status["exports"][0]["file"] == "s2.qcow2"
    qemu_img_check(image_dir / "s2.qcow2")
    assert qemu_img_info(image_dir / "s2.qcow2")["backing-filename"] == "vm.qcow2"


def test_jobs_through_control_file(image_dir, mountpoint, tmp_path):
    """The control file's verbs reach the job engine: commit, then stream."""
    make_chain(image_dir, depth=3, size=SIZE, base_fmt="qcow2", top_name="vm.qcow2", seed=9)
    model = tmp_path / "model.raw"
    to_raw(image_dir / "vm.qcow2", model)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        fd = os.open(m.path(".control"), os.O_RDWR)
        try:
            os.write(fd, b"commit vm top=snap1.qcow2")
            reply = json.loads(os.pread(fd, 65536, 0))
            assert reply["ok"] is True and reply["export"] == "vm"
            wait_job(exp, timeout=60)
            assert [layer["file"] for layer in chain_info(exp)["layers"]] == [
                "vm.qcow2", "base.qcow2"]
            with pytest.raises(OSError) as ei:
                os.write(fd, b"speed vm 1M")
            # the finished job refuses the verb
            assert ei.value.errno == errno.EBUSY
            assert "completed" in json.loads(os.pread(fd, 65536, 0))["error"]
            os.write(fd, b"stream vm")
            wait_job(exp, timeout=60)
            assert [layer["file"] for layer in chain_info(exp)["layers"]] == ["vm.qcow2"]
        finally:
            os.close(fd)
        run(["cmp", exp, str(model)])
    qemu_img_check(image_dir / "vm.qcow2")
    assert "backing-filename" not in qemu_img_info(image_dir / "vm.qcow2")


def test_snapshot_refused_while_job_runs(image_dir, mountpoint):
    make_chain(image_dir, depth=3, size=SIZE, base_fmt="qcow2", top_name="vm.qcow2", seed=12)
    qemu_io(image_dir / "snap1.qcow2", "write -P 9 0 8M")
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        # a commit slowed down so that it is still running below
        setxattr(exp, "user.chainfs.commit", "top=snap1.qcow2 bandwidth=64K")
        assert job_info(exp)["state"] in ("running", "paused", "ready")
        assert setxattr_errno(exp, "user.chainfs.snapshot", "s9.qcow2") == errno.EBUSY
        assert "job" in last_error(exp)
        assert not os.path.exists(str(image_dir / "s9.qcow2"))
        setxattr(exp, "user.chainfs.job.cancel")
        wait_job(exp, states=("cancelled", "completed"), timeout=60)
        # once the job is over, the snapshot goes through
        setxattr(exp, "user.chainfs.snapshot", "s9.qcow2")
        assert chain_info(exp)["layers"][0]["file"] == "s9.qcow2"
    qemu_img_check(image_dir / "s9.qcow2")


def test_snapshot_and_job_start_race(image_dir, mountpoint):
    """A snapshot and an active commit asked at the same moment: one of
    them waits for or refuses the other, never both run on the layers at
    once.  Each round writes a block first; the export ends equal to the
    model and no job fails."""
    rng = random.Random(41)
    make_chain(image_dir, depth=2, size=SIZE, base_fmt="qcow2", top_name="vm.qcow2", seed=13)
    with open(to_raw(image_dir / "vm.qcow2", image_dir.parent / "m.raw"), "rb") as f:
        model = bytearray(f.read())
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm")
        ctl = m.path(".control")
        for rnd in range(20):
            if len(chain_info(exp)["layers"]) == 1:
                # a pivot left base alone: give the commit a layer to race for
                setxattr(exp, "user.chainfs.snapshot", "p%d.qcow2" % rnd)
            depth = len(chain_info(exp)["layers"])
            off = rng.randrange(SIZE // BLOCK) * BLOCK
            data = pattern(0x40 + rnd, BLOCK)
            pwrite_all(exp, off, data)
            model[off:off + BLOCK] = data
            results = {}
            gate = threading.Barrier(2)

            def snapshot(delay):
                gate.wait()
                threading.Event().wait(delay)
                results["snapshot"] = setxattr_errno(exp, "user.chainfs.snapshot",
                                                     "r%d.qcow2" % rnd)

            def commit(delay):
                # Through the control file: the kernel serialises the
                # setxattr calls on one file, so both as xattrs never overlap.
                gate.wait()
                threading.Event().wait(delay)
                fd = os.open(ctl, os.O_WRONLY)
                try:
                    os.write(fd, b"commit vm active delete")
                    results["commit"] = 0
                except OSError as e:
                    results["commit"] = e.errno
                finally:
                    os.close(fd)

            threads = [threading.Thread(target=snapshot, args=(rng.random() / 1000,)),
                       threading.Thread(target=commit, args=(rng.random() / 1000,))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert set(results.values()) <= {0, errno.EBUSY}, results
            assert 0 in results.values(), results
            if results["commit"] == 0:
                wait_job(exp, states=("ready",), timeout=60)
                setxattr(exp, "user.chainfs.job.pivot")
                info = wait_job(exp, states=("completed",), timeout=60)
                assert info["type"] == "active-commit", info
                if results["snapshot"] == 0:
                    # both went through: the commit started after the
                    # snapshot, on the snapshot's layer
                    assert info["top"] == "r%d.qcow2" % rnd, (info, results)
            # a pivot leaves base alone; otherwise the snapshot added one
            layers = chain_info(exp)["layers"]
            want = 1 if results["commit"] == 0 else depth + (results["snapshot"] == 0)
            assert len(layers) == want, (layers, results)
            assert pread_all(exp, 0, SIZE) == bytes(model), "round %d" % rnd
    for layer in os.listdir(image_dir):
        if layer.endswith(".qcow2"):
            qemu_img_check(image_dir / layer)
