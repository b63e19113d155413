"""chainctl against a real mount: every option of info, commit, job,
snapshot and stream through a running chainfs, the result checked through
the export and, after unmounting, with qemu-img.
"""
import errno
import json
import os
import signal
import subprocess
import time

import pytest

from helpers import (CHAINCTL, MiB, chain_info, file_sha256, getxattr, job_info,
                     qemu_img, qemu_img_check, qemu_img_compare, setxattr,
                     setxattr_errno, wait_for, wait_job)
from test_chainctl_common import *  # noqa: F401,F403

BIG = 16 * MiB  # data in snap2: 16 s of copying at 1 MiB/s
# A slow intermediate commit (the big data is in snap2).
SLOW = ["--top", "snap2.qcow2", "--base", "base.qcow2", "--bandwidth", "1"]


@pytest.fixture
def chain(image_dir, mount):
    """A mounted 4-layer chain; yields (export path, image_dir, names)."""
    names = build_chain(image_dir, big=BIG, big_layer="snap2.qcow2")
    m = mount(wait_export="vm1")
    yield m.path("vm1"), str(image_dir), names, m


def _layers(export):
    return [l["file"] for l in chain_info(export)["layers"]]


def _img(d, n):
    return os.path.join(d, n)


# ----------------------------------------------------------------- info

def test_info_online(chain):
    export, d, names, _ = chain
    blocks = info_blocks(ctl_ok("info", export))
    assert [b["image"] for b in blocks] == list(reversed(names))
    assert blocks[0]["backing file"] == names[-2]
    assert blocks[0]["backing file format"] == "qcow2"
    assert blocks[0]["virtual size"].endswith("(%d bytes)" % (32 * MiB))
    assert all(b["cluster_size"] == "65536" for b in blocks)
    assert "backing file" not in blocks[-1]


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_info_online_matches_offline(image_dir, mount, base_fmt):
    """Online info shows what offline info shows, line by line and JSON
    member by member, for the same chain (with mixed cluster sizes, and a
    raw base, which has no cluster_size)."""
    from helpers import create_qcow2, make_chain
    names = make_chain(image_dir, depth=3, size=16 * MiB, base_fmt=base_fmt,
                       cluster_size=16384, top_name="vm1.qcow2", seed=5)
    top = _img(str(image_dir), "vm1.qcow2")
    create_qcow2(_img(str(image_dir), "vm2.qcow2"), backing="vm1.qcow2",
                 backing_fmt="qcow2", cluster_size=131072)
    top = _img(str(image_dir), "vm2.qcow2")
    offline_text = ctl_ok("info", top)
    offline_json = json.loads(ctl_ok("info", "--json", top))
    m = mount(wait_export="vm2")
    export = m.path("vm2")
    online_text = ctl_ok("info", export)
    online_json = json.loads(ctl_ok("info", "--json", export))
    m.stop()

    assert online_text == offline_text  # no job yet: no job block
    assert online_json.pop("job") == {}
    assert online_json == offline_json
    blocks = info_blocks(online_text)
    assert [b["image"] for b in blocks] == ["vm2.qcow2"] + list(reversed(names))
    assert blocks[0]["cluster_size"] == "131072"
    assert blocks[1]["cluster_size"] == "16384"
    assert ("cluster_size" in blocks[-1]) == (base_fmt == "qcow2")
    assert blocks[-2]["backing file format"] == base_fmt
    for l in online_json["layers"]:
        assert set(l) == {"file", "format", "virtual_size", "allocated", "backing",
                          "cluster_size", "backing_format"}
    assert ctl_ok("info", top) == offline_text  # the mount changed nothing


def test_info_online_json_has_job(chain):
    export, d, names, _ = chain
    info = json.loads(ctl_ok("info", "--json", export))
    assert info["name"] == "vm1"
    assert [l["file"] for l in info["layers"]] == list(reversed(names))
    assert info["job"] == {}
    ctl_ok("commit", export, "--top", "snap1.qcow2", "--base", "base.qcow2", "--wait")
    info = json.loads(ctl_ok("info", "--json", export))
    assert info["job"]["state"] == "completed"
    assert info["job"]["type"] == "commit"


# --------------------------------------------------------------- commit

