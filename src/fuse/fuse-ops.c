/*
 * fuse-ops.c: the FUSE low-level operations of chainfs.
 *
 * The mount root holds one regular file per export and the control file.
 * Nothing here keeps state of its own beyond the control file's per-open
 * handles: every request resolves its inode through the daemon's fixed
 * export list and calls src/chain (guest I/O, which takes the chain's
 * topology lock itself) or control.c.  The I/O handlers return the
 * library's negative errno to the kernel as a positive one, and never
 * hold a lock across a reply.  The I/O handlers (read, write, fsync,
 * fallocate) count each request of an export in its stats
 * (export-stats.h), with no lock.
 *
 * Handlers run on the threads of fuse_session_loop_mt, many at once; a
 * handler blocked in a drain (snapshot, pivot) blocks only its thread.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fuse.h>
#include <poll.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <fuse_lowlevel.h>

#include "chain-io.h"
#include "chain-log.h"
#include "export.h"

#define CHAINFS_XATTR_PREFIX "user.chainfs."
/* Short: the chain's allocation and times change under the kernel's feet
 * (writes, jobs); only the size is stable. */
#define CHAINFS_ATTR_TIMEOUT 1.0
#define CHAINFS_MAX_IO (1024 * 1024)

static Daemon *req_daemon(fuse_req_t req)
{
    return fuse_req_userdata(req);
}

/*
 * An export's I/O request answered with err (0: success without data),
 * counted in its stats first (export-stats.h says why before the reply).
 */
static void io_reply_err(fuse_req_t req, Export *e, ExportOp op, int err)
{
    export_stats_end(&e->stats, op, 0, err);
    fuse_reply_err(req, err);
}

static void stat_root(Daemon *d, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = CHAINFS_ROOT_INO;
    st->st_mode = S_IFDIR | 0755;
    st->st_nlink = 2;
    st->st_uid = d->uid;
    st->st_gid = d->gid;
    st->st_blksize = 4096;
    st->st_atim = st->st_mtim = st->st_ctim = d->start_time;
}

static void stat_control(Daemon *d, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = CHAINFS_CONTROL_INO;
    st->st_mode = S_IFREG | 0644;
    st->st_nlink = 1;
    st->st_uid = d->uid;
    st->st_gid = d->gid;
    st->st_blksize = 4096;
    st->st_atim = st->st_mtim = st->st_ctim = d->start_time;
}

/* The event file: read-only, a stream (events.h). */
static void stat_events(Daemon *d, struct stat *st)
{
    stat_control(d, st);
    st->st_ino = CHAINFS_EVENTS_INO;
    st->st_mode = S_IFREG | 0444;
}

/* Attributes of any inode; FALSE when ino is unknown. */
static bool stat_ino(Daemon *d, fuse_ino_t ino, struct stat *st)
{
    Export *e;

    if (ino == CHAINFS_ROOT_INO) {
        stat_root(d, st);
        return true;
    }
    if (ino == CHAINFS_CONTROL_INO) {
        stat_control(d, st);
        return true;
    }
    if (ino == CHAINFS_EVENTS_INO) {
        stat_events(d, st);
        return true;
    }
    e = daemon_export_by_ino(d, ino);
    if (!e) {
        return false;
    }
    export_stat(d, e, st);
    return true;
}

static void chainfs_init(void *userdata, struct fuse_conn_info *conn)
{
    /* Large requests: a hypervisor's 1 MiB I/O reaches us in one piece. */
    conn->max_write = CHAINFS_MAX_IO;
    /* Must equal the max_read mount option daemon.c adds. */
    conn->max_read = CHAINFS_MAX_IO;
    conn->max_readahead = CHAINFS_MAX_IO;
    /* Nothing here is setuid: the kernel need not ask for
     * security.capability before every write. */
    if (conn->capable & FUSE_CAP_HANDLE_KILLPRIV) {
        conn->want |= FUSE_CAP_HANDLE_KILLPRIV;
    }
    /* A truncating open must reach open() so that it can be refused. */
    if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC) {
        conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
    }
    /* Writes go straight to the chain; the kernel must not cache them. */
    conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
}

