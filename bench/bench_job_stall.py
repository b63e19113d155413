#!/usr/bin/python3
"""Guest stalls at the topology changes of a job (issue 10): how long the
longest guest write takes while an active commit starts, at its pivot,
and at a live snapshot, against the longest write of the same guest with
no job running.

The chain: base.qcow2 <- mid.qcow2 <- top.qcow2 (active), 1 TiB (--quick:
256 GiB) virtual, 64 KiB clusters; mid and top each hold one 4 KiB block
per 512 MiB, the range one L2 table maps, so every L2 table of both is
present and a walk of the allocation above base reads them all.  The
guest: one thread writing 4 KiB at random offsets of the first GUEST_SPAN
of the export with O_DIRECT, timing each write.

Per round, on a fresh chain:
  idle      the longest write during IDLE_SECS with no job
  commit    the longest write in the WINDOW_SECS after
            `user.chainfs.commit active base=base.qcow2` was sent
  pivot     the longest write in the WINDOW_SECS after the pivot (once
            ready)
  snapshot  on a second fresh chain, the longest write in the WINDOW_SECS
            after `user.chainfs.snapshot`

With --compare BUILD_DIR, the chainfs of BUILD_DIR runs too ("before"),
each round taking turns with CHAINFS_BUILD_DIR ("after"); the table gives
the median of ROUNDS rounds and each round's figure (a shared machine
swings by 2-3x).

    bench/bench_job_stall.py [--quick] [--compare BUILD_DIR]
"""
import mmap
import os
import random
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

SIZE = (256 if B.QUICK else 1024) * B.GiB
L2_SPAN = 512 * B.MiB       # what one L2 table maps at 64 KiB clusters
GUEST_SPAN = 1 * B.GiB
IDLE_SECS = 3 if B.QUICK else 5
WINDOW_SECS = 3 if B.QUICK else 5
ROUNDS = 2 if B.QUICK else 3
BLOCK = 4 * B.KiB


def compare_dir():
    args = sys.argv[1:]
    if "--compare" in args:
        i = args.index("--compare")
        if i + 1 < len(args):
            return os.path.abspath(args[i + 1])
        print("usage: %s [--quick] [--compare BUILD_DIR]" % sys.argv[0], file=sys.stderr)
        sys.exit(2)
    return None


# ------------------------------------------------------------ the chain

def build_chain(d):
    """base <- mid <- top, SIZE virtual, one 4 KiB block per L2 table range
    in mid and in top (at different offsets)."""
    os.makedirs(d)
    for name, backing in (("base.qcow2", None), ("mid.qcow2", "base.qcow2"),
                          ("top.qcow2", "mid.qcow2")):
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
        if backing:
            cmd += ["-b", backing, "-F", "qcow2"]
        B.run(cmd + [os.path.join(d, name), str(SIZE)])
    for name, shift, pattern in (("mid.qcow2", 0, 2), ("top.qcow2", 256 * B.KiB, 3)):
        B.qemu_io(os.path.join(d, name),
                  ["write -P %d %d %d" % (pattern, off + shift, BLOCK)
                   for off in range(0, SIZE, L2_SPAN)])


# ------------------------------------------------------------ the guest

