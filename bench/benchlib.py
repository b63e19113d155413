"""Shared pieces of the chainfs benchmarks (bench/*.py).

Benchmarks print figures and ratios; they never fail on timing.  They do
fail (exit 1) when something they need cannot be set up at all, and they
print "n/a" with the reason when only one side (usually chainfs, while it
is being written) cannot run.

Everything a benchmark makes lives in one scratch directory under
/var/tmp.  Every daemon it starts is registered here and, at exit (normal
exit, exception, SIGINT or SIGTERM), unmounted and reaped by its own PID
before the scratch directory is removed.  Nothing here kills by name.
"""
import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.environ.get("CHAINFS_BUILD_DIR", os.path.join(ROOT, "build-bench"))
CHAINFS = os.path.join(BUILD_DIR, "chainfs")
CHAINCTL = os.path.join(BUILD_DIR, "chainctl")
CHAIN_TOOL = os.path.join(BUILD_DIR, "tests", "chain-tool")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

QUICK = "--quick" in sys.argv[1:]


# ------------------------------------------------------------ bookkeeping

_daemons = []       # started daemons, stopped in reverse at exit
_scratch_dirs = []


def _cleanup():
    for d in reversed(_daemons[:]):
        try:
            d.stop()
        except Exception as e:  # cleanup must go on for the others
            print("bench: cleanup of %s: %s" % (d, e), file=sys.stderr)
    for s in _scratch_dirs:
        shutil.rmtree(s, ignore_errors=True)
    _scratch_dirs.clear()


def _on_signal(signum, frame):
    # Turn the signal into SystemExit so that atexit cleanup runs.
    raise SystemExit(128 + signum)


atexit.register(_cleanup)
signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGINT, _on_signal)


def scratch(tag, parent="/var/tmp"):
    """A fresh directory PARENT/chainfs-bench-TAG-XXXX, removed at exit."""
    d = tempfile.mkdtemp(prefix="chainfs-bench-%s-" % tag, dir=parent)
    _scratch_dirs.append(d)
    return d


