"""Whatever else is in the image directory, chainfs never blocks on it and
serves every healthy chain; what a header says is trusted only as far as
its recorded format allows.

- Special files (FIFO, socket, character and block device), dangling
  symbolic links, subdirectories and files the daemon may not read, in the
  directory, as a backing file, or behind a symbolic link: the daemon
  mounts and serves the healthy chains, says in its log what it left out
  and why ("... is a FIFO, not an image file"), and `chainctl info` on any
  of them fails with that message instead of hanging.
- Recorded formats win: an overlay whose backing format is recorded as raw
  is served over the raw bytes even when they start with a qcow2 header (a
  guest wrote it), and nothing that header names is ever opened (an
  inotify watch on the host files it names sees no open) or hidden from
  discovery.  A file with no recorded format is still probed.
- An external data file belongs to the image that names it: that image is
  refused, and its data file is not exported as a chain of its own.

Subprocess timeouts below are only a safety net (generous, never the
assertion): without the non-blocking opens these commands never return.
"""
import ctypes
import os
import socket
import stat
import subprocess

import pytest

import helpers
from helpers import CHAINCTL, MiB, create_qcow2, create_raw, mounted, qemu_img, qemu_io
from test_daemon_common import assert_export_equals_image, export_names, pread_all

SIZE = 8 * MiB
SAFETY_TIMEOUT = 120


def _ctl(*args, prefix=()):
    res = subprocess.run(list(prefix) + [CHAINCTL] + [str(a) for a in args],
                         capture_output=True, text=True, timeout=SAFETY_TIMEOUT)
    low = res.stderr.lower()
    assert "sanitizer" not in low and "runtime error" not in low, res.stderr
    return res


