/*
 * image.h: one image file (a layer) and the driver table behind it.
 *
 * A ChainImage is one open image file: qcow2 or raw.  Each format is a
 * const ImageDriver (after QEMU's BlockDriver).  Drivers know nothing of
 * chains beyond img->backing, which chain.c sets, and which the qcow2
 * driver uses for copy-on-write of partial clusters through
 * chain_image_read_below().
 *
 * Two tiers of errors: I/O entry points (block_status, pread, pwrite,
 * pwrite_zeroes, flush) return a negative errno and allocate nothing that
 * outlives the call; control entry points (open, grow, set_backing) take a
 * GError ** last, in the CHAINFS_ERROR domain, and return FALSE on failure.
 *
 * Locking: every I/O entry point may be called from many threads at once
 * on the same image.  The driver guards its metadata (L1/L2 tables,
 * refcounts, allocation) with img->meta_lock and performs data
 * pread()/pwrite() on img->fd outside that lock.  Control entry points are
 * called with the chain's topology lock held for writing (no I/O runs).
 */
#ifndef CHAINFS_IMAGE_H
#define CHAINFS_IMAGE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <glib.h>

#include "chain-error.h"

typedef struct ChainImage ChainImage;
typedef struct ImageDriver ImageDriver;

/* What a range of ONE layer holds (not looking at its backing file). */
typedef enum {
    BLOCK_UNALLOCATED = 0, /* not in this layer: the backing file shows */
    BLOCK_DATA = 1,        /* data stored in this layer */
    BLOCK_ZERO = 2,        /* reads as zeros; recorded in this layer */
    BLOCK_COMPRESSED = 3,  /* compressed data stored in this layer */
} BlockStatus;

/* Largest chain we resolve; deeper chains are refused (ELOOP). */
#define CHAIN_MAX_DEPTH 1024

struct ChainImage {
    const ImageDriver *drv;
    char *path;        /* absolute, canonical path of the file */
    char *name;        /* file name as named in the image directory */
    char *dir;         /* absolute directory holding the file */
    int fd;            /* O_RDONLY or O_RDWR; see writable */
    bool writable;     /* opened read-write (changed only by reopen) */
    bool direct;       /* reserved: fd has O_DIRECT */
    /* Why the image may be read but never written (a qcow2 dirty or
     * corrupt bit, as QEMU allows; metadata corruption found while
     * running; a file or filesystem that cannot be written): NULL while
     * it may be written.  Set once, through chain_image_mark_read_only
     * (atomic; requests read it concurrently through
     * chain_image_read_only_reason), never cleared or changed after;
     * chain_image_reopen refuses such an image read-write with it. */
    char *read_only_reason;
    /* A latched I/O error: set once, by chain_image_latch_io_error(), when
     * an fdatasync/fsync of the file failed, and kept until the image is
     * closed (the daemon restarts).  Linux marks the pages whose write-back
     * failed clean, so a later flush that succeeds proves nothing: from
     * then on every flush fails with EIO and the driver writes no metadata
     * that could point at data that never reached the disk.  NULL until
     * then; read with g_atomic_pointer_get() from any thread, no lock. */
    char *io_error;

    /*
     * Sizes.  virtual_size changes only through drv->grow(), which runs with
     * the topology lock held for writing; readers under the topology read
     * lock may read it without meta_lock.
     */
    uint64_t virtual_size;
    uint32_t cluster_size; /* allocation unit; raw reports 65536 */

    /* Backing reference as stored in the file (NULL: none) and its format
     * (NULL: not recorded, probe it).  Changed only by set_backing. */
    char *backing_ref;
    char *backing_fmt;

    /* The resolved backing image, set by chain.c; NULL at the bottom.
     * Not owned (the ImageSet owns every ChainImage). */
    ChainImage *backing;

    /* Guards the driver's metadata.  Never held across data I/O. */
    GMutex meta_lock;

    int refcnt;        /* users of this image in its ImageSet; chain.c */
    void *opaque;      /* driver state (BDRVQcow2State for qcow2) */
};

struct ImageDriver {
    const char *format_name; /* "qcow2", "raw" */

    /*
     * Score how well the first bytes of a file (buf, len >= 512 unless the
     * file is shorter) match this format: 0 no, 1 fallback (raw), 100 sure.
     */
    int (*probe)(const uint8_t *buf, size_t len);