class Guest:
    """A thread writing BLOCK at random offsets of GUEST_SPAN, O_DIRECT,
    recording (start time, seconds) of every write."""

    def __init__(self, path, seed=7):
        self.fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        self.buf = mmap.mmap(-1, BLOCK)
        self.buf.write(b"\x5a" * BLOCK)
        self.rng = random.Random(seed)
        self.samples = []
        self.error = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                off = self.rng.randrange(GUEST_SPAN // BLOCK) * BLOCK
                t0 = time.monotonic()
                os.pwrite(self.fd, self.buf, off)
                self.samples.append((t0, time.monotonic() - t0))
        except OSError as e:
            self.error = e

    def stop(self):
        self._stop.set()
        self.thread.join(timeout=120)
        os.close(self.fd)
        if self.error:
            raise RuntimeError("guest write failed: %s" % self.error)

    def longest(self, t_from, t_to):
        """The longest write started in [t_from, t_to), in ms (None: none)."""
        d = [s for t, s in self.samples if t_from <= t < t_to]
        return max(d) * 1000.0 if d else None

    def count(self, t_from, t_to):
        return sum(1 for t, _ in self.samples if t_from <= t < t_to)


def window_after(guest, t0, secs=WINDOW_SECS):
    """Wait until secs have passed since t0 (the guest keeps writing), and
    one write more that started after the window (so a stalled write is
    counted); return the longest write started in [t0, t0 + secs)."""
    B.wait_for(lambda: time.monotonic() >= t0 + secs and
               guest.count(t0 + secs, float("inf")) > 0, secs + 600,
               interval=0.05, what="the guest to write past the window")
    return guest.longest(t0, t0 + secs)


# ------------------------------------------------------------ one round

def round_commit(chainfs_bin, root):
    """idle, commit start and pivot on a fresh chain: dict of ms."""
    d = os.path.join(root, "chain")
    build_chain(d)
    B.CHAINFS = chainfs_bin
    out = {}
    try:
        with B.Chainfs(d, os.path.join(root, "mnt")) as cfs:
            guest = Guest(cfs.file)
            try:
                t0 = time.monotonic()
                out["idle"] = window_after(guest, t0, IDLE_SECS)
                t1 = time.monotonic()
                cfs.setxattr("user.chainfs.commit", "active base=base.qcow2")
                out["commit"] = window_after(guest, t1)
                cfs.wait_job(("ready",), timeout=600)
                t2 = time.monotonic()
                cfs.setxattr("user.chainfs.job.pivot")
                out["pivot"] = window_after(guest, t2)
                cfs.wait_job(("completed",), timeout=600)
            finally:
                guest.stop()
        chk = B.run(["qemu-img", "check", os.path.join(d, "base.qcow2")], check=False)
        if chk.returncode != 0:
            raise RuntimeError("qemu-img check base.qcow2: rc %d" % chk.returncode)
    finally:
        B.run(["rm", "-rf", d])
    return out


def round_snapshot(chainfs_bin, root):
    """idle and live snapshot on a fresh chain: dict of ms."""
    d = os.path.join(root, "chain")
    build_chain(d)
    B.CHAINFS = chainfs_bin
    out = {}
    try:
        with B.Chainfs(d, os.path.join(root, "mnt")) as cfs:
            guest = Guest(cfs.file, seed=8)
            try:
                t0 = time.monotonic()
                out["idle2"] = window_after(guest, t0, IDLE_SECS)
                t1 = time.monotonic()
                cfs.setxattr("user.chainfs.snapshot", "snap.qcow2")
                out["snapshot"] = window_after(guest, t1)
            finally:
                guest.stop()
    finally:
        B.run(["rm", "-rf", d])
    return out


# ------------------------------------------------------------ main

KEYS = (("idle", "idle max (commit chain)"), ("commit", "active commit start"),
        ("pivot", "pivot"), ("idle2", "idle max (snapshot chain)"),
        ("snapshot", "live snapshot"))


def main():
    missing = B.chainfs_missing()
    if missing:
        print("bench_job_stall: %s" % missing, file=sys.stderr)
        return 1
    sides = [("after", B.CHAINFS)]
    before = compare_dir()
    if before:
        sides.insert(0, ("before", os.path.join(before, "chainfs")))
    root = B.scratch("stall")
    notes = []
    results = {name: [] for name, _ in sides}
    for r in range(ROUNDS):
        for name, binary in sides:
            B.log("round %d, %s (%s)" % (r + 1, name, binary))

            def one(binary=binary):
                res = round_commit(binary, root)
                res.update(round_snapshot(binary, root))
                return res
            res = B.try_side("%s round %d" % (name, r + 1), one, notes)
            if res:
                results[name].append(res)

    header = ["longest guest 4k write (ms)"]
    for name, _ in sides:
        header += [name + " median", name + " rounds"]
    if before:
        header.append("after/before")
    rows = []
    for key, label in KEYS:
        row = [label]
        med = {}
        for name, _ in sides:
            vals = [x[key] for x in results[name] if x.get(key) is not None]
            med[name] = statistics.median(vals) if vals else None
            row += [med[name], " ".join("%.1f" % v for v in vals) or "n/a"]
        if before:
            row.append(B.ratio(med["after"], med["before"]))
        rows.append(row)
    B.table("guest write stalls, %d GiB chain with every L2 table present, "
            "median of %d rounds (%s)" % (SIZE // B.GiB, ROUNDS,
                                          ", ".join("%s=%s" % s for s in sides)),
            header, rows)
    B.print_notes(notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
