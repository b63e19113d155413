"""Counters (design.md "Counters", issue 13): per export the requests it
served and failed, and per job the recent copy rate and the time left.

Each export's counters are in `cat MOUNTPOINT/.control` ("stats") and in
its `user.chainfs.stats` attribute.  They are counted right before the
reply, so that a client whose call returned sees its own request in them:
the counts below are exact where the kernel passes one call as one
request (O_DIRECT of at most 64 KiB, fsync), and lower bounds where a
client (qemu-io) may add requests of its own (alignment probes).  A job's
"rate" is bytes written per second over the last few seconds and "eta"
the seconds left at the recent pace (null when not known); a slow job is
made with a small bandwidth so that it is still running when it is read.
"""
import errno
import json
import mmap
import os
import re
import subprocess
import threading

import pytest

from helpers import (CHAINCTL, KiB, MiB, FaultInjector, create_qcow2, getxattr, job_info, mounted,
                     qemu_img_check, qemu_io, run, setxattr, wait_for)
from qcow2craft import HDR_INCOMPAT, INCOMPAT_CORRUPT, Qcow2
from test_chainctl_common import build_chain, ctl_ok

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE")

SIZE = 16 * MiB
BLOCK = 64 * KiB
STATS = {"reads", "writes", "flushes", "discards", "read_bytes", "written_bytes",
         "discarded_bytes", "errors", "in_flight"}


def stats(export):
    return json.loads(getxattr(export, "user.chainfs.stats"))


def control_status(m):
    with open(m.path(".control")) as f:
        return json.loads(f.read())


def control_stats(m, name):
    exports = {e["name"]: e for e in control_status(m)["exports"]}
    return exports[name]["stats"]


def delta(after, before):
    return {k: after[k] - before[k] for k in after if k != "in_flight"}


