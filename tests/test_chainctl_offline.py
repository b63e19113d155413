"""chainctl without a daemon: command line, usage errors, and offline work
on image files (info, commit, snapshot), each result checked with qemu-img.
"""
import fcntl
import json
import os
import re
import select
import signal
import subprocess
import time

import pytest

from helpers import (CHAINCTL, file_sha256, mounted, qemu_img, qemu_img_check,
                     qemu_img_compare, qemu_img_info)
from test_chainctl_common import *  # noqa: F401,F403

COMMANDS = ["info", "commit", "job", "snapshot", "stream", "map"]


# ---------------------------------------------------------------- usage

def test_help_lists_every_command():
    out = ctl_ok("--help")
    for c in COMMANDS:
        assert "\n  %s " % c in out, out
    assert "Exit status" in out


@pytest.mark.parametrize("command,options", [
    ("info", ["--json"]),
    ("commit", ["--top", "--base", "--shallow", "--active", "--delete",
                "--keep-relative", "--bandwidth", "--bytes", "--dry-run", "--wait",
                "--verbose", "--timeout", "--pivot", "--keep-overlay", "--async"]),
    ("job", ["--info", "--abort", "--pivot", "--pause", "--resume", "--speed",
             "--wait"]),
    ("snapshot", []),
    ("stream", ["--base", "--bandwidth", "--wait", "--verbose"]),
])
def test_subcommand_help(command, options):
    rc, out, err = ctl(command, "--help")
    assert rc == 0, err
    assert "chainctl %s" % command in out
    for o in options:
        assert o in out, (o, out)
    assert err == ""


@pytest.mark.parametrize("args", [
    [],
    ["frobnicate"],
    ["info"],
    ["info", "a", "b"],
    ["info", "--no-such-option", "x"],
    ["commit", "x", "--pivot", "--keep-overlay", "--active"],
    ["commit", "x", "--pivot"],
    ["commit", "x", "--keep-overlay"],
    ["commit", "x", "--bandwidth", "fast"],
    ["commit", "x", "--bandwidth", "5X"],
    ["commit", "x", "--bytes"],
    ["commit", "x", "--timeout", "-3"],
    ["commit", "x", "--timeout", "soon"],
    ["commit", "x", "--async", "--wait"],
    ["commit", "x", "--dry-run", "--wait"],
    ["job", "x", "--abort", "--pivot"],
    ["job", "x", "--speed", "slow"],
    ["job"],
    ["snapshot", "x"],
    ["stream", "x", "--bandwidth", "-1"],
    ["stream", "x", "--async", "--verbose"],
])
def test_usage_errors_exit_2(args):
    rc, out, err = ctl(*args)
    assert rc == 2, (args, rc, out, err)
    assert "chainctl" in err and "sage" in err, err
    assert out == ""


def test_missing_target_fails(tmp_path):
    err = ctl_fails("info", tmp_path / "nope.qcow2")
    assert "nope.qcow2" in err and "No such file" in err


# ----------------------------------------------------------------- info

def _qemu_chain(path):
    return qemu_img_info(path, chain=True)


def test_info_matches_qemu_img(image_dir):
    names = build_chain(image_dir, cluster_size=32768)
    top = os.path.join(str(image_dir), names[-1])
    qinfo = _qemu_chain(top)
    out = ctl_ok("info", top)
    blocks = info_blocks(out)
    assert len(blocks) == len(names) == len(qinfo)
    for b, q in zip(blocks, qinfo):
        assert b["image"] == os.path.basename(q["filename"])
        assert b["file format"] == q["format"]
        assert b["virtual size"].endswith("(%d bytes)" % q["virtual-size"])
        assert b["cluster_size"] == str(q["cluster-size"])
        if "backing-filename" in q:
            assert b["backing file"] == q["backing-filename"]
            assert b["backing file format"] == q["backing-filename-format"]
        else:
            assert "backing file" not in b
        alloc = int(b["allocated"].split("(")[1].split()[0])
        assert alloc > 0


