/* chain-info.c: see chain-info.h. */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "chain-info.h"
#include "json.h"

/* One layer object of chain_info_json().  Topology lock held. */
static void chain_info_append_layer(GString *out, Chain *chain, guint i)
{
    ChainImage *img = chain_layer(chain, i);
    bool is_raw = strcmp(img->drv->format_name, "raw") == 0;
    const char *backing_format = NULL;

    if (img->backing_ref) {
        /* A chain that opened has its backing format right: recorded or
         * not, it is the format of the next layer. */
        backing_format = img->backing_fmt;
        if (!backing_format && i + 1 < chain_depth(chain)) {
            backing_format = chain_layer(chain, i + 1)->drv->format_name;
        }
    }
    g_string_append_c(out, '{');
    json_append_member_string(out, "file", img->name);
    json_append_member_string(out, "format", img->drv->format_name);
    json_append_member_uint(out, "virtual_size", img->virtual_size);
    json_append_member_uint(out, "allocated",
                            img->drv->allocated_bytes ?
                            img->drv->allocated_bytes(img) : 0);
    json_append_member_string(out, "backing", img->backing_ref);
    /* raw has no clusters; its driver's cluster_size is only the unit it
     * reports allocation in. */
    json_append_key(out, "cluster_size");
    if (is_raw) {
        g_string_append(out, "null");
    } else {
        g_string_append_printf(out, "%" G_GUINT32_FORMAT, img->cluster_size);
    }
    json_append_member_string(out, "backing_format", backing_format);
    /* Only when latched: absent means no I/O error (image.h). */
    if (chain_image_io_error(img)) {
        json_append_member_string(out, "io_error", chain_image_io_error(img));
    }
    g_string_append_c(out, '}');
}

/*
 * Why the active layer cannot be written, or NULL when it can.  A layer
 * opened read-only without a recorded reason (chainctl info opens the
 * chain so) is asked of the filesystem: a read-only file or mount.
 */
static char *chain_info_read_only_reason(ChainImage *top)
{
    const char *why = chain_image_read_only_reason(top);

    if (why) {
        return g_strdup(why);
    }
    if (!top->writable && access(top->path, W_OK) < 0) {
        int err = errno;
        return g_strdup_printf("%s cannot be written: %s", top->path,
                               g_strerror(err));
    }
    return NULL;
}

char *chain_info_json(Chain *chain)
{
    GString *out = g_string_new("{");
    g_autofree char *read_only = NULL;

    json_append_member_string(out, "name", chain->name);
    /* Where the layers' "file" names live, so that a client (chainctl
     * map) can open them read-only itself. */
    json_append_member_string(out, "image_dir", image_set_dir(chain->set));
    chain_topo_rdlock(chain);
    /* The export is writable when its active layer is. */
    read_only = chain_info_read_only_reason(chain_layer(chain, 0));
    json_append_member_bool(out, "writable", read_only == NULL);
    if (read_only) {
        json_append_member_string(out, "reason", read_only);
    }
    json_append_key(out, "layers");
    g_string_append_c(out, '[');
    for (guint i = 0; i < chain_depth(chain); i++) {
        if (i > 0) {
            g_string_append_c(out, ',');
        }
        chain_info_append_layer(out, chain, i);
    }
    g_string_append_c(out, ']');
    /* The chain's: the first latched layer's, from the top (the one its
     * flushes fail for; see chain_flush). */
    for (guint i = 0; i < chain_depth(chain); i++) {
        const char *io_error = chain_image_io_error(chain_layer(chain, i));

        if (io_error) {
            json_append_member_string(out, "io_error", io_error);
            break;
        }
    }
    chain_topo_unlock(chain);
    g_string_append_c(out, '}');
    return g_string_free(out, FALSE);
}
