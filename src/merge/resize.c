/*
 * resize.c: growing a chain's disk (merge_resize in merge.h), after QEMU's
 * block_resize and `qemu-img resize`: the active layer grows, and the new
 * range reads as zeros whatever the lower layers hold there.
 *
 * Order, and why:
 *   1. the chain's job slot is taken, and a live job refuses the resize
 *      with EBUSY: a job planned its range, grew its base and zeroed base
 *      past top's end (commit_prepare_base_locked) for the size the export
 *      had when it started, and relies on no guest writing past it;
 *   2. the topology write lock drains every request in flight, so that no
 *      read sees the size change half done and no write races the zeroing;
 *   3. the active layer's driver grows (qcow2_grow: the new range is
 *      zeroed where a lower layer shows data, and that is durable before
 *      the header holds the new size), so a crash at any point leaves the
 *      old size or the new one, reading the same below the old size and
 *      zeros above it;
 *   4. the chain map is forgotten: it was built for the old size, and the
 *      partial cluster at the old end may now live in the active layer.
 * Shrinking is refused: a guest's data past the new end would be lost,
 * and QEMU too asks for an explicit --shrink, which chainfs does not
 * implement.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>

#include "json.h"
#include "merge-int.h"

typedef struct {
    uint64_t size;
    uint64_t old_size;
} ResizeRequest;

static bool resize_idle(Chain *chain, void *opaque, GError **error)
{
    ResizeRequest *r = opaque;
    ChainImage *top;
    bool ok = true;

    chain_topo_wrlock(chain);
    top = chain_layer(chain, 0);
    r->old_size = top->virtual_size;
    if (r->size < top->virtual_size) {
        chainfs_set_error(error, EPERM, "cannot shrink %s from %"
                          G_GUINT64_FORMAT " to %" G_GUINT64_FORMAT
                          " bytes: shrinking is not supported", chain->name,
                          top->virtual_size, r->size);
        ok = false;
    } else if (r->size > top->virtual_size && r->size % 512 != 0) {
        /* A disk is made of sectors; qcow2 and QEMU count them. */
        chainfs_set_error(error, EINVAL, "cannot resize %s to %"
                          G_GUINT64_FORMAT " bytes: the size must be a "
                          "multiple of 512", chain->name, r->size);
        ok = false;
    } else if (r->size > top->virtual_size) {
        ok = top->drv->grow(top, r->size, error);
        if (ok) {
            chain_map_invalidate(chain);
        } else {
            g_prefix_error(error, "cannot grow %s: ", top->name);
        }
    }
    chain_topo_unlock(chain);
    return ok;
}

bool merge_resize(MergeContext *ctx, Chain *chain, uint64_t size,
                  uint64_t *old_size, GError **error)
{
    ResizeRequest r = { .size = size };
    g_autofree char *what = g_strdup_printf("resize %s", chain->name);

    if (!merge_run_idle(ctx, chain, what, resize_idle, &r, error)) {
        return false;
    }
    if (old_size) {
        *old_size = r.old_size;
    }
    if (size > r.old_size) {
        /* Like snapshot and pivot, through the context's event hook. */
        g_autoptr(GString) fields = g_string_new(NULL);

        json_append_member_uint(fields, "old_size", r.old_size);
        json_append_member_uint(fields, "size", size);
        merge_emit_event(chain->name, "resize", fields->str);
    }
    return true;
}