def test_commit_intermediate_wait(chain, tmp_path):
    export, d, names, m = chain
    digest = file_sha256(export)
    out = ctl_ok("commit", export, "--top", "snap2.qcow2", "--base", "base.qcow2",
                 "--wait", "--keep-relative")
    assert "Commit complete" in out
    assert job_info(export)["state"] == "completed"
    assert _layers(export) == ["vm1.qcow2", "base.qcow2"]
    assert file_sha256(export) == digest
    m.stop()
    qemu_img_check(_img(d, "base.qcow2"))
    assert backing_of(_img(d, "vm1.qcow2")) == "base.qcow2"


def test_commit_shallow_delete_online(chain):
    export, d, names, m = chain
    digest = file_sha256(export)
    out = ctl_ok("commit", export, "--top", "snap2.qcow2", "--shallow", "--delete",
                 "--keep-relative", "--wait")
    assert "Commit complete" in out
    assert _layers(export) == ["vm1.qcow2", "snap1.qcow2", "base.qcow2"]
    assert not os.path.exists(_img(d, "snap2.qcow2"))
    assert file_sha256(export) == digest
    m.stop()
    assert backing_of(_img(d, "vm1.qcow2")) == "snap1.qcow2"
    qemu_img_check(_img(d, "snap1.qcow2"))


def test_commit_absolute_backing_by_default(chain):
    export, d, names, m = chain
    ctl_ok("commit", export, "--top", "snap1.qcow2", "--base", "base.qcow2", "--wait")
    m.stop()
    assert backing_of(_img(d, "snap2.qcow2")) == _img(os.path.realpath(d), "base.qcow2")


def test_commit_force_shared_base(image_dir, mount):
    build_chain(image_dir)
    from helpers import create_qcow2
    create_qcow2(_img(str(image_dir), "other.qcow2"), backing="snap1.qcow2",
                 backing_fmt="qcow2")
    m = mount(wait_export="vm1")
    export = m.path("vm1")
    other = m.path("other")
    other_digest = file_sha256(other)
    err = ctl_fails("commit", export, "--top", "snap1.qcow2", "--base", "base.qcow2")
    assert err.strip() == "chainctl: " + getxattr(export, "user.chainfs.last_error").strip()
    assert job_info(export) == {}
    ctl_fails("commit", export, "--top", "snap2.qcow2", "--base", "snap1.qcow2")
    assert file_sha256(other) == other_digest
    # With --force the user accepts that the other chain (which reads
    # through snap1) now sees snap2's data.
    ctl_ok("commit", export, "--top", "snap2.qcow2", "--base", "snap1.qcow2", "--force",
           "--wait")
    assert _layers(export) == ["vm1.qcow2", "snap1.qcow2", "base.qcow2"]
    assert file_sha256(other) != other_digest


def test_commit_verbose_progress_bar_on_pty(chain):
    export, d, names, _ = chain
    rc, out = ctl_pty("commit", export, "--top", "snap2.qcow2", "--base", "base.qcow2",
                      "--verbose")
    assert rc == 0, out
    assert "\rBlock Commit: [100 %]" in out, repr(out)
    assert "Commit complete" in out


def test_commit_verbose_plain_lines(chain):
    export, d, names, _ = chain
    out = ctl_ok("commit", export, "--top", "snap2.qcow2", "--base", "base.qcow2",
                 "--verbose")
    assert "\r" not in out
    assert "Block Commit: [100 %]" in out.splitlines()


def test_commit_bandwidth_units(chain):
    export, d, names, _ = chain
    for args, speed in ((["--bandwidth", "1"], 1 * MiB),
                        (["--bandwidth", "512K"], 512 * 1024),
                        (["--bandwidth", "70000", "--bytes"], 70000)):
        out = ctl_ok("commit", export, "--top", "snap2.qcow2", *args)
        assert "Block Commit started" in out
        assert job_info(export)["speed"] == speed
        ctl_ok("job", export, "--abort", "--wait")
        assert job_info(export)["state"] == "cancelled"


def test_commit_async_returns_while_running(chain):
    export, d, names, _ = chain
    t0 = time.monotonic()
    out = ctl_ok("commit", export, *SLOW, "--async")
    assert "started" in out
    j = job_info(export)
    assert j["state"] == "running", j
    assert j["type"] == "commit"
    ctl_ok("job", export, "--abort", "--wait")
    assert job_info(export)["state"] == "cancelled"
    assert _layers(export) == list(reversed(names))
    assert time.monotonic() - t0 < 15  # did not wait for 16 s of copying


