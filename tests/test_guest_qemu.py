"""A real guest on the export: qemu-system-x86_64 (TCG) boots a boot sector
from MOUNTPOINT/vm as an unprivileged user, with the disk options libvirt
gives a file-backed raw disk (cache=none, i.e. O_DIRECT, and aio=threads),
while chainfs serves the mount with allow_other, as a libvirt host runs it.

There is no guest OS image on the machine and no network to fetch one, so
the guest is a 512-byte boot sector assembled here by hand (boot_sector,
with the label resolution of Asm).
SeaBIOS loads it at 0x7c00; it reads a pattern the test put on the disk
with INT 13h AH=42h, checks every byte, writes marker sectors with AH=43h
and leaves qemu through the isa-debug-exit port with a status that says
which step failed.  The result is read back through the export and, after
the unmount, from the images with qemu-img.
"""
import errno
import os
import shutil
import struct
import subprocess
import tempfile

import pytest

from helpers import (CHAINCTL, MiB, chain_info, create_qcow2, create_raw, file_sha256,
                     job_info, mounted, qemu_img, qemu_img_check, qemu_io, run, wait_for)

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 is not installed "
    "(scripts/install-deps.sh installs qemu-system-x86)")

SECTOR = 512
SIZE = 16 * MiB
NOBODY_UID = 65534
NOGROUP_GID = 65534

# Exit values the guest writes to the isa-debug-exit port; qemu exits with
# (value << 1) | 1, so none of them can be confused with qemu's own 0 or 1.
GUEST_OK, GUEST_MISMATCH, GUEST_READ_ERROR, GUEST_WRITE_ERROR, GUEST_NO_EXT = (
    0x10, 0x11, 0x12, 0x13, 0x14)
EXIT_MEANING = {
    (GUEST_OK << 1) | 1: "guest succeeded",
    (GUEST_MISMATCH << 1) | 1: "guest read a pattern that differs from what the test wrote",
    (GUEST_READ_ERROR << 1) | 1: "guest's INT 13h read failed",
    (GUEST_WRITE_ERROR << 1) | 1: "guest's INT 13h write failed",
    (GUEST_NO_EXT << 1) | 1: "BIOS has no INT 13h extensions for the disk",
}

PATTERN_SECTORS = 8          # sectors the guest reads and checks (one 4 KiB block)
STOP_MAGIC = b"STOP"         # what the test writes to the stop sector
DONE_MAGIC = b"DONE"         # what the guest writes to the done sector at its end


def pattern(seed, nbytes):
    """The bytes the guest expects: the high byte of a 16-bit counter that
    starts at seed and steps by 0x9e37 per byte.  Its period is 65536
    bytes, so sectors of a block differ from one another and a misplaced
    sector is caught."""
    out = bytearray(nbytes)
    state = seed & 0xffff
    for i in range(nbytes):
        out[i] = state >> 8
        state = (state + 0x9e37) & 0xffff
    return bytes(out)


def slot_data(seed, k):
    """What the guest's k-th write holds: the pattern inverted, with k as
    the first little-endian word."""
    inverted = bytes(b ^ 0xff for b in pattern(seed, PATTERN_SECTORS * SECTOR))
    return struct.pack("<H", k & 0xffff) + inverted[2:]


# ------------------------------------------------------------ the guest

class Asm:
    """Just enough of a 16-bit x86 assembler to place hand-assembled
    instructions and resolve the labels of jumps and data (org 0x7c00)."""

    ORG = 0x7c00

    def __init__(self):
        self.code = bytearray()
        self.labels = {}
        self.fixups = []   # (position, label, kind): kind rel8, rel16 or abs16

    def emit(self, *parts):
        """Append instruction bytes; a str part is a label: an absolute
        16-bit address ('label'), an 8-bit jump displacement ('>label') or
        a 16-bit one ('>>label', for the 0F 8x near Jcc of the 386 and
        later, which real mode runs as well)."""
        for p in parts:
            if isinstance(p, str) and p.startswith(">>"):
                self.fixups.append((len(self.code), p[2:], "rel16"))
                self.code += b"\0\0"
            elif isinstance(p, str) and p.startswith(">"):
                self.fixups.append((len(self.code), p[1:], "rel8"))
                self.code.append(0)
            elif isinstance(p, str):
                self.fixups.append((len(self.code), p, "abs16"))
                self.code += b"\0\0"
            else:
                self.code += bytes(p)

    def label(self, name):
        assert name not in self.labels, name
        self.labels[name] = len(self.code)

    def assemble(self):
        for pos, name, kind in self.fixups:
            target = self.labels[name]
            if kind == "abs16":
                struct.pack_into("<H", self.code, pos, self.ORG + target)
            elif kind == "rel16":
                struct.pack_into("<h", self.code, pos, target - (pos + 2))
            else:
                disp = target - (pos + 1)
                assert -128 <= disp <= 127, "jump to %s out of rel8 range" % name
                struct.pack_into("<b", self.code, pos, disp)
        assert len(self.code) <= 510, "boot sector code is %d bytes" % len(self.code)
        return bytes(self.code) + b"\0" * (510 - len(self.code)) + b"\x55\xaa"