def log(msg):
    print("# " + msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------ commands

def run(cmd, check=True, timeout=1800, env=None):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise RuntimeError("command failed (%d): %s\n%s%s" % (
            res.returncode, " ".join(map(str, cmd)), res.stdout, res.stderr))
    return res


def timed(cmd, timeout=1800):
    """Run cmd; return (seconds, CompletedProcess)."""
    t0 = time.monotonic()
    res = run(cmd, timeout=timeout)
    return time.monotonic() - t0, res


def wait_for(predicate, timeout, interval=0.01, what="condition"):
    """Poll predicate() until true; return its value.  TimeoutError after."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chainfs_missing():
    """None when chainfs is built, else the reason it cannot run."""
    if not os.access(CHAINFS, os.X_OK):
        return "no %s (build it: meson setup build-bench --buildtype=release)" % CHAINFS
    return None


# ------------------------------------------------------------ images

def qemu_io(image, cmds, fmt="qcow2"):
    """Run qemu-io commands in one process (many -c are cheap)."""
    # qemu-io limits the command line only by ARG_MAX; batch to be safe.
    for i in range(0, len(cmds), 2000):
        cmd = ["qemu-io", "-f", fmt, "-t", "writeback"]
        for c in cmds[i:i + 2000]:
            cmd += ["-c", c]
        cmd.append(image)
        res = run(cmd)
        if "failed" in res.stdout or "error" in res.stdout.lower():
            raise RuntimeError("qemu-io %s: %s" % (image, res.stdout[-2000:]))


def build_chain(dirpath, depth, size, seed=1, upper_share=0.25, chunk=64 * KiB,
                base_name="base.qcow2", top_name="top.qcow2", cluster_size=64 * KiB):
    """base.qcow2 <- l1.qcow2 <- ... <- top.qcow2 in dirpath; return names.

    depth counts every layer (depth 1 is the base alone, named top_name).
    The base is fully allocated (pattern 1); the layers above share about
    `upper_share` of the disk between them, in seeded `chunk`-sized writes
    of their own pattern, so a read touches every depth of the chain.
    """
    rng = random.Random(seed)
    names = []
    for i in range(depth):
        if i == depth - 1:
            name = top_name
        elif i == 0:
            name = base_name
        else:
            name = "l%02d.qcow2" % i
        path = os.path.join(dirpath, name)
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2",
               "-o", "cluster_size=%d" % cluster_size]
        if names:
            cmd += ["-b", names[-1], "-F", "qcow2"]
        run(cmd + [path, str(size)])
        if i == 0:
            # qemu-io takes at most 2 GiB - 512 per request.
            qemu_io(path, ["write -P 1 %d %d" % (o, min(GiB, size - o))
                           for o in range(0, size, GiB)])
        else:
            nchunks = max(1, int(size * upper_share / (depth - 1) / chunk))
            offs = rng.sample(range(size // chunk), min(nchunks, size // chunk))
            qemu_io(path, ["write -P %d %d %d" % ((i % 250) + 2, o * chunk, chunk)
                           for o in sorted(offs)])
        names.append(name)
    return names


def copy_dir(src, dst):
    """Copy a chain directory (plain files only), fsync'd."""
    os.makedirs(dst, exist_ok=True)
    for n in sorted(os.listdir(src)):
        s = os.path.join(src, n)
        if os.path.isfile(s):
            shutil.copyfile(s, os.path.join(dst, n))
    run(["sync", "-f", dst])
    return dst


# ------------------------------------------------------------ mounts

def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[1] == path and parts[2].startswith("fuse"):
                return True
    return False


def vm_hwm_kib(pid):
    """Peak resident set (VmHWM) of pid in KiB, or None."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Daemon:
    """A started process with a FUSE mount at self.mountpoint."""

    name = "daemon"

    def __init__(self):
        self.proc = None
        self.mountpoint = None
        self.log_path = None
        self.exit_status = None

    def _spawn(self, cmd, log_path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        _daemons.append(self)

    def _wait_mounted(self, timeout=60):
        def up():
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited %d before mounting: %s" % (
                    self.name, self.proc.returncode, self.log_tail()))
            return is_mounted(self.mountpoint)
        wait_for(up, timeout, what="%s to mount %s" % (self.name, self.mountpoint))

    @property
    def pid(self):
        return self.proc.pid

    def peak_rss_mib(self):
        k = vm_hwm_kib(self.proc.pid) if self.proc else None
        return None if k is None else k / 1024.0

    def read_log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-4000:]
        except (OSError, TypeError):
            return ""

    def log_tail(self, lines=2):
        """The last lines of the daemon's output, on one line."""
        return " | ".join(self.read_log().strip().splitlines()[-lines:])

    def _unmount(self, lazy=False):
        subprocess.run(["fusermount3", "-u"] + (["-z"] if lazy else []) + [self.mountpoint],
                       capture_output=True)

    def stop(self, timeout=60):
        """Unmount, reap; kill by PID only if it does not exit."""
        if self.proc is None:
            return self.exit_status
        if self.proc.poll() is None:
            self._unmount()
            # A client killed just before (fio after Ctrl-C) may keep the
            # mount busy for a moment: retry, then detach lazily.
            start = time.monotonic()
            while self.proc.poll() is None and time.monotonic() - start < timeout:
                try:
                    self.proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    if is_mounted(self.mountpoint):
                        self._unmount(lazy=time.monotonic() - start > 10)
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint],
                           capture_output=True)
        self.exit_status = self.proc.returncode
        self.proc = None
        self._log.close()
        if self in _daemons:
            _daemons.remove(self)
        return self.exit_status

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