def test_commit_timeout_cancels(chain):
    export, d, names, m = chain
    digest = file_sha256(export)
    t0 = time.monotonic()
    err = ctl_fails("commit", export, *SLOW, "--timeout", "1")
    assert "timed out" in err
    assert time.monotonic() - t0 < 12
    assert job_info(export)["state"] == "cancelled"
    assert _layers(export) == list(reversed(names))
    assert file_sha256(export) == digest


def test_commit_active_pivot(chain):
    export, d, names, m = chain
    digest = file_sha256(export)
    out = ctl_ok("commit", export, "--active", "--pivot", "--keep-relative")
    assert "Successfully pivoted" in out
    assert job_info(export)["state"] == "completed"
    assert _layers(export) == ["base.qcow2"]
    assert file_sha256(export) == digest
    # writes now land in base
    with open(export, "r+b") as f:
        f.write(b"\xab" * 4096)
    m.stop()
    qemu_img_check(_img(d, "base.qcow2"))
    raw = os.path.join(os.path.dirname(d), "b.raw")
    qemu_img("convert", "-O", "raw", _img(d, "base.qcow2"), raw)
    with open(raw, "rb") as f:
        assert f.read(4096) == b"\xab" * 4096


def test_commit_active_keep_overlay(chain):
    export, d, names, m = chain
    digest = file_sha256(export)
    out = ctl_ok("commit", export, "--active", "--keep-overlay", "--base", "base.qcow2")
    assert "overlay image kept" in out
    assert job_info(export)["state"] == "cancelled"
    assert _layers(export) == list(reversed(names))
    assert file_sha256(export) == digest
    m.stop()
    # base is in sync with the whole chain
    qemu_img_compare(_img(d, "base.qcow2"), _img(d, "vm1.qcow2"))


def test_commit_active_wait_stops_at_ready(chain):
    export, d, names, _ = chain
    out = ctl_ok("commit", export, "--active", "--wait")
    assert "synchronized phase" in out
    assert job_info(export)["state"] == "ready"
    out = ctl_ok("job", export, "--pivot", "--wait")
    assert "pivoted" in out
    assert _layers(export) == ["base.qcow2"]


@pytest.mark.parametrize("args", [
    [],                                          # active layer into the bottom
    ["--top", "snap2.qcow2", "--base", "base.qcow2"],
    ["--top", "snap2.qcow2", "--shallow"],
    ["--top", "snap1.qcow2", "--base", "base.qcow2", "--force", "--keep-relative"],
])
def test_commit_dry_run_online_equals_offline(image_dir, mount, args):
    """Online --dry-run prints the daemon's estimate: the figure offline
    --dry-run prints for the same chain; and it changes nothing."""
    names = build_chain(image_dir, big=BIG, big_layer="snap2.qcow2")
    d = str(image_dir)
    offline = dry_run_lines(ctl_ok("commit", _img(d, "vm1.qcow2"), "--dry-run", *args))
    m = mount(wait_export="vm1")
    export = m.path("vm1")
    before = dir_hashes(d)
    online = dry_run_lines(ctl_ok("commit", export, "--dry-run", *args))
    assert dir_hashes(d) == before
    assert job_info(export) == {}
    assert _layers(export) == list(reversed(names))
    assert (online["top"], online["base"]) == (offline["top"], offline["base"])
    assert online["needs"] == offline["needs"]
    assert int(online["needs"].split()[0]) > 0
    m.stop()
    assert dir_hashes(d) == before


def test_commit_dry_run_online_refused(chain):
    export, d, names, _ = chain
    before = dir_hashes(d)
    err = ctl_fails("commit", export, "--top", "nosuch.qcow2", "--dry-run")
    assert "nosuch.qcow2" in err
    assert err.strip() == "chainctl: " + getxattr(export, "user.chainfs.last_error").strip()
    err = ctl_fails("commit", export, "--top", "base.qcow2", "--dry-run")
    assert "base.qcow2" in err
    assert dir_hashes(d) == before
    assert job_info(export) == {}


def _control_command(m, line):
    """Write one command on a fresh handle of the control file; return
    (errno or 0, the JSON reply read back on that handle)."""
    fd = os.open(m.path(".control"), os.O_RDWR)
    try:
        try:
            os.write(fd, line.encode())
            code = 0
        except OSError as e:
            code = e.errno
        return code, json.loads(os.pread(fd, 65536, 0))
    finally:
        os.close(fd)


