#!/usr/bin/python3
"""FUSE export (issue 3): fio against chainfs's export and against
qemu-storage-daemon's FUSE export of the same chain.

Each daemon serves its own copy of one chain (base fully allocated, top
holding a quarter of the disk), both mounted at once; every workload runs
on chainfs, then on qsd, back to back, so both see the same machine
state.  Then random 4 KiB reads at chain depth 1, 8, 32 and 64 (one
daemon after the other on the same, read-only-used files), with
`qemu-img bench` on the same chain as a library-level reference.  Peak
RSS is VmHWM from /proc/PID/status after the workloads.

    bench/bench_fuse.py [--quick]
fio: --time_based --runtime=10 --ramp_time=2 (--quick: 3 s, 1 s ramp,
and a smaller disk).  All fio jobs use O_DIRECT so that the kernel's
page cache in front of the FUSE file does not serve them, but one: random
4 KiB writes without O_DIRECT, as a hypervisor's default cache mode
writes.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

SIZE = (512 if B.QUICK else 2048) * B.MiB
DEPTH_SIZE = (256 if B.QUICK else 1024) * B.MiB
DEPTHS = (1, 8, 32, 64)


def seq_split(size, jobs):
    # numjobs sequential streams over disjoint quarters, not 4 copies of one.
    part = size // jobs
    return dict(size=part, extra=("--offset_increment=%d" % part,))


WORKLOADS = [
    # (label, fio kwargs, unit) -- unit "MB/s" or "IOPS"
    ("seq read 1M psync x4", dict(rw="read", bs="1M", numjobs=4, **seq_split(SIZE, 4)), "MB/s"),
    ("seq write 1M psync x4", dict(rw="write", bs="1M", numjobs=4, **seq_split(SIZE, 4)), "MB/s"),
    ("rand read 4k psync x4", dict(rw="randread", bs="4k", numjobs=4), "IOPS"),
    ("rand write 4k psync x4", dict(rw="randwrite", bs="4k", numjobs=4), "IOPS"),
    # A hypervisor's default cache=writeback: no O_DIRECT (issue 12).
    ("rand write 4k psync x4 buffered",
     dict(rw="randwrite", bs="4k", numjobs=4, direct=False), "IOPS"),
    ("rand read 4k libaio qd16",
     dict(rw="randread", bs="4k", ioengine="libaio", iodepth=16), "IOPS"),
    ("rand write 4k libaio qd16",
     dict(rw="randwrite", bs="4k", ioengine="libaio", iodepth=16), "IOPS"),
]


def figure(res, unit):
    return None if res is None else (res["mbps"] if unit == "MB/s" else res["iops"])


def main_workloads(root, notes, rss_rows):
    master = os.path.join(root, "master")
    os.makedirs(master)
    B.log("fuse: building a depth-2 chain of %d MiB" % (SIZE // B.MiB))
    B.build_chain(master, 2, SIZE, seed=7)
    cdir = B.copy_dir(master, os.path.join(root, "c"))
    qdir = B.copy_dir(master, os.path.join(root, "q"))

    cfs = qsd = None
    why = B.chainfs_missing()
    if why:
        notes.append("chainfs: " + why)
    else:
        cfs = B.try_side("chainfs mount", lambda: B.Chainfs(cdir, os.path.join(root, "mnt")), notes)
    qsd = B.Qsd(os.path.join(qdir, "top.qcow2"), os.path.join(root, "qsd-export"))

    rows = []
    for label, kw, unit in WORKLOADS:
        B.log("fuse: " + label)
        c = None
        if cfs:
            c = B.try_side("chainfs " + label, lambda: B.fio(cfs.file, **kw), notes)
        q = B.try_side("qsd " + label, lambda: B.fio(qsd.file, **kw), notes)
        cf, qf = figure(c, unit), figure(q, unit)
        rows.append([label, unit, cf, qf, B.ratio(cf, qf)])
    rss_rows.append(["depth 2, after workloads",
                     cfs.peak_rss_mib() if cfs else None, qsd.peak_rss_mib(),
                     B.ratio(cfs.peak_rss_mib() if cfs else None, qsd.peak_rss_mib())])
    if cfs:
        rc = cfs.stop()
        if rc != 0:
            notes.append("chainfs exited %s after the workloads: %s" % (rc, cfs.read_log()[-300:]))
        # What chainfs wrote must still be a sound image.
        chk = B.run(["qemu-img", "check", os.path.join(cdir, "top.qcow2")], check=False)
        if chk.returncode not in (0, 3):
            notes.append("qemu-img check of chainfs's top after the workloads: rc %d"
                         % chk.returncode)
    qsd.stop()
    for d in (cdir, qdir, master):
        B.run(["rm", "-rf", d])
    rt, rp = B.fio_times()
    B.table("FUSE export, %d MiB chain of depth 2 (fio %ds + %ds ramp, O_DIRECT but "
            "the buffered row)"
            % (SIZE // B.MiB, rt, rp),
            ["workload", "unit", "chainfs", "qsd", "chainfs/qsd"], rows)


def qemu_img_bench(top):
    """4 KiB reads spread over the disk by qemu-img bench (IOPS, library level)."""
    count = 50000 if B.QUICK else 200000
    # A step of 1 MiB + 4 KiB wraps around the disk touching scattered
    # clusters (qemu-img bench has no random mode).
    # Default queue depth (64), as the anchors were taken.
    _t, res = B.timed(["qemu-img", "bench", "-f", "qcow2", "-t", "writeback",
                       "-c", count, "-s", "4096", "-S", B.MiB + 4096, top])
    secs = float(res.stdout.split("Run completed in")[1].split()[0])
    return count / secs


def depth_workloads(root, notes, rss_rows):
    rows = []
    kw = dict(rw="randread", bs="4k", numjobs=4)
    for depth in DEPTHS:
        d = os.path.join(root, "depth%d" % depth)
        os.makedirs(d)
        B.log("fuse: random reads at depth %d (%d MiB)" % (depth, DEPTH_SIZE // B.MiB))
        B.build_chain(d, depth, DEPTH_SIZE, seed=100 + depth)
        top = os.path.join(d, "top.qcow2")
        c = cr = None
        if not B.chainfs_missing():
            def run_chainfs():
                with B.Chainfs(d, os.path.join(root, "mnt")) as cfs:
                    res = B.fio(cfs.file, **kw)
                    return res, cfs.peak_rss_mib()
            r = B.try_side("chainfs depth %d" % depth, run_chainfs, notes)
            if r:
                c, cr = r
        with B.Qsd(top, os.path.join(root, "qsd-export")) as qsd:
            q = B.try_side("qsd depth %d" % depth, lambda: B.fio(qsd.file, **kw), notes)
            qr = qsd.peak_rss_mib()
        qib = B.try_side("qemu-img bench depth %d" % depth, lambda: qemu_img_bench(top), notes)
        cf, qf = figure(c, "IOPS"), figure(q, "IOPS")
        rows.append(["depth %d" % depth, cf, qf, B.ratio(cf, qf), qib])
        rss_rows.append(["depth %d, rand read" % depth, cr, qr, B.ratio(cr, qr)])
        B.run(["rm", "-rf", d])
    B.table("random read 4k psync x4 by chain depth (%d MiB disk), IOPS" % (DEPTH_SIZE // B.MiB),
            ["chain", "chainfs", "qsd", "chainfs/qsd", "qemu-img bench"], rows)


def main():
    root = B.scratch("fuse")
    notes = []
    rss_rows = []
    main_workloads(root, notes, rss_rows)
    depth_workloads(root, notes, rss_rows)
    B.table("peak RSS of the daemons (VmHWM), MiB", ["when", "chainfs", "qsd", "chainfs/qsd"],
            rss_rows)
    B.print_notes(notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