def test_info_json(image_dir):
    names = build_chain(image_dir)
    top = os.path.join(str(image_dir), names[-1])
    info = json.loads(ctl_ok("info", "--json", top))
    assert info["name"] == "vm1"
    files = [l["file"] for l in info["layers"]]
    assert files == list(reversed(names))
    for i, l in enumerate(info["layers"]):
        assert l["format"] == "qcow2"
        assert l["virtual_size"] == 32 * MiB
        assert l["allocated"] > 0
        assert l["backing"] == (names[-2 - i] if i + 1 < len(names) else None)


def test_info_json_cluster_size_and_backing_format(image_dir):
    """The extra layer members: cluster_size (null for raw), backing_format."""
    from helpers import make_chain
    names = make_chain(image_dir, depth=3, size=8 * MiB, base_fmt="raw",
                       cluster_size=32768)
    top = os.path.join(str(image_dir), names[-1])
    qinfo = _qemu_chain(top)
    layers = json.loads(ctl_ok("info", "--json", top))["layers"]
    assert len(layers) == len(qinfo) == 3
    for l, q in zip(layers, qinfo):
        assert l["file"] == os.path.basename(q["filename"])
        assert l["cluster_size"] == (None if q["format"] == "raw" else q["cluster-size"])
        assert l["backing_format"] == q.get("backing-filename-format")
    assert layers[0]["cluster_size"] == 32768
    assert layers[-1]["format"] == "raw" and layers[-1]["cluster_size"] is None
    assert layers[-2]["backing_format"] == "raw"


def test_info_raw_base(image_dir):
    from helpers import make_chain
    names = make_chain(image_dir, depth=2, size=8 * MiB, base_fmt="raw")
    out = ctl_ok("info", os.path.join(str(image_dir), names[-1]))
    blocks = info_blocks(out)
    assert blocks[0]["backing file format"] == "raw"
    assert blocks[1]["file format"] == "raw"
    assert "cluster_size" not in blocks[1]


def test_info_refuses_broken_chain(image_dir):
    names = build_chain(image_dir)
    os.unlink(os.path.join(str(image_dir), names[1]))
    err = ctl_fails("info", os.path.join(str(image_dir), names[-1]))
    assert names[1] in err


# --------------------------------------------------------------- commit

def _image(d, name):
    return os.path.join(str(d), name)


def test_offline_commit_equals_qemu_img_commit(image_dir, tmp_path):
    names = build_chain(image_dir)
    ref = copy_dir(image_dir, tmp_path / "ref")
    top = _image(image_dir, names[-1])
    before = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", top, before)

    out = ctl_ok("commit", top, "--base", "base.qcow2")
    assert "Commit complete" in out
    qemu_img("commit", "-q", "-b", "base.qcow2", _image(ref, names[-1]))

    qemu_img_check(_image(image_dir, "base.qcow2"))
    qemu_img_check(top)
    # base now holds what qemu-img's commit put there ...
    qemu_img_compare(_image(image_dir, "base.qcow2"), _image(ref, "base.qcow2"))
    # ... and the disk seen through the top layer did not change.
    qemu_img_compare(top, before, fmt_b="raw")
    qemu_img_compare(top, _image(ref, names[-1]))


def test_offline_intermediate_commit_rewrites_backing(image_dir, tmp_path):
    names = build_chain(image_dir)
    ref = copy_dir(image_dir, tmp_path / "ref")
    top = _image(image_dir, names[-1])

    ctl_ok("commit", top, "--top", "snap1.qcow2", "--base", "base.qcow2")
    qemu_img("commit", "-q", "-b", "base.qcow2", _image(ref, "snap1.qcow2"))

    qemu_img_check(_image(image_dir, "base.qcow2"))
    qemu_img_compare(_image(image_dir, "base.qcow2"), _image(ref, "base.qcow2"))
    qemu_img_compare(top, _image(ref, names[-1]))
    # snap2 now backs onto base, by absolute path (no --keep-relative)
    assert backing_of(_image(image_dir, "snap2.qcow2")) == _image(image_dir, "base.qcow2")
    files = [l["file"] for l in json.loads(ctl_ok("info", "--json", top))["layers"]]
    assert files == [names[-1], "snap2.qcow2", "base.qcow2"]