def aligned(data):
    """data in page-aligned memory, as O_DIRECT wants it."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


@pytest.fixture
def vm(image_dir):
    create_qcow2(image_dir / "base.qcow2", SIZE)
    qemu_io(image_dir / "base.qcow2", "write -P 1 0 %d" % SIZE)
    create_qcow2(image_dir / "vm.qcow2", backing="base.qcow2")
    return image_dir


def test_fresh_export_counts_nothing(vm, mountpoint):
    with mounted(vm, mountpoint) as m:
        exp = m.path("vm")
        s = stats(exp)
        assert set(s) == STATS
        assert all(v == 0 for v in s.values()), s
        assert "user.chainfs.stats" in os.listxattr(exp)


def test_direct_reads_writes_fsyncs_counted_exactly(vm, mountpoint):
    """Python's O_DIRECT calls: one FUSE request each, each counted once
    with its bytes."""
    with mounted(vm, mountpoint) as m:
        exp = m.path("vm")
        before = stats(exp)
        fd = os.open(exp, os.O_RDWR | os.O_DIRECT)
        try:
            wbuf = aligned(b"\x07" * BLOCK)
            for i in range(5):
                assert os.pwritev(fd, [wbuf], i * BLOCK) == BLOCK
            os.fsync(fd)
            os.fsync(fd)
            rbuf = mmap.mmap(-1, BLOCK)
            for i in range(3):
                assert os.preadv(fd, [rbuf], i * BLOCK) == BLOCK
                assert rbuf[:] == b"\x07" * BLOCK
        finally:
            os.close(fd)
        after = stats(exp)
        assert delta(after, before) == {
            "reads": 3, "read_bytes": 3 * BLOCK, "writes": 5, "written_bytes": 5 * BLOCK,
            "flushes": 2, "discards": 0, "discarded_bytes": 0, "errors": 0}
        assert after["in_flight"] == 0
    qemu_img_check(vm / "vm.qcow2")


def test_dd_counted_exactly(vm, mountpoint):
    """dd with direct I/O: 4 writes of 64 KiB and the fsync of conv=fsync,
    then 2 reads."""
    with mounted(vm, mountpoint) as m:
        exp = m.path("vm")
        before = stats(exp)
        run(["dd", "if=/dev/zero", "of=" + exp, "bs=64k", "count=4", "seek=8",
             "oflag=direct", "conv=notrunc,fsync", "status=none"])
        mid = stats(exp)
        assert delta(mid, before) == {
            "reads": 0, "read_bytes": 0, "writes": 4, "written_bytes": 4 * BLOCK,
            "flushes": 1, "discards": 0, "discarded_bytes": 0, "errors": 0}
        run(["dd", "if=" + exp, "of=/dev/null", "bs=64k", "count=2", "skip=8",
             "iflag=direct", "status=none"])
        after = stats(exp)
        assert delta(after, mid) == {
            "reads": 2, "read_bytes": 2 * BLOCK, "writes": 0, "written_bytes": 0,
            "flushes": 0, "discards": 0, "discarded_bytes": 0, "errors": 0}
        assert after["in_flight"] == 0


def test_qemu_io_counted_at_least(vm, mountpoint):
    """qemu-io as a hypervisor opens the disk (cache=none): its own probes
    may add requests, so its writes, reads, flush and discard are lower
    bounds; every byte it wrote is there."""
    with mounted(vm, mountpoint) as m:
        exp = m.path("vm")
        before = stats(exp)
        qemu_io(exp, "write -P 9 1M 256k", "read -P 9 1M 256k", "flush",
                "discard 4M 1M", fmt="raw", cache="none")
        d = delta(stats(exp), before)
        assert d["writes"] >= 1 and d["written_bytes"] >= 256 * KiB, d
        assert d["reads"] >= 1 and d["read_bytes"] >= 256 * KiB, d
        assert d["flushes"] >= 1, d
        assert d["discards"] >= 1 and d["discarded_bytes"] >= 1 * MiB, d
        assert d["errors"] == 0, d
        assert stats(exp)["in_flight"] == 0


def test_discard_counted(vm, mountpoint):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    with mounted(vm, mountpoint) as m:
        exp = m.path("vm")
        before = stats(exp)
        fd = os.open(exp, os.O_RDWR)
        try:
            assert libc.fallocate(fd, 0x03, 2 * MiB, 1 * MiB) == 0    # punch, keep size
            assert libc.fallocate(fd, 0x10, 3 * MiB, 128 * KiB) == 0  # zero range
            # An unsupported mode is a request answered with an error.
            assert libc.fallocate(fd, 0x01, 0, 4096) != 0             # keep size only
            assert ctypes.get_errno() == errno.EOPNOTSUPP
        finally:
            os.close(fd)
        d = delta(stats(exp), before)
        assert d["discards"] == 3 and d["discarded_bytes"] == 1 * MiB + 128 * KiB, d
        assert d["errors"] == 1, d
        assert d["writes"] == 0


def test_write_past_end_is_an_error(vm, mountpoint):
    with mounted(vm, mountpoint) as m:
        exp = m.path("vm")
        before = stats(exp)
        fd = os.open(exp, os.O_RDWR | os.O_DIRECT)
        try:
            with pytest.raises(OSError) as ei:
                os.pwritev(fd, [aligned(b"x" * 4096)], SIZE)
            assert ei.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        d = delta(stats(exp), before)
        assert d["writes"] == 1 and d["errors"] == 1 and d["written_bytes"] == 0, d


def test_write_to_read_only_export_is_an_error(vm, mountpoint):
    """A corrupt-flagged active layer is served read-only: its writes fail
    with EROFS and each is counted as an error; reads go on."""
    q = Qcow2(str(vm / "vm.qcow2"))
    q.patch_header(HDR_INCOMPAT, "Q", q.incompat | INCOMPAT_CORRUPT)
    with mounted(vm, mountpoint) as m:
        m.allowed_log = ["served read-only", "refused"]
        exp = m.path("vm")
        before = stats(exp)
        fd = os.open(exp, os.O_RDWR | os.O_DIRECT)
        try:
            for _ in range(2):
                with pytest.raises(OSError) as ei:
                    os.pwritev(fd, [aligned(b"x" * 4096)], 0)
                assert ei.value.errno == errno.EROFS
            rbuf = mmap.mmap(-1, 4096)
            assert os.preadv(fd, [rbuf], 0) == 4096 and rbuf[:] == b"\x01" * 4096
        finally:
            os.close(fd)
        d = delta(stats(exp), before)
        assert d["writes"] == 2 and d["errors"] == 2 and d["written_bytes"] == 0, d
        assert d["reads"] == 1 and d["read_bytes"] == 4096, d


def test_injected_eio_is_an_error(vm, tmp_path):
    """A pread and a pwrite of the image fail once with EIO (the
    fault-injection shim): two requests answered with EIO, two errors; the
    retries succeed and count as requests without error."""
    # Cluster 0 of vm.qcow2 allocated: the failed write is one in place,
    # which leaves nothing half done for the retry.
    qemu_io(vm / "vm.qcow2", "write -P 4 0 64k")
    fi = FaultInjector(tmp_path / "fi")
    m = mounted(vm, tmp_path / "mnt", env=fi.env())
    m.allowed_log.extend(["Input/output error"])
    with m:
        exp = m.path("vm")
        before = stats(exp)
        fd = os.open(exp, os.O_RDWR | os.O_DIRECT)
        try:
            rbuf = mmap.mmap(-1, BLOCK)
            fi.arm("pread:base.qcow2:1:EIO")
            with pytest.raises(OSError) as ei:
                os.preadv(fd, [rbuf], 1 * MiB)
            assert ei.value.errno == errno.EIO
            assert fi.fired("pread", "base.qcow2")
            fi.disarm()
            assert os.preadv(fd, [rbuf], 1 * MiB) == BLOCK
            assert rbuf[:] == b"\x01" * BLOCK
            fi.arm("pwrite:vm.qcow2:1:EIO")
            with pytest.raises(OSError) as ei:
                os.pwritev(fd, [aligned(b"\x05" * BLOCK)], 0)
            assert ei.value.errno == errno.EIO
            assert fi.fired("pwrite", "vm.qcow2")
            fi.disarm()
            assert os.pwritev(fd, [aligned(b"\x05" * BLOCK)], 0) == BLOCK
        finally:
            os.close(fd)
        d = delta(stats(exp), before)
        assert d["errors"] == 2, d
        assert d["reads"] == 2 and d["read_bytes"] == BLOCK, d
        assert d["writes"] == 2 and d["written_bytes"] == BLOCK, d


def test_concurrent_writers_leave_nothing_in_flight(vm, mountpoint):
    """Four threads write at once; when all returned, every write is counted
    and in_flight is 0 again (counted before each reply, not after)."""
    per_thread = 64
    with mounted(vm, mountpoint) as m:
        exp = m.path("vm")
        before = stats(exp)
        errors = []

        def writer(t):
            try:
                fd = os.open(exp, os.O_RDWR | os.O_DIRECT)
                try:
                    buf = aligned(bytes([t + 1]) * BLOCK)
                    for i in range(per_thread):
                        off = ((t * per_thread + i) * BLOCK) % SIZE
                        assert os.pwritev(fd, [buf], off) == BLOCK
                finally:
                    os.close(fd)
            except Exception as e:  # reported by the main thread
                errors.append(e)
        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        after = stats(exp)
        assert after["in_flight"] == 0, after
        d = delta(after, before)
        assert d["writes"] == 4 * per_thread and d["errors"] == 0, d
        assert d["written_bytes"] == 4 * per_thread * BLOCK, d


def test_xattr_agrees_with_control(image_dir, mountpoint):
    """Two exports: .control lists each with the stats of its own
    attribute, and I/O on one leaves the other's counters alone."""
    for name in ("a", "b"):
        create_qcow2(image_dir / ("%s.qcow2" % name), SIZE)
    with mounted(image_dir, mountpoint) as m:
        run(["dd", "if=/dev/zero", "of=" + m.path("a"), "bs=64k", "count=3",
             "oflag=direct", "conv=notrunc", "status=none"])
        for name in ("a", "b"):
            assert control_stats(m, name) == stats(m.path(name))
        assert stats(m.path("a"))["writes"] == 3
        assert stats(m.path("b"))["writes"] == 0
        status = control_status(m)
        assert all(set(e["stats"]) == STATS for e in status["exports"]), status


