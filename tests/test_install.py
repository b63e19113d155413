"""chainfs as a host runs it: mount(8) and fstab conventions, the systemd
unit, and the Debian package.

Two kinds of test here:
- the option handling, the read-only mount, the unit file and the version,
  with the built binaries (every run);
- tests marked `install`, which build the .deb (dpkg-buildpackage in a
  copy of the tree), install it with dpkg, run the demo through the
  installed /usr/bin/chainfs and /usr/bin/chainctl, mount with
  `mount -t fuse.chainfs` and through an fstab line (`mount -T FILE`, so
  the machine's /etc/fstab is never touched), and purge the package
  again.  They change the machine for a while, so they run only with
  CHAINFS_INSTALL_TESTS=1 (run-tests.sh runs them once) and are skipped
  otherwise, with that reason.
"""
import errno
import glob
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile

import pytest

from helpers import (BUILD_DIR, CHAINCTL, CHAINFS, MiB, create_qcow2, file_sha256,
                     is_mounted, make_chain, mounted, qemu_img, qemu_img_check, qemu_io,
                     run, setxattr_errno, to_raw, wait_for)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_TESTS = os.environ.get("CHAINFS_INSTALL_TESTS") == "1"
SIZE = 16 * MiB


def meson_version():
    with open(os.path.join(ROOT, "meson.build")) as f:
        return re.search(r"version\s*:\s*'([^']+)'", f.read()).group(1)


def changelog_version():
    with open(os.path.join(ROOT, "debian", "changelog")) as f:
        return re.match(r"chainfs \(([^)]+)\)", f.readline()).group(1)


# ------------------------------------------------------ with the build

def test_one_version_everywhere():
    version = meson_version()
    assert changelog_version() == version
    assert run([CHAINFS, "--version"]).stdout.splitlines()[0] == \
        "chainfs version " + version
    assert run([CHAINCTL, "--version"]).stdout.strip() == "chainctl " + version
    for page in ("chainfs.8", "chainctl.1"):
        with open(os.path.join(ROOT, "man", page)) as f:
            assert '"chainfs %s"' % version in f.readline(), page


def test_mount_helper_options_are_accepted(image_dir, mountpoint):
    """What mount(8), mount.fuse3 and fstab may hand over: options for
    other programs are dropped, not refused; the mount is read-write."""
    make_chain(image_dir, depth=2, size=SIZE, base_fmt="qcow2", top_name="vm.qcow2")
    opts = ("rw,nofail,_netdev,x-systemd.automount,x-systemd.device-timeout=10,"
            "defaults,auto,noauto,nouser,comment=disks,relatime,nodiratime,dev,suid")
    with mounted(image_dir, mountpoint, "-o", opts, "-o", "") as m:
        fd = os.open(m.path("vm"), os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"x" * 4096, 0) == 4096
        finally:
            os.close(fd)
    qemu_img_check(image_dir / "vm.qcow2")


def test_unknown_option_is_still_refused(image_dir, mountpoint):
    make_chain(image_dir, depth=1, size=SIZE, base_fmt="qcow2")
    res = run([CHAINFS, "-f", "-o", "frobnicate", str(image_dir), str(mountpoint)],
              check=False)
    assert res.returncode != 0 and "frobnicate" in res.stderr
    assert not is_mounted(mountpoint)


def test_ro_mount_writes_nothing(image_dir, mountpoint):
    names = make_chain(image_dir, depth=2, size=SIZE, base_fmt="qcow2", top_name="vm.qcow2")
    top = image_dir / "vm.qcow2"
    before = {n: (file_sha256(image_dir / n), os.stat(image_dir / n).st_mtime_ns)
              for n in names}
    with mounted(image_dir, mountpoint, "-o", "ro") as m:
        exp = m.path("vm")
        with pytest.raises(OSError) as ei:
            os.open(exp, os.O_WRONLY)
        assert ei.value.errno == errno.EROFS
        assert setxattr_errno(exp, "user.chainfs.snapshot", "snap.qcow2") == errno.EROFS
        # the images are open read-only: qemu-img may write... nothing here,
        # but it may open them for reading without -U
        qemu_img("info", str(top))
        raw = to_raw(top, m.mountpoint + ".raw")
        assert file_sha256(exp) == file_sha256(raw)
        os.unlink(raw)
    assert "read-only" in m.read_log()
    after = {n: (file_sha256(image_dir / n), os.stat(image_dir / n).st_mtime_ns)
             for n in names}
    assert after == before
    assert not os.path.exists(image_dir / "snap.qcow2")