static void chainfs_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    Daemon *d = req_daemon(req);
    struct fuse_entry_param ep;
    Export *e;

    memset(&ep, 0, sizeof(ep));
    if (parent != CHAINFS_ROOT_INO) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    if (strcmp(name, CHAINFS_CONTROL_NAME) == 0) {
        stat_control(d, &ep.attr);
    } else if (strcmp(name, CHAINFS_EVENTS_NAME) == 0) {
        stat_events(d, &ep.attr);
    } else if ((e = daemon_export_by_name(d, name))) {
        export_stat(d, e, &ep.attr);
    } else {
        fuse_reply_err(req, ENOENT);
        return;
    }
    ep.ino = ep.attr.st_ino;
    ep.generation = 1;
    ep.attr_timeout = CHAINFS_ATTR_TIMEOUT;
    ep.entry_timeout = CHAINFS_ATTR_TIMEOUT;
    fuse_reply_entry(req, &ep);
}

static void chainfs_getattr(fuse_req_t req, fuse_ino_t ino,
                            struct fuse_file_info *fi)
{
    struct stat st;

    if (!stat_ino(req_daemon(req), ino, &st)) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fuse_reply_attr(req, &st, CHAINFS_ATTR_TIMEOUT);
}

/*
 * chmod and chown of an export go to its active layer's file, where the
 * next active layer (snapshot, pivot) and the next mount find them
 * (image-owner.c).  Replies with the error itself when it fails.
 */
static bool export_set_owner(Export *e, const struct stat *attr, int to_set,
                             fuse_req_t req)
{
    g_autoptr(GError) err = NULL;
    bool ok;

    chain_topo_rdlock(e->chain);
    ok = chain_image_set_owner(
        chain_layer(e->chain, 0),
        (to_set & FUSE_SET_ATTR_UID) ? attr->st_uid : (uid_t)-1,
        (to_set & FUSE_SET_ATTR_GID) ? attr->st_gid : (gid_t)-1,
        (to_set & FUSE_SET_ATTR_MODE) ? attr->st_mode : (mode_t)-1, &err);
    chain_topo_unlock(e->chain);
    if (!ok) {
        fuse_reply_err(req, chainfs_error_errno(err));
    }
    return ok;
}

/*
 * truncate(2) of an export to another size (as `virsh blockresize` or
 * `qemu-img resize` would): a larger size grows the chain's active layer,
 * the new range reading as zeros (merge_resize); a smaller one is EPERM, a
 * read-only export refuses any size change with EROFS, a live job on the
 * chain with EBUSY.  A refusal leaves its message in last_error.  0 or an
 * errno.
 */
static int export_resize(Daemon *d, Export *e, uint64_t size)
{
    g_autoptr(GError) err = NULL;
    uint64_t old_size = 0;

    if (!export_writable(e)) {
        chainfs_set_error(&err, EROFS, "cannot resize %s: the export is "
                          "read-only", e->name);
    } else {
        merge_resize(d->merge, e->chain, size, &old_size, &err);
    }
    if (err) {
        export_set_last_error(e, "resize", err);
        return chainfs_error_errno(err);
    }
    chainfs_log(G_LOG_LEVEL_MESSAGE, e->name, NULL, "resized from %"
                G_GUINT64_FORMAT " to %" G_GUINT64_FORMAT " bytes", old_size,
                size);
    export_touch_content(e);
    return 0;
}

/*
 * A size change is a resize (export_resize; a "change" to the current size
 * is accepted).  Mode and owner go to the active layer (export_set_owner);
 * times are kept in memory for the life of the mount, as a disk file
 * would take them.
 */