def test_control_file_commit_dry_run(chain):
    """The control file's commit verb with the word dry-run: the reply
    carries the estimate, nothing starts, nothing is written; the same
    word through the attribute only validates."""
    export, d, names, m = chain
    before = dir_hashes(d)
    code, reply = _control_command(
        m, "commit vm1 top=snap2.qcow2 dry-run base=base.qcow2")
    assert code == 0, reply
    assert reply["ok"] is True and reply["dry_run"] is True
    assert reply["export"] == "vm1" and reply["command"] == "commit"
    assert reply["job"] == {}
    est = reply["estimate"]
    assert set(est) == {"top", "base", "needed_bytes", "available_bytes"}
    assert (est["top"], est["base"]) == ("snap2.qcow2", "base.qcow2")
    # snap2 holds BIG bytes that base lacks: they need room, plus metadata
    assert BIG <= est["needed_bytes"] <= BIG + 4 * MiB, est
    assert est["available_bytes"] > 0
    intermediate_need = est["needed_bytes"]
    assert job_info(export) == {}
    assert dir_hashes(d) == before

    # defaults: the active layer into the bottom
    code, reply = _control_command(m, "commit vm1 dry-run")
    assert code == 0, reply
    assert (reply["estimate"]["top"], reply["estimate"]["base"]) == (
        "vm1.qcow2", "base.qcow2")
    assert reply["estimate"]["needed_bytes"] >= intermediate_need

    # refusals keep their errno and message
    code, reply = _control_command(m, "commit vm1 top=nosuch.qcow2 dry-run")
    assert code == errno.ENOENT and reply["ok"] is False
    assert "nosuch.qcow2" in reply["error"]
    code, reply = _control_command(m, "commit vm1 dry-runs")
    assert code == errno.EINVAL and "dry-runs" in reply["error"]
    code, reply = _control_command(m, "commit vm1 shallow base=base.qcow2 dry-run")
    assert code == errno.EINVAL and reply["ok"] is False

    # through the attribute: validated, nothing started
    setxattr(export, "user.chainfs.commit", "top=snap2.qcow2 dry-run")
    assert job_info(export) == {}
    assert setxattr_errno(export, "user.chainfs.commit",
                          "top=nosuch.qcow2 dry-run") == errno.ENOENT
    assert dir_hashes(d) == before
    assert _layers(export) == list(reversed(names))

    # the real commit afterwards is not affected
    code, reply = _control_command(m, "commit vm1 top=snap2.qcow2 base=base.qcow2")
    assert code == 0 and "dry_run" not in reply and "estimate" not in reply
    wait_job(export, timeout=60)
    assert _layers(export) == ["vm1.qcow2", "base.qcow2"]


@pytest.mark.parametrize("args", [
    ["--top", "nosuch.qcow2"],
    ["--top", "vm1.qcow2"],                  # active layer without --active
    ["--shallow", "--base", "base.qcow2"],
])
def test_commit_refused_prints_last_error(chain, args):
    export, d, names, _ = chain
    err = ctl_fails("commit", export, *args)
    last = getxattr(export, "user.chainfs.last_error").strip()
    assert last and err.strip() == "chainctl: " + last.replace("\n", " ")
    assert job_info(export) == {}
    assert _layers(export) == list(reversed(names))


def test_commit_busy_refused(chain):
    export, d, names, _ = chain
    ctl_ok("commit", export, *SLOW)
    err = ctl_fails("commit", export, "--top", "snap1.qcow2")
    assert err.strip() == "chainctl: " + getxattr(export, "user.chainfs.last_error").strip()
    ctl_ok("job", export, "--abort", "--wait")