class Chainfs(Daemon):
    """chainfs -f IMAGE_DIR MOUNTPOINT; the export of top.qcow2 is `top`."""

    name = "chainfs"

    def __init__(self, image_dir, mountpoint, export="top", args=()):
        super().__init__()
        self.mountpoint = mountpoint
        os.makedirs(mountpoint, exist_ok=True)
        self._spawn([CHAINFS, "-f"] + list(args) + [image_dir, mountpoint],
                    mountpoint.rstrip("/") + ".chainfs.log")
        self.file = os.path.join(mountpoint, export)
        try:
            self._wait_mounted()
            wait_for(self._export_up, 15, what="export " + self.file)
        except BaseException:
            self.stop()
            raise

    def _export_up(self):
        if self.proc.poll() is not None:
            raise RuntimeError("chainfs exited %d: %s" % (self.proc.returncode, self.log_tail()))
        return os.path.exists(self.file)

    # --- control surface (design.md) ---
    def setxattr(self, name, value=""):
        os.setxattr(self.file, name, value.encode())

    def job(self):
        return json.loads(os.getxattr(self.file, "user.chainfs.job").decode() or "{}")

    def last_error(self):
        try:
            return os.getxattr(self.file, "user.chainfs.last_error").decode()
        except OSError as e:
            return str(e)

    def wait_job(self, states, timeout, interval=0.005):
        """Poll the job until its state is in states; return the job dict."""
        last = {}

        def reached():
            nonlocal last
            last = self.job()
            st = last.get("state")
            if st in ("failed", "cancelled") and st not in states:
                raise RuntimeError("chainfs job ended %s: %r" % (st, last))
            return last if st in states else None
        return wait_for(reached, timeout, interval=interval,
                        what="chainfs job state in %s" % (states,))


class Qsd(Daemon):
    """qemu-storage-daemon exporting TOP over FUSE at an empty file, with QMP."""

    name = "qsd"

    def __init__(self, top_image, export_file, qmp_sock=None):
        super().__init__()
        self.mountpoint = export_file
        self.file = export_file
        with open(export_file, "wb"):
            pass
        cmd = ["qemu-storage-daemon",
               "--blockdev", "driver=file,node-name=f,filename=%s" % top_image,
               "--blockdev", "driver=qcow2,node-name=q,file=f",
               "--export", "type=fuse,id=e,node-name=q,mountpoint=%s,writable=on" % export_file]
        if qmp_sock:
            cmd += ["--chardev", "socket,path=%s,server=on,wait=off,id=m" % qmp_sock,
                    "--monitor", "chardev=m"]
        self.qmp = None
        self._spawn(cmd, export_file + ".qsd.log")
        try:
            self._wait_mounted()
            if qmp_sock:
                wait_for(lambda: os.path.exists(qmp_sock), 30, what="QMP socket")
                self.qmp = Qmp(qmp_sock)
        except BaseException:
            self.stop()
            raise

    def _unmount(self, lazy=False):
        # qsd removes its own FUSE mount on SIGTERM and exits 0.
        if self.qmp:
            self.qmp.close()
            self.qmp = None
        self.proc.send_signal(signal.SIGTERM)


class QmpError(Exception):
    pass


class Qmp:
    """A minimal QMP client over a unix socket: commands and events."""

    def __init__(self, path, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.buf = b""
        self.events = []
        greeting = self._recv(timeout)
        if "QMP" not in greeting:
            raise QmpError("no QMP greeting: %r" % greeting)
        self.execute("qmp_capabilities")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _recv(self, timeout):
        """Next JSON message (blocking up to timeout seconds)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("QMP: no message within %.0fs" % timeout)
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise QmpError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd, timeout=60, **args):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = {k.replace("_", "-"): v for k, v in args.items()}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._recv(timeout)
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise QmpError("%s: %s" % (cmd, r["error"].get("desc", r["error"])))
            return r.get("return")

    def wait_event(self, names, timeout):
        """Return the first event whose name is in names (queued or new)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] in names:
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("QMP: no %s within %.0fs" % (names, timeout))
            self.events.append(self._recv(left))

    def node_for_file(self, filename):
        """Node name of the format node opened on filename."""
        real = os.path.realpath(filename)
        for n in self.execute("query-named-block-nodes", flat=True):
            if n.get("drv") != "file" and os.path.realpath(n.get("file", "")) == real:
                return n["node-name"]
        raise QmpError("no node for %s" % filename)