static void chainfs_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr,
                            int to_set, struct fuse_file_info *fi)
{
    Daemon *d = req_daemon(req);
    Export *e = daemon_export_by_ino(d, ino);
    struct timespec now;
    struct stat st;

    if (!e) {
        if (!stat_ino(d, ino, &st)) {
            fuse_reply_err(req, ENOENT);
        } else if (to_set & FUSE_SET_ATTR_SIZE) {
            fuse_reply_err(req, EPERM);
        } else {
            fuse_reply_attr(req, &st, CHAINFS_ATTR_TIMEOUT);
        }
        return;
    }
    if ((to_set & FUSE_SET_ATTR_SIZE) &&
        (uint64_t)attr->st_size != chain_size(e->chain)) {
        int err = export_resize(d, e, (uint64_t)attr->st_size);

        if (err) {
            fuse_reply_err(req, err);
            return;
        }
    }
    if ((to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID |
                   FUSE_SET_ATTR_GID)) && !export_set_owner(e, attr, to_set, req)) {
        return;
    }
    clock_gettime(CLOCK_REALTIME, &now);
    g_mutex_lock(&e->lock);
    if (to_set & FUSE_SET_ATTR_MODE) {
        e->mode = attr->st_mode & 07777;
    }
    if (to_set & FUSE_SET_ATTR_UID) {
        e->uid = attr->st_uid;
    }
    if (to_set & FUSE_SET_ATTR_GID) {
        e->gid = attr->st_gid;
    }
    if (to_set & FUSE_SET_ATTR_ATIME_NOW) {
        e->atime = now;
    } else if (to_set & FUSE_SET_ATTR_ATIME) {
        e->atime = attr->st_atim;
    }
    if (to_set & FUSE_SET_ATTR_MTIME_NOW) {
        e->mtime = now;
    } else if (to_set & FUSE_SET_ATTR_MTIME) {
        e->mtime = attr->st_mtim;
    }
    if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID |
                  FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME |
                  FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW)) {
        e->ctime = now;
    }
    g_mutex_unlock(&e->lock);
    export_stat(d, e, &st);
    fuse_reply_attr(req, &st, CHAINFS_ATTR_TIMEOUT);
}

/*
 * Reply to the open of an export with direct I/O, letting the kernel send
 * direct writes to it in parallel.  Without FOPEN_PARALLEL_DIRECT_WRITES
 * the kernel holds the inode lock across each direct write, so that a
 * guest's concurrent synchronous writers reach us one at a time, however
 * many threads serve requests.  The chain takes concurrent writes (the
 * qcow2 driver marks the clusters it allocates, chain-io serialises
 * overlapping writes while a job mirrors them).  libfuse 3.14's
 * fuse_file_info has no bit for the flag: the reply is built here, as
 * fuse_reply_open() builds it (fh and open flags, nothing else).  A kernel
 * without the flag ignores it.
 */
static void reply_open_parallel_writes(fuse_req_t req,
                                       const struct fuse_file_info *fi)
{
    struct fuse_open_out out;

    memset(&out, 0, sizeof(out));
    out.fh = fi->fh;
    out.open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
    fuse_reply_buf(req, (const char *)&out, sizeof(out));
}

static void chainfs_open(fuse_req_t req, fuse_ino_t ino,
                         struct fuse_file_info *fi)
{
    Daemon *d = req_daemon(req);

    if (ino == CHAINFS_EVENTS_INO) {
        /* Nothing to write to it, root included (who passes the mode). */
        if ((fi->flags & O_ACCMODE) != O_RDONLY) {
            fuse_reply_err(req, EACCES);
            return;
        }
        /* A stream: no cache, no offsets; every open is a reader of its
         * own that sees the events from now on. */
        fi->direct_io = 1;
        fi->keep_cache = 0;
        fi->nonseekable = 1;
        fi->fh = (uint64_t)(uintptr_t)event_reader_new(d->events);
        fuse_reply_open(req, fi);
        return;
    }

