/*
 * image-latch.c: latched I/O errors of one image (see ChainImage.io_error
 * in image.h).  Apart from chain.c so that the drivers, which call it on
 * their flush paths, link without the chain code (the unit tests link the
 * qcow2 driver alone).
 */
#include <errno.h>
#include <unistd.h>

#include "image.h"

/* Set once at daemon start, before any image is written. */
static ChainLatchHook latch_hook;
static void *latch_hook_opaque;

void chain_image_set_latch_hook(ChainLatchHook hook, void *opaque)
{
    latch_hook_opaque = opaque;
    latch_hook = hook;
}

void chain_image_latch_io_error(ChainImage *img, const char *call, int err)
{
    char *msg = g_strdup_printf("%s of %s failed: %s", call, img->name,
                                g_strerror(err));

    /* First one wins: it names the write-back that was lost. */
    if (!g_atomic_pointer_compare_and_exchange(&img->io_error, NULL, msg)) {
        g_free(msg);
        return;
    }
    /* The image then serves reads only (EROFS on writes, design.md's
     * read-only exports): a write would allocate metadata that the next
     * flush could not make durable. */
    chain_image_mark_read_only(img, msg);
    g_warning("%s: %s failed: %s; latched: every flush of it fails and it "
              "takes no metadata writes until chainfs restarts", img->path,
              call, g_strerror(err));
    if (latch_hook) {
        latch_hook(img->name, msg, latch_hook_opaque);
    }
}

bool chain_image_io_latched(ChainImage *img)
{
    return g_atomic_pointer_get(&img->io_error) != NULL;
}

const char *chain_image_io_error(ChainImage *img)
{
    return g_atomic_pointer_get(&img->io_error);
}

int chain_image_datasync(ChainImage *img)
{
    if (chain_image_io_latched(img)) {
        return -EIO;
    }
    while (fdatasync(img->fd) < 0) {
        int err = errno;

        if (err == EINTR) {
            continue;
        }
        /* Only a failed write-back latches.  EBADF or EINVAL say nothing
         * about the data (a descriptor that cannot sync), but treating
         * them alike is safe, and they do not happen on image files. */
        chain_image_latch_io_error(img, "fdatasync", err);
        return -err;
    }
    /* Another thread's sync may have taken the error of pages this one
     * wrote (Linux reports a write-back error once per descriptor). */
    return chain_image_io_latched(img) ? -EIO : 0;
}
