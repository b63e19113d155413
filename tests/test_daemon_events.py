"""MOUNTPOINT/.events (design.md "Events"): job, snapshot and pivot events
read through the real mount, with blocking, non-blocking and polled reads,
several readers, a reader that never reads, interrupts, shutdown, and
`chainctl events`.

Every wait is bounded (30 s or more) only as a failure bound: a reader
waits for the event it expects, never for time to pass.
"""
import errno
import json
import os
import select
import signal
import subprocess
import threading

import pytest

from helpers import (CHAINCTL, FaultInjector, MiB, create_qcow2, make_chain, mounted,
                     qemu_img_check, wait_for)
from test_merge_common import layer_files, start

SIZE = 16 * MiB
TIMEOUT = 60


class Events:
    """One open of MOUNTPOINT/.events."""

    def __init__(self, mountpoint, nonblock=False):
        flags = os.O_RDONLY | (os.O_NONBLOCK if nonblock else 0)
        self.fd = os.open(os.path.join(str(mountpoint), ".events"), flags)

    def next(self, timeout=TIMEOUT):
        """The next event, waiting at most timeout seconds (a failure)."""
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        if not p.poll(timeout * 1000):
            raise AssertionError("no event within %d s" % timeout)
        data = os.read(self.fd, 65536)
        assert data.endswith(b"\n"), data
        assert data.count(b"\n") == 1, "one read, one line: %r" % data
        return json.loads(data)

    def until(self, event, timeout=TIMEOUT):
        """Events up to and including the first named event."""
        seen = []
        while True:
            ev = self.next(timeout)
            seen.append(ev)
            if ev["event"] == event:
                return seen

    def read_errno(self):
        try:
            os.read(self.fd, 65536)
            return 0
        except OSError as e:
            return e.errno

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # Before the mount's clean-up: an open file keeps it busy.
        self.close()
        return False


def names_of(events):
    return [e["event"] for e in events]


def chain3(image_dir):
    return make_chain(image_dir, depth=3, size=SIZE, base_fmt="qcow2", seed=7,
                      top_name="vm1.qcow2")


def test_events_file_listed_and_read_only(image_dir, mountpoint):
    chain3(image_dir)
    with mounted(image_dir, mountpoint) as m:
        assert ".events" in os.listdir(m.mountpoint)
        st = os.stat(m.path(".events"))
        assert st.st_mode & 0o777 == 0o444
        # Refused by the daemon, for root (who passes the mode) too.
        with pytest.raises(PermissionError):
            os.close(os.open(m.path(".events"), os.O_WRONLY))


def test_commit_gives_created_then_completed(image_dir, mountpoint):
    names = chain3(image_dir)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with Events(m.mountpoint) as ev:
            start(exp, "commit", "top=snap1.qcow2")
            seen = ev.until("job-completed")
        # Nothing else happened: exactly these two, in this order.
        assert names_of(seen) == ["job-created", "job-completed"], seen
        for e in seen:
            assert e["export"] == "vm1"
            assert e["job"] == "commit"
            assert e["top"] == "snap1.qcow2" and e["base"] == names[0]
            assert isinstance(e["time"], float)
        assert seen[0]["id"] == seen[1]["id"]
        assert seen[0]["time"] <= seen[1]["time"]
        assert seen[1]["offset"] == seen[1]["len"] > 0
        assert layer_files(exp) == ["vm1.qcow2", names[0]]
    qemu_img_check(image_dir / names[0])


def test_active_commit_ready_pivot_completed(image_dir, mountpoint):
    names = chain3(image_dir)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with Events(m.mountpoint) as ev:
            start(exp, "commit", "active")
            seen = ev.until("job-ready")
            assert names_of(seen) == ["job-created", "job-ready"], seen
            assert seen[1]["job"] == "active-commit"
            start(exp, "job.pivot")
            seen = ev.until("job-completed")
            assert names_of(seen) == ["pivot", "job-completed"], seen
            assert seen[0]["export"] == "vm1"
            assert seen[0]["file"] == names[0]
        assert layer_files(exp) == [names[0]]