    /*
     * On entry img->fd is open (O_RDWR when writable), img->path/name/dir
     * are set.  On success fills virtual_size, cluster_size, backing_ref,
     * backing_fmt and opaque.  Refuses unsupported features with a message
     * naming the feature and the file (EOPNOTSUPP), a corrupt header (EINVAL),
     * and never writes to the file when it refuses.
     */
    bool (*open)(ChainImage *img, GError **error);

    /* Frees driver state.  Does not flush (the caller flushed) nor close fd. */
    void (*close)(ChainImage *img);

    /*
     * Status of this layer alone at [offset, offset + bytes); bytes > 0 and
     * the range lies below virtual_size.  Returns a BlockStatus and sets
     * *pnum (> 0, <= bytes) to the length of the run from offset that
     * shares it, so callers move in runs.  Negative errno on failure.
     */
    int (*block_status)(ChainImage *img, uint64_t offset, uint64_t bytes,
                        uint64_t *pnum);

    /*
     * Read this layer's content: DATA and COMPRESSED ranges give their
     * bytes, ZERO and UNALLOCATED ranges give zeros (the chain never asks a
     * layer for a range it does not own).  Range below virtual_size.
     * Returns 0 or negative errno.
     */
    int (*pread)(ChainImage *img, uint64_t offset, void *buf, uint64_t bytes);

    /*
     * Write into this layer, any alignment.  A partial cluster not yet
     * allocated here is completed from chain_image_read_below().  Returns 0
     * only when every byte will read back (until a crash: durable after
     * flush).  NULL for read-only formats.
     */
    int (*pwrite)(ChainImage *img, uint64_t offset, const void *buf,
                  uint64_t bytes);

    /*
     * Make the range read as zeros.  qcow2 v3 stores whole clusters as zero
     * clusters (freeing their data when may_unmap); partial clusters and v2
     * are written as data (v2 with no backing may leave unallocated).
     */
    int (*pwrite_zeroes)(ChainImage *img, uint64_t offset, uint64_t bytes,
                         bool may_unmap);

    /* Make every completed write durable, metadata in crash-safe order. */
    int (*flush)(ChainImage *img);

    /*
     * Before an image opened read-only becomes writable (chain_image_reopen),
     * with fd the new read-write descriptor of the file (img->fd is still
     * the read-only one): make the file fit for writing (qcow2 rebuilds the
     * refcounts of a dirty image).  NULL when there is nothing to do.
     */
    bool (*prepare_writable)(ChainImage *img, int fd, GError **error);

    /*
     * Grow the virtual size (never shrinks).  The new range reads as
     * zeros, whatever img's backing chain holds there (QEMU's truncate
     * zero-fills it too), and a crash at any point leaves img reading as
     * before or grown.  Durable on return.
     */
    bool (*grow)(ChainImage *img, uint64_t new_size, GError **error);

    /*
     * Replace the backing reference (ref NULL: none) and its format, in one
     * atomic header write followed by fdatasync.  Durable on return.
     */
    bool (*set_backing)(ChainImage *img, const char *ref, const char *fmt,
                        GError **error);

    /* Host bytes the file uses for this layer's data (for "allocated"). */
    uint64_t (*allocated_bytes)(ChainImage *img);
};

extern const ImageDriver qcow2_driver;
extern const ImageDriver raw_driver;

/*
 * Read [offset, offset+bytes) as img's backing chain shows it BELOW img
 * (that is, starting at img->backing), with zeros past the end of a shorter
 * backing file or when there is none.  Used by drivers for copy-on-write.
 * Implemented in chain-io.c.  Returns 0 or negative errno.
 */
int chain_image_read_below(ChainImage *img, uint64_t offset, void *buf,
                           uint64_t bytes);

/*
 * Status of [offset, offset+bytes) as img's backing chain shows it BELOW
 * img (each layer past its end shows zeros and hides what lies below):
 * BLOCK_DATA (compressed included), BLOCK_ZERO, or BLOCK_UNALLOCATED when
 * no layer below holds the range or img has no backing file; the run
 * length in *pnum.  bytes > 0.  Per-layer walk, as chain_image_read_below
 * reads.  Implemented in chain-walk.c.  A BlockStatus or negative
 * errno.
 */
int chain_image_status_below(ChainImage *img, uint64_t offset,
                             uint64_t bytes, uint64_t *pnum);