    if (ino == CHAINFS_CONTROL_INO) {
        /* Replies are generated per open: never cache them, and let a
         * reader see them although the file's size is 0. */
        fi->direct_io = 1;
        fi->keep_cache = 0;
        fi->nonseekable = 0;
        fi->fh = (uint64_t)(uintptr_t)ctl_handle_new();
        fuse_reply_open(req, fi);
        return;
    }
    if (ino == CHAINFS_ROOT_INO) {
        fuse_reply_err(req, EISDIR);
        return;
    }
    if (!daemon_export_by_ino(d, ino)) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    if (fi->flags & O_TRUNC) {
        /* Truncation is a size change; a disk keeps its size. */
        fuse_reply_err(req, EPERM);
        return;
    }
    /*
     * Every open bypasses the kernel's page cache, buffered ones too (a
     * hypervisor's default cache=writeback opens without O_DIRECT).
     * Through the page cache, the kernel sends a buffered open's writes
     * one at a time under the inode lock: four guest writers went no
     * faster than one (issue 12).  With direct I/O and parallel direct
     * writes they reach the chain concurrently, as O_DIRECT ones do.  The
     * other way, FUSE's writeback cache, would acknowledge writes from
     * the kernel's cache and send them later in its own order and sizes,
     * past the chain's range locks and a job's mirror; direct I/O keeps
     * one path for every write, fsync semantics as they are (each write
     * acknowledged by the chain, durable at the next flush), and reads
     * coherent with writes from any open and with jobs.  The price: no
     * kernel read-ahead or cache for buffered readers, and a shared
     * writable mmap of an export is refused (a disk image is not mapped).
     */
    fi->direct_io = 1;
    fi->keep_cache = 0;
    fi->fh = 0;
    reply_open_parallel_writes(req, fi);
}

static void chainfs_release(fuse_req_t req, fuse_ino_t ino,
                            struct fuse_file_info *fi)
{
    if (ino == CHAINFS_EVENTS_INO) {
        event_reader_free((EventReader *)(uintptr_t)fi->fh);
        fuse_reply_err(req, 0);
        return;
    }
    if (ino == CHAINFS_CONTROL_INO) {
        ctl_handle_free((CtlHandle *)(uintptr_t)fi->fh);
    }
    fuse_reply_err(req, 0);
}

