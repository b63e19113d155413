/*
 * raw.c: the raw image driver.
 *
 * A raw file is its own content.  It has no backing file, so it only ever
 * sits at the bottom of a chain (or forms a chain of one).  Holes of the
 * host file (SEEK_DATA / SEEK_HOLE) are reported as BLOCK_ZERO so that a
 * commit into a raw base keeps them, and so that SEEK_HOLE on the export
 * sees them.
 *
 * Status is reported in units of RAW_UNIT bytes (the cluster_size we
 * advertise): a unit is a hole only when all of it is.  That keeps the
 * chain map (which works per granule, never above the smallest cluster
 * size of the chain) from seeing a raw layer change status in the middle of
 * a granule because of the host file system's block size.
 *
 * The driver keeps no state (opaque stays NULL) and always uses img->fd at
 * call time, so chain_image_reopen() can swap the descriptor under it.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "image.h"

#define RAW_UNIT 65536ULL

static int raw_probe(const uint8_t *buf, size_t len)
{
    /* Anything can be a raw image; every other format outranks us. */
    return 1;
}

static bool raw_open(ChainImage *img, GError **error)
{
    struct stat st;

    if (fstat(img->fd, &st) < 0) {
        chainfs_set_error(error, errno, "cannot stat %s: %s", img->path,
                          g_strerror(errno));
        return false;
    }
    if (!S_ISREG(st.st_mode)) {
        chainfs_set_error(error, EINVAL, "%s is not a regular file",
                          img->path);
        return false;
    }
    img->virtual_size = st.st_size;
    img->cluster_size = RAW_UNIT;
    img->backing_ref = NULL;
    img->backing_fmt = NULL;
    img->opaque = NULL;
    return true;
}

static void raw_close(ChainImage *img)
{
}

/*
 * On entry [offset, offset+bytes) lies below virtual_size.  On exit
 * *pnum > 0: a run of whole RAW_UNITs (except at the range's ends) that is
 * DATA (some byte of each unit is stored) or ZERO (a hole throughout).
 */
static int raw_block_status(ChainImage *img, uint64_t offset, uint64_t bytes,
                            uint64_t *pnum)
{
    uint64_t end = offset + bytes;
    uint64_t unit = offset & ~(RAW_UNIT - 1);
    off_t data, hole;

    data = lseek(img->fd, unit, SEEK_DATA);
    if (data < 0 && errno != ENXIO) {
        /* No SEEK_DATA support: call everything data. */
        *pnum = bytes;
        return BLOCK_DATA;
    }
    if (data < 0 || (uint64_t)data >= unit + RAW_UNIT) {
        /* The unit holding offset is a hole; so is everything up to the
         * unit holding the next data byte. */
        uint64_t next = data < 0 ? end : ((uint64_t)data & ~(RAW_UNIT - 1));

        *pnum = MIN(next, end) - offset;
        return BLOCK_ZERO;
    }
    hole = lseek(img->fd, MAX((uint64_t)data, offset), SEEK_HOLE);
    if (hole < 0) {
        *pnum = bytes;
        return BLOCK_DATA;
    }
    /* Round the end of the data up to a unit: a unit with any data in it is
     * data as a whole. */
    uint64_t stop = ((uint64_t)hole + RAW_UNIT - 1) & ~(RAW_UNIT - 1);

    *pnum = MIN(stop, end) - offset;
    if (*pnum == 0) {
        *pnum = MIN(RAW_UNIT, bytes);
    }
    return BLOCK_DATA;
}

static int raw_pread(ChainImage *img, uint64_t offset, void *buf,
                     uint64_t bytes)
{
    uint8_t *p = buf;

    while (bytes > 0) {
        ssize_t n = pread(img->fd, p, bytes, offset);

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        if (n == 0) {
            /* The file got shorter than virtual_size: read as zeros. */
            memset(p, 0, bytes);
            return 0;
        }
        p += n;
        offset += n;
        bytes -= n;
    }
    return 0;
}

static int raw_pwrite(ChainImage *img, uint64_t offset, const void *buf,
                      uint64_t bytes)
{
    const uint8_t *p = buf;

    while (bytes > 0) {
        ssize_t n = pwrite(img->fd, p, bytes, offset);

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        p += n;
        offset += n;
        bytes -= n;
    }
    return 0;
}

