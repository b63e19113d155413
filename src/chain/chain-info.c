/* chain-info.c: see chain-info.h. */
#include <errno.h>
#include <string.h>
#include <sys/statvfs.h>

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
    g_string_append_c(out, '}');
}

char *chain_info_json(Chain *chain)
{
    GString *out = g_string_new("{");

    json_append_member_string(out, "name", chain->name);
    json_append_key(out, "layers");
    g_string_append_c(out, '[');
    chain_topo_rdlock(chain);
    for (guint i = 0; i < chain_depth(chain); i++) {
        if (i > 0) {
            g_string_append_c(out, ',');
        }
        chain_info_append_layer(out, chain, i);
    }
    chain_topo_unlock(chain);
    g_string_append(out, "]}");
    return g_string_free(out, FALSE);
}

bool chain_info_commit_layers(Chain *chain, const char *top,
                              const char *base, bool shallow,
                              guint *top_idx, guint *base_idx,
                              GError **error)
{
    bool ok = false;
    guint depth;
    int t, b;

    chain_topo_rdlock(chain);
    depth = chain_depth(chain);
    t = top ? chain_find_layer(chain, top) : 0;
    b = base ? chain_find_layer(chain, base) :
        shallow ? t + 1 : (int)depth - 1;
    if (t < 0 || b < 0) {
        chainfs_set_error(error, ENOENT, "no layer %s in chain %s",
                          t < 0 ? top : base, chain->name);
    } else if (b >= (int)depth) {
        chainfs_set_error(error, EINVAL, "%s has no backing file to commit "
                          "into", chain_layer(chain, (guint)t)->name);
    } else if (b <= t) {
        chainfs_set_error(error, EINVAL, "base %s is not below top %s",
                          chain_layer(chain, (guint)b)->name,
                          chain_layer(chain, (guint)t)->name);
    } else {
        *top_idx = (guint)t;
        *base_idx = (guint)b;
        ok = true;
    }
    chain_topo_unlock(chain);
    return ok;
}

char *chain_info_commit_room_json(Chain *chain, const char *top,
                                  const char *base, bool shallow,
                                  uint64_t needed_bytes, GError **error)
{
    GString *out;
    ChainImage *base_img;
    guint t, b;
    struct statvfs sv;

    chain_topo_rdlock(chain);
    if (!chain_info_commit_layers(chain, top, base, shallow, &t, &b, error)) {
        chain_topo_unlock(chain);
        return NULL;
    }
    base_img = chain_layer(chain, b);
    /* Where base lives as resolved: its path may be a symlink elsewhere. */
    if (statvfs(base_img->dir, &sv) < 0) {
        int err = errno;

        chainfs_set_error(error, err, "cannot stat the filesystem of %s: %s",
                          base_img->name, g_strerror(err));
        chain_topo_unlock(chain);
        return NULL;
    }
    out = g_string_new("{");
    json_append_member_string(out, "top", chain_layer(chain, t)->name);
    json_append_member_string(out, "base", base_img->name);
    json_append_member_uint(out, "needed_bytes", needed_bytes);
    json_append_member_uint(out, "available_bytes",
                            (uint64_t)sv.f_bavail * sv.f_frsize);
    chain_topo_unlock(chain);
    g_string_append_c(out, '}');
    return g_string_free(out, FALSE);
}
