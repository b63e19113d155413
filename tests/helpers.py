"""Building blocks shared by every pytest suite of chainfs.

Images are made with the real qemu-img and qemu-io; mounts are real FUSE
mounts of the real chainfs binary.  Every mount made through `mounted()`
or the `mount` fixture is unmounted with `fusermount3 -u` and its daemon
reaped (and its exit status and log checked) even when the test fails.
Nothing here sleeps for a fixed time: waits poll with a deadline.
"""
import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import time

import pytest

BUILD_DIR = os.environ.get(
    "CHAINFS_BUILD_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build"),
)
CHAINFS = os.path.join(BUILD_DIR, "chainfs")
CHAINCTL = os.path.join(BUILD_DIR, "chainctl")
CHAIN_TOOL = os.path.join(BUILD_DIR, "tests", "chain-tool")

MiB = 1024 * 1024
KiB = 1024


# ---------------------------------------------------------------- processes

def run(cmd, check=True, input=None, timeout=300, env=None):
    """Run cmd (a list); return CompletedProcess with text stdout/stderr."""
    res = subprocess.run(cmd, input=input, capture_output=True, text=True,
                         timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise AssertionError(
            "command failed (%d): %s\nstdout: %s\nstderr: %s"
            % (res.returncode, " ".join(map(str, cmd)), res.stdout, res.stderr))
    return res


def wait_for(predicate, timeout=30.0, interval=0.02, what="condition"):
    """Poll predicate() until it returns a true value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        val = predicate()
        if val:
            return val
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


# ------------------------------------------------------------------ images

def qemu_img(*args, check=True, timeout=300):
    return run(["qemu-img"] + [str(a) for a in args], check=check, timeout=timeout)


def qemu_io(image, *cmds, fmt=None, cache="writeback", check=True, extra=()):
    """Run qemu-io commands (each a string like 'write -P 1 0 64k')."""
    cmd = ["qemu-io"]
    if fmt:
        cmd += ["-f", fmt]
    cmd += ["-t", cache] + list(extra)
    for c in cmds:
        cmd += ["-c", c]
    cmd.append(str(image))
    res = run(cmd, check=check)
    if check:
        # qemu-io reports many failures on stdout and still exits 0.
        for bad in ("Pattern verification failed", "failed:", "error"):
            assert bad not in res.stdout, res.stdout
    return res


def create_qcow2(path, size=None, backing=None, backing_fmt=None, cluster_size=None,
                 compat="1.1", extra_opts=None):
    opts = ["compat=%s" % compat]
    if cluster_size:
        opts.append("cluster_size=%d" % cluster_size)
    if extra_opts:
        opts += list(extra_opts)
    cmd = ["create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
    if backing:
        cmd += ["-b", str(backing), "-F", backing_fmt or "qcow2"]
    cmd.append(str(path))
    if size is not None:
        cmd.append(str(size))
    qemu_img(*cmd)
    return str(path)


def create_raw(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def make_chain(dirpath, depth=3, size=64 * MiB, base_fmt="raw", cluster_size=None,
               compat="1.1", prefix="", seed=1, writes_per_layer=8, top_name=None):
    """Build base <- l1 <- ... <- top in dirpath with seeded patterned writes.

    Returns the list of file names, bottom first.  Layer i (0 = base) gets
    `writes_per_layer` writes of pattern i+1 at seeded offsets, so later
    layers overwrite parts of earlier ones.
    """
    rng = random.Random(seed)
    names = []
    dirpath = str(dirpath)
    base = prefix + ("base.img" if base_fmt == "raw" else "base.qcow2")
    if base_fmt == "raw":
        create_raw(os.path.join(dirpath, base), size)
    else:
        create_qcow2(os.path.join(dirpath, base), size, cluster_size=cluster_size,
                     compat=compat)
    names.append(base)
    for i in range(1, depth):
        if i == depth - 1 and top_name:
            name = top_name
        else:
            name = prefix + "snap%d.qcow2" % i
        create_qcow2(os.path.join(dirpath, name), backing=names[-1],
                     backing_fmt="raw" if i == 1 and base_fmt == "raw" else "qcow2",
                     cluster_size=cluster_size, compat=compat)
        names.append(name)
    for i, name in enumerate(names):
        fmt = "raw" if (i == 0 and base_fmt == "raw") else "qcow2"
        cmds = []
        for _ in range(writes_per_layer):
            length = rng.choice([512, 4096, 65536, 100000, 1 * MiB])
            off = rng.randrange(0, size - length)
            cmds.append("write -P %d %d %d" % ((i + 1) & 0xff, off, length))
        qemu_io(os.path.join(dirpath, name), *cmds, fmt=fmt)
    return names


def to_raw(image, out, fmt=None):
    cmd = ["convert", "-U", "-O", "raw"]
    if fmt:
        cmd += ["-f", fmt]
    qemu_img(*(cmd + [str(image), str(out)]))
    return str(out)


def file_sha256(path, length=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length
        while True:
            n = 1 * MiB if remaining is None else min(1 * MiB, remaining)
            if n == 0:
                break
            b = f.read(n)
            if not b:
                break
            h.update(b)
            if remaining is not None:
                remaining -= len(b)
    return h.hexdigest()


def qemu_img_check(image, force_share=False):
    """Assert `qemu-img check` finds no corruption (leaks are allowed)."""
    args = ["check", "--output=json"]
    if force_share:
        args.append("-U")
    res = qemu_img(*(args + [str(image)]), check=False)
    # exit 0 clean, 3 leaks only; 2 corruption; 1 could not check
    assert res.returncode in (0, 3), "qemu-img check %s: rc=%d\n%s%s" % (
        image, res.returncode, res.stdout, res.stderr)
    info = json.loads(res.stdout)
    assert info.get("corruptions", 0) == 0, info
    assert info.get("check-errors", 0) == 0, info
    return info


def qemu_img_info(image, chain=False):
    args = ["info", "-U", "--output=json"]
    if chain:
        args.append("--backing-chain")
    return json.loads(qemu_img(*(args + [str(image)])).stdout)


def qemu_img_compare(a, b, fmt_a=None, fmt_b=None, strict=False):
    args = ["compare", "-U"]
    if fmt_a:
        args += ["-f", fmt_a]
    if fmt_b:
        args += ["-F", fmt_b]
    if strict:
        args.append("-s")
    res = qemu_img(*(args + [str(a), str(b)]), check=False)
    assert res.returncode == 0, "qemu-img compare %s %s: %s%s" % (a, b, res.stdout, res.stderr)


# ------------------------------------------------------------------ mounts

def is_mounted(path):
    path = os.path.realpath(str(path))
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[1] == path and parts[2].startswith("fuse"):
                return True
    return False


class Mount:
    """A running `chainfs -f IMAGE_DIR MOUNTPOINT`.

    Use as a context manager (or through the `mount` fixture).  On exit it
    unmounts with fusermount3 -u, reaps the daemon, and asserts it exited 0
    with no unexpected warnings in its log (unless expect_clean=False or
    the daemon was killed on purpose through kill()).
    """

    def __init__(self, image_dir, mountpoint, args=(), env=None, wait_export=None):
        self.image_dir = str(image_dir)
        self.mountpoint = str(mountpoint)
        self.args = list(args)
        self.env = env
        self.proc = None
        self.log_path = self.mountpoint.rstrip("/") + ".log"
        self.killed = False
        self.expect_clean = True
        self.allowed_log = []   # substrings of log lines that are fine
        self.wait_export = wait_export

    def start(self):
        os.makedirs(self.mountpoint, exist_ok=True)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [CHAINFS, "-f"] + self.args + [self.image_dir, self.mountpoint],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError("chainfs exited with %d before mounting:\n%s"
                                     % (self.proc.returncode, self.read_log()))
            return is_mounted(self.mountpoint)
        wait_for(up, timeout=30, what="chainfs to mount %s" % self.mountpoint)
        if self.wait_export:
            wait_for(lambda: os.path.exists(self.path(self.wait_export)), timeout=30,
                     what="export %s" % self.wait_export)
        return self

    def path(self, name):
        return os.path.join(self.mountpoint, name)

    def read_log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def kill(self, sig=signal.SIGKILL):
        """Kill the daemon (a crash).  The mount is cleaned up lazily."""
        self.killed = True
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint],
                           capture_output=True)

    def stop(self):
        """Unmount cleanly and return the daemon's exit status."""
        if self.proc is None:
            return None
        if not self.killed:
            if is_mounted(self.mountpoint):
                r = subprocess.run(["fusermount3", "-u", self.mountpoint],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    # busy: a client still has it open; retry then force
                    try:
                        wait_for(lambda: subprocess.run(
                            ["fusermount3", "-u", self.mountpoint],
                            capture_output=True).returncode == 0 or
                            not is_mounted(self.mountpoint), timeout=30,
                            what="unmount")
                    except AssertionError:
                        subprocess.run(["fusermount3", "-u", "-z", self.mountpoint],
                                       capture_output=True)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("chainfs did not exit after unmount:\n" + self.read_log())
        rc = self.proc.returncode
        self.log.close()
        self.proc = None
        return rc

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        killed = self.killed
        died = self.proc is not None and self.proc.poll() is not None
        rc = self.stop()
        if exc_type is not None:
            # Shown by pytest with the failure: why the daemon went away.
            print("chainfs %s, exit status %s; its log:\n%s" % (
                "had died" if died else "was running", rc, self.read_log()))
        if exc_type is None and not killed and self.expect_clean:
            assert rc == 0, "chainfs exited %s:\n%s" % (rc, self.read_log())
            for line in self.read_log().splitlines():
                low = line.lower()
                if ("addresssanitizer" in low or "runtime error" in low or
                        "leaksanitizer" in low):
                    raise AssertionError("sanitizer report in chainfs log:\n" + self.read_log())
                if ("critical" in low or "warning" in low) and not any(
                        a in line for a in self.allowed_log):
                    raise AssertionError("unexpected warning in chainfs log: %s\n%s"
                                         % (line, self.read_log()))
        return False


def mounted(image_dir, mountpoint, *args, **kw):
    return Mount(image_dir, mountpoint, args=args, **kw)


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    return d


@pytest.fixture
def mountpoint(tmp_path):
    d = tmp_path / "mnt"
    d.mkdir()
    return d


@pytest.fixture
def mount(image_dir, mountpoint):
    """Factory: mount(*args) starts chainfs on image_dir; always cleaned up."""
    mounts = []

    def start(*args, **kw):
        m = Mount(image_dir, mountpoint, args=args, **kw)
        mounts.append(m)
        return m.start()
    yield start
    errors = []
    for m in reversed(mounts):
        killed = m.killed
        rc = m.stop()
        if not killed and m.expect_clean and rc not in (None, 0):
            errors.append("chainfs exited %s:\n%s" % (rc, m.read_log()))
    if errors:
        pytest.fail("\n".join(errors))


# ------------------------------------------------------------------ xattrs

def getxattr(path, name):
    return os.getxattr(str(path), name).decode()


def setxattr(path, name, value=""):
    os.setxattr(str(path), name, value.encode())


def setxattr_errno(path, name, value=""):
    """Return the errno a refused setxattr fails with (0 if it succeeded)."""
    try:
        os.setxattr(str(path), name, value.encode())
        return 0
    except OSError as e:
        return e.errno


def job_info(path):
    return json.loads(getxattr(path, "user.chainfs.job"))


def job_stopped_on_error(path):
    """The job's info once it has met an error and left running (failed,
    paused...), else None.  The error is published as the copy meets it,
    the state when the job thread has stopped the job: wait for both."""
    info = job_info(path)
    if info.get("error") and info.get("state") != "running":
        return info
    return None


def chain_info(path):
    return json.loads(getxattr(path, "user.chainfs.chain"))


def wait_job(path, states=("completed",), timeout=120):
    """Wait until the export's job reaches one of states; return its info."""
    last = {}

    def done():
        nonlocal last
        last = job_info(path)
        if last.get("state") in ("failed",) and "failed" not in states:
            raise AssertionError("job failed: %r" % last)
        return last if last.get("state") in states else None
    wait_for(done, timeout=timeout, what="job state in %s (last %r)" % (states, last))
    return last



# ---------------------------------------------------------- fault injection

FAULTINJECT = os.path.join(BUILD_DIR, "tests", "libfaultinject.so")


def _asan_runtime(binary):
    """The libasan a sanitizer build of binary links, or None.  ASan wants
    its runtime first in the list of libraries: preloading it before the
    shim keeps its link-order check on (verify_asan_link_order=0 would
    work too, but hides a real misorder)."""
    res = run(["ldd", binary], check=False)
    for line in res.stdout.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("libasan.so") and len(parts) >= 3:
            return parts[2]
    return None


class FaultInjector:
    """tests/faultinject.c for one daemon: its environment, its control
    file (rules armed at run time) and the log of the faults it injected.

    Rules are "OP:PATH-SUBSTRING:NTH:ERRNO[:COUNT]" (see faultinject.c).
    arm() replaces the rules atomically (rename), and the daemon's next
    intercepted call sees them, counting from 0."""

    def __init__(self, dirpath, *rules):
        self.dir = str(dirpath)
        os.makedirs(self.dir, exist_ok=True)
        self.ctl = os.path.join(self.dir, "faults.ctl")
        self.log = os.path.join(self.dir, "faults.log")
        self._seq = 0
        self.arm(*rules)

    def env(self, binary=None):
        env = dict(os.environ)
        preload = [FAULTINJECT]
        asan = _asan_runtime(binary or CHAINFS)
        if asan:
            preload.insert(0, asan)
        if env.get("LD_PRELOAD"):
            preload.append(env["LD_PRELOAD"])
        env["LD_PRELOAD"] = ":".join(preload)
        env["CHAINFS_FAULT_CTL"] = self.ctl
        env["CHAINFS_FAULT_LOG"] = self.log
        return env

    def arm(self, *rules):
        self._seq += 1
        tmp = "%s.%d" % (self.ctl, self._seq)
        with open(tmp, "w") as f:
            f.write("\n".join(rules) + "\n")
        os.rename(tmp, self.ctl)

    def disarm(self):
        self.arm()

    def fired(self, op=None, path=None):
        """The faults injected so far: [(op, path, errno name, n)]."""
        try:
            with open(self.log) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            parts = line.split(" ")
            o, e, n = parts[0], parts[-2], int(parts[-1])
            p = " ".join(parts[1:-2])
            if (op is None or o == op) and (path is None or path in p):
                out.append((o, p, e, n))
        return out

    def wait_fired(self, op=None, path=None, count=1, timeout=60):
        return wait_for(lambda: len(self.fired(op, path)) >= count and
                        self.fired(op, path), timeout=timeout,
                        what="%d fault(s) %s on %s" % (count, op, path))


@contextlib.contextmanager
def loop_ext4(path, size):
    """An ext4 filesystem of exactly `size` bytes on a loop device, mounted
    at path; unmounted and detached even when the test fails."""
    path = str(path)
    img = path + ".ext4"
    os.makedirs(path, exist_ok=True)
    with open(img, "wb") as f:
        f.truncate(size)
    # No reserved blocks, no lazy init (nothing writes behind the test's
    # back), a journal as small as mkfs allows.
    run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
         "lazy_itable_init=0,lazy_journal_init=0", img])
    dev = run(["losetup", "-f", "--show", img]).stdout.strip()
    try:
        run(["mount", "-t", "ext4", dev, path])
        try:
            yield path
        finally:
            run(["umount", path], check=False)
            if os.path.ismount(path):
                run(["umount", "-l", path], check=False)
    finally:
        run(["losetup", "-d", dev], check=False)
        os.unlink(img)


def fs_free_bytes(path):
    st = os.statvfs(str(path))
    return st.f_bavail * st.f_frsize


def fill_fs_leaving(path, room):
    """Fill the filesystem of path with one file, leaving `room` bytes
    free; return the filler's path.  fallocate makes it exact and fast."""
    filler = os.path.join(str(path), "filler")
    os.sync()
    free = fs_free_bytes(path)
    assert free > room, "only %d bytes free, %d wanted" % (free, room)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, free - room)
        os.fsync(fd)
    finally:
        os.close(fd)
    return filler

__all__ = [n for n in dir() if not n.startswith("_")] + ["errno", "os", "json", "random",
                                                          "signal", "subprocess", "time"]