def test_cancel_in_ready_gives_cancelled(image_dir, mountpoint):
    chain3(image_dir)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with Events(m.mountpoint) as ev:
            start(exp, "commit", "active")
            ev.until("job-ready")
            start(exp, "job.cancel")
            seen = ev.until("job-cancelled")
            assert names_of(seen) == ["job-cancelled"], seen
            assert "error" not in seen[0]
        assert layer_files(exp)[0] == "vm1.qcow2"


def test_pause_resume_in_ready(image_dir, mountpoint):
    chain3(image_dir)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with Events(m.mountpoint) as ev:
            start(exp, "commit", "active")
            ev.until("job-ready")
            start(exp, "job.pause")
            assert names_of(ev.until("job-paused")) == ["job-paused"]
            start(exp, "job.resume")
            assert names_of(ev.until("job-resumed")) == ["job-resumed"]
            start(exp, "job.cancel")
            assert names_of(ev.until("job-cancelled")) == ["job-cancelled"]


def test_snapshot_event_and_nothing_from_before_open(image_dir, mountpoint):
    chain3(image_dir)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        start(exp, "snapshot", "before.qcow2")
        with Events(m.mountpoint, nonblock=True) as ev:
            # The snapshot before the open is not queued for this reader.
            assert ev.read_errno() == errno.EAGAIN
            start(exp, "snapshot", "after.qcow2")
            e = ev.next()
            assert e["event"] == "snapshot" and e["export"] == "vm1"
            assert e["file"] == "after.qcow2"
            assert ev.read_errno() == errno.EAGAIN
        assert layer_files(exp)[:2] == ["after.qcow2", "before.qcow2"]


def test_resize_event(image_dir, mountpoint):
    chain3(image_dir)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        old = os.stat(exp).st_size
        with Events(m.mountpoint, nonblock=True) as ev:
            os.truncate(exp, old + 8 * 1024 * 1024)
            e = ev.next()
            assert e["event"] == "resize" and e["export"] == "vm1", e
            assert (e["old_size"], e["size"]) == (old, old + 8 * 1024 * 1024), e
            # A refused shrink is no event.
            with pytest.raises(OSError):
                os.truncate(exp, old)
            assert ev.read_errno() == errno.EAGAIN


def test_two_readers_each_get_every_event(image_dir, mountpoint):
    chain3(image_dir)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with Events(m.mountpoint) as a, Events(m.mountpoint) as b:
            start(exp, "snapshot", "s1.qcow2")
            start(exp, "commit", "top=vm1.qcow2 base=snap1.qcow2")
            got_a = a.until("job-completed")
            got_b = b.until("job-completed")
            assert names_of(got_a) == ["snapshot", "job-created", "job-completed"]
            assert got_a == got_b


def test_blocking_read_and_poll_wake_on_new_event(image_dir, mountpoint):
    chain3(image_dir)
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with Events(m.mountpoint) as reader, Events(m.mountpoint) as poller:
            p = select.poll()
            p.register(poller.fd, select.POLLIN)
            assert p.poll(0) == []
            results = {}

            def blocking_read():
                results["read"] = os.read(reader.fd, 65536)

            def blocking_poll():
                results["poll"] = p.poll(30000)
            threads = [threading.Thread(target=blocking_read),
                       threading.Thread(target=blocking_poll)]
            for t in threads:
                t.start()
            start(exp, "snapshot", "s1.qcow2")
            for t in threads:
                t.join(TIMEOUT)
                assert not t.is_alive()
            assert json.loads(results["read"])["event"] == "snapshot"
            assert results["poll"] == [(poller.fd, select.POLLIN)]
            assert poller.next()["file"] == "s1.qcow2"


def test_nonblocking_read_is_eagain_when_empty(image_dir, mountpoint):
    chain3(image_dir)
    with mounted(image_dir, mountpoint) as m:
        with Events(m.mountpoint, nonblock=True) as ev:
            assert ev.read_errno() == errno.EAGAIN
            start(m.path("vm1"), "snapshot", "s1.qcow2")
            assert ev.next()["event"] == "snapshot"
            assert ev.read_errno() == errno.EAGAIN