def dap(lba, count, buffer):
    """An INT 13h extended Disk Address Packet: size 16, count, buffer
    offset:segment (segment 0), 64-bit LBA."""
    return struct.pack("<BBHHHQ", 16, 0, count, buffer, 0, lba)


def boot_sector(seed, pattern_lba, mark_lba, slots=1, max_writes=1,
                stop_lba=0, done_lba=0):
    """The guest, as the 512 bytes of sector 0.

    It reads PATTERN_SECTORS sectors at pattern_lba into 0x8000 and checks
    them against pattern(seed); inverts them in place; then writes them
    (with the write count k as the first word) to slot k % slots at
    mark_lba + slot * PATTERN_SECTORS, k = 0, 1, ... until it has written
    max_writes times (0: no limit) or, when stop_lba is set, the sector at
    stop_lba begins with STOP_MAGIC (checked after every write).  Last it
    writes DONE_MAGIC and the number of writes to done_lba (if set) and
    exits through isa-debug-exit with GUEST_OK.  slots must be a power of
    two.  Register use: BX = k; SI = buffer or DAP; DL = drive for INT 13h.
    """
    assert slots & (slots - 1) == 0 and mark_lba + slots * PATTERN_SECTORS < 0x10000
    a = Asm()
    a.emit([0xfa])                            # cli
    a.emit([0x31, 0xc0])                      # xor ax, ax
    a.emit([0x8e, 0xd8])                      # mov ds, ax
    a.emit([0x8e, 0xc0])                      # mov es, ax
    a.emit([0x8e, 0xd0])                      # mov ss, ax
    a.emit([0xbc, 0x00, 0x7c])                # mov sp, 0x7c00 (stack below us)
    a.emit([0xfb])                            # sti
    a.emit([0xfc])                            # cld
    a.emit([0xea], "main", [0x00, 0x00])      # jmp 0000:main (CS = 0 whatever the BIOS used)
    a.label("main")
    a.emit([0x88, 0x16], "drive")             # mov [drive], dl (the BIOS's boot disk)
    # INT 13h AH=41h: are the extensions (AH=42h/43h) there for this disk?
    a.emit([0xb4, 0x41])                      # mov ah, 0x41
    a.emit([0xbb, 0xaa, 0x55])                # mov bx, 0x55aa
    a.emit([0xcd, 0x13])                      # int 0x13
    a.emit([0x0f, 0x82], ">>no_ext")          # jc near no_ext
    a.emit([0x81, 0xfb, 0x55, 0xaa])          # cmp bx, 0xaa55
    a.emit([0x0f, 0x85], ">>no_ext")          # jne near no_ext
    # Read the pattern.
    a.emit([0xbe], "dap_read")                # mov si, dap_read
    a.emit([0xb4, 0x42])                      # mov ah, 0x42 (extended read)
    a.emit([0x8a, 0x16], "drive")             # mov dl, [drive]
    a.emit([0xcd, 0x13])                      # int 0x13
    a.emit([0x0f, 0x82], ">>read_error")      # jc near read_error
    # Check it byte by byte, inverting each checked byte in place.
    a.emit([0xbe, 0x00, 0x80])                # mov si, 0x8000
    a.emit([0xb9], list(struct.pack("<H", PATTERN_SECTORS * SECTOR)))  # mov cx, bytes
    a.emit([0xb8], list(struct.pack("<H", seed & 0xffff)))  # mov ax, seed
    a.label("check")
    a.emit([0x38, 0x24])                      # cmp [si], ah
    a.emit([0x0f, 0x85], ">>mismatch")        # jne near mismatch
    a.emit([0x05, 0x37, 0x9e])                # add ax, 0x9e37
    a.emit([0xf6, 0x14])                      # not byte [si]
    a.emit([0x46])                            # inc si
    a.emit([0xe2], ">check")                  # loop check
    a.emit([0x31, 0xdb])                      # xor bx, bx (k = 0)
    a.label("write_loop")
    a.emit([0x89, 0x1e, 0x00, 0x80])          # mov [0x8000], bx (k in the first word)
    a.emit([0x89, 0xd8])                      # mov ax, bx
    a.emit([0x25], list(struct.pack("<H", slots - 1)))  # and ax, slots-1
    a.emit([0xb9], list(struct.pack("<H", PATTERN_SECTORS)))  # mov cx, sectors per slot
    a.emit([0xf7, 0xe1])                      # mul cx (dx:ax = slot * sectors)
    a.emit([0x05], list(struct.pack("<H", mark_lba)))  # add ax, mark_lba
    a.emit([0xa3], "dap_write_lba")           # mov [dap_write_lba], ax
    a.emit([0xbe], "dap_write")               # mov si, dap_write
    a.emit([0xb8, 0x00, 0x43])                # mov ax, 0x4300 (extended write, no verify)
    a.emit([0x8a, 0x16], "drive")             # mov dl, [drive]
    a.emit([0x53])                            # push bx (keep k across the BIOS call)
    a.emit([0xcd, 0x13])                      # int 0x13
    a.emit([0x5b])                            # pop bx
    a.emit([0x0f, 0x82], ">>write_error")     # jc near write_error
    a.emit([0x43])                            # inc bx
    a.emit([0x81, 0xfb], list(struct.pack("<H", max_writes & 0xffff)))  # cmp bx, max_writes
    a.emit([0x74], ">finish")                 # je finish
    if stop_lba:
        # Has the test asked us to stop?  Read the stop sector to 0x9000.
        a.emit([0xbe], "dap_stop")            # mov si, dap_stop
        a.emit([0xb4, 0x42])                  # mov ah, 0x42
        a.emit([0x8a, 0x16], "drive")         # mov dl, [drive]
        a.emit([0x53])                        # push bx
        a.emit([0xcd, 0x13])                  # int 0x13
        a.emit([0x5b])                        # pop bx
        a.emit([0x0f, 0x82], ">>read_error")  # jc near read_error
        a.emit([0x81, 0x3e, 0x00, 0x90], list(STOP_MAGIC[:2]))  # cmp word [0x9000], "ST"
        a.emit([0x75], ">write_loop")         # jne write_loop
        a.emit([0x81, 0x3e, 0x02, 0x90], list(STOP_MAGIC[2:]))  # cmp word [0x9002], "OP"
        a.emit([0x75], ">write_loop")         # jne write_loop
    else:
        a.emit([0xeb], ">write_loop")         # jmp write_loop
    a.label("finish")
    if done_lba:
        # 0x9000: DONE_MAGIC, then the number of writes.
        a.emit([0xc7, 0x06, 0x00, 0x90], list(DONE_MAGIC[:2]))  # mov word [0x9000], "DO"
        a.emit([0xc7, 0x06, 0x02, 0x90], list(DONE_MAGIC[2:]))  # mov word [0x9002], "NE"
        a.emit([0x89, 0x1e, 0x04, 0x90])      # mov [0x9004], bx
        a.emit([0xbe], "dap_done")            # mov si, dap_done
        a.emit([0xb8, 0x00, 0x43])            # mov ax, 0x4300
        a.emit([0x8a, 0x16], "drive")         # mov dl, [drive]
        a.emit([0xcd, 0x13])                  # int 0x13
        a.emit([0x0f, 0x82], ">>write_error") # jc near write_error
    a.emit([0xb0, GUEST_OK])                  # mov al, GUEST_OK
    a.emit([0xeb], ">exit")                   # jmp exit
    a.label("no_ext")
    a.emit([0xb0, GUEST_NO_EXT])              # mov al, GUEST_NO_EXT
    a.emit([0xeb], ">exit")                   # jmp exit
    a.label("read_error")
    a.emit([0xb0, GUEST_READ_ERROR])          # mov al, GUEST_READ_ERROR
    a.emit([0xeb], ">exit")                   # jmp exit
    a.label("write_error")
    a.emit([0xb0, GUEST_WRITE_ERROR])         # mov al, GUEST_WRITE_ERROR
    a.emit([0xeb], ">exit")                   # jmp exit
    a.label("mismatch")
    a.emit([0xb0, GUEST_MISMATCH])            # mov al, GUEST_MISMATCH
    a.label("exit")
    a.emit([0xe6, 0xf4])                      # out 0xf4, al (isa-debug-exit: qemu exits)
    a.emit([0xfa])                            # cli
    a.label("halt")
    a.emit([0xf4])                            # hlt
    a.emit([0xeb], ">halt")                   # jmp halt
    # Data.
    a.label("drive")
    a.emit([0x80, 0x00])
    a.label("dap_read")
    a.emit(dap(pattern_lba, PATTERN_SECTORS, 0x8000))
    a.label("dap_write")
    a.emit(dap(0, PATTERN_SECTORS, 0x8000)[:8])
    a.label("dap_write_lba")
    a.emit(dap(0, PATTERN_SECTORS, 0x8000)[8:])
    a.label("dap_stop")
    a.emit(dap(stop_lba, 1, 0x9000))
    a.label("dap_done")
    a.emit(dap(done_lba, 1, 0x9000))
    return a.assemble()


