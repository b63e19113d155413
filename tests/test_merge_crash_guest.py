"""SIGKILL of the daemon while a guest writes, during every job kind.

A guest thread writes seeded random data (and zero ranges) to the export,
reads back what it wrote, and calls fsync at seeded moments, while a
commit, an active commit (copy, ready and pivot), a stream or a live
snapshot runs.  The daemon is killed (a) at seeded random moments of each
job and (b) at every crash point of src/merge (CHAINFS_CRASH_AT, listed
in src/merge/merge-int.h), where it kills itself.

What is asserted, per 4 KiB block (guest writes are 4 KiB aligned):
  * while the daemon runs, every read returns exactly what the guest last
    wrote, whatever the job does;
  * after a crash, a block that the guest did not write since its last
    completed fsync reads exactly what it held then (acknowledged means
    fsync'd); a block written since reads either that or the content of
    one of the writes issued to it since (the one in flight at the crash
    included): an unflushed write may be lost, but a block never holds
    anything else (no older data, no bytes of another block, no torn
    block);
  * right after the crash every qcow2 image of the directory passes
    `qemu-img check` (leaks allowed);
  * the next mount resumes the job by itself (or, after a crash past the
    job's last step, has nothing left to do); it finishes with the guest
    writing (an active commit is pivoted once ready); the export then
    equals the model exactly, the chain has its final layers under the
    same export name, and after a clean unmount every image passes
    `qemu-img check` and the active image equals the model per
    `qemu-img compare`.

Every choice is drawn from a seed in the test id; the timing of threads is
not, so a failure names its seed and the kill that found it.
"""
import ctypes
import hashlib
import os
import random
import threading
import time

import pytest

from helpers import (KiB, MiB, create_qcow2, create_raw, job_info, mounted,
                     qemu_img_check, qemu_img_compare, qemu_io, wait_for)
from test_daemon_common import export_names
from test_merge_common import GuestThread, command, layer_files

BLOCK = 4 * KiB
SIZE = 32 * MiB
EXPORT = "vm1"


# ------------------------------------------------------------------ chain


def build(d, raw_base):
    """vm1.qcow2 <- snap2.qcow2 <- snap1.qcow2 <- base; returns base's name."""
    if raw_base:
        base = "base.img"
        create_raw(d / base, SIZE)
        qemu_io(d / base, "write -P 1 0 16M", fmt="raw")
    else:
        base = "base.qcow2"
        create_qcow2(d / base, SIZE)
        qemu_io(d / base, "write -P 1 0 16M", "write -z 30M 1M")
    create_qcow2(d / "snap1.qcow2", backing=base,
                 backing_fmt="raw" if raw_base else "qcow2")
    create_qcow2(d / "snap2.qcow2", backing="snap1.qcow2")
    create_qcow2(d / "vm1.qcow2", backing="snap2.qcow2")
    qemu_io(d / "snap1.qcow2", "write -P 2 0 8M", "write -P 12 24M 2M")
    qemu_io(d / "snap2.qcow2", "write -P 3 4M 8M", "write -z 25M 512k")
    qemu_io(d / "vm1.qcow2", "write -P 4 2M 6M", "write -z 20M 1M")
    return base


class JobKind:
    """How to start a job and what the chain looks like once it is done."""

    def __init__(self, kind, base):
        self.kind = kind
        self.base = base
        if kind == "commit":
            self.verb, self.words = "commit", "top=snap2.qcow2"
            self.final = ["vm1.qcow2", base]
        elif kind == "active":
            self.verb, self.words = "commit", "active"
            self.final = [base]
        elif kind == "stream":
            self.verb, self.words = "stream", ""
            self.final = ["vm1.qcow2"]
        else:
            self.verb, self.words = "snapshot", "s1.qcow2"
            self.final = ["s1.qcow2", "vm1.qcow2", "snap2.qcow2",
                          "snap1.qcow2", base]

    def command(self, exp, bandwidth=0):
        """Start the job: (errno, last_error), errno 0 on success."""
        words = self.words
        if bandwidth and self.kind != "snapshot":
            words += " bandwidth=%d" % bandwidth
        return command(exp, self.verb, words.strip())

    def issue(self, exp, bandwidth=0):
        err, msg = self.command(exp, bandwidth)
        assert err == 0, "%s %s refused: %s" % (self.verb, self.words, msg)


# ------------------------------------------------------------------ model


def read_all(path):
    with open(path, "rb") as f:
        return f.read()


