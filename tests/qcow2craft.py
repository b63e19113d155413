"""Read and patch the metadata of a qcow2 image made by qemu-img.

A small, deliberate tool for making hostile images: it parses the header,
the L1 table, L2 tables, the refcount table and the snapshot table with
`struct` (layout: QEMU's docs/interop/qcow2.txt) and overwrites single
entries in place.  It never allocates nor fixes anything: the point is
to produce exactly the corruption a test names.
"""
import os
import struct

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00

HDR_INCOMPAT = 72
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1

EXT_BITMAPS = 0x23852875


class Qcow2:
    """One image file; every read goes to the file (no caching)."""

    def __init__(self, path):
        self.path = str(path)
        h = self._read(0, 104)
        (magic, self.version, self.backing_offset, self.backing_size,
         self.cluster_bits, self.size, self.crypt, self.l1_size,
         self.l1_offset, self.rt_offset, self.rt_clusters, self.nb_snapshots,
         self.snapshots_offset) = struct.unpack(">IIQIIQIIQQIIQ", h[:72])
        assert magic == 0x514649FB, "not qcow2: %s" % path
        self.cluster_size = 1 << self.cluster_bits
        self.l2_entries = self.cluster_size // 8
        if self.version >= 3:
            (self.incompat, self.compat, self.autoclear, self.refcount_order,
             self.header_length) = struct.unpack(">QQQII", h[72:104])
        else:
            self.incompat = self.compat = self.autoclear = 0
            self.refcount_order, self.header_length = 4, 72

    # -- raw access ------------------------------------------------------
    def _read(self, off, n):
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def write(self, off, data):
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(data)

    def read_u64(self, off):
        return struct.unpack(">Q", self._read(off, 8))[0]

    def write_u64(self, off, v):
        self.write(off, struct.pack(">Q", v))

    def patch_header(self, off, fmt, value):
        """Overwrite one header field (struct format, big-endian)."""
        self.write(off, struct.pack(">" + fmt, value))

    def file_size(self):
        return os.path.getsize(self.path)

    # -- tables ----------------------------------------------------------
    def l1(self, i):
        return self.read_u64(self.l1_offset + 8 * i)

    def set_l1(self, i, v):
        self.write_u64(self.l1_offset + 8 * i, v)

    def l2_offset(self, l1_index):
        return self.l1(l1_index) & OFFSET_MASK

    def _l2_slot(self, guest_offset):
        gc = guest_offset // self.cluster_size
        l1i, l2i = divmod(gc, self.l2_entries)
        table = self.l2_offset(l1i)
        assert table, "no L2 table for guest offset %d" % guest_offset
        return table + 8 * l2i

    def l2(self, guest_offset):
        """The L2 entry of the cluster holding guest_offset."""
        return self.read_u64(self._l2_slot(guest_offset))

    def set_l2(self, guest_offset, v):
        self.write_u64(self._l2_slot(guest_offset), v)

    def host_offset(self, guest_offset):
        """Host offset of a normal (uncompressed) data cluster."""
        e = self.l2(guest_offset)
        assert e & OFFSET_MASK and not e & COMPRESSED, hex(e)
        return e & OFFSET_MASK

    def guest_span(self):
        """Guest bytes one L2 table covers."""
        return self.l2_entries * self.cluster_size

    def rt(self, i):
        return self.read_u64(self.rt_offset + 8 * i)

    def refcount_block(self, i=0):
        return self.rt(i) & ~0x1FF

    # -- compressed descriptors -------------------------------------------
    def _csize_shift(self):
        return 62 - (self.cluster_bits - 8)

    def compressed(self, l2e):
        """(host offset, descriptor bytes) of a compressed L2 entry."""
        shift = self._csize_shift()
        off = l2e & ((1 << shift) - 1)
        nb = ((l2e >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        return off, nb * 512 - (off & 511)

    def make_compressed(self, host, sectors):
        """A compressed L2 entry for `sectors` 512-byte sectors at host."""
        return COMPRESSED | ((sectors - 1) << self._csize_shift()) | host

    # -- snapshots and extensions ----------------------------------------
    def snapshot_entries(self):
        """[(entry offset, l1_offset, l1_size)] of the snapshot table."""
        out, pos = [], self.snapshots_offset
        for _ in range(self.nb_snapshots):
            e = self._read(pos, 40)
            l1o, l1s, ids, names = struct.unpack(">QIHH", e[:16])
            extra = struct.unpack(">I", e[36:40])[0]
            out.append((pos, l1o, l1s))
            pos += (40 + extra + ids + names + 7) & ~7
        return out

    def extensions(self):
        """{type: (offset of its data, length)} of the header extensions."""
        out, off = {}, self.header_length
        end = self.backing_offset or self.cluster_size
        while off + 8 <= end:
            t, n = struct.unpack(">II", self._read(off, 8))
            if t == 0:
                break
            out[t] = (off + 8, n)
            off += 8 + ((n + 7) & ~7)
        return out
