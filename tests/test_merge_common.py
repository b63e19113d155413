"""Shared pieces of the merge-engine suites (test_merge_*.py).

A `Guest` thread writes seeded random data to an exported file and reads
random ranges back against an in-memory model of the disk, while a job
runs.  At the end the whole export must equal the model.  This module
holds no tests of its own.
"""
import errno
import hashlib
import os
import random
import threading

from helpers import (BUILD_DIR, KiB, MiB, chain_info, file_sha256,  # noqa: F401
                     getxattr, job_info, run, setxattr, wait_for)

MERGE_TOOL = os.path.join(BUILD_DIR, "tests", "merge-tool")


class GuestThread(threading.Thread):
    """A guest thread run as a context manager: started on entry, told to
    stop (stop_event) and joined on exit, also on failure, since an open
    file would keep the mount busy."""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.join(timeout=60)
        return False


class Guest(GuestThread):
    """Seeded writer + reader on an exported file, checked against a model."""

    def __init__(self, path, seed, size, max_len=128 * KiB, zero_every=10):
        super().__init__(daemon=True)
        self.path = str(path)
        self.rng = random.Random(seed)
        self.size = size
        self.max_len = max_len
        self.zero_every = zero_every
        with open(self.path, "rb") as f:
            self.model = bytearray(f.read())
        assert len(self.model) == size
        self.stop_event = threading.Event()
        self.writes = 0
        self.error = None

    def run(self):
        fd = os.open(self.path, os.O_RDWR)
        try:
            while not self.stop_event.is_set():
                n = self.rng.randrange(1, self.max_len // 512 + 1) * 512
                off = self.rng.randrange(0, (self.size - n) // 512 + 1) * 512
                if self.zero_every and self.rng.randrange(self.zero_every) == 0:
                    data = bytes(n)
                else:
                    data = self.rng.randbytes(n)
                assert os.pwrite(fd, data, off) == n
                self.model[off:off + n] = data
                self.writes += 1
                roff = self.rng.randrange(0, (self.size - n) // 512 + 1) * 512
                got = os.pread(fd, n, roff)
                if got != bytes(self.model[roff:roff + n]):
                    self.error = "read-back of [%d, +%d) differs" % (roff, n)
                    return
        except Exception as e:  # reported by finish()
            self.error = repr(e)
        finally:
            os.close(fd)

    def wait_writes(self, n, timeout=60):
        wait_for(lambda: self.writes >= n or self.error, timeout=timeout,
                 what="%d guest writes" % n)
        assert self.error is None, self.error

    def finish(self):
        self.stop_event.set()
        self.join(timeout=60)
        assert not self.is_alive()
        assert self.error is None, self.error

    def check(self):
        """The whole export equals the model."""
        with open(self.path, "rb") as f:
            data = f.read()
        assert len(data) == len(self.model)
        if data != bytes(self.model):
            for i in range(0, len(data), 65536):
                if data[i:i + 65536] != bytes(self.model[i:i + 65536]):
                    raise AssertionError("export differs from the model near %d" % i)

    def save_model(self, path):
        with open(path, "wb") as f:
            f.write(self.model)
        return str(path)


def export_sha(path):
    return file_sha256(path)


def dir_hashes(d):
    out = {}
    for name in sorted(os.listdir(str(d))):
        p = os.path.join(str(d), name)
        if os.path.isfile(p):
            out[name] = file_sha256(p)
    return out


def command(path, attr, value=""):
    """setxattr; return (errno, last_error) with errno 0 on success."""
    try:
        setxattr(path, "user.chainfs." + attr, value)
        return 0, ""
    except OSError as e:
        try:
            msg = getxattr(path, "user.chainfs.last_error")
        except OSError:
            msg = ""
        return e.errno, msg


def start(path, attr, value=""):
    err, msg = command(path, attr, value)
    assert err == 0, "%s %r refused: %s (%s)" % (attr, value, errno.errorcode.get(err), msg)


def wait_state(path, states, timeout=60):
    last = {}

    def ok():
        nonlocal last
        last = job_info(path)
        return last.get("state") in states
    wait_for(ok, timeout=timeout, what="job state in %s" % (states,))
    return last


def layer_files(path):
    return [l["file"] for l in chain_info(path)["layers"]]


def sha256_bytes(b):
    return hashlib.sha256(b).hexdigest()


def merge_tool(*args, check=True, timeout=120):
    return run([MERGE_TOOL] + [str(a) for a in args], check=check, timeout=timeout)