static void chainfs_read(fuse_req_t req, fuse_ino_t ino, size_t size,
                         off_t off, struct fuse_file_info *fi)
{
    Daemon *d = req_daemon(req);
    g_autofree void *buf = NULL;
    uint64_t disk_size;
    Export *e;
    int ret;

    if (ino == CHAINFS_EVENTS_INO) {
        /* fi->flags are the file's flags now: fcntl(F_SETFL) counts. */
        event_reader_read((EventReader *)(uintptr_t)fi->fh, req, size,
                          (fi->flags & O_NONBLOCK) != 0);
        return;
    }
    if (ino == CHAINFS_CONTROL_INO) {
        g_autoptr(GBytes) bytes =
            ctl_handle_read(d, (CtlHandle *)(uintptr_t)fi->fh, off, size);
        gsize len;
        const void *data = g_bytes_get_data(bytes, &len);

        fuse_reply_buf(req, data, len);
        return;
    }
    e = daemon_export_by_ino(d, ino);
    if (!e) {
        fuse_reply_err(req, ino == CHAINFS_ROOT_INO ? EISDIR : ENOENT);
        return;
    }
    export_stats_begin(&e->stats);
    disk_size = chain_size(e->chain);
    if (off < 0 || (uint64_t)off >= disk_size || size == 0) {
        export_stats_end(&e->stats, EXPORT_OP_READ, 0, 0);
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    size = MIN(size, disk_size - (uint64_t)off);
    buf = g_try_malloc(size);
    if (!buf) {
        io_reply_err(req, e, EXPORT_OP_READ, ENOMEM);
        return;
    }
    ret = chain_pread(e->chain, off, buf, size);
    if (ret < 0) {
        chainfs_log(G_LOG_LEVEL_DEBUG, e->name, NULL,
                    "read of %zu bytes at %jd failed: %s", size,
                    (intmax_t)off, g_strerror(-ret));
        io_reply_err(req, e, EXPORT_OP_READ, -ret);
        return;
    }
    export_stats_end(&e->stats, EXPORT_OP_READ, size, 0);
    fuse_reply_buf(req, buf, size);
}

/*
 * A write past the end is refused, never grown: ENOSPC when it starts at
 * or past the end (as a block device answers), a short write when it
 * straddles the end.
 */
static void chainfs_write(fuse_req_t req, fuse_ino_t ino, const char *buf,
                          size_t size, off_t off, struct fuse_file_info *fi)
{
    Daemon *d = req_daemon(req);
    uint64_t disk_size;
    Export *e;
    int ret;

    if (ino == CHAINFS_CONTROL_INO) {
        ret = ctl_handle_write(d, (CtlHandle *)(uintptr_t)fi->fh, buf, size);
        if (ret < 0) {
            fuse_reply_err(req, -ret);
        } else {
            fuse_reply_write(req, size);
        }
        return;
    }
    e = daemon_export_by_ino(d, ino);
    if (!e) {
        fuse_reply_err(req, ino == CHAINFS_ROOT_INO ? EISDIR : ENOENT);
        return;
    }
    export_stats_begin(&e->stats);
    if (size == 0) {
        export_stats_end(&e->stats, EXPORT_OP_WRITE, 0, 0);
        fuse_reply_write(req, 0);
        return;
    }
    disk_size = chain_size(e->chain);
    if (off < 0 || (uint64_t)off >= disk_size) {
        io_reply_err(req, e, EXPORT_OP_WRITE, off < 0 ? EINVAL : ENOSPC);
        return;
    }
    size = MIN(size, disk_size - (uint64_t)off);
    ret = chain_pwrite(e->chain, off, buf, size);
    if (ret < 0) {
        chainfs_log(G_LOG_LEVEL_DEBUG, e->name, NULL,
                    "write of %zu bytes at %jd failed: %s", size,
                    (intmax_t)off, g_strerror(-ret));
        io_reply_err(req, e, EXPORT_OP_WRITE, -ret);
        return;
    }
    export_touch_content(e);
    export_stats_end(&e->stats, EXPORT_OP_WRITE, size, 0);
    fuse_reply_write(req, size);
}

static void chainfs_flush(fuse_req_t req, fuse_ino_t ino,
                          struct fuse_file_info *fi)
{
    /* close() promises nothing about durability; fsync does. */
    fuse_reply_err(req, 0);
}

static void chainfs_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
                          struct fuse_file_info *fi)
{
    Export *e = daemon_export_by_ino(req_daemon(req), ino);
    int ret = 0;

    if (!e) {
        fuse_reply_err(req, 0);
        return;
    }
    export_stats_begin(&e->stats);
    ret = chain_flush(e->chain);
    if (ret < 0) {
        chainfs_log(G_LOG_LEVEL_WARNING, e->name, NULL, "flush failed: %s",
                    g_strerror(-ret));
    }
    io_reply_err(req, e, EXPORT_OP_FLUSH, ret < 0 ? -ret : 0);
}

/* Only the event file waits for anything; the rest is always ready. */
static void chainfs_poll(fuse_req_t req, fuse_ino_t ino,
                         struct fuse_file_info *fi,
                         struct fuse_pollhandle *ph)
{
    if (ino == CHAINFS_EVENTS_INO) {
        event_reader_poll((EventReader *)(uintptr_t)fi->fh, req, ph);
        return;
    }
    if (ph) {
        fuse_pollhandle_destroy(ph);
    }
    fuse_reply_poll(req, POLLIN | POLLRDNORM | POLLOUT | POLLWRNORM);
}

static void chainfs_opendir(fuse_req_t req, fuse_ino_t ino,
                            struct fuse_file_info *fi)
{
    if (ino != CHAINFS_ROOT_INO) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    fuse_reply_open(req, fi);
}

/*
 * The root lists ".", "..", the control file, the event file, then the
 * exports; entry i
 * has directory offset i + 1, so a listing resumes wherever the kernel
 * stopped.
 */
