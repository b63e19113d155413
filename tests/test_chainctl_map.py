"""chainctl map: where each layer holds data, on image files and through a
real mount.  The oracle is `qemu-img map --output=json` of each layer: the
ranges it reports at depth 0 are what that layer itself holds.
"""
import json
import os

import pytest

from helpers import (MiB, KiB, create_qcow2, file_sha256, qemu_img,
                     qemu_img_check, qemu_io)
from test_chainctl_common import *  # noqa: F401,F403

SIZE = 32 * MiB
UTF8 = {"LC_ALL": "C.UTF-8"}
ASCII = {"LC_ALL": "C"}
FULL_UTF8, BLANK = "\u2588", " "
SHADES_UTF8 = "\u2591\u2592\u2593"


def _env(**extra):
    env = dict(os.environ)
    env.pop("NO_COLOR", None)
    env.update(extra)
    return env


@pytest.fixture
def chain(image_dir):
    """base.raw fully written <- mid.qcow2 (0-1M) <- top.qcow2 (1M at 50%,
    a zero range at 20M, 100k at 24M).  Returns (top path, file names)."""
    d = str(image_dir)
    base = os.path.join(d, "base.raw")
    with open(base, "wb") as f:
        f.truncate(SIZE)
    qemu_io(base, "write -P 1 0 %d" % SIZE, fmt="raw")
    mid = create_qcow2(os.path.join(d, "mid.qcow2"), backing="base.raw",
                       backing_fmt="raw")
    qemu_io(mid, "write -P 2 0 1M")
    top = create_qcow2(os.path.join(d, "top.qcow2"), backing="mid.qcow2")
    qemu_io(top, "write -P 3 %d 1M" % (SIZE // 2), "write -z 20M 1M",
            "write -P 4 24M 100k")
    return top, ["top.qcow2", "mid.qcow2", "base.raw"]


def _merge(ranges):
    """Sorted (offset, length, zero) ranges with touching ones of a kind
    merged (qemu-img splits runs where the host offset jumps)."""
    out = []
    for off, length, zero in sorted(ranges):
        if out and out[-1][2] == zero and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, zero)
        else:
            out.append((off, length, zero))
    return out


def _qemu_layer_ranges(path):
    """What qemu-img says the file itself holds: depth 0 and present."""
    entries = json.loads(qemu_img("map", "-U", "--output=json", path).stdout)
    return _merge((e["start"], e["length"], bool(e["zero"]) and not e["data"])
                  for e in entries if e["depth"] == 0 and e.get("present", True))


def _map_json(target):
    return json.loads(ctl_ok("map", "--json", target))


def _ranges(layer):
    return _merge((e["offset"], e["length"], e["zero"]) for e in layer["extents"])


# ---------------------------------------------------------------- JSON

def test_json_extents_equal_qemu_img_map_per_layer(chain):
    top, files = chain
    m = _map_json(top)
    d = os.path.dirname(top)
    assert [l["file"] for l in m["layers"]] == files
    assert m["virtual_size"] == SIZE
    for l in m["layers"]:
        assert _ranges(l) == _qemu_layer_ranges(os.path.join(d, l["file"])), l["file"]
        for e in l["extents"]:
            assert e["data"] != e["zero"]


def test_json_totals(chain):
    """Per layer: data and zero bytes as written; a commit copies the data
    (the zero range becomes zero clusters); the bottom has nothing to
    commit into.  Totals add up, and the data the disk shows is what
    qemu-img map of the whole chain calls data."""
    top, _ = chain
    m = _map_json(top)
    t, mid, base = m["layers"]
    # 100k rounds up to two 64 KiB clusters
    assert t["data_bytes"] == 1 * MiB + 128 * KiB
    assert t["zero_bytes"] == 1 * MiB
    assert t["allocated_bytes"] == 2 * MiB + 128 * KiB
    assert t["commit_bytes"] == t["data_bytes"]
    assert (mid["data_bytes"], mid["zero_bytes"], mid["commit_bytes"]) == (1 * MiB, 0, 1 * MiB)
    assert base["data_bytes"] == SIZE and base["commit_bytes"] is None
    tot = m["totals"]
    assert tot["data_bytes"] == sum(l["data_bytes"] for l in m["layers"])
    assert tot["zero_bytes"] == sum(l["zero_bytes"] for l in m["layers"])
    assert tot["allocated_bytes"] == tot["data_bytes"] + tot["zero_bytes"]
    assert tot["commit_bytes"] == t["commit_bytes"] + mid["commit_bytes"]
    chain_map = json.loads(qemu_img("map", "-U", "--output=json", top).stdout)
    assert tot["visible_data_bytes"] == sum(e["length"] for e in chain_map if e["data"])
    assert tot["visible_data_bytes"] == SIZE - 1 * MiB