def sha(b):
    return hashlib.sha1(b).digest()


class DiskModel:
    """The disk as the guest wrote it, per block: its content at the last
    completed fsync (durable), what reads must return now (latest), and
    every content written to it since that fsync (pending, issue order)."""

    def __init__(self, content):
        assert len(content) == SIZE
        self.durable = bytearray(content)
        self.latest = bytearray(content)
        self.pending = {}
        self.origin = {}   # sha1 of a block's content -> what wrote it
        for b in range(SIZE // BLOCK):
            self.origin.setdefault(sha(content[b * BLOCK:(b + 1) * BLOCK]),
                                   "block %d before the guest wrote" % b)

    def issue(self, wid, off, data):
        """Before the write is sent: from now on it may be on disk."""
        for i in range(0, len(data), BLOCK):
            blk = bytes(data[i:i + BLOCK])
            b = (off + i) // BLOCK
            self.pending.setdefault(b, []).append(blk)
            self.origin.setdefault(sha(blk), "write #%d block %d" % (wid, b))

    def completed(self, off, data):
        self.latest[off:off + len(data)] = data

    def synced(self):
        """An fsync issued after every write so far completed."""
        for b in self.pending:
            s = b * BLOCK
            self.durable[s:s + BLOCK] = self.latest[s:s + BLOCK]
        self.pending.clear()

    def describe(self, blk):
        if blk == bytes(BLOCK):
            return "zeros"
        return self.origin.get(sha(blk), "content the guest never wrote "
                               "(first bytes %s)" % blk[:8].hex())

    def check_crash(self, data, what):
        """After a crash: every block is allowed; then data becomes the
        baseline (it is what the disk holds now)."""
        assert len(data) == SIZE, "%s: export is %d bytes" % (what, len(data))
        bad = []
        for b in range(SIZE // BLOCK):
            s = b * BLOCK
            got = data[s:s + BLOCK]
            if got == self.durable[s:s + BLOCK] or got in self.pending.get(b, ()):
                continue
            bad.append(b)
        if bad:
            lines = []
            for b in bad[:8]:
                s = b * BLOCK
                lines.append("block %d (offset %d): reads %s; fsync'd %s; %d "
                             "writes since" % (
                                 b, s, self.describe(data[s:s + BLOCK]),
                                 self.describe(bytes(self.durable[s:s + BLOCK])),
                                 len(self.pending.get(b, ()))))
            raise AssertionError("%s: %d blocks read neither their fsync'd "
                                 "content nor a write issued since:\n  %s"
                                 % (what, len(bad), "\n  ".join(lines)))
        self.durable[:] = data
        self.latest[:] = data
        self.pending.clear()

    def check_exact(self, data, what):
        if data != bytes(self.latest):
            for b in range(SIZE // BLOCK):
                s = b * BLOCK
                if data[s:s + BLOCK] != self.latest[s:s + BLOCK]:
                    raise AssertionError(
                        "%s: block %d (offset %d) reads %s, the guest last "
                        "wrote %s" % (what, b, s, self.describe(data[s:s + BLOCK]),
                                      self.describe(bytes(self.latest[s:s + BLOCK]))))

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.latest)
        return str(path)


# ------------------------------------------------------------------ guest

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                            ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd, mode, off, length):
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class CrashGuest(GuestThread):
    """One guest: seeded writes, zero ranges, fsyncs and read checks on the
    export, kept in a DiskModel.  An I/O error ends it: when the daemon
    is gone (io_error; the test decides whether that was expected), or
    while it still answers (error, a failure, as is a read that differs
    from the model)."""

    # How often the guest calls fsync: one operation in N (None: never),
    # drawn per guest from fsync_rates.  Rarely or never, nothing but the
    # job's own flushes makes what it copied durable (a guest fsync
    # flushes every writable layer, base included), so a missing flush of
    # the job shows; often, the acknowledged data is what a crash tests.
    ALL_RATES = (4, 8, 64, None)
    RARE = (64, None)
    OFTEN = (4, 8)

    MAX_BLOCKS = 32     # blocks per write, at most
    ZERO_ONE_IN = 8     # one write in this many writes zeros

    def __init__(self, path, model, seed, fsync_rates=ALL_RATES):
        super().__init__(daemon=True)
        self.path = str(path)
        self.model = model
        self.rng = random.Random(seed)
        self.fsync_one_in = self.rng.choice(fsync_rates)
        self.stop_event = threading.Event()
        self.ops = 0
        self.io_error = None   # OSError that ended it
        self.error = None      # a wrong read, or a bug of the test

    def run(self):
        fd = os.open(self.path, os.O_RDWR)
        wid = 0
        try:
            while not self.stop_event.is_set():
                if self.fsync_one_in and \
                        self.rng.randrange(self.fsync_one_in) == 0:
                    os.fsync(fd)
                    self.model.synced()
                else:
                    n = self.rng.randrange(1, self.MAX_BLOCKS + 1) * BLOCK
                    off = self.rng.randrange(0, (SIZE - n) // BLOCK + 1) * BLOCK
                    wid += 1
                    zero = self.rng.randrange(self.ZERO_ONE_IN) == 0
                    data = bytes(n) if zero else self.rng.randbytes(n)
                    self.model.issue(wid, off, data)
                    if zero:
                        mode = self.rng.choice([
                            FALLOC_FL_ZERO_RANGE,
                            FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE])
                        fallocate(fd, mode, off, n)
                    else:
                        assert os.pwrite(fd, data, off) == n
                    self.model.completed(off, data)
                    if self.rng.randrange(2) == 0:
                        self.read_check(fd)
                self.ops += 1
        except OSError as e:
            if self.daemon_answers():
                self.error = "I/O error while the daemon ran: %r" % e
            else:
                self.io_error = e
        except Exception as e:  # noqa: BLE001 -- reported by the test
            self.error = repr(e)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass    # the connection is gone

    def daemon_answers(self):
        """An extended attribute is never cached: reading one reaches the
        daemon, or fails at once when the connection is gone (a read of
        the export through the page cache then fails with EIO, a request
        in flight with ECONNABORTED, a new one with ENOTCONN)."""
        try:
            os.getxattr(self.path, "user.chainfs.job")
            return True
        except OSError:
            return False

    def read_check(self, fd):
        n = self.rng.randrange(1, self.MAX_BLOCKS + 1) * BLOCK
        off = self.rng.randrange(0, (SIZE - n) // BLOCK + 1) * BLOCK
        # Past the page cache: the daemon must serve it.
        os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
        got = os.pread(fd, n, off)
        want = bytes(self.model.latest[off:off + n])
        if got != want:
            for i in range(0, n, BLOCK):
                if got[i:i + BLOCK] != want[i:i + BLOCK]:
                    self.error = ("read of block %d (offset %d) while the "
                                  "daemon ran: %s, the guest last wrote %s" % (
                                      (off + i) // BLOCK, off + i,
                                      self.model.describe(got[i:i + BLOCK]),
                                      self.model.describe(want[i:i + BLOCK])))
                    break
            self.stop_event.set()

    def healthy(self):
        assert self.error is None, self.error
        assert self.io_error is None, "guest I/O failed: %r" % self.io_error
        assert self.is_alive(), "guest stopped"
        return True

    def wait_ops(self, n, timeout=60):
        target = self.ops + n
        wait_for(lambda: self.healthy() and self.ops >= target,
                 timeout=timeout, what="%d more guest operations" % n)

    def check_died(self, what):
        """After the daemon died: the guest saw no error but that of the
        dead connection."""
        self.stop_event.set()
        self.join(timeout=60)
        assert not self.is_alive()
        assert self.error is None, "%s: %s" % (what, self.error)

    def finish(self):
        """Stop after the current operation; it must have seen no error."""
        self.stop_event.set()
        self.join(timeout=60)
        assert not self.is_alive()
        assert self.error is None, self.error
        assert self.io_error is None, "guest I/O failed: %r" % self.io_error


# ------------------------------------------------------------------ checks


# The first mount after a crash may leave out a chain it must not serve
# (a layer a job was dropping), with a warning.
LEFT_OUT = "left out"


def check_images(d, what):
    """qemu-img check of every qcow2 image of the directory (no daemon)."""
    for name in sorted(os.listdir(str(d))):
        p = os.path.join(str(d), name)
        if name.startswith(".") or not os.path.isfile(p):
            continue
        with open(p, "rb") as f:
            if f.read(4) != b"QFI\xfb":
                continue
        try:
            qemu_img_check(p)
        except AssertionError as e:
            raise AssertionError("%s: %s" % (what, e)) from None


def dead_soon(m, timeout=5):
    """Whether the daemon dies within timeout (an I/O error may come a
    moment before the killed process can be reaped)."""
    try:
        wait_for(lambda: m.proc.poll() is not None, timeout=timeout,
                 what="the daemon to die")
        return True
    except AssertionError:
        return False


def finish_job(exp, job, guest, timeout=120):
    """Drive the job on exp to its end, the guest writing meanwhile:
    resumed by the mount, or issued again when the crash came before the
    job recorded itself.  Returns how many times it had to be issued."""
    issued = 0
    pivoted = False
    deadline = time.monotonic() + timeout
    while True:
        guest.healthy()
        info = job_info(exp)
        state = info.get("state")
        layers = layer_files(exp)
        if state == "failed":
            raise AssertionError("job failed: %r" % info)
        if state in (None, "completed", "cancelled"):
            if layers == job.final:
                return issued
            assert state != "completed", (
                "job completed with layers %s, want %s" % (layers, job.final))
            job.issue(exp)
            issued += 1
        elif state == "ready" and not pivoted:
            guest.wait_ops(5)
            err, msg = command(exp, "job.pivot")
            assert err == 0, msg
            pivoted = True
        if time.monotonic() > deadline:
            raise AssertionError("job did not finish: %r, layers %s"
                                 % (info, layers))
        time.sleep(0.02)


def after_crash(image_dir, mountpoint, tmp_path, job, model, seed, what,
                expect_resumed=False):
    """Everything that follows a crash: check the images, remount, check
    the export against the model, finish the job with the guest writing,
    check again, unmount, cross-check with qemu-img."""
    check_images(image_dir, what)
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log.append(LEFT_OUT)
        exp = m.path(EXPORT)
        model.check_crash(read_all(exp), what)
        with CrashGuest(exp, model, seed) as g:
            issued = finish_job(exp, job, g)
            g.wait_ops(10)
            g.finish()
        if expect_resumed:
            assert issued == 0, "%s: the job did not resume by itself" % what
        model.check_exact(read_all(exp), what + ", job finished")
        assert layer_files(exp) == job.final
    check_images(image_dir, what + ", after the job")
    flat = model.save(tmp_path / "model.raw")
    qemu_img_compare(image_dir / job.final[0], flat, fmt_b="raw")
    # A clean restart: the same disk, under the same name alone.
    with mounted(image_dir, mountpoint) as m:
        assert export_names(mountpoint) == [EXPORT], what
        assert layer_files(m.path(EXPORT)) == job.final, what
        model.check_exact(read_all(m.path(EXPORT)), what + ", restarted")


# ------------------------------------------------------------------ crash points

PIVOT_POINTS = ("active-pivot-flushed", "active-pivot-recorded",
                "active-dropped")

# (job kind, crash point): every point of src/merge, with the N-th time
# for points reached many times.
CRASH_POINTS = [
    ("commit", "job-started"),
    ("commit", "commit-checkpoint"),
    ("commit", "commit-base-flushed"),
    ("commit", "commit-above-rewritten"),
    ("commit", "commit-top-rewritten"),
    ("commit", "commit-dropped"),
    ("commit", "commit-recorded"),
    ("active", "job-started"),
    ("active", "active-copy:3"),
    ("active", "active-mirror-start"),
    ("active", "active-mirror:20"),
    ("active", "active-ready"),
    ("active", "active-pivot-flushed"),
    ("active", "active-pivot-recorded"),
    ("active", "active-dropped"),
    ("stream", "job-started"),
    ("stream", "stream-copy:4"),
    ("stream", "stream-flushed"),
    ("stream", "stream-rewritten"),
    ("stream", "stream-recorded"),
    ("snapshot", "snapshot-created"),
    ("snapshot", "snapshot-flushed"),
    ("snapshot", "snapshot-recorded"),
]

# Points reached many times, later in the job (qcow2 base); then every
# point again on a raw base, the guest calling fsync often.
CRASH_POINTS_SLOW = [
    ("commit", "commit-checkpoint:2", False, 4 * MiB),
    ("commit", "commit-checkpoint:3", False, 4 * MiB),
    ("active", "active-copy:1", False, 0),
    ("active", "active-copy:10", False, 8 * MiB),
    ("active", "active-mirror:1", False, 0),
    ("active", "active-mirror:200", False, 0),
    ("stream", "stream-copy:1", False, 0),
    ("stream", "stream-copy:10", False, 8 * MiB),
] + [(k, p, True, 0) for k, p in CRASH_POINTS]


def crash_point_run(image_dir, mountpoint, tmp_path, kind, point, seed,
                    raw_base=False, bandwidth=0, fsync_rates=CrashGuest.RARE):
    rng = random.Random(seed)
    job = JobKind(kind, build(image_dir, raw_base))
    name = point.split(":")[0]
    what = "crash at %s (seed %d, %s base)" % (point, seed,
                                               "raw" if raw_base else "qcow2")
    env = dict(os.environ, CHAINFS_CRASH_AT=point)
    m = mounted(image_dir, mountpoint, env=env).start()
    try:
        exp = m.path(EXPORT)
        model = DiskModel(read_all(exp))
        with CrashGuest(exp, model, seed, fsync_rates) as g:
            g.wait_ops(rng.randrange(10, 40))
            # The daemon may die inside the command (snapshot): then it
            # fails with ENOTCONN or ECONNABORTED.
            err, msg = job.command(exp, bandwidth)
            assert err == 0 or dead_soon(m), msg
            # Points of the pivot need one; the others come before it
            # or, for the mirror, in ready with the guest writing.
            pivoted = name not in PIVOT_POINTS
            deadline = time.monotonic() + 60
            while m.proc.poll() is None:
                try:
                    info = job_info(exp)
                    if info.get("state") == "ready" and not pivoted:
                        # A while of guest writes in ready, then pivot.
                        g.wait_ops(rng.randrange(5, 30))
                        command(exp, "job.pivot")
                        pivoted = True
                    assert info.get("state") not in (
                        "completed", "failed", "cancelled") or dead_soon(m), \
                        "%s: not reached, job %r" % (what, info)
                except (OSError, AssertionError):
                    if not dead_soon(m):
                        raise
                assert time.monotonic() < deadline, "%s: not reached" % what
                time.sleep(0.01)
    finally:
        m.kill()
    log = m.read_log()
    assert "crash point %s reached" % name in log, log
    g.check_died(what)
    after_crash(image_dir, mountpoint, tmp_path, job, model, seed + 1, what,
                expect_resumed=kind != "snapshot")


@pytest.mark.parametrize("kind,point", CRASH_POINTS,
                         ids=["%s-%s" % (k, p) if p == "job-started" else p
                              for k, p in CRASH_POINTS])
def test_crash_point(image_dir, mountpoint, tmp_path, kind, point):
    seed = CRASH_POINTS.index((kind, point))
    crash_point_run(image_dir, mountpoint, tmp_path, kind, point, seed)


@pytest.mark.slow
@pytest.mark.parametrize("kind,point,raw_base,bandwidth", CRASH_POINTS_SLOW,
                         ids=["%s%s-%s" % (k + "-" if p == "job-started" else "",
                                            p, "raw" if r else "qcow2")
                              for k, p, r, _ in CRASH_POINTS_SLOW])
def test_crash_point_more(image_dir, mountpoint, tmp_path, kind, point,
                          raw_base, bandwidth):
    seed = 100 + CRASH_POINTS_SLOW.index((kind, point, raw_base, bandwidth))
    crash_point_run(image_dir, mountpoint, tmp_path, kind, point, seed,
                    raw_base, bandwidth,
                    CrashGuest.OFTEN if raw_base else CrashGuest.RARE)


# A crash between the backing rewrite and the record leaves layers that
# no image uses any more and that the state file does not yet call
# dropped.  Discovery (src/chain/directory.c) must not serve them as chains
# of their own, writable, before the resumed job records them dropped: the
# [job EXPORT] checkpoint names them, and dir_discover leaves them out.
@pytest.mark.parametrize("kind,point", [
    ("commit", "commit-above-rewritten"),
    ("commit", "commit-dropped"),
    ("stream", "stream-rewritten"),
])
def test_no_dropped_layer_served_after_crash(image_dir, mountpoint, kind, point):
    job = JobKind(kind, build(image_dir, raw_base=False))
    env = dict(os.environ, CHAINFS_CRASH_AT=point)
    m = mounted(image_dir, mountpoint, env=env).start()
    try:
        job.issue(m.path(EXPORT))
        assert dead_soon(m, timeout=30), "%s not reached" % point
        log = m.read_log()
        assert "crash point %s reached" % point in log, log
    finally:
        m.kill()
    with mounted(image_dir, mountpoint) as m:
        m.allowed_log.append(LEFT_OUT)
        assert layer_files(m.path(EXPORT)) == job.final
        assert export_names(mountpoint) == [EXPORT]


# ------------------------------------------------------------------ random kills

SPEED = 2 * MiB   # ~7 s per job: seeded kills land mid-job
DONE = ("completed", "failed", "cancelled")


def kill_moment(exp, job, g, rng, last):
    """Wait for a seeded moment of the job (the guest writing) and return
    a word for it: in the copy, once a seeded number of bytes was copied
    by this run of the job; for an active commit also in ready, or right
    after a pivot was asked (only at the last kill of a run: a pivot ends
    the job)."""
    if job.kind == "active":
        phase = rng.choice(["copy", "ready"] + (["pivot"] * 2 if last else []))
    else:
        phase = "copy"
    if phase == "copy":
        # A resumed stream skips what the guest's fsyncs made durable.
        target = rng.randrange(0, (2 if job.kind == "stream" else 10) * MiB)

        def reached():
            info = job_info(exp)
            return g.healthy() and (info.get("copied", 0) >= target or
                                    info.get("state") in ("ready", None) + DONE)
        wait_for(reached, timeout=120, what="%d bytes copied" % target)
        g.wait_ops(rng.randrange(0, 8))
    else:
        # No need to crawl to ready.
        err, msg = command(exp, "job.speed", "0")
        assert err == 0, msg
        wait_for(lambda: g.healthy() and job_info(exp).get("state") == "ready",
                 timeout=120, what="ready")
        g.wait_ops(rng.randrange(0, 30))
        if phase == "pivot":
            err, msg = command(exp, "job.pivot")
            assert err == 0, msg
            g.wait_ops(rng.randrange(0, 4))
    return "%s, job %s" % (phase, job_info(exp).get("state", "gone"))


def random_kill_run(tmp_path, kind, seed, kills):
    """SIGKILL at `kills` seeded moments of jobs of one kind, the guest
    writing throughout; each next mount checks the export and resumes the
    job.  A run ends when its job has finished, then the next one starts
    on a fresh chain (the base format alternates).  Returns how many kills
    came while a job was running or ready."""
    rng = random.Random(seed)
    done = mid_job = 0
    for run in range(1, kills + 1):
        d = tmp_path / ("run%d" % run)
        image_dir, mountpoint = d / "images", d / "mnt"
        image_dir.mkdir(parents=True)
        job = JobKind(kind, build(image_dir, raw_base=(seed + run) % 2 == 1))
        model = what = None
        while done < kills:
            with mounted(image_dir, mountpoint) as m:
                m.allowed_log.append(LEFT_OUT)
                exp = m.path(EXPORT)
                if model is None:
                    model = DiskModel(read_all(exp))
                else:
                    model.check_crash(read_all(exp), what)
                    check_resumed(exp, job, what)
                    if layer_files(exp) == job.final:
                        break
                with CrashGuest(exp, model, rng.randrange(1 << 30)) as g:
                    g.wait_ops(rng.randrange(5, 20))
                    if what is None:
                        job.issue(exp, SPEED)
                    moment = kill_moment(exp, job, g, rng,
                                         last=done == kills - 1)
                    m.kill()
            done += 1
            mid_job += moment.endswith(("running", "ready"))
            what = "kill %d/%d of %s (seed %d, run %d) in %s" % (
                done, kills, kind, seed, run, moment)
            g.check_died(what)
            check_images(image_dir, what)
        after_crash(image_dir, mountpoint, d, job, model, seed + run, what)
        if done == kills:
            return mid_job
    raise AssertionError("no kill in %d runs" % kills)


def check_resumed(exp, job, what):
    """After a crash the mount resumed the job, or it had finished."""
    info = job_info(exp)
    if info.get("state") not in ("running", "ready", "paused"):
        assert layer_files(exp) == job.final, (
            "%s: job %r not resumed, layers %s" % (what, info, layer_files(exp)))


@pytest.mark.parametrize("kind", ["commit", "active", "stream"])
def test_random_kills(tmp_path, kind):
    seed = {"commit": 11, "active": 12, "stream": 13}[kind]
    assert random_kill_run(tmp_path, kind, seed, kills=2) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("seed", [201, 202])
@pytest.mark.parametrize("kind", ["commit", "active", "stream"])
def test_random_kills_many(tmp_path, kind, seed):
    kills = 12
    mid_job = random_kill_run(tmp_path, kind, seed, kills)
    # The others came after a job ended, the guest still writing.
    assert mid_job >= kills // 2, mid_job