def unit_text(bindir):
    with open(os.path.join(ROOT, "systemd", "chainfs@.service.in")) as f:
        return f.read().replace("@bindir@", bindir)


def test_unit_file_verifies(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    unit = tmp_path / "chainfs@.service"
    unit.write_text(unit_text(BUILD_DIR))
    # --man=no: the man pages are not installed from a build tree (the
    # install test verifies the installed unit with them).
    res = run(["systemd-analyze", "verify", "--man=no", str(unit)], check=False)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    # a mistake is caught: the same check on a broken copy complains
    bad = tmp_path / "chainfs@bad.service"
    bad.write_text(unit_text(BUILD_DIR).replace("Type=notify", "Type=notfy"))
    res = run(["systemd-analyze", "verify", "--man=no", str(bad)], check=False)
    assert "notfy" in res.stderr


def test_unit_file_contract():
    """What the unit promises, in its own words (systemd-analyze checks
    the syntax, not these choices)."""
    text = unit_text("/usr/bin")
    keys = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            keys.setdefault(k, []).append(v)
    assert keys["Type"] == ["notify"]
    assert keys["EnvironmentFile"] == ["/etc/chainfs/%i.conf"]
    assert keys["ExecStart"] == [
        '/usr/bin/chainfs -f -o "${OPTIONS}" "${IMAGE_DIR}" "${MOUNTPOINT}"']
    assert keys["Restart"] == ["on-failure"]
    assert keys["ExecStopPost"] == ['-/bin/fusermount3 -u -z "${MOUNTPOINT}"']
    assert keys["DeviceAllow"] == ["/dev/fuse rw"]
    # nothing that would make the mount private to the service
    for k in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
              "ReadWritePaths", "ProtectKernelTunables", "PrivateMounts"):
        assert k not in keys, k


def test_unit_installed_by_meson(tmp_path):
    """meson install puts the unit, with the installed chainfs in its
    ExecStart, under the unit directory (default PREFIX/lib/systemd/system)."""
    dest = tmp_path / "dest"
    run(["meson", "install", "-C", BUILD_DIR, "--no-rebuild", "--destdir", str(dest)])
    info = run(["meson", "introspect", "--buildoptions", BUILD_DIR]).stdout
    prefix = re.search(r'"name": "prefix", "value": "([^"]+)"', info).group(1)
    units = glob.glob(str(dest) + "/**/chainfs@.service", recursive=True)
    assert len(units) == 1, units
    with open(units[0]) as f:
        assert "ExecStart=%s/bin/chainfs -f " % prefix in f.read()
    for rel in ("bin/chainfs", "bin/chainctl", "share/man/man8/chainfs.8",
                "share/man/man1/chainctl.1"):
        assert os.path.exists(str(dest) + prefix + "/" + rel), rel


# -------------------------------------------------- the Debian package

install = pytest.mark.install
need_install = pytest.mark.skipif(
    not INSTALL_TESTS,
    reason="builds and installs the Debian package: set CHAINFS_INSTALL_TESTS=1 "
           "(run-tests.sh does, once)")


def package_installed():
    res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "chainfs"],
                         capture_output=True, text=True)
    return res.returncode == 0 and "install ok installed" in res.stdout