static int raw_write_zero_buffer(ChainImage *img, uint64_t offset,
                                 uint64_t bytes)
{
    size_t chunk = MIN(bytes, 1024 * 1024);
    g_autofree uint8_t *zeros = g_malloc0(chunk);

    while (bytes > 0) {
        size_t n = MIN(bytes, chunk);
        int ret = raw_pwrite(img, offset, zeros, n);

        if (ret < 0) {
            return ret;
        }
        offset += n;
        bytes -= n;
    }
    return 0;
}

static int raw_pwrite_zeroes(ChainImage *img, uint64_t offset, uint64_t bytes,
                             bool may_unmap)
{
    if (may_unmap &&
        fallocate(img->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  offset, bytes) == 0) {
        return 0;
    }
    if (fallocate(img->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                  offset, bytes) == 0) {
        return 0;
    }
    if (!may_unmap &&
        fallocate(img->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  offset, bytes) == 0) {
        return 0;
    }
    /* The file system offers neither: write zeros. */
    return raw_write_zero_buffer(img, offset, bytes);
}

static int raw_flush(ChainImage *img)
{
    /* Latches a failure, and fails every flush after it (image.h). */
    return chain_image_datasync(img);
}

/*
 * A raw image has no backing file, and the range ftruncate() adds reads as
 * zeros: nothing below can show through it (image.h's promise for grow).
 * The size is the file's, so it changes with the one ftruncate: a crash
 * leaves the old size or the new one, both reading as the guest saw.
 */
static bool raw_grow(ChainImage *img, uint64_t new_size, GError **error)
{
    if (new_size <= img->virtual_size) {
        return true;
    }
    if (ftruncate(img->fd, new_size) < 0 || fsync(img->fd) < 0) {
        int err = errno;

        chainfs_set_error(error, err, "cannot grow %s to %" G_GUINT64_FORMAT
                          " bytes: %s", img->path, new_size, g_strerror(err));
        return false;
    }
    img->virtual_size = new_size;
    return true;
}

static bool raw_set_backing(ChainImage *img, const char *ref,
                            const char *fmt, GError **error)
{
    chainfs_set_error(error, EOPNOTSUPP,
                      "%s: raw images have no backing file", img->name);
    return false;
}

static uint64_t raw_allocated_bytes(ChainImage *img)
{
    struct stat st;

    if (fstat(img->fd, &st) < 0) {
        return 0;
    }
    return (uint64_t)st.st_blocks * 512;
}

const ImageDriver raw_driver = {
    .format_name = "raw",
    .probe = raw_probe,
    .open = raw_open,
    .close = raw_close,
    .block_status = raw_block_status,
    .pread = raw_pread,
    .pwrite = raw_pwrite,
    .pwrite_zeroes = raw_pwrite_zeroes,
    .flush = raw_flush,
    .grow = raw_grow,
    .set_backing = raw_set_backing,
    .allocated_bytes = raw_allocated_bytes,
};

/* ---- driver lookup ---------------------------------------------------- */

const ImageDriver *image_driver_by_name(const char *format_name)
{
    if (!format_name) {
        return NULL;
    }
    if (strcmp(format_name, "qcow2") == 0) {
        return &qcow2_driver;
    }
    if (strcmp(format_name, "raw") == 0) {
        return &raw_driver;
    }
    return NULL;
}

/*
 * On exit: the driver whose probe scores the file's first bytes highest;
 * raw when nothing else matches or the file cannot be read.
 */
const ImageDriver *image_probe_fd(int fd)
{
    static const ImageDriver *const drivers[] = { &qcow2_driver,
                                                  &raw_driver };
    uint8_t buf[4096];
    ssize_t n;
    const ImageDriver *best = &raw_driver;
    int best_score = 0;

    do {
        n = pread(fd, buf, sizeof(buf), 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        return &raw_driver;
    }
    for (size_t i = 0; i < G_N_ELEMENTS(drivers); i++) {
        int score = drivers[i]->probe ? drivers[i]->probe(buf, n) : 0;

        if (score > best_score) {
            best_score = score;
            best = drivers[i];
        }
    }
    return best;
}