# ------------------------------------------------------------------- jobs

RATE_LINE = re.compile(r"Rate: [0-9.]+ (B|KiB|MiB|GiB)/s    Time left: (\d+:\d\d:\d\d|unknown)")
# A line with a pace known: a rate above 0 and a time left.
PACED_LINE = re.compile(r"Rate: ([0-9.]+) (B|KiB|MiB|GiB)/s    Time left: \d+:\d\d:\d\d")
PROGRESS_LINE = re.compile(r"Block Commit: \[ *(\d+) %\]")


def paced(line):
    m = PACED_LINE.search(line)
    return bool(m) and float(m.group(1)) > 0


def rate_bound(speed):
    """The most a job limited to speed bytes/s can show as its rate: over
    dt (at least the half second an estimate needs) it writes speed * dt,
    plus what it may write before paying (a MERGE_CHUNK of 1 MiB for each
    of the 3 copy workers, as each pays after its write), plus the debt of
    one request charged in full (1 MiB) and the bucket's tenth of a
    second of credit."""
    return speed + (4 * MiB + speed / 10) / 0.5


@pytest.fixture
def slow_chain(image_dir, mount):
    """A mounted 4-layer chain of 16 MiB, all of it data in snap2 (so that
    every 1 MiB window of a commit is one request and progress moves
    steadily).  An intermediate commit of it at 256 KiB/s runs for 47 s
    at least (16 MiB less the 4.1 MiB it may write ahead of paying): the
    tests below read it running and then abort it, never wait for it."""
    build_chain(image_dir, size=16 * MiB, big=16 * MiB, big_layer="snap2.qcow2")
    m = mount(wait_export="vm1")
    return m.path("vm1"), m


