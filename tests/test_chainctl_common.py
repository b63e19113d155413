"""Shared pieces of the chainctl suites (test_chainctl_*.py).

chainctl is run as a user runs it: a subprocess, with its output on pipes
or, for the progress bar, on a pseudo-terminal.  This module holds no
tests of its own.
"""
import os
import pty
import select
import shutil
import subprocess
import time

from helpers import (CHAINCTL, MiB, create_qcow2, file_sha256, qemu_img, qemu_io,
                     wait_for)


def ctl(*args, timeout=120, env=None):
    """Run chainctl with args (pipes); return (rc, stdout, stderr)."""
    res = subprocess.run([CHAINCTL] + [str(a) for a in args], capture_output=True,
                         text=True, timeout=timeout, env=env)
    low = res.stderr.lower()
    assert "sanitizer" not in low and "runtime error" not in low, res.stderr
    return res.returncode, res.stdout, res.stderr


def ctl_ok(*args, **kw):
    rc, out, err = ctl(*args, **kw)
    assert rc == 0, "chainctl %s: rc=%d\nstdout: %s\nstderr: %s" % (
        " ".join(map(str, args)), rc, out, err)
    return out


def ctl_fails(*args, rc=1, **kw):
    """Run chainctl expecting exit status rc; return stderr."""
    got, out, err = ctl(*args, **kw)
    assert got == rc, "chainctl %s: rc=%d, wanted %d\nstdout: %s\nstderr: %s" % (
        " ".join(map(str, args)), got, rc, out, err)
    if rc == 1:
        # A failure is one line on stderr, "chainctl: MESSAGE".
        lines = err.splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("chainctl: ") and len(lines[0]) > 12, err
    return err


def ctl_pty(*args, timeout=120):
    """Run chainctl with stdout on a pseudo-terminal; return (rc, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([CHAINCTL] + [str(a) for a in args], stdout=slave,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise AssertionError("chainctl %s did not finish" % (args,))
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                # drained and exited
                r, _, _ = select.select([master], [], [], 0)
                if not r:
                    break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    proc.stderr.close()
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def info_blocks(text):
    """Parse chainctl info's human output: one dict per layer (and job)."""
    blocks = []
    for chunk in text.strip().split("\n\n"):
        d = {}
        for line in chunk.splitlines():
            key, _, val = line.partition(": ")
            d[key] = val
        blocks.append(d)
    return blocks


def build_chain(d, size=32 * MiB, top="vm1.qcow2", cluster_size=None, big=0,
                big_layer=None, seed=7):
    """base.qcow2 <- snap1.qcow2 <- snap2.qcow2 <- top in d, each layer with
    its own seeded pattern writes; big extra bytes of data written into
    big_layer (to make jobs take a while under a bandwidth limit).
    Returns the file names, bottom first."""
    import random
    rng = random.Random(seed)
    names = ["base.qcow2", "snap1.qcow2", "snap2.qcow2", top]
    d = str(d)
    create_qcow2(os.path.join(d, names[0]), size, cluster_size=cluster_size)
    for i in range(1, len(names)):
        create_qcow2(os.path.join(d, names[i]), backing=names[i - 1],
                     backing_fmt="qcow2", cluster_size=cluster_size)
    for i, n in enumerate(names):
        cmds = []
        for _ in range(6):
            length = rng.choice([4096, 65536, 100000, 1 * MiB])
            off = rng.randrange(0, size - length)
            cmds.append("write -P %d %d %d" % (0x10 + i, off, length))
        if n == big_layer and big:
            cmds.append("write -P %d %d %d" % (0x77, size - big, big))
        qemu_io(os.path.join(d, n), *cmds, fmt="qcow2")
    return names


def dry_run_lines(out):
    """commit --dry-run's output ("top: F", "base: F", "needs: N bytes (..)",
    "available: N bytes (..)") as a dict; needs and available checked to be
    byte counts."""
    lines = dict(l.split(": ", 1) for l in out.strip().splitlines())
    assert set(lines) == {"top", "base", "needs", "available"}, out
    for key in ("needs", "available"):
        n, unit = lines[key].split()[:2]
        assert n.isdigit() and unit == "bytes", out
    return lines


def copy_dir(src, dst):
    shutil.copytree(str(src), str(dst))
    return str(dst)


def dir_hashes(d):
    return {f: file_sha256(os.path.join(str(d), f)) for f in sorted(os.listdir(str(d)))
            if os.path.isfile(os.path.join(str(d), f))}


def backing_of(image):
    """Backing reference recorded in image (qemu-img info), or None."""
    import json
    info = json.loads(qemu_img("info", "-U", "--output=json", str(image)).stdout)
    return info.get("backing-filename")


__all__ = ["ctl", "ctl_ok", "ctl_fails", "ctl_pty", "info_blocks", "build_chain",
           "dry_run_lines", "copy_dir", "dir_hashes", "backing_of", "wait_for", "MiB"]