# ------------------------------------------------------------ fio

def fio_times():
    """(runtime, ramp_time) in seconds for the current mode."""
    return (3, 1) if QUICK else (10, 2)


def fio(filename, rw, bs, numjobs=1, iodepth=1, ioengine="psync", direct=True,
        runtime=None, ramp=None, size=None, time_based=True, extra=()):
    """Run one fio job group; return dict(iops, mbps, clat_p99_us, clat_mean_us)."""
    rt, rp = fio_times()
    runtime = rt if runtime is None else runtime
    ramp = rp if ramp is None else ramp
    cmd = ["fio", "--name=bench", "--filename=%s" % filename, "--rw=%s" % rw,
           "--bs=%s" % bs, "--numjobs=%d" % numjobs, "--iodepth=%d" % iodepth,
           "--ioengine=%s" % ioengine, "--direct=%d" % int(direct),
           "--group_reporting", "--output-format=json", "--randseed=1234",
           "--runtime=%s" % runtime, "--percentile_list=50:99:99.9"]
    if time_based:
        cmd.append("--time_based")
    if ramp:
        cmd.append("--ramp_time=%s" % ramp)
    if size:
        cmd.append("--size=%d" % size)
    cmd += list(extra)
    res = run(cmd, timeout=runtime + ramp + 90)
    return parse_fio(res.stdout)


def parse_fio(text):
    """fio's JSON output (after any warnings) -> dict of the figures we use."""
    job = json.loads(text[text.index("{"):])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    p99 = next((v for k, v in pct.items() if k.startswith("99.0")), None)
    return {
        "iops": side["iops"],
        "mbps": side["bw_bytes"] / 1e6,
        "clat_p99_us": None if p99 is None else p99 / 1000.0,
        "clat_mean_us": side.get("clat_ns", {}).get("mean", 0) / 1000.0,
    }


class BackgroundFio:
    """fio running time_based (up to `seconds`) until stop() interrupts it.

    Used to measure a guest for exactly as long as something else runs.
    """

    def __init__(self, filename, out_json, seconds, rw="randwrite", bs="4k",
                 ioengine="psync", iodepth=1, size=None):
        self.out = out_json
        self.proc = subprocess.Popen(
            ["fio", "--name=guest", "--filename=%s" % filename, "--rw=%s" % rw,
             "--bs=%s" % bs, "--ioengine=%s" % ioengine, "--iodepth=%d" % iodepth,
             "--direct=1", "--time_based", "--runtime=%d" % seconds, "--randseed=99",
             "--percentile_list=50:99:99.9", "--output-format=json",
             "--output=%s" % out_json] + (["--size=%d" % size] if size else []),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.t0 = time.monotonic()

    def stop(self):
        """Stop fio (SIGINT to its own PID); return parse_fio's dict or None."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            with open(self.out) as f:
                return parse_fio(f.read())
        except (OSError, ValueError, KeyError, IndexError):
            return None


# ------------------------------------------------------------ output

def fmt(v, digits=1):
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return "%.0f" % v
    return "%.*f" % (digits, v)


def ratio(a, b, higher_is_better=True):
    """chainfs/reference as text ("1.23x"); n/a when either side is missing."""
    if a is None or b is None or isinstance(a, str) or isinstance(b, str) or b == 0:
        return "n/a"
    return "%.2fx" % (a / b)


def table(title, header, rows):
    """Print a plain aligned table (to stdout)."""
    cells = [header] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print()
    print("== %s" % title)
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def try_side(what, fn, notes):
    """Run fn(); on failure record a note and return None (the cell is n/a)."""
    try:
        return fn()
    except Exception as e:
        msg = str(e).strip().splitlines()
        notes.append("%s: %s" % (what, msg[0] if msg else type(e).__name__))
        return None


def print_notes(notes):
    for n in notes:
        print("  note: " + n)
    sys.stdout.flush()