# ------------------------------------------------------------ running it

@pytest.fixture
def world_mountpoint():
    """A mount point that user nobody can reach (pytest's tmp dirs are
    0700): qemu runs as nobody and opens MOUNTPOINT/vm by path."""
    d = tempfile.mkdtemp(prefix="chainfs-guest-")
    os.chmod(d, 0o755)
    mnt = os.path.join(d, "mnt")
    os.mkdir(mnt)
    yield mnt
    if not os.path.ismount(mnt):
        shutil.rmtree(d, ignore_errors=True)


def disk_args(disk, bus):
    """The disk's qemu options.  virtio and ide: -drive with the options of
    <driver name='qemu' type='raw' cache='none' io='threads'/>.
    "libvirt": the -blockdev pair and device that libvirt 9 (Debian 12)
    generates for the README's <disk> element: a file node with O_DIRECT
    (cache.direct), thread-pool AIO, auto-read-only and discard=unmap, a raw
    format node over it, a virtio-blk device that boots."""
    if bus == "libvirt":
        storage = ('{"driver":"file","filename":"%s","aio":"threads",'
                   '"node-name":"libvirt-1-storage","cache":{"direct":true,"no-flush":false},'
                   '"auto-read-only":true,"discard":"unmap"}' % disk)
        fmt = ('{"node-name":"libvirt-1-format","read-only":false,'
               '"cache":{"direct":true,"no-flush":false},"driver":"raw",'
               '"file":"libvirt-1-storage"}')
        return ["-blockdev", storage, "-blockdev", fmt,
                "-device", "virtio-blk-pci,drive=libvirt-1-format,id=virtio-disk0,"
                "bootindex=1,write-cache=on"]
    return ["-boot", "order=c",
            "-drive", "file=%s,format=raw,if=%s,cache=none,aio=threads" % (disk, bus)]