def test_offline_commit_keep_relative_and_delete(image_dir, tmp_path):
    names = build_chain(image_dir)
    top = _image(image_dir, names[-1])
    before = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", top, before)

    ctl_ok("commit", top, "--top", "snap2.qcow2", "--base", "base.qcow2",
           "--keep-relative", "--delete")
    assert backing_of(top) == "base.qcow2"
    assert not os.path.exists(_image(image_dir, "snap1.qcow2"))
    assert not os.path.exists(_image(image_dir, "snap2.qcow2"))
    qemu_img_compare(top, before, fmt_b="raw")


def test_offline_shallow_commit(image_dir, tmp_path):
    names = build_chain(image_dir)
    ref = copy_dir(image_dir, tmp_path / "ref")
    top = _image(image_dir, names[-1])
    ctl_ok("commit", top, "--top", "snap2.qcow2", "--shallow", "--keep-relative")
    qemu_img("commit", "-q", _image(ref, "snap2.qcow2"))  # into its backing file
    qemu_img_compare(_image(image_dir, "snap1.qcow2"), _image(ref, "snap1.qcow2"))
    assert backing_of(top) == "snap1.qcow2"
    qemu_img_compare(top, _image(ref, names[-1]))


def test_offline_commit_dry_run_changes_nothing(image_dir):
    names = build_chain(image_dir)
    top = _image(image_dir, names[-1])
    before = dir_hashes(image_dir)
    out = ctl_ok("commit", top, "--base", "base.qcow2", "--dry-run")
    after = dir_hashes(image_dir)
    assert before == after
    lines = dry_run_lines(out)
    assert lines["top"] == names[-1] and lines["base"] == "base.qcow2"
    need = int(lines["needs"].split()[0])
    allocated = sum(l["allocated"] for l in
                    json.loads(ctl_ok("info", "--json", top))["layers"][:-1])
    assert 0 < need
    # no more than what the merged layers hold, plus metadata slack
    assert need <= allocated + 4 * MiB, (need, allocated)
    assert int(lines["available"].split()[0]) > 0


def test_offline_commit_dry_run_defaults(image_dir):
    """The layers the dry run names follow the commit's defaults."""
    names = build_chain(image_dir)
    top = _image(image_dir, names[-1])
    lines = dry_run_lines(ctl_ok("commit", top, "--dry-run"))
    assert (lines["top"], lines["base"]) == (names[-1], "base.qcow2")
    lines = dry_run_lines(ctl_ok("commit", top, "--top", "snap1.qcow2", "--shallow",
                                 "--dry-run"))
    assert (lines["top"], lines["base"]) == ("snap1.qcow2", "base.qcow2")
    err = ctl_fails("commit", top, "--top", "base.qcow2", "--dry-run")
    assert "base.qcow2" in err


def test_offline_commit_verbose_pty(image_dir):
    names = build_chain(image_dir)
    rc, out = ctl_pty("commit", _image(image_dir, names[-1]), "--base", "base.qcow2",
                      "--verbose")
    assert rc == 0, out
    assert "\rBlock Commit: [100 %]" in out, repr(out)
    assert "Commit complete" in out


def test_offline_commit_verbose_plain(image_dir):
    names = build_chain(image_dir)
    out = ctl_ok("commit", _image(image_dir, names[-1]), "--base", "base.qcow2",
                 "--verbose")
    assert "\r" not in out
    lines = out.splitlines()
    assert "Block Commit: [100 %]" in lines
    assert all(l.startswith("Block Commit: [") or l == "Commit complete"
               for l in lines), out


@pytest.mark.parametrize("args,needle", [
    (["--base", "nosuch.qcow2"], "nosuch.qcow2"),
    (["--top", "nosuch.qcow2"], "nosuch.qcow2"),
    (["--top", "base.qcow2", "--base", "snap1.qcow2"], ""),
    (["--shallow", "--base", "base.qcow2"], ""),
])
def test_offline_commit_refused(image_dir, args, needle):
    names = build_chain(image_dir)
    before = dir_hashes(image_dir)
    err = ctl_fails("commit", _image(image_dir, names[-1]), *args)
    assert needle in err
    assert dir_hashes(image_dir) == before