def test_idle_reader_never_blocks_jobs_and_sees_overflow(image_dir, mountpoint):
    """A reader that never reads while more events come than its queue
    holds: every job still ends (another reader sees each completion),
    and the idle reader finds its queue full, then one overflow event
    counting what it missed."""
    create_qcow2(image_dir / "base.qcow2", SIZE)
    create_qcow2(image_dir / "vm1.qcow2", backing="base.qcow2",
                 backing_fmt="qcow2")
    queue_max = 1024
    jobs = queue_max // 2 + 10
    with mounted(image_dir, mountpoint) as m:
        exp = m.path("vm1")
        with Events(m.mountpoint, nonblock=True) as idle, \
                Events(m.mountpoint) as active:
            for _ in range(jobs):
                # Nothing to pull from base=its own backing file: the
                # chain stays as it is, the job runs and completes.
                start(exp, "stream", "base=base.qcow2")
                assert active.until("job-completed")[-1]["export"] == "vm1"
            total = 2 * jobs
            got = []
            while True:
                try:
                    data = os.read(idle.fd, 65536)
                except BlockingIOError:
                    break
                got.append(json.loads(data))
            assert len(got) == queue_max + 1
            assert names_of(got[:4]) == ["job-created", "job-completed"] * 2
            assert got[-1]["event"] == "overflow"
            assert got[-1]["export"] is None
            assert got[-1]["dropped"] == total - queue_max
        assert layer_files(exp) == ["vm1.qcow2", "base.qcow2"]


def wait_open_events(pid, mountpoint):
    """Wait until process pid has MOUNTPOINT/.events open."""
    target = os.path.join(os.path.realpath(str(mountpoint)), ".events")

    def has_it():
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == target:
                    return True
            except OSError:
                pass
        return False
    wait_for(has_it, timeout=30, what="process %d to open .events" % pid)


def wait_in_read(pid):
    """Wait until process pid sits in read(2) (x86-64 syscall 0)."""
    def reading():
        with open("/proc/%d/syscall" % pid) as f:
            return f.read().split()[0] == "0"
    wait_for(reading, timeout=30, what="process %d to block in read" % pid)


def read_line(proc, timeout=TIMEOUT):
    p = select.poll()
    p.register(proc.stdout, select.POLLIN)
    assert p.poll(timeout * 1000), "no line from chainctl within %d s" % timeout
    return proc.stdout.readline()


def test_chainctl_events_json_filtered_to_export(image_dir, mountpoint):
    make_chain(image_dir, depth=2, size=SIZE, base_fmt="qcow2", seed=3,
               top_name="vm1.qcow2", prefix="a-")
    make_chain(image_dir, depth=2, size=SIZE, base_fmt="qcow2", seed=4,
               top_name="vm2.qcow2", prefix="b-")
    with mounted(image_dir, mountpoint) as m:
        proc = subprocess.Popen([CHAINCTL, "events", m.path("vm1"), "--json"],
                                stdout=subprocess.PIPE, text=True)
        try:
            wait_open_events(proc.pid, m.mountpoint)
            start(m.path("vm2"), "snapshot", "b-s.qcow2")
            start(m.path("vm1"), "snapshot", "a-s.qcow2")
            # vm2's event is filtered out: vm1's is the first line.
            line = read_line(proc)
            e = json.loads(line)
            assert e["event"] == "snapshot" and e["export"] == "vm1"
            assert e["file"] == "a-s.qcow2"
        finally:
            proc.terminate()
            proc.wait(TIMEOUT)
            proc.stdout.close()


def test_chainctl_events_human_lines(image_dir, mountpoint):
    chain3(image_dir)
    with mounted(image_dir, mountpoint) as m:
        proc = subprocess.Popen([CHAINCTL, "events", m.mountpoint],
                                stdout=subprocess.PIPE, text=True)
        try:
            wait_open_events(proc.pid, m.mountpoint)
            start(m.path("vm1"), "commit", "top=snap1.qcow2")
            first = read_line(proc).split()
            second = read_line(proc).split()
            assert first[2:4] == ["vm1", "job-created"], first
            assert "job=commit" in first and "top=snap1.qcow2" in first
            assert second[2:4] == ["vm1", "job-completed"], second
        finally:
            proc.terminate()
            proc.wait(TIMEOUT)
            proc.stdout.close()