def test_slow_job_shows_rate_and_eta(slow_chain):
    exp, m = slow_chain
    info = job_info(exp)
    assert info == {}
    setxattr(exp, "user.chainfs.commit", "top=snap2.qcow2 base=base.qcow2 bandwidth=256K")

    def pace_known():
        j = job_info(exp)
        assert j["state"] == "running", j   # 47 s of copying at least
        return j if j["rate"] > 0 and j["eta"] is not None else None
    j = wait_for(pace_known, timeout=30, what="a rate and an eta")
    assert j["speed"] == 256 * KiB, j
    assert 0 < j["rate"] <= rate_bound(256 * KiB), j
    assert j["eta"] >= 1, j
    # .control shows the same job with its pace.
    job = {e["name"]: e for e in control_status(m)["exports"]}["vm1"]["job"]
    assert "rate" in job and "eta" in job and job["id"] == j["id"]
    # chainctl info prints it.
    out = ctl_ok("info", exp)
    job_line = [l for l in out.splitlines() if l.startswith("Block Commit: [")]
    assert len(job_line) == 1, out
    assert "State: running" in job_line[0]
    assert RATE_LINE.search(job_line[0]), job_line
    assert "Rate:" in ctl_ok("job", exp, "--info")
    # Paused: no pace.
    ctl_ok("job", exp, "--pause", "--wait")
    paused = job_info(exp)
    assert paused["state"] == "paused" and paused["rate"] == 0 and paused["eta"] is None
    assert "Rate:" not in ctl_ok("info", exp)
    ctl_ok("job", exp, "--abort", "--wait")
    ended = job_info(exp)
    assert ended["state"] == "cancelled" and ended["rate"] == 0 and ended["eta"] is None


def test_commit_verbose_prints_rate_and_eta(image_dir, mount, tmp_path):
    """commit --wait --verbose, as virsh blockcommit --verbose, with the
    rate and the time left on each progress line of the running job, and
    [100 %] alone last.

    chainctl prints a line when the percentage it polls has changed, so
    which lines there are depends on when it polls; the first half second
    has no estimate yet ("Rate: 0 B/s    Time left: unknown"), and the
    copy workers' first writes (each pays for its own after writing) can
    take progress past several percent in that time.  So the test reads
    the lines as chainctl prints them, from a commit of 32 MiB of data at
    1 MiB/s (28 s at least, and progress moving every window of 1 MiB), and
    once a line shows a rate and a time left it lifts the limit
    (job --speed 0), so that the commit then ends soon."""
    build_chain(image_dir, size=32 * MiB, big=32 * MiB, big_layer="snap2.qcow2")
    m = mount(wait_export="vm1")
    exp = m.path("vm1")
    lines = []
    lifted = False
    with open(tmp_path / "chainctl.err", "w+") as err:
        proc = subprocess.Popen(
            [CHAINCTL, "commit", exp, "--top", "snap2.qcow2", "--base", "base.qcow2",
             "--bandwidth", "1", "--wait", "--verbose"],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True)
        try:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if not lifted and paced(line):
                    # Still copying: that line came from a running job
                    # that has 28 s of copying at 1 MiB/s.
                    ctl_ok("job", exp, "--speed", "0")
                    lifted = True
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        err.seek(0)
        stderr = err.read()
    out = "\n".join(lines)
    assert rc == 0, "chainctl: rc=%d\nstdout: %s\nstderr: %s" % (rc, out, stderr)
    assert lifted, "no line with a rate and a time left:\n" + out
    progress = [l for l in lines if l.startswith("Block Commit: [")]
    assert progress[-1] == "Block Commit: [100 %]", out
    running = progress[:-1]
    assert running and all(RATE_LINE.search(l) for l in running), out
    percents = [int(PROGRESS_LINE.match(l).group(1)) for l in running]
    assert percents == sorted(set(percents)) and percents[-1] <= 99, out
    assert lines[-1] == "Commit complete", out
    assert job_info(exp)["state"] == "completed"
    qemu_img_check(image_dir / "base.qcow2")
