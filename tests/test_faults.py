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
import random
import threading
import zlib

import pytest

from helpers import (job_stopped_on_error, FaultInjector, MiB, chain_info, create_qcow2, job_info,
                     mounted, qemu_img_check, qemu_img_compare, qemu_io,
                     setxattr_errno, wait_for)
from test_merge_common import GuestThread, command, layer_files, start, wait_state

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


# ------------------------------------------------- ENOSPC at every job step

BLOCK = 64 * 1024
SIZE = 32 * MiB


class FaultGuest(GuestThread):
    """A guest writing 64 KiB blocks at seeded offsets and fsyncing every
    few writes, through a disk that may fail.  It keeps what each
    successful fsync made durable: `durable` maps block -> bytes (the
    blocks it never wrote hold the chain's content from before), and a
    block written after the last successful fsync, or whose write failed,
    is left out of the final check (its content may be either)."""

    def __init__(self, path, seed, max_writes=400):
        super().__init__(daemon=True)
        self.path = str(path)
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.cond = threading.Condition()
        self.max_writes = max_writes
        self.durable = {}
        self.pending = {}
        self.unknown = set()
        self.writes = self.failed_writes = self.fsyncs = self.failed_fsyncs = 0
        self.error = None

    def run(self):
        fd = os.open(self.path, os.O_RDWR)
        try:
            while not self.stop_event.is_set():
                with self.cond:
                    # Done with its writes: wait for more(), or the end.
                    self.cond.wait_for(lambda: self.writes < self.max_writes or
                                       self.stop_event.is_set())
                if self.stop_event.is_set():
                    break
                blk = self.rng.randrange(SIZE // BLOCK)
                data = self.rng.randbytes(BLOCK)
                try:
                    assert os.pwrite(fd, data, blk * BLOCK) == BLOCK
                    self.pending[blk] = data
                    self.unknown.discard(blk)
                except OSError as e:
                    # EROFS once a failed flush latched the top: read-only.
                    assert e.errno in (errno.EIO, errno.ENOSPC, errno.EROFS), e
                    self.pending.pop(blk, None)
                    self.unknown.add(blk)
                    self.failed_writes += 1
                self.writes += 1
                if self.writes % 4 == 0:
                    try:
                        os.fsync(fd)
                        self.durable.update(self.pending)
                        self.pending.clear()
                        self.fsyncs += 1
                    except OSError as e:
                        assert e.errno in (errno.EIO, errno.ENOSPC), e
                        self.failed_fsyncs += 1
        except Exception as e:  # reported by finish()
            self.error = repr(e)
        finally:
            os.close(fd)

    def more(self, n):
        """Write n more blocks (the guest waits once it wrote its lot)."""
        with self.cond:
            self.max_writes = self.writes + n
            self.cond.notify_all()

    def stop(self):
        with self.cond:
            self.stop_event.set()
            self.cond.notify_all()

    def __exit__(self, *exc):
        self.stop()
        self.join(timeout=60)
        return False

    def finish(self):
        self.stop()
        self.join(timeout=60)
        assert not self.is_alive()
        assert self.error is None, self.error

    def wait_writes(self, n, timeout=60):
        wait_for(lambda: self.writes >= n or self.error or not self.is_alive(),
                 timeout=timeout, what="%d guest writes" % n)
        assert self.error is None, self.error

    def check(self, before, after):
        """after (the export read back through a fresh mount) holds every
        byte an fsync covered; before is the export before the guest."""
        for blk in range(SIZE // BLOCK):
            if blk in self.pending or blk in self.unknown:
                continue
            want = self.durable.get(blk, before[blk * BLOCK:(blk + 1) * BLOCK])
            got = after[blk * BLOCK:(blk + 1) * BLOCK]
            assert got == want, "fsync'd block %d (offset %d) lost" % (blk, blk * BLOCK)


def build_chain(d):
    create_qcow2(d / "base.qcow2", SIZE)
    qemu_io(d / "base.qcow2", "write -P 1 0 8M")
    create_qcow2(d / "snap1.qcow2", backing="base.qcow2")
    qemu_io(d / "snap1.qcow2", "write -P 2 6M 8M")
    create_qcow2(d / "vm1.qcow2", backing="snap1.qcow2")
    qemu_io(d / "vm1.qcow2", "write -P 3 12M 4M")


def read_export(path):
    with open(path, "rb") as f:
        return f.read()


# job: (verb, words, the file it writes, layers once it completed)
JOBS = {
    "commit": ("commit", "top=snap1.qcow2", "base.qcow2", ["vm1.qcow2", "base.qcow2"]),
    "active": ("commit", "active", "base.qcow2", ["base.qcow2"]),
    "stream": ("stream", "", "vm1.qcow2", ["vm1.qcow2"]),
}
# step: (op, thread, transient): the job's own threads are not "chainfs"
# (the FUSE threads, the guest's); a failed sync latches, a pwrite not.
STEPS = {
    "copy": ("pwrite", "!chainfs", True),
    "sync": ("sync", "!chainfs", False),
    "mirror": ("pwrite", "chainfs", True),   # active commit in ready
}
CASES = [(j, s, p) for j in JOBS for s in ("copy", "sync") for p in ("report", "stop", "ignore")]
CASES += [("active", "mirror", p) for p in ("report", "stop", "ignore")]


# How fast each case's job starts.  A copy fault must hit a copy write
# before the last window (8 MiB at 512 KiB/s: ~14 s after the first
# windows); a sync fault must be armed before the job's last flush.  A
# mirror fault comes in ready, which the job need not be slow to reach.
START_SPEED = {"copy": "512K", "sync": "512K", "mirror": "1M"}


def job_words(job, policy, bandwidth):
    words = JOBS[job][1]
    return ("%s bandwidth=%s on-error=%s" % (words, bandwidth, policy)).strip()


def finish_job(exp, job):
    """Take a running job to its end: pivot an active commit once ready."""
    if job == "active":
        info = wait_state(exp, ("ready", "failed", "paused"), timeout=120)
        assert info["state"] == "ready", info
        start(exp, "job.pivot")
    info = wait_state(exp, ("completed", "failed", "cancelled"), timeout=120)
    assert info["state"] == "completed", info
    assert layer_files(exp) == JOBS[job][3]


def cancel_job(exp):
    """Cancel the job and wait for its end.  EBUSY (a verb in progress,
    such as a failing pivot) is asked again until the job takes it or
    ends by itself."""
    wait_for(lambda: job_info(exp)["state"] in ("cancelled", "failed", "completed") or
             setxattr_errno(exp, "user.chainfs.job.cancel") == 0,
             timeout=60, what="the job to take the cancel")
    return wait_state(exp, ("cancelled", "failed", "completed"), timeout=60)


def end_latched_job(exp, job, policy):
    """Drive a job whose image is latched to its end; none completes."""
    # A latched image is read-only: a copy into it may fail with EROFS.
    errs = ("No space left", "Input/output", "Read-only file system")

    def stopped():
        info = job_info(exp)
        if info["state"] in ("failed", "cancelled", "completed"):
            return info
        if info["state"] in ("paused", "standby") and info["error"]:
            return info
        if info["state"] == "ready":
            return info
        return None
    info = wait_for(stopped, timeout=120, what="the job to stop on the error")
    if info["state"] == "ready":
        assert job == "active", info
        if setxattr_errno(exp, "user.chainfs.job.pivot") == 0:
            # Accepted: the job pivots, and fails at the flush of base.
            info = wait_state(exp, ("failed", "cancelled", "completed"), timeout=120)
        else:
            # Refused: the job stays ready, in sync with nothing durable;
            # cancel keeps the old active layer.
            info = cancel_job(exp)
    if info["state"] in ("paused", "standby"):
        assert policy == "stop", info
        assert any(e in info["error"] for e in errs), info
        start(exp, "job.resume")
        info = wait_for(lambda: job_info(exp)["state"] in ("paused", "standby", "failed")
                        and job_info(exp), timeout=60, what="the job to stop again")
        assert info["state"] != "completed", info
        info = cancel_job(exp)
    assert info["state"] != "completed", info
    if info["state"] == "failed":
        assert any(e in info["error"] for e in errs), info
    return info


@pytest.mark.parametrize("job,step,policy", CASES)
def test_enospc_at_each_step_of_a_job(tmp_path, job, step, policy):
    verb, _, target, _ = JOBS[job]
    op, thread, transient = STEPS[step]
    d = tmp_path / "images"
    d.mkdir()
    build_chain(d)
    fi = FaultInjector(tmp_path / "fi")
    m = fault_mount(d, tmp_path, fi)
    completed = False
    with m:
        exp = m.path("vm1")
        before = read_export(exp)
        with FaultGuest(exp, seed=zlib.crc32(('%s-%s-%s' % (job, step, policy)).encode())) as guest:
            guest.wait_writes(8)
            start(exp, verb, job_words(job, policy, START_SPEED[step]))
            if step == "mirror":
                info = wait_state(exp, ("ready", "failed"), timeout=120)
                assert info["state"] == "ready", info
                guest.more(100)
            else:
                wait_for(lambda: job_info(exp)["offset"] > 0, timeout=60,
                         what="the copy to start")
            fi.arm("%s:%s:1:ENOSPC:1:%s" % (op, target, thread))
            if step == "sync":
                # Armed: the job's next flush of the target fails, and no
                # job ends without one, so the rest of the copy may as
                # well run at full speed.  (The slow start only had to
                # keep the job from passing its last flush before this.)
                setxattr_errno(exp, "user.chainfs.job.speed", "0")
            # The guest's writes reach base in ready: they are the mirror.
            fired = fi.wait_fired(path=target, timeout=120)
            info = job_info(exp)
            # In the phase tested: not after the job (the copy, or the sync
            # of an active commit on reaching ready, or a stream's final
            # flush, or a mirror write in ready).
            assert info["state"] != "completed", (info, fired)
            assert 0 < info["offset"] <= info["len"], (info, fired)
            fi.disarm()
            if info["state"] in ("running", "ready", "paused"):
                setxattr_errno(exp, "user.chainfs.job.speed", "0")
            if transient:
                if step == "mirror":
                    # A failed mirror write never fails the guest's write
                    # (it landed in top): its range stays dirty and the job,
                    # still ready, copies it again before the pivot.
                    assert guest.failed_writes == 0
                    assert job_info(exp)["state"] == "ready"
                    finish_job(exp, job)
                    completed = True
                elif policy == "report":
                    info = wait_state(exp, ("failed", "completed"), timeout=120)
                    assert info["state"] == "failed" and "No space left" in info["error"], info
                elif policy == "stop":
                    info = wait_for(lambda: job_stopped_on_error(exp),
                                    timeout=60, what="the job to stop on the error")
                    assert info["state"] == "paused" and "No space left" in info["error"], info
                    start(exp, "job.resume")
                    finish_job(exp, job)
                    completed = True
                elif job == "stream":
                    # As QEMU's stream: skipped, then failed at the end with
                    # the backing chain kept.
                    info = wait_state(exp, ("failed", "completed"), timeout=120)
                    assert info["state"] == "failed" and "skipped" in info["error"], info
                else:
                    finish_job(exp, job)   # retried, not skipped
                    completed = True
                assert "io_error" not in chain_info(exp)
            else:
                # Latched: no policy ends in success.  report fails;
                # stop pauses, and again at each resume; ignore fails
                # (a latched image is not retried); an active commit in
                # ready cannot pivot.
                info = end_latched_job(exp, job, policy)
                assert info["state"] in ("failed", "cancelled"), info
                assert target in chain_info(exp)["io_error"]
                m.expect_clean = False
            guest.finish()
        assert len(fi.fired()) == 1, fi.fired()
    for f in os.listdir(d):
        if f.endswith(".qcow2"):
            qemu_img_check(d / f)

    # A fresh mount: every fsync'd byte is there; an unfinished job, issued
    # again, completes, and the chain it leaves shows what it showed before.
    with mounted(d, tmp_path / "mnt2") as m2:
        exp = m2.path("vm1")
        now = read_export(exp)
        guest.check(before, now)
        if not completed:
            if job_info(exp).get("state") not in ("running", "ready"):
                start(exp, verb, JOBS[job][1] or "on-error=report")
            else:
                # Resumed from its checkpoint, with the slow speed it was
                # issued with: nothing here needs it slow.
                setxattr_errno(exp, "user.chainfs.job.speed", "0")
            finish_job(exp, job)
        assert read_export(exp) == now
    flat = tmp_path / "flat.raw"
    flat.write_bytes(now)
    top = JOBS[job][3][0]
    qemu_img_compare(d / top, flat, fmt_b="raw")
    for f in JOBS[job][3]:
        qemu_img_check(d / f)


# step: (rule, latched): the new overlay's creation, its sync, and the
# flush of the old active layer that makes every acknowledged write durable
# before the overlay takes over.
SNAPSHOT_STEPS = {
    "create": ("pwrite:snap2.qcow2:1:ENOSPC", False),
    "create-sync": ("sync:snap2.qcow2:1:ENOSPC", False),
    "flush": ("sync:vm1.qcow2:1:ENOSPC", True),
}


@pytest.mark.parametrize("step", list(SNAPSHOT_STEPS))
def test_enospc_at_each_step_of_a_live_snapshot(tmp_path, step):
    rule, latched = SNAPSHOT_STEPS[step]
    d = tmp_path / "images"
    d.mkdir()
    build_chain(d)
    layers = ["vm1.qcow2", "snap1.qcow2", "base.qcow2"]
    fi = FaultInjector(tmp_path / "fi")
    m = fault_mount(d, tmp_path, fi)
    with m:
        exp = m.path("vm1")
        before = read_export(exp)
        with FaultGuest(exp, seed=zlib.crc32(step.encode())) as guest:
            guest.wait_writes(8)
            guest.more(100)
            fi.arm(rule)
            err, msg = command(exp, "snapshot", "snap2.qcow2")
            # The guest's fsync may meet the failed flush first: then the
            # snapshot's own flush fails latched, with EIO.
            assert err in ((errno.ENOSPC, errno.EIO) if latched else (errno.ENOSPC,)), (err, msg)
            assert fi.fired(), "the fault did not fire"
            fi.disarm()
            assert layer_files(exp) == layers
            assert not os.path.exists(d / "snap2.qcow2")
            n = guest.writes
            guest.more(8)
            guest.wait_writes(n + 8)
            if latched:
                assert "vm1.qcow2" in chain_info(exp)["io_error"]
                m.expect_clean = False
            else:
                # Nothing latched: the snapshot, asked again, is taken.
                assert "io_error" not in chain_info(exp)
                start(exp, "snapshot", "snap2.qcow2")
                assert layer_files(exp) == ["snap2.qcow2"] + layers
            guest.finish()
        assert len(fi.fired()) == 1, fi.fired()
        if not latched:
            assert guest.failed_writes == 0 and guest.failed_fsyncs == 0
    for f in os.listdir(d):
        if f.endswith(".qcow2"):
            qemu_img_check(d / f)
    with mounted(d, tmp_path / "mnt2") as m2:
        exp = m2.path("vm1")
        now = read_export(exp)
        guest.check(before, now)
        if latched:
            start(exp, "snapshot", "snap2.qcow2")
        assert layer_files(exp) == ["snap2.qcow2"] + layers
        assert read_export(exp) == now
    flat = tmp_path / "flat.raw"
    flat.write_bytes(now)
    qemu_img_compare(d / "snap2.qcow2", flat, fmt_b="raw")