static void chainfs_do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size,
                               off_t off, bool plus)
{
    Daemon *d = req_daemon(req);
    g_autofree char *buf = NULL;
    size_t used = 0;
    uint64_t count = 4 + d->exports->len;

    if (ino != CHAINFS_ROOT_INO) {
        fuse_reply_err(req, ENOTDIR);
        return;
    }
    buf = g_malloc(size);
    for (uint64_t i = off < 0 ? 0 : (uint64_t)off; i < count; i++) {
        struct fuse_entry_param ep;
        const char *name;
        size_t len;

        memset(&ep, 0, sizeof(ep));
        if (i == 0) {
            name = ".";
            stat_root(d, &ep.attr);
        } else if (i == 1) {
            name = "..";
            stat_root(d, &ep.attr);
        } else if (i == 2) {
            name = CHAINFS_CONTROL_NAME;
            stat_control(d, &ep.attr);
        } else if (i == 3) {
            name = CHAINFS_EVENTS_NAME;
            stat_events(d, &ep.attr);
        } else {
            Export *e = g_ptr_array_index(d->exports, i - 4);
            name = e->name;
            export_stat(d, e, &ep.attr);
        }
        if (plus) {
            /* "." and ".." get no entry (ino 0): the kernel must not
             * count a lookup for them. */
            if (i >= 2) {
                ep.ino = ep.attr.st_ino;
                ep.generation = 1;
                ep.attr_timeout = CHAINFS_ATTR_TIMEOUT;
                ep.entry_timeout = CHAINFS_ATTR_TIMEOUT;
            }
            len = fuse_add_direntry_plus(req, buf + used, size - used, name,
                                         &ep, (off_t)(i + 1));
        } else {
            len = fuse_add_direntry(req, buf + used, size - used, name,
                                    &ep.attr, (off_t)(i + 1));
        }
        if (len > size - used) {
            break;
        }
        used += len;
    }
    fuse_reply_buf(req, buf, used);
}

static void chainfs_readdir(fuse_req_t req, fuse_ino_t ino, size_t size,
                            off_t off, struct fuse_file_info *fi)
{
    chainfs_do_readdir(req, ino, size, off, false);
}

static void chainfs_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size,
                                off_t off, struct fuse_file_info *fi)
{
    chainfs_do_readdir(req, ino, size, off, true);
}

static void chainfs_releasedir(fuse_req_t req, fuse_ino_t ino,
                               struct fuse_file_info *fi)
{
    fuse_reply_err(req, 0);
}

