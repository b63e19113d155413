#!/usr/bin/python3
"""Library read (issue 2): the chain library reading a whole chain
sequentially (`chain-tool read IMAGE OUT`, i.e. chain_pread) against
`qemu-img convert -O raw` of the same chain, at depth 2, 16 and 64.

The disk is 512 MiB; the base is fully allocated and the layers above
hold a quarter of the disk between them in 64 KiB pieces, so reads reach
every depth.  Both tools read the same files, page cache warm (a first
untimed qemu-img run warms it), write their output to tmpfs
(/dev/shm), and run alternately; the best of N runs is reported.

Note what differs: qemu-img writes its output sparse (it skips zero
blocks), chain-tool writes every byte.  Neither flushes the output.

    bench/bench_read.py [--quick]
Targets (anchors.md / issue 2): >= 1.0x qemu-img at depth 2, >= 2x at 64.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

SIZE = 512 * B.MiB
DEPTHS = (2, 16, 64)
TARGETS = {2: 1.0, 64: 2.0}


def main():
    runs = 2 if B.QUICK else 5
    tool_missing = None if os.access(B.CHAIN_TOOL, os.X_OK) else "no " + B.CHAIN_TOOL
    notes = []
    rows = []
    root = B.scratch("read")
    # Outputs go to tmpfs: writeback of 512 MiB per run to the disk made
    # the figures swing by 2x between runs, and it is not the read.
    outdir = B.scratch("read-out", parent="/dev/shm")
    for depth in DEPTHS:
        d = os.path.join(root, "d%d" % depth)
        os.makedirs(d)
        B.log("read: building a depth-%d chain of %d MiB" % (depth, SIZE // B.MiB))
        B.build_chain(d, depth, SIZE, seed=depth)
        top = os.path.join(d, "top.qcow2")
        out_q = os.path.join(outdir, "out-qemu.raw")
        out_c = os.path.join(outdir, "out-chain.raw")
        qemu_cmd = ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", top, out_q]
        tool_cmd = [B.CHAIN_TOOL, "read", top, out_c]
        B.run(qemu_cmd)  # warm the page cache, untimed
        best_q = best_c = None
        failed_c = tool_missing
        for _ in range(runs):
            for f in (out_q, out_c):
                if os.path.exists(f):
                    os.unlink(f)
            t, _r = B.timed(qemu_cmd)
            best_q = t if best_q is None else min(best_q, t)
            if failed_c is None:
                try:
                    t, _r = B.timed(tool_cmd)
                    best_c = t if best_c is None else min(best_c, t)
                except Exception as e:
                    failed_c = str(e).strip().splitlines()[0]
        if failed_c:
            notes.append("chain-tool at depth %d: %s" % (depth, failed_c))
        elif best_c is not None:
            # The two outputs must hold the same disk, or the figure is void.
            cmp = B.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", out_c, out_q],
                        check=False)
            if cmp.returncode != 0:
                notes.append("depth %d: chain-tool output DIFFERS from qemu-img's: %s"
                             % (depth, cmp.stdout.strip()))
        for f in (out_q, out_c):
            if os.path.exists(f):
                os.unlink(f)
        mb = SIZE / 1e6
        c_mbps = None if best_c is None else mb / best_c
        q_mbps = mb / best_q
        target = TARGETS.get(depth)
        rows.append(["depth %d" % depth, c_mbps, q_mbps, B.ratio(c_mbps, q_mbps),
                     ">= %.1fx" % target if target else "-"])
    B.table("library sequential read of a %d MiB chain, MB/s (best of %d)"
            % (SIZE // B.MiB, runs),
            ["chain", "chain-tool", "qemu-img convert", "ratio", "target"], rows)
    B.print_notes(notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