# ------------------------------------------------------------- picture

def _lines(out):
    lines = out.splitlines()
    assert lines[0].startswith("LAYER"), out
    return lines


def _picture(line):
    return line.split("|")[1]


def _expected_class(ranges, start, end):
    """'full', 'blank' or 'partial' for the column [start, end)."""
    covered = sum(max(0, min(o + n, end) - max(o, start)) for o, n, _ in ranges)
    if covered == 0:
        return "blank"
    return "full" if covered >= end - start else "partial"


@pytest.mark.parametrize("locale,full,shades", [
    (UTF8, FULL_UTF8, SHADES_UTF8),
    (ASCII, "#", ".:"),
])
def test_picture_full_where_allocated_blank_where_not(chain, locale, full, shades):
    top, files = chain
    d = os.path.dirname(top)
    out = ctl_ok("map", "--width", "100", top, env=_env(TERM="xterm", **locale))
    lines = _lines(out)
    assert [l.split()[0] for l in lines[1:4]] == files
    for line, f in zip(lines[1:4], files):
        pic = _picture(line)
        ranges = _qemu_layer_ranges(os.path.join(d, f))
        cols = len(pic)
        for c, glyph in enumerate(pic):
            start, end = SIZE * c // cols, SIZE * (c + 1) // cols
            want = _expected_class(ranges, start, end)
            if want == "full":
                assert glyph == full, (f, c, pic)
            elif want == "blank":
                assert glyph == BLANK, (f, c, pic)
            else:
                assert glyph in shades, (f, c, pic)
    assert set(_picture(lines[3])) == {full}          # base: all of it
    assert _picture(lines[2])[0] == full and _picture(lines[2])[-1] == BLANK


def test_plain_output_without_a_tty_has_no_escapes(chain):
    top, _ = chain
    out = ctl_ok("map", top, env=_env(TERM="xterm-256color", **UTF8))
    assert "\x1b" not in out
    # sizes are there, in the HOLDS and COMMIT columns
    assert "HOLDS" in out and "COMMIT" in out
    assert "32 MiB" in _lines(out)[3]


