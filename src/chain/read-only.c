/*
 * read-only.c: an image's read-only reason, published once (image.h).
 *
 * The reason can appear while requests run (a metadata overlap found by
 * one write, a latched I/O error): it is published with a
 * compare-and-exchange on the pointer, so a reader sees NULL or a whole
 * string, and it is never freed before the image itself, so a pointer
 * read once stays valid.
 */
#include "image.h"

bool chain_image_mark_read_only(ChainImage *img, const char *reason)
{
    char *copy = g_strdup(reason ? reason : "image is read-only");

    if (g_atomic_pointer_compare_and_exchange(&img->read_only_reason, NULL,
                                              copy)) {
        return true;
    }
    g_free(copy);
    return false;
}

const char *chain_image_read_only_reason(ChainImage *img)
{
    return g_atomic_pointer_get(&img->read_only_reason);
}
