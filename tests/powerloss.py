"""Power-loss states from a record of writes and flushes (CrashMonkey's method).

tests/iorecord.c records, in one global order, every write, size change,
flush and name change a process makes to the files of one directory.  From a
copy of that directory taken before the process started, and that record,
`crash_state()` builds a directory as a power cut at record K may have left
it on disk.  What is modelled, and why:

  * File content.  Every change to a file (write, truncate, fallocate, a
    truncating open) recorded before the S line of a flush of that file
    (fsync or fdatasync) whose completion (its s line) precedes K is on
    disk: fdatasync writes back the data and the metadata needed to read
    it, the size included (POSIX, and what ext4 and XFS do).  Changes after
    that flush and before K are each either lost or kept, independently
    (the page cache writes back pages in any order); a kept write is torn
    at 4 KiB pages, the unit of write-back: all of its pages, a random
    prefix of them, or a random subset.  A size change is kept or lost as
    a whole.  A flush that had not returned at K guarantees nothing.
  * Names.  Creating, renaming, linking and unlinking a name are changes
    to the directory: they are on disk once an fsync of the directory that
    started after them has returned.  ext4 also commits them when an fsync
    of the file runs a journal commit, but POSIX does not promise it and
    XFS or ext4 with fast commits need not do it: not modelled (stricter).
    Changes not yet covered reach the disk as a prefix, in their order:
    every journaling file system commits metadata in transaction order, so
    a rename is never on disk without the create before it; a subset model
    would flag states no file system produces.
  * A file's content belongs to its inode, not its name: a write through a
    name later renamed lands in the renamed file; a name whose create is
    not on disk does not exist, whatever was flushed through it.

The test appends marker lines ("0 M WORD N") to the log itself (O_APPEND,
one write per line, so they are ordered with the recorder's lines).
"""
import os
import random
import urllib.parse

PAGE = 4096

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


class Record:
    """One line of the log: op, index in the log, and its fields."""
    __slots__ = ("index", "op", "path", "path2", "off", "length", "dataoff",
                 "sync_id", "kind", "rc", "word", "value", "trunc", "mode")

    def __init__(self, index, op):
        self.index = index
        self.op = op
        for s in self.__slots__[2:]:
            setattr(self, s, None)

    def __repr__(self):
        fields = ["%s=%r" % (s, getattr(self, s)) for s in self.__slots__
                  if getattr(self, s) is not None]
        return "Record(%s)" % ", ".join(fields)


def _path(s):
    return urllib.parse.unquote(s)


