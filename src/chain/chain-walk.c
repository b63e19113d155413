/*
 * chain-walk.c: the status of a range through an image and the images
 * below it, one driver call per layer: what chain-io.c's flat reads,
 * zero runs and map builds, and the drivers' copy-on-write and grow
 * (image-grow.c), ask.  Its own file so that a driver's unit test links it
 * without the chain map.
 */
#include <errno.h>

#include "image.h"

/* The first layer that holds the range, or past whose end it lies,
 * decides (image.h). */
int chain_walk_status(ChainImage *img, guint count, uint64_t offset,
                      uint64_t bytes, uint64_t *pnum, ChainImage **owner,
                      guint *steps)
{
    uint64_t n = bytes;
    guint i = 0;

    for (ChainImage *l = img; l && i < count; l = l->backing, i++) {
        uint64_t p;
        int ret;

        if (offset >= l->virtual_size) {
            /* A shorter layer hides everything below its end. */
            *pnum = n;
            *owner = l;
            *steps = i;
            return BLOCK_ZERO;
        }
        n = MIN(n, l->virtual_size - offset);
        ret = l->drv->block_status(l, offset, n, &p);
        if (ret < 0) {
            return ret;
        }
        if (p == 0) {
            return -EIO;
        }
        n = MIN(n, p);
        if (ret != BLOCK_UNALLOCATED) {
            *pnum = n;
            *owner = l;
            *steps = i;
            return ret == BLOCK_COMPRESSED ? BLOCK_DATA : ret;
        }
    }
    *pnum = n;
    *owner = NULL;
    *steps = 0;
    return BLOCK_UNALLOCATED;
}

int chain_image_status_below(ChainImage *img, uint64_t offset,
                             uint64_t bytes, uint64_t *pnum)
{
    ChainImage *owner;
    guint steps;

    if (!img->backing) {
        *pnum = bytes;
        return BLOCK_UNALLOCATED;
    }
    return chain_walk_status(img->backing, G_MAXUINT, offset, bytes, pnum, &owner,
                       &steps);
}