def test_sigint_during_wait_cancels(chain):
    export, d, names, _ = chain
    proc = subprocess.Popen([CHAINCTL, "commit", export] + SLOW + ["--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for(lambda: job_info(export).get("state") == "running", timeout=60,
                 what="job running")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (out, err)
    assert "interrupted" in err and "cancelled" in err
    assert len(err.splitlines()) == 1
    assert job_info(export)["state"] == "cancelled"


# ------------------------------------------------------------------ job

def test_job_info_pause_resume_speed(chain):
    export, d, names, _ = chain
    out = ctl_ok("job", export)
    assert "No current block job for vm1" in out
    assert json.loads(ctl_ok("job", export, "--info", "--json")) == {}
    ctl_ok("commit", export, *SLOW)
    out = ctl_ok("job", export, "--info")
    assert out.startswith("Block Commit: [")
    assert "Bandwidth limit: %d bytes/s" % MiB in out
    ctl_ok("job", export, "--pause", "--wait")
    assert job_info(export)["state"] == "paused"
    ctl_fails("job", export, "--pause")   # already paused: refused
    ctl_ok("job", export, "--resume")
    assert job_info(export)["state"] in ("running", "completed")
    ctl_ok("job", export, "--speed", "2")
    assert job_info(export)["speed"] == 2 * MiB
    ctl_ok("job", export, "--speed", "4096", "--bytes")
    assert job_info(export)["speed"] == 4096
    ctl_ok("job", export, "--speed", "0")
    assert job_info(export)["speed"] == 0
    out = ctl_ok("job", export, "--wait", "--timeout", "60")
    assert out.startswith("Block Commit: [100 %]"), out
    assert job_info(export)["state"] == "completed"
    assert _layers(export) == ["vm1.qcow2", "base.qcow2"]


def test_job_verbs_refused_without_job(chain):
    export, d, names, _ = chain
    for verb in ("--abort", "--pivot", "--pause", "--resume"):
        err = ctl_fails("job", export, verb)
        assert "no job" in err.lower(), err


def test_job_pivot_refused_while_running(chain):
    export, d, names, _ = chain
    ctl_ok("commit", export, *SLOW)
    err = ctl_fails("job", export, "--pivot")
    assert "cannot" in err
    ctl_ok("job", export, "--abort", "--wait")


# ------------------------------------------------------- snapshot, stream

def test_snapshot_online(chain):
    export, d, names, m = chain
    digest = file_sha256(export)
    out = ctl_ok("snapshot", export, "snap3.qcow2")
    assert "snap3.qcow2" in out
    assert _layers(export)[:2] == ["snap3.qcow2", "vm1.qcow2"]
    assert file_sha256(export) == digest
    ctl_fails("snapshot", export, "snap3.qcow2")   # exists
    m.stop()
    qemu_img_check(_img(d, "snap3.qcow2"))
    assert backing_of(_img(d, "snap3.qcow2")) == "vm1.qcow2"


def test_stream_online(chain):
    export, d, names, m = chain
    digest = file_sha256(export)
    rc, out = ctl_pty("stream", export, "--base", "snap1.qcow2", "--verbose")
    assert rc == 0, out
    assert "\rBlock Pull: [100 %]" in out and "Pull complete" in out
    assert _layers(export) == ["vm1.qcow2", "snap1.qcow2", "base.qcow2"]
    out = ctl_ok("stream", export, "--wait")
    assert "Pull complete" in out
    assert _layers(export) == ["vm1.qcow2"]
    assert file_sha256(export) == digest
    m.stop()
    qemu_img_check(_img(d, "vm1.qcow2"))
    assert backing_of(_img(d, "vm1.qcow2")) is None


def test_offline_refused_while_mounted(chain):
    """The image files are locked by the daemon: offline work is refused."""
    export, d, names, _ = chain
    before = dir_hashes(d)
    ctl_fails("commit", _img(d, "vm1.qcow2"), "--base", "base.qcow2")
    after = dir_hashes(d)
    assert before == after


def test_stream_timeout_cancels(chain):
    export, d, names, _ = chain
    digest = file_sha256(export)
    err = ctl_fails("stream", export, "--bandwidth", "1", "--timeout", "1")
    assert "timed out" in err
    j = job_info(export)
    assert j["type"] == "stream" and j["state"] == "cancelled", j
    assert _layers(export) == list(reversed(names))
    assert file_sha256(export) == digest


def test_stream_async_then_job_verbose(chain):
    export, d, names, _ = chain
    out = ctl_ok("stream", export, "--bandwidth", "2", "--async")
    assert "Block Pull started" in out
    assert job_info(export)["state"] == "running"
    ctl_ok("job", export, "--speed", "0")
    out = ctl_ok("job", export, "--verbose")
    lines = out.splitlines()
    assert "Block Pull: [100 %]" in lines, out
    assert job_info(export)["state"] == "completed"
    assert _layers(export) == ["vm1.qcow2"]