def copy_tree(dest):
    """The source tree without build output, .git or an in-tree package
    build."""
    def ignore(d, names):
        rel = os.path.relpath(d, ROOT)
        skip = {n for n in names if n in (".git", "__pycache__", "demo") or
                (rel == "." and (n.startswith("build") or n.startswith("obj-")))}
        if rel == "debian":
            skip |= {n for n in names if n in ("chainfs", ".debhelper", "files",
                                               "tmp", "debhelper-build-stamp") or
                     n.endswith(".substvars") or n.endswith(".log")}
        return skip
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build the .deb from a copy of the tree, install it, and purge it
    afterwards, whatever the tests did."""
    if package_installed():
        pytest.skip("a chainfs package is installed already: the test would "
                    "replace and then remove it")
    for prog in ("/usr/local/bin/chainfs", "/usr/local/sbin/chainfs"):
        if os.path.exists(prog):
            pytest.skip("%s (a meson install) would shadow the package's "
                        "/usr/bin/chainfs for mount.fuse3" % prog)
    for tool in ("dpkg-buildpackage", "dh"):
        assert shutil.which(tool), "%s is missing: install debhelper and dpkg-dev" % tool
    work = tmp_path_factory.mktemp("deb")
    src = work / ("chainfs-" + meson_version())
    copy_tree(str(src))
    res = subprocess.run(["nice", "dpkg-buildpackage", "-b", "-us", "-uc"],
                         cwd=str(src), capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, "dpkg-buildpackage failed:\n%s\n%s" % (
        res.stdout[-5000:], res.stderr[-5000:])
    debs = glob.glob(str(work / "chainfs_*.deb"))
    assert len(debs) == 1, debs
    try:
        run(["dpkg", "-i", debs[0]])
        assert package_installed()
        yield debs[0]
    finally:
        run(["dpkg", "--purge", "chainfs"], check=False)
    assert not package_installed()
    assert not os.path.exists("/usr/bin/chainfs")
    assert not os.path.exists("/lib/systemd/system/chainfs@.service")


def make_demo(image_dir):
    """The chain of setup-and-run.sh, smaller: base.img <- snap1 <- vm1."""
    d = str(image_dir)
    base = os.path.join(d, "base.img")
    with open(base, "wb") as f:
        f.truncate(64 * MiB)
    qemu_io(base, "write -P 0x11 0 16M", fmt="raw")
    create_qcow2(os.path.join(d, "snap1.qcow2"), backing="base.img", backing_fmt="raw")
    qemu_io(os.path.join(d, "snap1.qcow2"), "write -P 0x22 8M 8M")
    create_qcow2(os.path.join(d, "vm1.qcow2"), backing="snap1.qcow2")
    qemu_io(os.path.join(d, "vm1.qcow2"), "write -P 0x33 12M 2M")


def daemon_pids(image_dir):
    """PIDs of the chainfs processes serving image_dir (a daemonized chainfs
    is not our child: found by its exact command line)."""
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % p, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"chainfs" and \
                str(image_dir).encode() in argv:
            pids.append(int(p))
    return pids


class HostMount:
    """A mount made the way a host makes it (chainfs daemonized, mount(8)):
    always unmounted, and its daemon seen to exit (killed by PID if it
    does not)."""

    def __init__(self, image_dir, mountpoint):
        self.image_dir = str(image_dir)
        self.mountpoint = str(mountpoint)
        self.pids = []

    def __enter__(self):
        return self

    def started(self):
        wait_for(lambda: is_mounted(self.mountpoint), timeout=30, what="the mount")
        self.pids = wait_for(lambda: daemon_pids(self.image_dir), timeout=10,
                             what="the chainfs daemon")
        return self

    def __exit__(self, *exc):
        if is_mounted(self.mountpoint):
            if subprocess.run(["umount", self.mountpoint]).returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", self.mountpoint])
        try:
            wait_for(lambda: not any(os.path.exists("/proc/%d" % p) for p in self.pids),
                     timeout=60, what="chainfs to exit after the unmount")
        finally:
            for p in self.pids:
                if os.path.exists("/proc/%d" % p):
                    os.kill(p, 9)
        return False


@pytest.fixture
def world_mountpoint():
    """A mount point that another user can reach (pytest's tmp dirs are
    0700), for allow_other."""
    d = tempfile.mkdtemp(prefix="chainfs-install-")
    os.chmod(d, 0o755)
    mnt = os.path.join(d, "mnt")
    os.mkdir(mnt)
    yield mnt
    if not is_mounted(mnt):
        shutil.rmtree(d, ignore_errors=True)


def read_as_nobody(path, length):
    """The first length bytes of path, read by user nobody."""
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534",
                          "--clear-groups", "head", "-c", str(length), path],
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@install
@need_install
def test_package_contents(installed):
    for path in ("/usr/bin/chainfs", "/usr/bin/chainctl",
                 "/usr/share/man/man8/chainfs.8.gz", "/usr/share/man/man1/chainctl.1.gz",
                 "/lib/systemd/system/chainfs@.service", "/etc/chainfs",
                 "/usr/share/doc/chainfs/example.conf"):
        assert os.path.exists(path), path
    assert stat.S_IMODE(os.stat("/usr/bin/chainfs").st_mode) == 0o755
    assert run(["/usr/bin/chainfs", "--version"]).stdout.startswith(
        "chainfs version " + meson_version())
    has_man = shutil.which("man") is not None
    if has_man:
        assert run(["man", "-w", "8", "chainfs"]).stdout.strip() == \
            "/usr/share/man/man8/chainfs.8.gz"
    with open("/lib/systemd/system/chainfs@.service") as f:
        assert "ExecStart=/usr/bin/chainfs -f " in f.read()
    if shutil.which("systemd-analyze"):
        # the installed unit, man pages included
        res = run(["systemd-analyze", "verify"] + ([] if has_man else ["--man=no"]) +
                  ["/lib/systemd/system/chainfs@.service"], check=False)
        assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


@install
@need_install
def test_installed_demo(installed, image_dir, mountpoint, tmp_path):
    """setup-and-run.sh's demo, through the installed programs: chainfs
    goes to the background as a daemon, chainctl reads the chain and
    commits, the export reads as qemu-img reads the chain."""
    make_demo(image_dir)
    expected = to_raw(image_dir / "vm1.qcow2", tmp_path / "vm1.raw")
    with HostMount(image_dir, mountpoint) as hm:
        res = run(["/usr/bin/chainfs", str(image_dir), str(mountpoint)])
        assert res.returncode == 0
        hm.started()
        exp = os.path.join(str(mountpoint), "vm1")
        info = run(["/usr/bin/chainctl", "info", exp, "--json"]).stdout
        assert [layer["file"] for layer in json.loads(info)["layers"]] == [
            "vm1.qcow2", "snap1.qcow2", "base.img"]
        assert "vm1.qcow2" in run(["/usr/bin/chainctl", "info", exp]).stdout
        assert file_sha256(exp) == file_sha256(expected)
        run(["/usr/bin/chainctl", "commit", exp, "--top", "snap1.qcow2", "--wait"],
            timeout=300)
        assert file_sha256(exp) == file_sha256(expected)
    qemu_img_check(image_dir / "vm1.qcow2")
    qemu_img("compare", "-U", str(image_dir / "vm1.qcow2"), expected)


@install
@need_install
def test_mount_t_fuse_chainfs(installed, image_dir, world_mountpoint, tmp_path):
    """`mount -t fuse.chainfs IMAGE_DIR MNT -o allow_other`: mount.fuse3
    runs the installed chainfs; another user reads the export."""
    make_demo(image_dir)
    os.chmod(str(image_dir), 0o755)
    expected = to_raw(image_dir / "vm1.qcow2", tmp_path / "vm1.raw")
    with HostMount(image_dir, world_mountpoint) as hm:
        run(["mount", "-t", "fuse.chainfs", str(image_dir), world_mountpoint,
             "-o", "allow_other"])
        hm.started()
        line = [entry for entry in open("/proc/self/mounts").read().splitlines()
                if entry.split()[1] == world_mountpoint][0]
        assert line.split()[2] == "fuse.chainfs" and "allow_other" in line.split()[3]
        exp = os.path.join(world_mountpoint, "vm1")
        with open(expected, "rb") as f:
            assert read_as_nobody(exp, 13 * MiB)[12 * MiB:] == f.read(13 * MiB)[12 * MiB:]
        assert file_sha256(exp) == file_sha256(expected)
    assert not is_mounted(world_mountpoint)


@install
@need_install
@pytest.mark.parametrize("options,writable", [
    ("allow_other,nofail", True),
    ("ro,allow_other,nofail,_netdev,x-systemd.requires=local-fs.target", False),
])
def test_fstab_line(installed, image_dir, world_mountpoint, tmp_path, options, writable):
    """The line of README's fstab example, mounted from a file of its own
    (`mount -T`): the machine's /etc/fstab stays as it is."""
    make_demo(image_dir)
    fstab = tmp_path / "fstab"
    fstab.write_text("%s %s fuse.chainfs %s 0 0\n" % (image_dir, world_mountpoint, options))
    with HostMount(image_dir, world_mountpoint) as hm:
        run(["mount", "-T", str(fstab), world_mountpoint])
        hm.started()
        opts = [entry.split()[3] for entry in open("/proc/self/mounts").read().splitlines()
                if entry.split()[1] == world_mountpoint][0].split(",")
        assert "allow_other" in opts
        assert ("ro" in opts) == (not writable)
        exp = os.path.join(world_mountpoint, "vm1")
        try:
            fd = os.open(exp, os.O_WRONLY)
            os.close(fd)
            opened = 0
        except OSError as e:
            opened = e.errno
        assert opened == (0 if writable else errno.EROFS)
    assert not is_mounted(world_mountpoint)
    qemu_img_check(image_dir / "vm1.qcow2")