/* The room and files of the image directory's filesystem. */
static void chainfs_statfs(fuse_req_t req, fuse_ino_t ino)
{
    Daemon *d = req_daemon(req);
    struct statvfs sv;

    if (statvfs(image_set_dir(d->set), &sv) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    sv.f_namemax = 255;
    fuse_reply_statfs(req, &sv);
}

/*
 * SEEK_DATA / SEEK_HOLE from what the chain allocates (zero clusters read
 * as holes).  Past the end: ENXIO, as lseek(2) says; the end is a hole.
 */
static void chainfs_lseek(fuse_req_t req, fuse_ino_t ino, off_t off,
                          int whence, struct fuse_file_info *fi)
{
    Export *e = daemon_export_by_ino(req_daemon(req), ino);
    uint64_t size, pos;

    if (!e) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (whence != SEEK_DATA && whence != SEEK_HOLE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    size = chain_size(e->chain);
    if (off < 0 || (uint64_t)off >= size) {
        fuse_reply_err(req, ENXIO);
        return;
    }
    for (pos = (uint64_t)off; pos < size;) {
        uint64_t pnum = 0;
        int kind = chain_range_kind(e->chain, pos, size - pos, &pnum);

        if (kind < 0) {
            fuse_reply_err(req, -kind);
            return;
        }
        if ((whence == SEEK_DATA && kind == CHAIN_DATA) ||
            (whence == SEEK_HOLE && kind == CHAIN_HOLE)) {
            fuse_reply_lseek(req, (off_t)pos);
            return;
        }
        if (pnum == 0) {
            fuse_reply_err(req, EIO);
            return;
        }
        pos += pnum;
    }
    if (whence == SEEK_DATA) {
        fuse_reply_err(req, ENXIO);
    } else {
        fuse_reply_lseek(req, (off_t)size);
    }
}

/*
 * Punching a hole (with KEEP_SIZE, as Linux requires) and zeroing a range
 * both make the range read as zeros, stored as zero clusters where whole
 * clusters are covered.  The size never changes; other modes (allocate,
 * collapse, insert) make no sense for a disk: EOPNOTSUPP.
 */
static void chainfs_fallocate(fuse_req_t req, fuse_ino_t ino, int mode,
                              off_t off, off_t length,
                              struct fuse_file_info *fi)
{
    Export *e = daemon_export_by_ino(req_daemon(req), ino);
    uint64_t size, end;
    int ret;

    if (!e) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    export_stats_begin(&e->stats);
    if (mode != (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) &&
        mode != FALLOC_FL_ZERO_RANGE &&
        mode != (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)) {
        io_reply_err(req, e, EXPORT_OP_DISCARD, EOPNOTSUPP);
        return;
    }
    if (off < 0 || length <= 0) {
        io_reply_err(req, e, EXPORT_OP_DISCARD, EINVAL);
        return;
    }
    size = chain_size(e->chain);
    end = (uint64_t)off + (uint64_t)length;
    if (!(mode & FALLOC_FL_KEEP_SIZE) && end > size) {
        /* Zeroing past the end would grow the file. */
        io_reply_err(req, e, EXPORT_OP_DISCARD, ENOSPC);
        return;
    }
    if ((uint64_t)off >= size) {
        io_reply_err(req, e, EXPORT_OP_DISCARD, 0);
        return;
    }
    end = MIN(end, size);
    ret = chain_pwrite_zeroes(e->chain, off, end - (uint64_t)off);
    if (ret < 0) {
        io_reply_err(req, e, EXPORT_OP_DISCARD, -ret);
        return;
    }
    export_touch_content(e);
    export_stats_end(&e->stats, EXPORT_OP_DISCARD, end - (uint64_t)off, 0);
    fuse_reply_err(req, 0);
}

/* ---- extended attributes ------------------------------------------- */

/* "user.chainfs.X" -> "X", or NULL for any other name. */
static const char *chainfs_attr_suffix(const char *name)
{
    if (g_str_has_prefix(name, CHAINFS_XATTR_PREFIX)) {
        return name + strlen(CHAINFS_XATTR_PREFIX);
    }
    return NULL;
}

static void reply_xattr_value(fuse_req_t req, const char *value, size_t size)
{
    size_t len = strlen(value);

    if (size == 0) {
        fuse_reply_xattr(req, len);
    } else if (size < len) {
        fuse_reply_err(req, ERANGE);
    } else {
        fuse_reply_buf(req, value, len);
    }
}

static void chainfs_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name,
                             size_t size)
{
    Daemon *d = req_daemon(req);
    Export *e = daemon_export_by_ino(d, ino);
    const char *attr = chainfs_attr_suffix(name);
    g_autofree char *value = NULL;

    /* A name outside user.chainfs.* is one no file here can hold: ENOTSUP,
     * as setxattr answers, not ENODATA ("not set yet").  libvirt's DAC
     * driver reads trusted.libvirt.security.ref_dac first and, told
     * ENODATA, goes on to set it and fails the domain start on the
     * ENOTSUP; told ENOTSUP, it skips remembering the owner. */
    if (!attr) {
        fuse_reply_err(req, ENOTSUP);
        return;
    }
    if (e) {
        value = ctl_read_attribute(d, e, attr);
    }
    if (!value) {
        fuse_reply_err(req, ENODATA);
        return;
    }
    reply_xattr_value(req, value, size);
}

static void chainfs_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    Export *e = daemon_export_by_ino(req_daemon(req), ino);

    if (!e) {
        if (size == 0) {
            fuse_reply_xattr(req, 0);
        } else {
            fuse_reply_buf(req, NULL, 0);
        }
        return;
    }
    if (size == 0) {
        fuse_reply_xattr(req, ctl_xattr_list_len);
    } else if (size < ctl_xattr_list_len) {
        fuse_reply_err(req, ERANGE);
    } else {
        fuse_reply_buf(req, ctl_xattr_list, ctl_xattr_list_len);
    }
}