@pytest.mark.parametrize("env,coloured", [
    ({"TERM": "xterm"}, True),
    ({"TERM": "xterm", "NO_COLOR": "1"}, False),
    ({"TERM": "dumb"}, False),
])
def test_colour_only_on_a_terminal_that_wants_it(chain, monkeypatch, env, coloured):
    top, _ = chain
    monkeypatch.delenv("NO_COLOR", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc, out = ctl_pty("map", top)
    assert rc == 0, out
    assert ("\x1b[" in out) == coloured, repr(out)


@pytest.mark.parametrize("width", [38, 40, 72, 100, 160])
def test_width_sets_the_line_width(chain, width):
    top, _ = chain
    out = ctl_ok("map", "--width", str(width), top, env=_env(**UTF8))
    lines = _lines(out)
    for line in lines[:4]:
        assert len(line) == width, (width, line)


def test_default_width_without_a_terminal_is_80(chain):
    top, _ = chain
    lines = _lines(ctl_ok("map", top, env=_env(**UTF8)))
    assert all(len(line) == 80 for line in lines[:4]), lines


def test_width_too_narrow_fails(chain):
    top, _ = chain
    err = ctl_fails("map", "--width", "20", top)
    assert "--width 20" in err and "narrow" in err


# -------------------------------------------------------------- online

def test_online_equals_offline_and_changes_no_file(chain, mount):
    top, files = chain
    d = os.path.dirname(top)
    env = _env(**UTF8)
    offline_json = _map_json(top)
    offline_text = ctl_ok("map", "--width", "90", top, env=env)
    m = mount(wait_export="top")
    export = m.path("top")
    before = {f: file_sha256(os.path.join(d, f)) for f in files}
    online_json = _map_json(export)
    online_text = ctl_ok("map", "--width", "90", export, env=env)
    after = {f: file_sha256(os.path.join(d, f)) for f in files}
    assert before == after  # force-shared read-only opens write nothing
    assert online_json == offline_json
    assert online_text == offline_text
    m.stop()
    for f in files[:2]:
        qemu_img_check(os.path.join(d, f))


def test_online_shows_a_guest_write_once_flushed(chain, mount):
    """What a guest wrote and fsynced is on disk, so the map of the files
    shows it in the active layer."""
    top, _ = chain
    m = mount(wait_export="top")
    export = m.path("top")
    fd = os.open(export, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x5a" * MiB, 8 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    t = _map_json(export)["layers"][0]
    assert (8 * MiB, 1 * MiB, False) in _ranges(t), t["extents"]
    assert t["data_bytes"] == 2 * MiB + 128 * KiB
    m.stop()
    assert _ranges(_map_json(top)["layers"][0]) == _qemu_layer_ranges(top)


def test_offline_map_of_a_mounted_image_is_refused_with_the_lock(chain, mount):
    """Offline map takes a reader's lock, as qemu-img map without -U does:
    the daemon writing the image makes it fail, naming the lock."""
    top, _ = chain
    mount(wait_export="top")
    err = ctl_fails("map", top)
    assert "lock" in err and "top.qcow2" in err, err


# -------------------------------------------------------------- errors

def test_missing_path_fails(tmp_path):
    err = ctl_fails("map", str(tmp_path / "nothere.qcow2"))
    assert "nothere.qcow2" in err and "No such file" in err


def test_directory_fails(tmp_path):
    err = ctl_fails("map", str(tmp_path))
    assert "directory" in err


def test_missing_backing_file_fails(image_dir):
    top = create_qcow2(os.path.join(str(image_dir), "lone.qcow2"), size=SIZE)
    qemu_img("rebase", "-u", "-b", "gone.qcow2", "-F", "qcow2", top)
    err = ctl_fails("map", top)
    assert "gone.qcow2" in err, err


@pytest.mark.parametrize("args", [
    ["map"],
    ["map", "a", "b"],
    ["map", "x", "--width", "wide"],
    ["map", "x", "--width", "0"],
    ["map", "x", "--width", "80", "--json"],
])
def test_usage_errors_exit_2(args):
    rc, out, err = ctl(*args)
    assert rc == 2, (args, rc, out, err)
    assert "sage" in err and out == ""


def test_help():
    rc, out, err = ctl("map", "--help")
    assert rc == 0 and err == ""
    for o in ("--width", "--json", "HOLDS", "COMMIT"):
        assert o in out
    assert "\n  map " in ctl_ok("--help")


def test_lower_layers_shorter_than_the_disk(chain):
    """A grown active layer: the disk is its size; a lower layer's line is
    blank past that layer's own end, and its extents stop there."""
    top, files = chain
    qemu_img("resize", "-q", top, str(2 * SIZE))
    m = _map_json(top)
    assert m["virtual_size"] == 2 * SIZE
    base = m["layers"][2]
    assert base["virtual_size"] == SIZE
    assert _ranges(base) == [(0, SIZE, False)]
    lines = _lines(ctl_ok("map", "--width", "80", top, env=_env(**UTF8)))
    pic = _picture(lines[3])
    cols = len(pic)
    for c, glyph in enumerate(pic):
        start, end = 2 * SIZE * c // cols, 2 * SIZE * (c + 1) // cols
        if end <= SIZE:
            assert glyph == FULL_UTF8, (c, pic)
        elif start >= SIZE:
            assert glyph == BLANK, (c, pic)
