/*
 * image-grow.c: zeroing the part of an image that a change of the chain
 * would otherwise expose.
 *
 * Past a layer's end the chain reads zeros and never consults that layer's
 * backing file (QEMU does the same).  Two operations move that end without
 * the guest having written anything: growing a layer (its backing chain
 * may be longer: the new range would show the backing file's bytes), and a
 * commit that puts base in the place of a shorter layer (the range past
 * that layer's end would show base's bytes).  Both call
 * chain_image_zero_exposed() on the range first, so that it keeps reading
 * zeros; the callers order it against the change that makes the range
 * visible (qcow2_grow, commit.c).
 */
#include <errno.h>

#include "image.h"

/*
 * Whether the run of img at offset must be zeroed: img holds data there,
 * or leaves it to a backing chain that shows data.  Sets *pnum to the run
 * length.  1 must zero, 0 already reads zeros, or negative errno.
 */
static int exposed_run(ChainImage *img, uint64_t offset, uint64_t bytes,
                       uint64_t *pnum)
{
    uint64_t n = 0;
    int own = img->drv->block_status(img, offset, bytes, &n);

    if (own < 0) {
        return own;
    }
    if (n == 0) {
        return -EIO;
    }
    *pnum = MIN(n, bytes);
    if (own == BLOCK_DATA || own == BLOCK_COMPRESSED) {
        return 1;
    }
    if (own == BLOCK_ZERO) {
        return 0;
    }
    int below = chain_image_status_below(img, offset, *pnum, &n);
    if (below < 0) {
        return below;
    }
    if (n == 0) {
        return -EIO;
    }
    *pnum = MIN(*pnum, n);
    return below == BLOCK_DATA;
}

int chain_image_zero_exposed(ChainImage *img, uint64_t from, uint64_t to)
{
    uint64_t cs = img->cluster_size ? img->cluster_size : 512;
    uint64_t zstart = 0, zend = 0;
    bool pending = false;
    uint64_t off = from;
    int ret = 0;

    if (to > img->virtual_size || from > to) {
        return -EINVAL;
    }
    /*
     * Runs that must be zeroed are widened to whole clusters of img (never
     * below from: that part is what the guest sees now) and merged, so
     * that a fragmented backing file costs whole zero clusters rather
     * than a copy-on-write of every partial one.
     */
    while (off < to) {
        uint64_t n;
        int need = exposed_run(img, off, to - off, &n);

        if (need < 0) {
            return need;
        }
        if (need) {
            uint64_t s0 = MAX(from, off / cs * cs);
            uint64_t e0 = MIN(to, (off + n + cs - 1) / cs * cs);

            if (!pending) {
                zstart = s0;
                pending = true;
            }
            zend = e0;
            off = e0;
            continue;
        }
        if (pending) {
            ret = img->drv->pwrite_zeroes(img, zstart, zend - zstart, true);
            if (ret < 0) {
                return ret;
            }
            pending = false;
        }
        off += n;
    }
    if (pending) {
        ret = img->drv->pwrite_zeroes(img, zstart, zend - zstart, true);
    }
    return ret;
}
