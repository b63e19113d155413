"""Where chainfs's messages go, and what systemd is told.

No journald runs on a test machine: the tests bind a Unix datagram socket
of their own and point chainfs at it with CHAINFS_JOURNAL_SOCKET (the
journal's native protocol, what /run/systemd/journal/socket receives),
and one more for NOTIFY_SOCKET (the sd_notify protocol of Type=notify).
A thread drains each socket while the daemon runs, so that a full socket
queue never turns a message away (chainfs would then write it to stderr).
"""
import errno
import os
import signal
import socket
import struct
import threading

import pytest

from helpers import (CHAINFS, MiB, job_info, make_chain, mounted, qemu_img,
                     run, setxattr, setxattr_errno, wait_for, wait_job)

SIZE = 16 * MiB


def parse_journal_datagram(data):
    """Fields of one native-protocol datagram: KEY=value lines, or KEY, a
    64-bit little-endian length and the value for one holding a newline.
    Returns a list of (key, value) in order."""
    fields = []
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = nl + 1
        else:
            key = line
            (length,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            value = data[nl + 9:nl + 9 + length]
            assert data[nl + 9 + length:nl + 10 + length] == b"\n"
            i = nl + 10 + length
        fields.append((key.decode(), value.decode()))
    return fields


class DatagramSink:
    """A bound AF_UNIX datagram socket and a thread collecting what it
    receives (a message passed as a memfd, SCM_RIGHTS, is read too)."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.received = []
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
            except socket.timeout:
                if self.stopping:
                    return
                continue
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fd = struct.unpack("i", payload[:4])[0]
                    with os.fdopen(fd, "rb") as f:
                        data = f.read()
            with self.lock:
                self.received.append(data)

    def messages(self):
        with self.lock:
            return list(self.received)

    def drain(self):
        """Everything the socket received, once the sender is gone: the
        thread stops only when a receive times out, that is once the queue
        is empty, so a datagram sent just before the daemon exited is not
        missed (reading self.received at once could miss it)."""
        self.stopping = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the socket reader did not stop"
        return self.messages()

    def close(self):
        self.drain()
        self.sock.close()


@pytest.fixture
def journal(tmp_path):
    sink = DatagramSink(tmp_path / "journal.sock")
    yield sink
    sink.close()


@pytest.fixture
def vm(image_dir):
    make_chain(image_dir, depth=3, size=SIZE, base_fmt="qcow2", top_name="vm.qcow2", seed=7)
    return image_dir / "vm.qcow2"


def journal_entries(sink):
    """The entries of a sink whose daemon has exited."""
    return [dict(parse_journal_datagram(d)) for d in sink.drain()]


def entry_with(entries, text):
    found = [e for e in entries if text in e.get("MESSAGE", "")]
    assert found, "no journal entry with %r in %r" % (text, entries)
    return found[0]


def test_journal_fields(vm, image_dir, mountpoint, journal):
    # a chain that is left out: a warning about export "broken"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "nothere.qcow2", "-F", "qcow2",
             str(image_dir / "broken.qcow2"), "16M")
    env = dict(os.environ, CHAINFS_JOURNAL_SOCKET=journal.path)
    with mounted(image_dir, mountpoint, "--log=journal", env=env) as m:
        exp = m.path("vm")
        assert setxattr_errno(exp, "user.chainfs.commit", "frobnicate") == errno.EINVAL
        setxattr(exp, "user.chainfs.commit", "top=snap1.qcow2")
        job = wait_job(exp)
    entries = journal_entries(journal)
    for e in entries:
        assert e["SYSLOG_IDENTIFIER"] == "chainfs"
        assert e["PRIORITY"] in "234567"
        assert e["MESSAGE"]

    serving = entry_with(entries, "serving vm.qcow2")
    assert serving["MESSAGE"] == "vm: serving vm.qcow2, 3 layers"
    assert serving["CHAINFS_EXPORT"] == "vm" and serving["PRIORITY"] == "5"
    assert "CHAINFS_JOB" not in serving
    assert serving["CODE_FILE"].endswith("export.c") and serving["CODE_FUNC"]

    left_out = entry_with(entries, "broken.qcow2 left out")
    assert left_out["CHAINFS_EXPORT"] == "broken" and left_out["PRIORITY"] == "4"
    assert "nothere.qcow2" in left_out["MESSAGE"]

    refused = entry_with(entries, "commit refused")
    assert refused["CHAINFS_EXPORT"] == "vm" and "frobnicate" in refused["MESSAGE"]

    started = entry_with(entries, "vm: commit top=snap1.qcow2")
    assert started["CHAINFS_EXPORT"] == "vm"
    assert started["CHAINFS_JOB"] == job["id"]

    mounted_msg = entry_with(entries, "mounted ")
    assert "CHAINFS_EXPORT" not in mounted_msg and mounted_msg["PRIORITY"] == "5"
    entry_with(entries, "stopped; every image flushed and closed")
    # --log=journal: nothing of it on stderr
    log = m.read_log()
    assert "serving" not in log and "refused" not in log, log


def test_auto_follows_journal_stream(vm, image_dir, mountpoint, journal):
    """Under systemd, JOURNAL_STREAM names the stream that stderr is: the
    default target then is the journal.  The test makes stderr a file and
    names that file."""
    log_path = str(mountpoint).rstrip("/") + ".log"
    with open(log_path, "wb"):
        pass
    st = os.stat(log_path)
    env = dict(os.environ, CHAINFS_JOURNAL_SOCKET=journal.path,
               JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
    with mounted(image_dir, mountpoint, env=env) as m:
        assert os.path.exists(m.path("vm"))
    entry_with(journal_entries(journal), "vm: serving")
    assert "serving" not in m.read_log()


def test_auto_is_stderr_otherwise(vm, image_dir, mountpoint, journal):
    """A JOURNAL_STREAM inherited from a parent but no longer stderr (the
    test's stderr is a file) counts for nothing: plain lines on stderr."""
    env = dict(os.environ, CHAINFS_JOURNAL_SOCKET=journal.path, JOURNAL_STREAM="1:1")
    with mounted(image_dir, mountpoint, env=env) as m:
        assert os.path.exists(m.path("vm"))
    assert "vm: serving vm.qcow2, 3 layers" in m.read_log()
    assert "Message" in m.read_log()   # GLib's usual format, as before
    assert journal.drain() == []


def test_journal_without_socket_falls_back(vm, image_dir, mountpoint, tmp_path):
    env = dict(os.environ, CHAINFS_JOURNAL_SOCKET=str(tmp_path / "nosuch.sock"))
    with mounted(image_dir, mountpoint, "--log=journal", env=env) as m:
        m.allowed_log = ["no journal socket"]
        assert os.path.exists(m.path("vm"))
    log = m.read_log()
    assert "no journal socket at %s: logging to stderr" % (tmp_path / "nosuch.sock") in log
    assert "vm: serving" in log


def test_bad_log_target(vm, image_dir, mountpoint):
    res = run([CHAINFS, "-f", "--log=syslog", str(image_dir), str(mountpoint)], check=False)
    assert res.returncode == 2
    assert 'bad log target "syslog": auto, stderr or journal' in res.stderr


def test_debug_messages_only_with_d(vm, image_dir, mountpoint, journal):
    """Debug messages (a failed read) reach the journal only with -d, as
    GLib's own writer keeps them back without G_MESSAGES_DEBUG."""
    env = dict(os.environ, CHAINFS_JOURNAL_SOCKET=journal.path)
    env.pop("G_MESSAGES_DEBUG", None)
    with mounted(image_dir, mountpoint, "--log=journal", env=env):
        pass
    assert all(e["PRIORITY"] != "7" for e in journal_entries(journal))


def test_notify_ready_and_stopping_on_sigterm(vm, image_dir, mountpoint, tmp_path):
    """Type=notify: READY=1 once mounted and serving, STOPPING=1 when a
    SIGTERM stops it; the daemon then exits 0 after a clean shutdown."""
    sink = DatagramSink(tmp_path / "notify.sock")
    try:
        env = dict(os.environ, NOTIFY_SOCKET=sink.path)
        m = mounted(image_dir, mountpoint, env=env).start()
        try:
            wait_for(lambda: any(b"READY=1" in d for d in sink.messages()),
                     timeout=30, what="READY=1")
            assert os.path.exists(m.path("vm"))
            assert not any(b"STOPPING=1" in d for d in sink.messages())
            m.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: m.proc.poll() is not None, timeout=60, what="chainfs to exit")
            assert m.proc.returncode == 0, m.read_log()
        finally:
            m.stop()
        wait_for(lambda: any(b"STOPPING=1" in d for d in sink.messages()),
                 timeout=10, what="STOPPING=1")
        assert "stopped; every image flushed and closed" in m.read_log()
    finally:
        sink.close()


def test_notify_abstract_socket(vm, image_dir, mountpoint):
    """systemd may name an abstract socket, written with a leading '@'."""
    name = "chainfs-test-%d" % os.getpid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(30)
    try:
        env = dict(os.environ, NOTIFY_SOCKET="@" + name)
        with mounted(image_dir, mountpoint, env=env):
            assert b"READY=1" in sock.recv(4096)
    finally:
        sock.close()


def test_messages_name_the_export_on_stderr(vm, image_dir, mountpoint):
    with mounted(image_dir, mountpoint) as m:
        assert setxattr_errno(m.path("vm"), "user.chainfs.job.pause") == errno.EINVAL
        assert job_info(m.path("vm")) == {}
    log = m.read_log()
    assert "vm: job.pause refused: no job on vm" in log, log