def _ctl_refuses(target, *words, prefix=()):
    """chainctl info target: exit 1, one line naming each of words."""
    res = _ctl("info", target, prefix=prefix)
    assert res.returncode == 1, "chainctl info %s: rc %d\n%s%s" % (
        target, res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("chainctl: "), res.stderr
    for w in words:
        assert w in lines[0], "message does not say %r: %s" % (w, lines[0])
    return lines[0]


def _healthy_chain(d):
    """base.qcow2 <- vm1.qcow2 with data in both, and a raw disk2.img."""
    create_qcow2(d / "base.qcow2", SIZE)
    qemu_io(d / "base.qcow2", "write -P 0x11 0 1M")
    create_qcow2(d / "vm1.qcow2", backing="base.qcow2")
    qemu_io(d / "vm1.qcow2", "write -P 0x22 512k 1M")
    create_raw(d / "disk2.img", SIZE)
    qemu_io(d / "disk2.img", "write -P 0x33 4M 64k", fmt="raw")


def _make_socket(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the socket file stays, with nobody listening


def _overlay_on(d, name, backing, fmt):
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt,
             d / name, SIZE)


def _special_files(d):
    """Every kind of thing that is not an image file, and images over them.

    Returns {top file: words its refusal names}."""
    os.mkfifo(str(d / "pipe.qcow2"))
    _make_socket(d / "sock.qcow2")
    os.mknod(str(d / "null.img"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    # A block device node that nothing opens (discovery only looks at it).
    os.mknod(str(d / "blk.img"), stat.S_IFBLK | 0o600, os.makedev(7, 200))
    os.symlink("nothere.qcow2", str(d / "dangling.qcow2"))
    os.symlink("pipe.qcow2", str(d / "linkpipe.qcow2"))
    (d / "subdir.qcow2").mkdir()
    _overlay_on(d, "onpipe.qcow2", "pipe.qcow2", "qcow2")
    _overlay_on(d, "onlink.qcow2", "linkpipe.qcow2", "qcow2")
    _overlay_on(d, "onsock.qcow2", "sock.qcow2", "raw")
    _overlay_on(d, "onnull.qcow2", "null.img", "raw")
    return {
        "onpipe.qcow2": ["pipe.qcow2 is a FIFO, not an image file"],
        "onlink.qcow2": ["pipe.qcow2 is a FIFO, not an image file"],
        "onsock.qcow2": ["sock.qcow2 is a socket, not an image file"],
        "onnull.qcow2": ["null.img is a character device, not an image file"],
    }


def _stopped_log(m):
    """Unmount m, check it exited cleanly; its log."""
    assert m.stop() == 0, m.read_log()
    log = m.read_log()
    assert "sanitizer" not in log.lower() and "runtime error" not in log, log
    return log


def test_daemon_serves_healthy_chains_beside_special_files(image_dir, mountpoint, tmp_path,
                                                           mount):
    _healthy_chain(image_dir)
    refused = _special_files(image_dir)
    # The mount fixture reaps the daemon even if it never mounts (as it
    # did when it blocked on the FIFO).
    m = mount()
    assert export_names(mountpoint) == ["disk2", "vm1"]
    assert_export_equals_image(mountpoint / "vm1", image_dir / "vm1.qcow2", tmp_path)
    assert_export_equals_image(mountpoint / "disk2", image_dir / "disk2.img", tmp_path,
                               fmt="raw")
    log = _stopped_log(m)
    # Each thing left out is named, with its type, on a line of its own.
    for line in ("pipe.qcow2 is a FIFO, not an image file",
                 "sock.qcow2 is a socket, not an image file",
                 "null.img is a character device, not an image file",
                 "blk.img is a block device, not an image file",
                 "dangling.qcow2 is a dangling symbolic link, not an image file",
                 "linkpipe.qcow2 is a FIFO, not an image file"):
        assert line in log, "log does not say %r:\n%s" % (line, log)
    for top, words in refused.items():
        lines = [ln for ln in log.splitlines() if "chain %s left out" % top in ln]
        assert len(lines) == 1, "no single line leaves %s out:\n%s" % (top, log)
        for w in words:
            assert w in lines[0], lines[0]
    assert "subdir" not in log  # a directory is no news


@pytest.mark.parametrize("target,words", [
    ("pipe.qcow2", ["pipe.qcow2 is a FIFO, not an image file"]),
    ("linkpipe.qcow2", ["pipe.qcow2 is a FIFO, not an image file"]),
    ("sock.qcow2", ["sock.qcow2 is a socket, not an image file"]),
    ("null.img", ["null.img is a character device, not an image file"]),
    ("subdir.qcow2", ["subdir.qcow2 is a directory, not an image file"]),
    ("dangling.qcow2", ["dangling.qcow2", "No such file"]),
    ("onpipe.qcow2", ["backing file pipe.qcow2 of onpipe.qcow2",
                      "pipe.qcow2 is a FIFO, not an image file"]),
    ("onlink.qcow2", ["of onlink.qcow2", "pipe.qcow2 is a FIFO, not an image file"]),
    ("onsock.qcow2", ["of onsock.qcow2", "sock.qcow2 is a socket, not an image file"]),
    ("onnull.qcow2", ["of onnull.qcow2",
                      "null.img is a character device, not an image file"]),
])
def test_chainctl_info_refuses_special_file(image_dir, target, words):
    _special_files(image_dir)
    _ctl_refuses(image_dir / target, *words)


# ------------------------------------------------------- unreadable files

# root reads a chmod 000 file anyway (CAP_DAC_OVERRIDE).  Run the daemon
# and chainctl without the two capabilities that bypass file permissions,
# so that such a file is really unreadable to them.
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def test_unreadable_files_are_reported_not_fatal(image_dir, mountpoint, tmp_path,
                                                 monkeypatch, mount):
    _healthy_chain(image_dir)
    create_qcow2(image_dir / "locked.qcow2", SIZE)
    create_qcow2(image_dir / "secret.qcow2", SIZE)
    create_qcow2(image_dir / "vm2.qcow2", backing="secret.qcow2")
    os.chmod(str(image_dir / "locked.qcow2"), 0)
    os.chmod(str(image_dir / "secret.qcow2"), 0)
    # The check is only worth something if these really cannot be read.
    probe = subprocess.run(NO_DAC + ["head", "-c1", str(image_dir / "locked.qcow2")],
                           capture_output=True, text=True, timeout=SAFETY_TIMEOUT)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr, probe

    wrapper = tmp_path / "chainfs-no-dac"
    wrapper.write_text("#!/bin/sh\nexec %s %s \"$@\"\n" % (" ".join(NO_DAC), helpers.CHAINFS))
    wrapper.chmod(0o755)
    monkeypatch.setattr(helpers, "CHAINFS", str(wrapper))
    m = mount()
    assert export_names(mountpoint) == ["disk2", "vm1"]
    assert_export_equals_image(mountpoint / "vm1", image_dir / "vm1.qcow2", tmp_path)
    log = _stopped_log(m)
    assert "locked.qcow2: Permission denied" in log, log
    lines = [ln for ln in log.splitlines() if "chain vm2.qcow2 left out" in ln]
    assert len(lines) == 1 and "secret.qcow2" in lines[0] and \
        "Permission denied" in lines[0], log

    _ctl_refuses(image_dir / "locked.qcow2", "locked.qcow2", "Permission denied",
                 prefix=NO_DAC)
    _ctl_refuses(image_dir / "vm2.qcow2", "secret.qcow2", "vm2.qcow2", "Permission denied",
                 prefix=NO_DAC)


# ------------------------------------------------- recorded formats win

IN_ACCESS = 0x001
IN_OPEN = 0x020


class OpenWatch:
    """inotify watch for any open or read of the given files."""

    def __init__(self, paths):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        for p in paths:
            wd = self.libc.inotify_add_watch(self.fd, str(p).encode(), IN_OPEN | IN_ACCESS)
            assert wd >= 0, "%s: %s" % (p, os.strerror(ctypes.get_errno()))

    def events(self):
        """Bytes of the events queued since the last call (b"" for none)."""
        out = b""
        while True:
            try:
                out += os.read(self.fd, 65536)
            except BlockingIOError:
                return out

    def close(self):
        os.close(self.fd)


def _fake_header(tmp_path, name, *opts, backing=None, backing_fmt="raw"):
    """A qcow2 header made by qemu-img, outside the image directory."""
    path = tmp_path / name
    cmd = ["create", "-q", "-f", "qcow2", "-u"]
    if opts:
        cmd += ["-o", ",".join(opts)]
    if backing:
        cmd += ["-b", backing, "-F", backing_fmt]
    qemu_img(*(cmd + [path, SIZE]))
    return path


def _raw_disk_with_header(path, header, seed):
    """A raw disk with data, whose first cluster is a copy of header's (as a
    guest writing a qcow2 image into its own disk leaves it)."""
    create_raw(path, SIZE)
    qemu_io(path, "write -P %d 0 %d" % (seed, SIZE), fmt="raw")
    subprocess.run(["dd", "if=%s" % header, "of=%s" % path, "bs=64k", "count=1",
                    "conv=notrunc", "status=none"], check=True, timeout=SAFETY_TIMEOUT)
    with open(str(path), "rb") as f:
        assert f.read(4) == b"QFI\xfb"


def test_recorded_raw_wins_over_a_qcow2_header(image_dir, mountpoint, tmp_path):
    host_backing = tmp_path / "host-backing.bin"
    host_backing.write_bytes(b"\x99" * SIZE)
    # disk.img (raw) starts with a header whose backing file and external
    # data file are host files outside the image directory.
    hdr = _fake_header(tmp_path, "hdr.qcow2", "data_file=%s" % (tmp_path / "host-data.bin"),
                       backing=str(host_backing))
    host_data = tmp_path / "host-data.bin"
    assert host_data.exists()
    _raw_disk_with_header(image_dir / "disk.img", hdr, 0x44)
    _overlay_on(image_dir, "vm.qcow2", "disk.img", "raw")
    qemu_io(image_dir / "vm.qcow2", "write -P 0x55 1M 64k")

    # disk2.img (raw) starts with a header naming vm2.qcow2 as its backing
    # file and vm4.img as its data file: both are disks of their own, which
    # a raw disk's content must not hide.
    create_qcow2(image_dir / "vm2.qcow2", SIZE)
    qemu_io(image_dir / "vm2.qcow2", "write -P 0x66 0 64k")
    hdr2 = _fake_header(tmp_path, "hdr2.qcow2", "data_file=%s" % (image_dir / "vm4.img"),
                        backing="vm2.qcow2", backing_fmt="qcow2")
    os.truncate(str(image_dir / "vm4.img"), SIZE)
    qemu_io(image_dir / "vm4.img", "write -P 0x77 0 64k", fmt="raw")
    _raw_disk_with_header(image_dir / "disk2.img", hdr2, 0x88)
    _overlay_on(image_dir, "vm3.qcow2", "disk2.img", "raw")

    watch = OpenWatch([host_backing, host_data])
    try:
        with mounted(image_dir, mountpoint) as m:
            assert export_names(mountpoint) == ["vm", "vm2", "vm3", "vm4"], m.read_log()
            assert_export_equals_image(mountpoint / "vm", image_dir / "vm.qcow2", tmp_path)
            assert_export_equals_image(mountpoint / "vm3", image_dir / "vm3.qcow2", tmp_path)
            assert_export_equals_image(mountpoint / "vm2", image_dir / "vm2.qcow2", tmp_path)
            assert_export_equals_image(mountpoint / "vm4", image_dir / "vm4.img", tmp_path,
                                       fmt="raw")
            # The raw bytes, qcow2 header and all.
            with open(str(image_dir / "disk.img"), "rb") as f:
                assert pread_all(mountpoint / "vm", 0, 65536) == f.read(65536)
            layers = helpers.chain_info(mountpoint / "vm")["layers"]
            assert [(x["file"], x["format"]) for x in layers] == [
                ("vm.qcow2", "qcow2"), ("disk.img", "raw")]
            # A write below the header cluster and a read back through it.
            with open(str(mountpoint / "vm"), "r+b") as f:
                f.seek(2 * MiB)
                f.write(b"\xab" * 4096)
                f.flush()
                os.fsync(f.fileno())
            assert pread_all(mountpoint / "vm", 2 * MiB, 4096) == b"\xab" * 4096

        # Offline, the same: recorded raw wins.
        res = _ctl("info", image_dir / "vm.qcow2", "--json")
        assert res.returncode == 0, res.stderr
        assert '"disk.img"' in res.stdout and '"raw"' in res.stdout, res.stdout
        # With no recorded format the same file is probed, and is qcow2, as
        # in QEMU: then refused for its external data file.
        _ctl_refuses(image_dir / "disk.img", "disk.img", "qcow2 external data file")
        # disk2.img's header names a backing file in the directory, with
        # no data file... but it does have one too: refused the same way.
        _ctl_refuses(image_dir / "disk2.img", "disk2.img", "qcow2 external data file")

        assert watch.events() == b"", "a host file named by a raw disk's content was opened"
        # The watch does see an open: the assertion above could fail.
        with open(str(host_backing), "rb"):
            pass
        assert watch.events() != b""
    finally:
        watch.close()
    qemu_img("check", image_dir / "vm.qcow2")


# ------------------------------------------------- external data files

def test_data_file_is_not_exported_on_its_own(image_dir, mountpoint, tmp_path, mount):
    _healthy_chain(image_dir)
    # Absolute, and relative (QEMU resolves it from its working directory,
    # which is meaningless for a daemon; chainfs takes the image's
    # directory, like a backing file's: the same directory here).
    create_qcow2(image_dir / "ext.qcow2", SIZE,
                 extra_opts=["data_file=%s" % (image_dir / "ext-data.raw")])
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "data_file=ext2-data.img,data_file_raw=on", "ext2.qcow2", str(SIZE)],
                   cwd=str(image_dir), check=True, timeout=SAFETY_TIMEOUT)
    assert (image_dir / "ext-data.raw").exists() and (image_dir / "ext2-data.img").exists()

    m = mount()
    assert export_names(mountpoint) == ["disk2", "vm1"], m.read_log()
    log = _stopped_log(m)
    for top in ("ext.qcow2", "ext2.qcow2"):
        lines = [ln for ln in log.splitlines() if "chain %s left out" % top in ln]
        assert len(lines) == 1 and "external data file" in lines[0], log
    _ctl_refuses(image_dir / "ext2.qcow2", "ext2.qcow2", "external data file")