def qemu_cmd(disk, bus="virtio"):
    """qemu-system-x86_64 (TCG) as nobody, as libvirt's DAC driver runs it
    as its qemu user, with the disk on `bus` (see disk_args)."""
    return ["setpriv", "--reuid=%d" % NOBODY_UID, "--regid=%d" % NOGROUP_GID,
            "--clear-groups", "--",
            QEMU, "-accel", "tcg", "-machine", "pc", "-m", "32",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "none", "-monitor", "none", "-parallel", "none",
            "-nic", "none", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"] + disk_args(disk, bus)


def start_guest(disk, bus="virtio"):
    return subprocess.Popen(qemu_cmd(disk, bus), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish_guest(proc, timeout=120):
    """Wait for the guest (the timeout only bounds a failure) and return
    its exit status and output; kill it if it overruns."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError("qemu did not exit in %d s:\n%s" % (timeout, out))
    return proc.returncode, out


def assert_qemu_as_libvirt_runs_it(pid, export):
    """The running qemu is user nobody, and holds the export open for
    reading and writing with O_DIRECT (cache=none): the kernel's record of
    it, not the command line, says so."""
    with open("/proc/%d/status" % pid) as f:
        ids = dict(l.split(":", 1) for l in f.read().splitlines() if ":" in l)
    assert ids["Uid"].split()[:2] == [str(NOBODY_UID)] * 2, ids["Uid"]
    fds = [fd for fd in os.listdir("/proc/%d/fd" % pid)
           if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == os.path.realpath(export)]
    assert fds, "qemu has no descriptor of %s" % export
    for fd in fds:
        with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
            info = dict(l.split(":", 1) for l in f.read().splitlines() if ":" in l)
        flags = int(info["flags"].strip(), 8)
        assert flags & os.O_DIRECT, "fd %s flags %o: no O_DIRECT" % (fd, flags)
        assert flags & os.O_ACCMODE == os.O_RDWR, "fd %s flags %o" % (fd, flags)


def run_guest(disk, bus="virtio"):
    rc, out = finish_guest(start_guest(disk, bus))
    assert rc == (GUEST_OK << 1) | 1, "qemu exit %d (%s):\n%s" % (
        rc, EXIT_MEANING.get(rc, "qemu itself failed"), out)


def write_at(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_at(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def image_bytes(image, fmt, offset, length, tmp_path):
    """length bytes at offset of an image, through qemu-img convert."""
    raw = str(tmp_path / ("%s.raw" % os.path.basename(image)))
    qemu_img("convert", "-U", "-f", fmt, "-O", "raw", image, raw)
    try:
        return read_at(raw, offset, length)
    finally:
        os.unlink(raw)


def make_vm(image_dir):
    """base.img (raw) <- vm.qcow2: exported as vm."""
    base = create_raw(os.path.join(str(image_dir), "base.img"), SIZE)
    create_qcow2(os.path.join(str(image_dir), "vm.qcow2"), backing=base, backing_fmt="raw")
    return base, os.path.join(str(image_dir), "vm.qcow2")


def give_to_nobody(export):
    """What libvirt's DAC driver does to a disk before it starts qemu."""
    os.chown(export, NOBODY_UID, NOGROUP_GID)
    os.chmod(export, 0o600)
    st = os.stat(export)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY_UID, NOGROUP_GID, 0o600)


def layer_files(export):
    return [l["file"] for l in chain_info(export)["layers"]]


# ---------------------------------------------------------------- tests

PATTERN_LBA = 2048       # 1 MiB
MARK_LBA = 4096          # 2 MiB


@needs_qemu
@pytest.mark.parametrize("bus", ["virtio", "ide", "libvirt"])
def test_guest_reads_and_writes_the_export(image_dir, world_mountpoint, tmp_path, bus):
    """The guest, unprivileged, boots from the export, finds the pattern
    (half of it in the raw base, half written through the export into the
    qcow2 overlay) and its marker lands in the active layer."""
    base, top = make_vm(image_dir)
    seed = 0x1234
    block = pattern(seed, PATTERN_SECTORS * SECTOR)
    half = len(block) // 2
    # The first half lives in the base: the guest's read crosses layers.
    with open(base, "r+b") as f:
        f.seek(PATTERN_LBA * SECTOR)
        f.write(block[:half])
    with mounted(image_dir, world_mountpoint, "-o", "allow_other", wait_export="vm") as m:
        exp = m.path("vm")
        write_at(exp, 0, boot_sector(seed, PATTERN_LBA, MARK_LBA))
        write_at(exp, PATTERN_LBA * SECTOR + half, block[half:])
        # Owned by root, mode 0644: nobody cannot open it for writing, and
        # qemu fails to start (a control that the user and the permission
        # checks are real).
        rc, out = finish_guest(start_guest(exp, bus))
        assert rc == 1 and "Permission denied" in out, (rc, out)
        give_to_nobody(exp)
        run_guest(exp, bus)
        marker = slot_data(seed, 0)
        assert read_at(exp, MARK_LBA * SECTOR, len(marker)) == marker
        # The pattern the guest read is unchanged.
        assert read_at(exp, PATTERN_LBA * SECTOR, len(block)) == block
    qemu_img_check(top)
    assert image_bytes(top, "qcow2", MARK_LBA * SECTOR, len(marker), tmp_path) == marker
    # The marker is in the overlay only: the base holds zeros there.
    qemu_io(base, "read -P 0 %d %d" % (MARK_LBA * SECTOR, len(marker)), fmt="raw",
            extra=("-r",))


@needs_qemu
def test_guest_detects_a_wrong_pattern(image_dir, world_mountpoint):
    """The guest's check is real: one flipped bit in the pattern and it
    exits with GUEST_MISMATCH and writes nothing."""
    make_vm(image_dir)
    seed = 0x4321
    block = bytearray(pattern(seed, PATTERN_SECTORS * SECTOR))
    block[3 * SECTOR + 17] ^= 0x01
    with mounted(image_dir, world_mountpoint, "-o", "allow_other", wait_export="vm") as m:
        exp = m.path("vm")
        write_at(exp, 0, boot_sector(seed, PATTERN_LBA, MARK_LBA))
        write_at(exp, PATTERN_LBA * SECTOR, bytes(block))
        give_to_nobody(exp)
        rc, out = finish_guest(start_guest(exp, "libvirt"))
        assert rc == (GUEST_MISMATCH << 1) | 1, "qemu exit %d (%s):\n%s" % (
            rc, EXIT_MEANING.get(rc, "qemu itself failed"), out)
        assert read_at(exp, MARK_LBA * SECTOR, PATTERN_SECTORS * SECTOR) == \
            b"\0" * (PATTERN_SECTORS * SECTOR)


LOOP_SLOTS = 64
STOP_LBA = 8192          # 4 MiB
DONE_LBA = 8200
# A bound on the looping guest's writes, so that its 16-bit count never
# wraps (nor reaches 0xffff, which marks an unwritten slot) however slowly
# the commit runs; normally the test stops it long before.
LOOP_MAX_WRITES = 0xfff0


class LoopingGuest:
    """A guest that checks the pattern of `seed` at pattern_lba, then
    writes slot after slot (LOOP_SLOTS slots from MARK_LBA) until the test
    writes STOP_MAGIC to STOP_LBA.  Use as a context manager: it is killed
    if the test fails before it stops."""

    def __init__(self, export, seed, pattern_lba):
        self.export = export
        self.seed = seed
        # Slots start as 0xff so that the first write to each is seen.
        write_at(export, MARK_LBA * SECTOR, b"\xff" * (LOOP_SLOTS * PATTERN_SECTORS * SECTOR))
        write_at(export, STOP_LBA * SECTOR, b"\0" * SECTOR)
        write_at(export, 0, boot_sector(seed, pattern_lba, MARK_LBA, slots=LOOP_SLOTS,
                                        max_writes=LOOP_MAX_WRITES,
                                        stop_lba=STOP_LBA, done_lba=DONE_LBA))
        self.proc = None
        self.total = None

    def __enter__(self):
        self.proc = start_guest(self.export, "libvirt")
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return False

    def slot_headers(self):
        """The write count k of each slot as the export shows it now
        (0xffff where the guest has not written yet)."""
        data = read_at(self.export, MARK_LBA * SECTOR,
                       LOOP_SLOTS * PATTERN_SECTORS * SECTOR)
        return [struct.unpack_from("<H", data, j * PATTERN_SECTORS * SECTOR)[0]
                for j in range(LOOP_SLOTS)]

    def writes(self):
        """How many writes the guest has made, as far as the slots show."""
        ks = [k for k in self.slot_headers() if k != 0xffff]
        return max(ks) + 1 if ks else 0

    def wait_writes(self, n, what):
        def wrote():
            if self.proc.poll() is not None:
                raise AssertionError("guest exited %d early (%s):\n%s" % (
                    self.proc.returncode, EXIT_MEANING.get(self.proc.returncode, "?"),
                    self.proc.stdout.read()))
            return self.writes() >= n
        wait_for(wrote, timeout=120, what=what)

    def stop(self):
        """Ask the guest to stop, wait for it, return its number of writes."""
        write_at(self.export, STOP_LBA * SECTOR, STOP_MAGIC + b"\0" * (SECTOR - 4))
        rc, out = finish_guest(self.proc)
        assert rc == (GUEST_OK << 1) | 1, "qemu exit %d (%s):\n%s" % (
            rc, EXIT_MEANING.get(rc, "qemu itself failed"), out)
        done = read_at(self.export, DONE_LBA * SECTOR, 6)
        assert done[:4] == DONE_MAGIC, done
        self.total = struct.unpack("<H", done[4:])[0]
        return self.total

    def expected_slots(self):
        """Slot j holds the guest's last write to it: the largest k < total
        with k % LOOP_SLOTS == j."""
        expected = bytearray()
        for j in range(LOOP_SLOTS):
            k = j + ((self.total - 1 - j) // LOOP_SLOTS) * LOOP_SLOTS
            expected += slot_data(self.seed, k)
        return bytes(expected)


def save_export(export, path):
    with open(export, "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)


def assert_base_holds(base, guest, served):
    """The raw base holds the guest's last writes and is, whole, the disk
    the guest saw (`served`, read through the export before the unmount)."""
    expected = guest.expected_slots()
    with open(base, "rb") as f:
        f.seek(MARK_LBA * SECTOR)
        assert f.read(len(expected)) == expected
        f.seek(DONE_LBA * SECTOR)
        assert f.read(6) == DONE_MAGIC + struct.pack("<H", guest.total)
    qemu_img("compare", "-f", "raw", "-F", "raw", base, str(served))


@needs_qemu
def test_guest_across_snapshot_and_active_commit(image_dir, world_mountpoint, tmp_path):
    """libvirt's workflow with the guest running: a guest run, a live
    snapshot (the next run's writes land in the new overlay), then
    `chainctl commit --active --pivot --wait` while the guest keeps
    writing; the raw base ends with everything.  After a restart of
    chainfs the guest user still owns the disk and boots from it."""
    base, top = make_vm(image_dir)
    snap = os.path.join(str(image_dir), "snap.qcow2")
    seed1, seed2 = 0x0101, 0xbeef
    block1 = pattern(seed1, PATTERN_SECTORS * SECTOR)
    block2 = pattern(seed2, PATTERN_SECTORS * SECTOR)
    with mounted(image_dir, world_mountpoint, "-o", "allow_other", wait_export="vm") as m:
        exp = m.path("vm")
        write_at(exp, 0, boot_sector(seed1, PATTERN_LBA, MARK_LBA))
        write_at(exp, PATTERN_LBA * SECTOR, block1)
        write_at(exp, (PATTERN_LBA + PATTERN_SECTORS) * SECTOR, block2)
        give_to_nobody(exp)
        run_guest(exp, "libvirt")
        assert read_at(exp, MARK_LBA * SECTOR, PATTERN_SECTORS * SECTOR) == slot_data(seed1, 0)

        run([CHAINCTL, "snapshot", exp, "snap.qcow2"])
        assert layer_files(exp) == ["snap.qcow2", "vm.qcow2", "base.img"]
        # The export keeps its owner across the snapshot: nobody opens it again.
        st = os.stat(exp)
        assert (st.st_uid, st.st_gid) == (NOBODY_UID, NOGROUP_GID)
        top_after_snapshot = file_sha256(top)

        with LoopingGuest(exp, seed2, PATTERN_LBA + PATTERN_SECTORS) as guest:
            guest.wait_writes(1, "the guest's first write")
            assert_qemu_as_libvirt_runs_it(guest.proc.pid, exp)
            # The guest's writes land in the new overlay: the old active
            # layer's file is as the snapshot left it.
            guest.wait_writes(LOOP_SLOTS + 1, "a round of guest writes")
            assert file_sha256(top) == top_after_snapshot
            res = run([CHAINCTL, "commit", exp, "--active", "--pivot", "--wait"],
                      timeout=300)
            assert "Successfully pivoted" in res.stdout, res.stdout
            assert layer_files(exp) == ["base.img"]
            # The guest writes on, now into the base, over every slot.
            after_pivot = guest.writes()
            guest.wait_writes(after_pivot + LOOP_SLOTS + 1, "guest writes after the pivot")
            total = guest.stop()
        assert total > after_pivot + LOOP_SLOTS
        st = os.stat(exp)
        assert (st.st_uid, st.st_gid) == (NOBODY_UID, NOGROUP_GID)
        save_export(exp, tmp_path / "served.raw")
    assert_base_holds(base, guest, tmp_path / "served.raw")
    # The dropped overlays are still sound qcow2 files.
    qemu_img_check(top)
    qemu_img_check(snap)

    # The host restarts chainfs: the disk is still the guest user's, and
    # the guest boots from it again as that user.
    with mounted(image_dir, world_mountpoint, "-o", "allow_other", wait_export="vm") as m:
        exp = m.path("vm")
        st = os.stat(exp)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY_UID, NOGROUP_GID, 0o600)
        write_at(exp, 0, boot_sector(seed1, PATTERN_LBA, MARK_LBA))
        run_guest(exp, "libvirt")
    with open(base, "rb") as f:
        f.seek(MARK_LBA * SECTOR)
        assert f.read(PATTERN_SECTORS * SECTOR) == slot_data(seed1, 0)


@needs_qemu
def test_guest_writes_through_ready_phase_then_pivot(image_dir, world_mountpoint, tmp_path):
    """The guest writes while the active commit is in ready (its writes
    reach the overlay and the base) and across the pivot: `commit --active
    --wait` stops at ready, the test waits for a full round of guest writes
    there, then `job --pivot`."""
    base, top = make_vm(image_dir)
    seed = 0x5a5a
    block = pattern(seed, PATTERN_SECTORS * SECTOR)
    with mounted(image_dir, world_mountpoint, "-o", "allow_other", wait_export="vm") as m:
        exp = m.path("vm")
        write_at(exp, PATTERN_LBA * SECTOR, block)
        give_to_nobody(exp)
        with LoopingGuest(exp, seed, PATTERN_LBA) as guest:
            guest.wait_writes(1, "the guest's first write")
            res = run([CHAINCTL, "commit", exp, "--active", "--wait"], timeout=300)
            assert "synchronized phase" in res.stdout, res.stdout
            assert job_info(exp)["state"] == "ready"
            in_ready = guest.writes()
            guest.wait_writes(in_ready + LOOP_SLOTS + 1, "guest writes in ready")
            assert job_info(exp)["state"] == "ready"
            res = run([CHAINCTL, "job", exp, "--pivot", "--wait"], timeout=300)
            assert "pivoted" in res.stdout, res.stdout
            assert layer_files(exp) == ["base.img"]
            after_pivot = guest.writes()
            guest.wait_writes(after_pivot + LOOP_SLOTS + 1, "guest writes after the pivot")
            guest.stop()
        save_export(exp, tmp_path / "served.raw")
    assert_base_holds(base, guest, tmp_path / "served.raw")
    qemu_img_check(top)


# libvirt's DAC driver (qemu.conf remember_owner = 1, the default) keeps a
# disk's original owner in trusted.libvirt.security.* attributes before it
# chowns the disk.  It reads the refcount attribute first: ENOTSUP or ENOSYS
# there means "no xattrs on this file system" and it just chowns; ENODATA
# means "not remembered yet", and it then sets the owner, a timestamp and
# the refcount, failing the domain's start if any of them fails.
LIBVIRT_DAC_XATTRS = (("trusted.libvirt.security.dac", b"+0:+0"),
                      ("trusted.libvirt.security.timestamp_dac", b"1733616000"),
                      ("trusted.libvirt.security.ref_dac", b"1"))


def test_libvirt_remember_owner_probe(image_dir, world_mountpoint):
    """libvirt's remember-owner sequence on the export either is skipped
    (the probe says there are no xattrs) or succeeds in full."""
    make_vm(image_dir)
    with mounted(image_dir, world_mountpoint, "-o", "allow_other", wait_export="vm") as m:
        exp = m.path("vm")
        try:
            os.getxattr(exp, "trusted.libvirt.security.ref_dac")
            probe = 0
        except OSError as e:
            probe = e.errno
        # chainfs keeps no such attribute: the probe must say so.
        assert probe in (errno.ENOTSUP, errno.ENOSYS), os.strerror(probe)
        if probe not in (errno.ENOTSUP, errno.ENOSYS):
            for name, value in LIBVIRT_DAC_XATTRS:
                os.setxattr(exp, name, value)
            # At the domain's stop libvirt reads the owner back to restore it.
            assert os.getxattr(exp, "trusted.libvirt.security.dac") == b"+0:+0"
        give_to_nobody(exp)
        # The stop: libvirt restores the owner it remembered (root here).
        os.chown(exp, 0, 0)
        assert (os.stat(exp).st_uid, os.stat(exp).st_gid) == (0, 0)