/*
 * Writing a user.chainfs.* command attribute runs the command; nothing is
 * stored.  Any other name cannot be set on an export (ENOTSUP), as on a
 * filesystem without xattr support; the readable attributes are not
 * writable either.
 */
static void chainfs_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name,
                             const char *value, size_t size, int flags)
{
    Daemon *d = req_daemon(req);
    Export *e = daemon_export_by_ino(d, ino);
    const char *attr = chainfs_attr_suffix(name);
    g_autofree char *words = NULL;
    g_autoptr(GError) err = NULL;

    if (!e || !attr || !ctl_is_command(attr)) {
        fuse_reply_err(req, ENOTSUP);
        return;
    }
    words = g_strndup(value, size);
    if (strlen(words) + 1 < size) {
        /* An embedded NUL would silently cut the command short. */
        chainfs_set_error(&err, EINVAL, "command value holds a NUL byte");
        export_set_last_error(e, attr, err);
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (!ctl_run_command(d, e, attr, words, &err)) {
        fuse_reply_err(req, chainfs_error_errno(err));
        return;
    }
    fuse_reply_err(req, 0);
}

static void chainfs_removexattr(fuse_req_t req, fuse_ino_t ino,
                                const char *name)
{
    Daemon *d = req_daemon(req);
    Export *e = daemon_export_by_ino(d, ino);
    const char *attr = chainfs_attr_suffix(name);
    g_autofree char *value = NULL;

    if (e && attr) {
        value = ctl_read_attribute(d, e, attr);
    }
    /* The control attributes are computed, not stored: never removable. */
    fuse_reply_err(req, value ? EPERM : ENODATA);
}

/* ---- the namespace is fixed ------------------------------------------ */

static void chainfs_mknod(fuse_req_t req, fuse_ino_t parent, const char *name,
                          mode_t mode, dev_t rdev)
{
    fuse_reply_err(req, EPERM);
}

static void chainfs_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name,
                          mode_t mode)
{
    fuse_reply_err(req, EPERM);
}

static void chainfs_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    fuse_reply_err(req, EPERM);
}

static void chainfs_rename(fuse_req_t req, fuse_ino_t parent, const char *name,
                           fuse_ino_t newparent, const char *newname,
                           unsigned int flags)
{
    fuse_reply_err(req, EPERM);
}

static void chainfs_symlink(fuse_req_t req, const char *link, fuse_ino_t parent,
                            const char *name)
{
    fuse_reply_err(req, EPERM);
}

static void chainfs_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent,
                         const char *newname)
{
    fuse_reply_err(req, EPERM);
}

static void chainfs_create(fuse_req_t req, fuse_ino_t parent, const char *name,
                           mode_t mode, struct fuse_file_info *fi)
{
    fuse_reply_err(req, EPERM);
}

const struct fuse_lowlevel_ops chainfs_ll_ops = {
    .init = chainfs_init,
    .lookup = chainfs_lookup,
    .getattr = chainfs_getattr,
    .setattr = chainfs_setattr,
    .mknod = chainfs_mknod,
    .mkdir = chainfs_mkdir,
    .unlink = chainfs_unlink,
    .rmdir = chainfs_unlink,
    .rename = chainfs_rename,
    .symlink = chainfs_symlink,
    .link = chainfs_link,
    .create = chainfs_create,
    .open = chainfs_open,
    .read = chainfs_read,
    .write = chainfs_write,
    .flush = chainfs_flush,
    .release = chainfs_release,
    .fsync = chainfs_fsync,
    .opendir = chainfs_opendir,
    .readdir = chainfs_readdir,
    .readdirplus = chainfs_readdirplus,
    .releasedir = chainfs_releasedir,
    .statfs = chainfs_statfs,
    .setxattr = chainfs_setxattr,
    .getxattr = chainfs_getxattr,
    .listxattr = chainfs_listxattr,
    .removexattr = chainfs_removexattr,
    .fallocate = chainfs_fallocate,
    .lseek = chainfs_lseek,
    .poll = chainfs_poll,
};