/*
 * Status of img and at most count-1 images below it (via ->backing) at
 * [offset, offset+bytes): the first of them that has the range allocated,
 * or past whose end the range lies, decides.  On exit *pnum > 0 is the run
 * length, *owner the deciding image (NULL when none), *steps how many
 * images below img it is.  Returns a BlockStatus (COMPRESSED reported as
 * DATA) or negative errno.  Implemented in chain-walk.c.
 */
int chain_walk_status(ChainImage *img, guint count, uint64_t offset,
                      uint64_t bytes, uint64_t *pnum, ChainImage **owner,
                      guint *steps);

/*
 * Make [from, to) of img read as zeros wherever it would not already:
 * where img itself holds data there, and where img leaves the range
 * unallocated over a backing chain that shows data.  Ranges that already
 * read as zeros are not written.  Zero clusters on qcow2 v3, zero data on
 * v2 (drv->pwrite_zeroes).  img->virtual_size >= to.  Not flushed: the
 * caller orders it (see qcow2_grow).  Call where no I/O on img runs (the
 * topology write lock of every chain using it, or offline).  Implemented
 * in image-grow.c.  0 or negative errno.
 */
int chain_image_zero_exposed(ChainImage *img, uint64_t from, uint64_t to);

/*
 * Read [offset, offset+bytes) of the chain as seen from img downward
 * (img, then its backing files), zeros past any layer's end.  Per-layer
 * walk: cost grows with depth; the export's hot path uses the chain map.
 * Implemented in chain-io.c.
 */
int chain_image_read_through(ChainImage *img, uint64_t offset, void *buf,
                             uint64_t bytes);

/*
 * Start writing img's dirty page-cache pages back to the disk without
 * waiting for them.  A long copy into img calls it as it goes, so the disk
 * writes while the copy runs instead of all at the next flush.  Advisory:
 * a failure is left for that flush to report.  Implemented in chain.c.
 */
void chain_image_start_writeback(ChainImage *img);

/*
 * Drop img's clean pages from the page cache (dirty ones stay: no data is
 * lost).  A job's bulk copy leaves large folios behind (its 1 MiB reads
 * and writes), and on Linux 6.x a guest's 4 KiB write into a large folio
 * walks all its blocks: after an active commit, guest random writes into
 * the copied images ran at 10-13k IOPS against 67-112k once their cache
 * was dropped.  Jobs call it on the images the guest writes next.
 * Advisory.  Implemented in chain.c.
 */
void chain_image_drop_cache(ChainImage *img);

/*
 * Latched I/O errors (see ChainImage.io_error).  Implemented in
 * image-latch.c.
 *
 * chain_image_datasync: fdatasync of img->fd, the one way drivers make an
 * image durable.  Returns -EIO at once when an error is latched; latches
 * a failure (and returns its errno, this once).  Any thread, any lock.
 *
 * chain_image_latch_io_error: latch the failure of `call` with errno err,
 * logging one line naming the image and the call; a second latch of the
 * same image keeps the first message and logs nothing.
 *
 * chain_image_io_latched: true once latched.  chain_image_io_error: the
 * message (valid until the image is freed), or NULL.
 */
int chain_image_datasync(ChainImage *img);
void chain_image_latch_io_error(ChainImage *img, const char *call, int err);
bool chain_image_io_latched(ChainImage *img);
const char *chain_image_io_error(ChainImage *img);
/*
 * Told of each image's latch (the first error only): the daemon's
 * io-error event.  One process-wide hook, set once at start (NULL: none);
 * called in the thread that latched, possibly with the image's meta_lock
 * or its chain's topology lock held, so it must not block nor take a
 * chain's lock.  file is the image's name in the image directory.
 */
typedef void (*ChainLatchHook)(const char *file, const char *message,
                               void *opaque);
void chain_image_set_latch_hook(ChainLatchHook hook, void *opaque);

/*
 * Make img read-only for the rest of its life in this process, for reason
 * (copied): its writes fail with EROFS from now on.  Thread-safe, callable
 * with any lock held; the first reason stays.  Returns TRUE when this call
 * set it (the caller then logs), FALSE when img was read-only already.
 * Implemented in read-only.c.
 */
bool chain_image_mark_read_only(ChainImage *img, const char *reason);
/* Why img may not be written, or NULL.  Valid for img's lifetime. */
const char *chain_image_read_only_reason(ChainImage *img);

/* Pick the driver for a file: by backing_fmt name when given, else probe. */
const ImageDriver *image_driver_by_name(const char *format_name);
const ImageDriver *image_probe_fd(int fd);

#endif