def test_offline_online_only_options(image_dir):
    names = build_chain(image_dir)
    top = _image(image_dir, names[-1])
    for opt in (["--active", "--pivot"], ["--active", "--keep-overlay"], ["--async"],
                ["--timeout", "5"]):
        rc, out, err = ctl("commit", top, *opt)
        assert rc == 2, (opt, rc, err)
        assert "mounted export" in err
    err = ctl_fails("job", top)
    assert "not a chainfs export" in err


def test_offline_commit_refuses_shared_base(image_dir):
    names = build_chain(image_dir)
    # a second chain on the same base
    from helpers import create_qcow2
    create_qcow2(_image(image_dir, "other.qcow2"), backing="base.qcow2",
                 backing_fmt="qcow2")
    before = dir_hashes(image_dir)
    ctl_fails("commit", _image(image_dir, names[-1]), "--base", "base.qcow2")
    assert dir_hashes(image_dir) == before


# ------------------------------------------------------------- snapshot

def test_offline_snapshot(image_dir, tmp_path):
    names = build_chain(image_dir)
    top = _image(image_dir, names[-1])
    before = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", top, before)
    ctl_ok("snapshot", top, "new.qcow2")
    new = _image(image_dir, "new.qcow2")
    qemu_img_check(new)
    assert backing_of(new) == names[-1]
    qemu_img_compare(new, before, fmt_b="raw")
    ctl_fails("snapshot", top, "new.qcow2")  # exists already


def test_offline_stream(image_dir, tmp_path):
    names = build_chain(image_dir)
    top = _image(image_dir, names[-1])
    before = tmp_path / "before.raw"
    qemu_img("convert", "-O", "raw", top, before)
    out = ctl_ok("stream", top, "--base", "snap1.qcow2", "--wait")
    assert "Pull complete" in out
    assert backing_of(top) == "snap1.qcow2" or backing_of(top).endswith("/snap1.qcow2")
    qemu_img_check(top)
    qemu_img_compare(top, before, fmt_b="raw")


# ------------------------------------------------------- Ctrl-C offline

F_SETPIPE_SZ = 1031