def parse_log(log_path):
    """Return the list of Records of log_path, in file order."""
    records = []
    with open(log_path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            r = Record(len(records), parts[1])
            a = parts[2:]
            if r.op == "W":
                r.path, r.off, r.length, r.dataoff = _path(a[0]), int(a[1]), int(a[2]), int(a[3])
            elif r.op == "T":
                r.path, r.length = _path(a[0]), int(a[1])
            elif r.op == "A":
                r.path, r.mode, r.off, r.length = _path(a[0]), int(a[1]), int(a[2]), int(a[3])
            elif r.op == "C":
                r.path, r.trunc = _path(a[0]), a[1] == "1"
            elif r.op in ("N", "L"):
                r.path, r.path2 = _path(a[0]), _path(a[1])
            elif r.op == "U":
                r.path = _path(a[0])
            elif r.op == "S":
                r.sync_id, r.path, r.kind = int(a[0]), _path(a[1]), a[2]
            elif r.op == "s":
                r.sync_id, r.rc = int(a[0]), int(a[1])
            elif r.op == "R":
                r.path = _path(a[0])
            elif r.op == "M":
                r.word, r.value = a[0], int(a[1])
            else:
                raise ValueError("unknown record %r" % line)
            records.append(r)
    return records


def append_marker(log_path, word, value):
    """Append "0 M WORD VALUE" to the log, ordered with the recorder's lines."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"0 M %s %d\n" % (word.encode(), value))
    finally:
        os.close(fd)


class Recording:
    """A recorded run: the directory as it was before, the log, the data."""

    def __init__(self, initial_dir, recorded_dir, log_path, data_path):
        self.recorded_dir = os.path.realpath(recorded_dir)
        self.records = parse_log(log_path)
        with open(data_path, "rb") as f:
            self.data = memoryview(f.read())
        self.initial = {}   # name -> bytes
        for name in sorted(os.listdir(initial_dir)):
            p = os.path.join(initial_dir, name)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    self.initial[name] = f.read()
        self._resolve_inodes()

    def _name(self, path):
        """The name in the directory of a recorded absolute path, or None."""
        if path is None or os.path.dirname(path) != self.recorded_dir:
            return None
        return os.path.basename(path)

    def _resolve_inodes(self):
        """Give each record the inode it acts on, by replaying the names as
        the process saw them (the live namespace, not the durable one).

        Sets self.inode_of[i] for file records, self.ns_ops (directory
        changes, in order), self.syncs (S index -> (inode or 'dir', s index
        or None)) and self.ninodes."""
        live = {}
        self.init_inode = {}
        for n, name in enumerate(self.initial):
            live[name] = n
            self.init_inode[name] = n
        next_inode = len(self.initial)
        self.inode_of = {}
        self.ns_ops = []   # (index, op, name, name2, inode)
        self.syncs = []    # (S index, target, s index)
        open_syncs = {}
        for r in self.records:
            name = self._name(r.path)
            if r.op == "C":
                if name not in live:
                    live[name] = next_inode
                    self.ns_ops.append((r.index, "C", name, None, next_inode))
                    next_inode += 1
                elif r.trunc:
                    self.inode_of[r.index] = live[name]
            elif r.op in ("W", "T", "A"):
                if name in live:
                    self.inode_of[r.index] = live[name]
            elif r.op == "N":
                name2 = self._name(r.path2)
                ino = live.pop(name, None)
                if name2 is not None and ino is not None:
                    live[name2] = ino
                self.ns_ops.append((r.index, "N", name, name2, ino))
            elif r.op == "L":
                name2 = self._name(r.path2)
                if name in live and name2 is not None:
                    live[name2] = live[name]
                    self.ns_ops.append((r.index, "L", name, name2, live[name]))
            elif r.op == "U":
                if name in live:
                    self.ns_ops.append((r.index, "U", name, None, live.pop(name)))
            elif r.op == "S":
                if r.kind == "d":
                    target = "dir" if os.path.realpath(r.path) == self.recorded_dir else None
                else:
                    target = live.get(name)
                open_syncs[r.sync_id] = len(self.syncs)
                self.syncs.append([r.index, target, None, None])
            elif r.op == "s":
                k = open_syncs.pop(r.sync_id, None)
                if k is not None:
                    self.syncs[k][2] = r.index
                    self.syncs[k][3] = r.rc
        self.ninodes = next_inode

    def markers(self, word):
        """[(index, value)] of the test's marker lines with that word."""
        return [(r.index, r.value) for r in self.records
                if r.op == "M" and r.word == word]

    def covered_before(self, k):
        """For a crash at record k: {inode or 'dir': index of the S line of
        the last flush of it that completed before k}."""
        cover = {}
        for s_index, target, done, rc in self.syncs:
            if target is not None and done is not None and done < k and rc == 0:
                cover[target] = max(cover.get(target, -1), s_index)
        return cover

    # ------------------------------------------------------------ one state

    def _apply(self, f, r, pages=None):
        """Apply file record r to FileState f (only the 4 KiB pages of the
        file in `pages`, for a torn write)."""
        if r.op == "W":
            end = r.off + r.length
            if pages is None:
                spans = [(r.off, end)]
            else:
                spans = [(max(r.off, p * PAGE), min(end, (p + 1) * PAGE)) for p in pages]
            for a, b in spans:
                f.write(a, self.data[r.dataoff + a - r.off:r.dataoff + b - r.off])
        elif r.op in ("T", "C"):
            f.truncate(0 if r.op == "C" else r.length)
        elif r.op == "A":
            end = r.off + r.length
            if not r.mode & FALLOC_FL_KEEP_SIZE and end > f.size:
                f.size = end
            if r.mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
                f.zero(r.off, end)

    @staticmethod
    def _torn_pages(rng, r):
        """Which 4 KiB pages of a not yet flushed write reach the disk:
        None for all of them, else a list (possibly empty)."""
        first, last = r.off // PAGE, (r.off + r.length - 1) // PAGE
        pages = list(range(first, last + 1))
        how = rng.random()
        if how < 0.3:
            return []                       # lost
        if how < 0.6 or len(pages) == 1:
            return None                     # whole
        if how < 0.8:
            return pages[:rng.randrange(0, len(pages))]   # a prefix
        return [p for p in pages if rng.random() < 0.5]  # any subset

    def crash_state(self, k, seed):
        """{name: FileState} of the directory after a power cut at record k
        (records[:k] happened), the choices drawn from seed.  Each
        FileState's `sig` names the choices that made it: two states with
        the same signatures are the same."""
        rng = random.Random(seed)
        cover = self.covered_before(k)
        files = [FileState(ino) for ino in range(self.ninodes)]
        for name, n in self.init_inode.items():
            files[n].buf[:] = self.initial[name]
            files[n].size = len(self.initial[name])
        for r in self.records[:k]:
            ino = self.inode_of.get(r.index)
            if ino is None:
                continue
            if r.index < cover.get(ino, -1):
                self._apply(files[ino], r)
                files[ino].sig.append(r.index)
            elif r.op == "W":
                pages = self._torn_pages(rng, r)
                if pages != []:
                    self._apply(files[ino], r, pages)
                    files[ino].sig.append((r.index, None if pages is None else tuple(pages)))
            elif rng.random() < 0.5:
                self._apply(files[ino], r)
                files[ino].sig.append(r.index)
        names = dict(self.init_inode)
        dir_cover = cover.get("dir", -1)
        pending = [op for op in self.ns_ops if op[0] < k]
        durable = [op for op in pending if op[0] < dir_cover]
        rest = [op for op in pending if op[0] >= dir_cover]
        for op in durable + rest[:rng.randrange(0, len(rest) + 1)]:
            _, what, name, name2, ino = op
            if what == "C":
                names[name] = ino
            elif what == "N":
                ino = names.pop(name, ino)
                if name2 is not None:
                    names[name2] = ino
            elif what == "L":
                names[name2] = ino
            elif what == "U":
                names.pop(name, None)
        return {name: files[ino] for name, ino in names.items()}


class FileState:
    """One inode's content in a crash state: the bytes up to the last one
    written (buf) and the size (the rest reads as zeros)."""

    def __init__(self, inode):
        self.buf = bytearray()
        self.size = 0
        self.sig = [inode]

    def write(self, off, data):
        end = off + len(data)
        if len(self.buf) < off:
            self.buf.extend(bytes(off - len(self.buf)))
        self.buf[off:end] = data
        self.size = max(self.size, end)

    def truncate(self, size):
        if size < len(self.buf):
            del self.buf[size:]
        self.size = size

    def zero(self, start, end):
        end = min(end, len(self.buf))
        if end > start:
            self.buf[start:end] = bytes(end - start)

    def signature(self):
        return tuple(self.sig)

    def content(self):
        """The whole file as bytes (for a small file: the state file)."""
        return bytes(self.buf) + bytes(self.size - len(self.buf))


def write_state(state, out_dir):
    """Write {name: FileState} into the empty directory out_dir, sparsely
    (runs of 64 KiB of zeros are left as holes)."""
    chunk = 64 * 1024
    zero = bytes(chunk)
    for name, f in state.items():
        fd = os.open(os.path.join(out_dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(f.buf)
            for off in range(0, len(view), chunk):
                piece = view[off:off + chunk]
                if piece != zero[:len(piece)]:
                    os.pwrite(fd, piece, off)
            os.ftruncate(fd, f.size)
        finally:
            os.close(fd)


def crash_points(recording, count, seed, variants=4):
    """Seeded crash points as (k, seed): every record right after which the
    directory changed or a flush began or ended (the moments an ordering bug
    shows), each with `variants` seeds of the lost, kept and torn choices,
    and a seeded sample of the other records with one seed each; at most
    count in all, in log order."""
    rng = random.Random(seed)
    n = len(recording.records)
    key = set()
    for r in recording.records:
        if r.op in ("C", "N", "U", "L", "s"):
            key.add(r.index + 1)
        if r.op == "S":
            key.add(r.index)
    key.discard(0)
    others = [i for i in range(1, n + 1) if i not in key]
    points = [(k, rng.randrange(1 << 30)) for k in sorted(key) for _ in range(variants)]
    if len(points) > count * 3 // 4:
        points = rng.sample(points, count * 3 // 4)
    points += [(k, rng.randrange(1 << 30))
               for k in rng.sample(others, min(len(others), count - len(points)))]
    return sorted(points)