def test_interrupt_ends_blocked_read(image_dir, mountpoint):
    """Ctrl-C on a cat blocked on .events: the daemon answers the
    interrupted read, and cat exits."""
    chain3(image_dir)
    with mounted(image_dir, mountpoint) as m:
        proc = subprocess.Popen(["cat", m.path(".events")],
                                stdout=subprocess.PIPE)
        try:
            wait_open_events(proc.pid, m.mountpoint)
            wait_in_read(proc.pid)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        assert rc == -signal.SIGINT
        # The daemon goes on serving events after the interrupt.
        with Events(m.mountpoint) as ev:
            start(m.path("vm1"), "snapshot", "s1.qcow2")
            assert ev.next()["event"] == "snapshot"


def test_shutdown_answers_blocked_reader(image_dir, mountpoint):
    """SIGTERM to the daemon while a reader is blocked: the reader gets end
    of file and exits 0, and the daemon exits 0."""
    chain3(image_dir)
    with mounted(image_dir, mountpoint) as m:
        proc = subprocess.Popen([CHAINCTL, "events", m.mountpoint, "--json"],
                                stdout=subprocess.PIPE, text=True)
        try:
            wait_open_events(proc.pid, m.mountpoint)
            wait_in_read(proc.pid)
            m.proc.send_signal(signal.SIGTERM)
            assert proc.wait(TIMEOUT) == 0
            assert proc.stdout.read() == ""
            assert m.proc.wait(TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def test_latched_flush_gives_io_error(tmp_path):
    """A failed fdatasync (tests/faultinject.c) latches the image: one
    io-error event names the export, the file and the failed call."""
    d = tmp_path / "images"
    d.mkdir()
    create_qcow2(d / "base.qcow2", SIZE)
    create_qcow2(d / "vm1.qcow2", backing="base.qcow2", backing_fmt="qcow2")
    fi = FaultInjector(tmp_path / "fi")
    m = mounted(d, tmp_path / "mnt", env=fi.env())
    m.allowed_log.extend(("latched", "flush failed", "flush at shutdown failed",
                          "Input/output error"))
    with m:
        with Events(m.mountpoint) as ev:
            fd = os.open(m.path("vm1"), os.O_RDWR)
            try:
                os.pwrite(fd, b"\x44" * 65536, 0)
                fi.arm("fdatasync:vm1.qcow2:1:EIO")
                with pytest.raises(OSError):
                    os.fsync(fd)
                fi.disarm()
                with pytest.raises(OSError):
                    os.fsync(fd)   # latched: no second event
            finally:
                os.close(fd)
            e = ev.next()
            assert e["event"] == "io-error", e
            assert e["export"] == "vm1"
            assert e["file"] == "vm1.qcow2"
            assert "fdatasync" in e["error"] and "vm1.qcow2" in e["error"]
            # The first latch only: nothing more was queued.
            os.set_blocking(ev.fd, False)
            assert ev.read_errno() == errno.EAGAIN
        m.expect_clean = False   # its flush at shutdown fails, as it must


def test_failed_commit_gives_job_failed_with_error(tmp_path):
    """A commit whose base cannot be flushed (tests/faultinject.c) fails:
    job-created, then job-failed carrying the job's error."""
    d = tmp_path / "images"
    d.mkdir()
    names = chain3(d)
    fi = FaultInjector(tmp_path / "fi", "fdatasync:%s:1:EIO:0" % names[0])
    m = mounted(d, tmp_path / "mnt", env=fi.env())
    m.allowed_log.extend(("latched", "flush failed", "flush at shutdown failed",
                          "Input/output error", "failed", "checkpoint"))
    with m:
        exp = m.path("vm1")
        with Events(m.mountpoint) as ev:
            start(exp, "commit", "top=snap1.qcow2")
            seen = ev.until("job-failed")
        jobs = [e for e in seen if e["event"].startswith("job-")]
        assert names_of(jobs) == ["job-created", "job-failed"], seen
        assert jobs[1]["export"] == "vm1" and jobs[1]["job"] == "commit"
        assert jobs[1]["error"], jobs[1]
        assert jobs[1]["error"] == json.loads(
            os.getxattr(exp, "user.chainfs.job"))["error"]
        assert fi.fired("fdatasync", names[0])
        m.expect_clean = False   # base's flush at shutdown fails, as it must