def _full_pipe():
    """A pipe whose buffer is full: a write into it blocks until the reader
    drains it.  Returns (read fd, write fd, bytes already in it)."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    flags = fcntl.fcntl(w, fcntl.F_GETFL)
    fcntl.fcntl(w, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    filled = 0
    try:
        while True:
            filled += os.write(w, b"#" * 4096)
    except BlockingIOError:
        pass
    fcntl.fcntl(w, fcntl.F_SETFL, flags)
    return r, w, filled


def _catches_sigint(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    return False


def _read_to_eof(fd, timeout):
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "chainctl did not finish: %r" % data[-200:]
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                return data
            data += chunk


def test_offline_commit_sigint_stops_cleanly(image_dir, tmp_path, mountpoint):
    """Ctrl-C in the middle of an offline commit: exit 1 with one line that
    says so, every image passes qemu-img check with no leak, no backing
    reference changed, base holds part of the data, and the chain reads
    as before, through qemu-img and through chainfs.  A reissued commit
    then completes.

    Deterministic: chainctl's stdout is a full pipe, so its first progress
    line holds the commit's calling thread (the copy goes on in its
    workers) until the test, after the SIGINT, drains the pipe."""
    names = build_chain(image_dir, size=128 * MiB, big=64 * MiB, big_layer="snap2.qcow2")
    top = _image(image_dir, names[-1])
    base = _image(image_dir, "base.qcow2")
    original = tmp_path / "original.raw"
    qemu_img("convert", "-O", "raw", top, original)
    original_digest = file_sha256(original)
    backings = {n: backing_of(_image(image_dir, n)) for n in names}
    base_digest = file_sha256(base)
    base_blocks = os.stat(base).st_blocks

    r, w, filled = _full_pipe()
    proc = subprocess.Popen([CHAINCTL, "commit", top, "--verbose"], stdout=w,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(w)
    try:
        wait_for(lambda: proc.poll() is not None or _catches_sigint(proc.pid),
                 timeout=30, what="chainctl catching SIGINT")
        # The copy has written into base: the commit is under way.
        wait_for(lambda: proc.poll() is not None or os.stat(base).st_blocks > base_blocks,
                 timeout=30, what="the copy into base")
        assert proc.poll() is None, "chainctl ended before the SIGINT"
        proc.send_signal(signal.SIGINT)
        out = _read_to_eof(r, 120)[filled:].decode()
        proc.wait(timeout=60)
        err = proc.stderr.read().decode()
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    low = err.lower()
    assert "sanitizer" not in low and "runtime error" not in low, err
    assert proc.returncode == 1, (out, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("chainctl: interrupted: commit of %s into base.qcow2 "
                          % names[-1]), err
    assert "no backing file was changed" in err
    assert "Commit complete" not in out
    assert out and all(l.startswith("Block Commit: [") for l in out.splitlines()), out

    for n in names:
        qemu_img("check", _image(image_dir, n))  # exit 0: no corruption, no leak
        assert backing_of(_image(image_dir, n)) == backings[n], n
    assert file_sha256(base) != base_digest  # part of the data reached base
    qemu_img_compare(top, original, fmt_b="raw")
    with mounted(image_dir, mountpoint, wait_export="vm1") as m:
        assert file_sha256(m.path("vm1")) == original_digest

    assert "Commit complete" in ctl_ok("commit", top)
    qemu_img("check", base)
    qemu_img_compare(top, original, fmt_b="raw")


def test_offline_commit_keeps_to_bandwidth(image_dir, tmp_path):
    """--bandwidth holds an offline commit back too: at 2 MiB/s a commit of
    about 40 MiB is still copying a second after the first bytes reach
    base, and a Ctrl-C then stops it short of the end (unlimited, it ends
    in well under a second), base having grown by no more than the limit
    allows.  The chain still reads as before, and the commit reissued
    without a limit completes."""
    names = build_chain(image_dir, size=64 * MiB, big=32 * MiB, big_layer="snap2.qcow2")
    top = _image(image_dir, names[-1])
    base = _image(image_dir, "base.qcow2")
    original = tmp_path / "original.raw"
    qemu_img("convert", "-O", "raw", top, original)
    base_blocks = os.stat(base).st_blocks

    t0 = time.monotonic()
    proc = subprocess.Popen([CHAINCTL, "commit", top, "--bandwidth", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: proc.poll() is not None or _catches_sigint(proc.pid),
                 timeout=30, what="chainctl catching SIGINT")
        wait_for(lambda: proc.poll() is not None or os.stat(base).st_blocks > base_blocks,
                 timeout=30, what="the copy into base")
        # A second of copying at the limit, to compare with below.
        time.sleep(1)
        assert proc.poll() is None, "the limited commit ended at once"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        # Up to its exit: the copy may go on a while after the signal.
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode == 1, (out, err)
    m = re.search(r"stopped at offset (\d+) of (\d+) bytes", err)
    assert m and int(m.group(1)) < int(m.group(2)), err
    # Nor faster than the limit: what base grew by is at most 2 MiB/s from
    # the start to the exit, plus the first window of each of the three workers (each
    # writes before it asks the limiter), their windows in flight at the
    # stop, and 1 MiB for metadata.  (A slow machine only writes less.)
    grown = (os.stat(base).st_blocks - base_blocks) * 512
    assert grown <= 2 * MiB * elapsed + 7 * MiB, (grown, elapsed, err)
    for n in names:
        qemu_img("check", _image(image_dir, n))
    qemu_img_compare(top, original, fmt_b="raw")

    assert "Commit complete" in ctl_ok("commit", top)
    qemu_img_compare(top, original, fmt_b="raw")
