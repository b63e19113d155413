/*
 * qcow2-refcount.c: refcounts, the allocation pool and deferred frees.
 *
 * Allocation happens only at the end of the file, from a batch (the pool)
 * reserved ahead: the batch's refcounts are set to 1 (written) before any
 * cluster of it is handed out, and an fdatasync separates that write from
 * the first on-disk pointer to a cluster of the batch, so an L2 or L1
 * entry never points to a cluster whose refcount is 0, whatever prefix of
 * our writes survives a crash.  That fdatasync is not taken per batch:
 * L2 entries reach the disk only after an fdatasync anyway (qcow2-cluster.c,
 * rule 3), which covers every batch reserved before it; the one writer of
 * another pointer into a batch, the L1 entry of a new L2 table
 * (qcow2_l2_prepare), syncs first while s->rc_unsynced says that the
 * current batch's refcounts are not covered yet; growing the L1 table
 * syncs before its header write.  (Syncing per batch would write back all
 * the guest data dirtied since the last one, under meta_lock, every 16 MiB
 * of allocation.)  A crash merely leaks the unused rest of the batch (or,
 * on power loss, loses refcounts that nothing durable points to), which
 * `qemu-img check` reports as leaks and `-r leaks` repairs.  At close the
 * unused rest is given back (refcounts 0, synced, then the file is
 * truncated).
 *
 * Refcount blocks a batch needs are placed at the start of the batch and
 * count themselves; they are written and synced before the refcount table
 * entries that name them.  A refcount table too small for them is replaced
 * by a larger one, also at the start of the batch, written and synced
 * before the header points to it; the old one is freed later.
 *
 * Frees (refcount decrements) are queued and applied only after an
 * fdatasync that made the entries no longer pointing to them durable
 * (qcow2_flush_and_free).  Freed clusters are never handed out again, so a
 * reader racing with a free still reads the old bytes, and a refcount that
 * reaches 0 early can never corrupt anything.
 *
 * Refcount blocks are not cached: they are touched once per batch and
 * once per flush with pending frees, never per guest request.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "qcow2-int.h"

static uint64_t rc_get(BDRVQcow2State *s, const uint8_t *blk, uint64_t i)
{
    switch (s->refcount_order) {
    case 0:
    case 1:
    case 2: {
        unsigned bits = s->refcount_bits;
        uint64_t bit = i * bits;
        return (blk[bit / 8] >> (bit % 8)) & ((1U << bits) - 1);
    }
    case 3:
        return blk[i];
    case 4:
        return ((uint64_t)blk[2 * i] << 8) | blk[2 * i + 1];
    case 5:
        return qcow2_be32(blk + 4 * i);
    default:
        return qcow2_be64(blk + 8 * i);
    }
}

void qcow2_rc_set(BDRVQcow2State *s, uint8_t *blk, uint64_t i, uint64_t v)
{
    switch (s->refcount_order) {
    case 0:
    case 1:
    case 2: {
        unsigned bits = s->refcount_bits;
        uint64_t bit = i * bits;
        uint8_t mask = (uint8_t)(((1U << bits) - 1) << (bit % 8));
        blk[bit / 8] = (uint8_t)((blk[bit / 8] & ~mask) |
                                 ((v << (bit % 8)) & mask));
        break;
    }
    case 3:
        blk[i] = (uint8_t)v;
        break;
    case 4:
        blk[2 * i] = (uint8_t)(v >> 8);
        blk[2 * i + 1] = (uint8_t)v;
        break;
    case 5:
        qcow2_put_be32(blk + 4 * i, (uint32_t)v);
        break;
    default:
        qcow2_put_be64(blk + 8 * i, v);
        break;
    }
}

/* One refcount block being read-modify-written. */
typedef struct {
    uint64_t blk_index; /* UINT64_MAX: none loaded */
    uint64_t offset;
    bool dirty;
    uint8_t *buf;
} RcCursor;

static int rc_cursor_flush(ChainImage *img, RcCursor *c)
{
    BDRVQcow2State *s = img->opaque;

    if (c->dirty) {
        c->dirty = false;
        return qcow2_pwrite_meta(img, QCOW2_META_RB, c->buf, s->cluster_size,
                                 c->offset);
    }
    return 0;
}

/* Load the refcount block for cluster index ci.  -ENOENT if it has none. */
static int rc_cursor_load(ChainImage *img, RcCursor *c, uint64_t ci)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t blk = ci / s->rb_entries;
    int ret;

    if (c->blk_index == blk) {
        return 0;
    }
    ret = rc_cursor_flush(img, c);
    if (ret < 0) {
        return ret;
    }
    c->blk_index = UINT64_MAX;
    if (blk >= s->rt_entries || !(s->rt[blk] & QCOW2_RTE_OFFSET_MASK)) {
        return -ENOENT;
    }
    c->offset = s->rt[blk] & QCOW2_RTE_OFFSET_MASK;
    if (c->offset & (s->cluster_size - 1)) {
        return -EIO;
    }
    if (!c->buf) {
        c->buf = g_malloc(s->cluster_size);
    }
    ret = qcow2_pread_full(img->fd, c->buf, s->cluster_size, c->offset);
    if (ret < 0) {
        return ret;
    }
    c->blk_index = blk;
    return 0;
}

int qcow2_get_refcount(ChainImage *img, uint64_t offset, uint64_t *refcount)
{
    BDRVQcow2State *s = img->opaque;
    RcCursor c = { .blk_index = UINT64_MAX };
    uint64_t ci = offset >> s->cluster_bits;
    int ret = rc_cursor_load(img, &c, ci);

    *refcount = 0;
    if (ret == 0) {
        *refcount = rc_get(s, c.buf, ci % s->rb_entries);
    } else if (ret == -ENOENT) {
        ret = 0;
    }
    g_free(c.buf);
    return ret;
}

int qcow2_sync_meta(ChainImage *img)
{
    BDRVQcow2State *s = img->opaque;
    int ret = chain_image_datasync(img);

    if (ret == 0) {
        s->rc_unsynced = false;
    }
    return ret;
}

uint64_t qcow2_pool_left(BDRVQcow2State *s)
{
    return (s->pool_end - s->pool_next) >> s->cluster_bits;
}

/*
 * Reserve a batch of at least `want` clusters at the end of the file.
 * meta_lock held.  See the comment at the top for the ordering.
 */
static int qcow2_reserve_batch(ChainImage *img, uint64_t want)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t rbe = s->rb_entries;
    uint64_t batch = MAX(want, MAX(1, (16ULL << 20) / cs));
    uint64_t start = s->pool_end;
    uint64_t start_ci = start / cs;
    uint64_t meta_rt = 0, meta_rb = 0;
    uint64_t end_ci, first_blk, last_blk;
    RcCursor c = { .blk_index = UINT64_MAX };
    g_autofree uint8_t *newblks = NULL;
    g_autofree uint64_t *newrt = NULL;
    int ret = 0;

    if (s->refcount_max < 1) {
        return -EIO;
    }
    /* Fixed point: the metadata of the batch is part of the batch. */
    for (;;) {
        end_ci = start_ci + meta_rt + meta_rb + batch;
        first_blk = start_ci / rbe;
        last_blk = (end_ci - 1) / rbe;
        uint64_t missing = 0;
        for (uint64_t b = first_blk; b <= last_blk; b++) {
            if (b >= s->rt_entries || !(s->rt[b] & QCOW2_RTE_OFFSET_MASK)) {
                missing++;
            }
        }
        uint64_t rt_cl = 0;
        if (last_blk >= s->rt_entries) {
            /* Room for growth so the next batches fit the new table. */
            rt_cl = ((last_blk + 1) * 8 * 2 + cs - 1) / cs;
        }
        if (missing == meta_rb && rt_cl == meta_rt) {
            break;
        }
        meta_rb = MAX(meta_rb, missing);
        meta_rt = MAX(meta_rt, rt_cl);
    }
    if (meta_rt * cs > QCOW2_MAX_RT_BYTES) {
        return -EFBIG;
    }

    uint64_t rt_off = start;
    uint64_t rb_off = start + meta_rt * cs;
    uint64_t end = end_ci * cs;

    /* The file covers the whole batch before anything points into it. */
    if (ftruncate(img->fd, (off_t)end) < 0) {
        return -errno;
    }
    s->file_end = end;

    /* Refcount 1 for every cluster of the batch, metadata included. */
    newblks = g_malloc0(MAX(1, meta_rb) * cs);
    uint64_t *blk_off = g_new0(uint64_t, last_blk - first_blk + 1);
    uint64_t next_new = 0;
    for (uint64_t b = first_blk; b <= last_blk; b++) {
        uint64_t lo = MAX(start_ci, b * rbe);
        uint64_t hi = MIN(end_ci, (b + 1) * rbe);
        bool exists = b < s->rt_entries &&
                      (s->rt[b] & QCOW2_RTE_OFFSET_MASK);
        if (exists) {
            blk_off[b - first_blk] = s->rt[b] & QCOW2_RTE_OFFSET_MASK;
            ret = rc_cursor_load(img, &c, b * rbe);
            if (ret < 0) {
                goto out;
            }
            for (uint64_t ci = lo; ci < hi; ci++) {
                qcow2_rc_set(s, c.buf, ci - b * rbe, 1);
            }
            c.dirty = true;
        } else {
            uint8_t *nb = newblks + next_new * cs;
            blk_off[b - first_blk] = rb_off + next_new * cs;
            next_new++;
            for (uint64_t ci = lo; ci < hi; ci++) {
                qcow2_rc_set(s, nb, ci - b * rbe, 1);
            }
        }
    }
    g_assert(next_new == meta_rb);
    ret = rc_cursor_flush(img, &c);
    if (ret == 0 && meta_rb > 0) {
        /* Fresh clusters at the end of the file: metadata from now on. */
        if (!qcow2_meta_add(s, QCOW2_META_RB, rb_off, meta_rb * cs, NULL)) {
            ret = qcow2_signal_corruption(img, "new refcount blocks at host "
                                          "offset %" G_GUINT64_FORMAT
                                          " land on metadata", rb_off);
        } else {
            ret = qcow2_pwrite_meta(img, QCOW2_META_RB, newblks,
                                    meta_rb * cs, rb_off);
        }
    }
    if (ret < 0) {
        goto out;
    }
    if (meta_rb == 0 && meta_rt == 0) {
        /* Only entries of existing blocks changed: durable at the next
         * fdatasync, before anything durable points into the batch. */
        s->rc_unsynced = true;
    } else {
        /* New blocks are synced before the table (entries) naming them. */
        ret = qcow2_sync_meta(img);
        if (ret < 0) {
            goto out;
        }
    }

    if (meta_rt > 0) {
        /* A larger refcount table: written and synced, then the header. */
        uint64_t n = meta_rt * cs / 8;
        uint8_t h[12];
        newrt = g_new0(uint64_t, n);
        memcpy(newrt, s->rt, s->rt_entries * 8);
        for (uint64_t b = first_blk; b <= last_blk; b++) {
            newrt[b] = blk_off[b - first_blk];
        }
        g_autofree uint64_t *be = g_new(uint64_t, n);
        for (uint64_t i = 0; i < n; i++) {
            be[i] = GUINT64_TO_BE(newrt[i]);
        }
        if (!qcow2_meta_add(s, QCOW2_META_RT, rt_off, n * 8, NULL)) {
            ret = qcow2_signal_corruption(img, "new refcount table at host "
                                          "offset %" G_GUINT64_FORMAT
                                          " lands on metadata", rt_off);
        } else {
            ret = qcow2_pwrite_meta(img, QCOW2_META_RT, be, n * 8, rt_off);
        }
        if (ret == 0) {
            ret = qcow2_sync_meta(img);
        }
        if (ret == 0) {
            qcow2_put_be64(h, rt_off);
            qcow2_put_be32(h + 8, (uint32_t)meta_rt);
            ret = qcow2_pwrite_meta(img, QCOW2_META_HEADER, h, sizeof(h), 48);
            if (ret == 0) {
                memcpy(s->header_raw + 48, h, sizeof(h));
                ret = qcow2_sync_meta(img);
            }
        }
        if (ret < 0) {
            goto out;
        }
        qcow2_defer_free(s, s->rt_offset, (uint64_t)s->rt_clusters * cs);
        /* The header names the new table: the old one is not metadata
         * any more (its clusters are never reused, see above). */
        qcow2_meta_remove(s, QCOW2_META_RT, s->rt_offset,
                          (uint64_t)s->rt_clusters * cs);
        g_free(s->rt);
        s->rt = g_steal_pointer(&newrt);
        s->rt_entries = n;
        s->rt_offset = rt_off;
        s->rt_clusters = (uint32_t)meta_rt;
    } else if (meta_rb > 0) {
        /* New blocks are durable: now the table entries naming them. */
        uint64_t lo = UINT64_MAX, hi = 0;
        for (uint64_t b = first_blk; b <= last_blk; b++) {
            if (!(s->rt[b] & QCOW2_RTE_OFFSET_MASK)) {
                s->rt[b] = blk_off[b - first_blk];
                lo = MIN(lo, b);
                hi = MAX(hi, b + 1);
            }
        }
        g_autofree uint64_t *be = g_new(uint64_t, hi - lo);
        for (uint64_t b = lo; b < hi; b++) {
            be[b - lo] = GUINT64_TO_BE(s->rt[b]);
        }
        ret = qcow2_pwrite_meta(img, QCOW2_META_RT, be, (hi - lo) * 8,
                                s->rt_offset + lo * 8);
        if (ret == 0) {
            ret = qcow2_sync_meta(img);
        }
        if (ret < 0) {
            goto out;
        }
    }
    s->pool_next = start + (meta_rt + meta_rb) * cs;
    s->pool_end = end;

out:
    g_free(blk_off);
    g_free(c.buf);
    return ret;
}

int qcow2_alloc_clusters(ChainImage *img, uint64_t n, uint64_t *offset)
{
    BDRVQcow2State *s = img->opaque;
    int ret;

    /* Whatever would point at new clusters of a latched image could never
     * be made durable (no flush succeeds): refuse now, not at the flush. */
    if (chain_image_io_latched(img)) {
        return -EIO;
    }
    if (qcow2_pool_left(s) < n) {
        /* A rest too small to be useful stays reserved: a leak, no harm. */
        s->pool_next = s->pool_end;
        ret = qcow2_reserve_batch(img, n);
        if (ret < 0) {
            return ret;
        }
    }
    *offset = s->pool_next;
    s->pool_next += n * s->cluster_size;
    return 0;
}

void qcow2_defer_free(BDRVQcow2State *s, uint64_t offset, uint64_t len)
{
    uint64_t cs = s->cluster_size;
    Qcow2PendingFree f;

    if (len == 0 || offset == 0) {
        return;
    }
    f.offset = offset & ~(cs - 1);
    f.nb_clusters = (((offset + len - 1) & ~(cs - 1)) - f.offset) / cs + 1;
    g_array_append_val(s->pending_frees, f);
}

void qcow2_defer_free_entry(BDRVQcow2State *s, uint64_t l2e)
{
    switch (qcow2_entry_type(s, l2e)) {
    case QCOW2_CL_NORMAL:
    case QCOW2_CL_ZERO_ALLOC:
        qcow2_defer_free(s, l2e & QCOW2_L2E_OFFSET_MASK, s->cluster_size);
        break;
    case QCOW2_CL_COMPRESSED: {
        uint64_t coff = l2e & s->coffset_mask;
        uint64_t nb = ((l2e >> s->csize_shift) & s->csize_mask) + 1;
        qcow2_defer_free(s, coff & ~511ULL, nb * 512);
        break;
    }
    default:
        break;
    }
}

static gint pending_cmp(gconstpointer a, gconstpointer b)
{
    const Qcow2PendingFree *x = a, *y = b;

    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Decrement the refcounts of frees.  meta_lock held. */
static int qcow2_apply_frees(ChainImage *img, GArray *frees)
{
    BDRVQcow2State *s = img->opaque;
    RcCursor c = { .blk_index = UINT64_MAX };
    int ret = 0;

    g_array_sort(frees, pending_cmp);
    for (guint i = 0; i < frees->len && ret == 0; i++) {
        Qcow2PendingFree *f = &g_array_index(frees, Qcow2PendingFree, i);
        uint64_t ci0 = f->offset >> s->cluster_bits;
        for (uint64_t ci = ci0; ci < ci0 + f->nb_clusters; ci++) {
            ret = rc_cursor_load(img, &c, ci);
            if (ret == -ENOENT) {
                g_warning("%s: freeing cluster %" G_GUINT64_FORMAT
                          " that has no refcount block", img->path, ci);
                ret = 0;
                continue;
            }
            if (ret < 0) {
                break;
            }
            uint64_t v = rc_get(s, c.buf, ci % s->rb_entries);
            if (v == 0) {
                g_warning("%s: freeing cluster %" G_GUINT64_FORMAT
                          " whose refcount is already 0", img->path, ci);
                continue;
            }
            qcow2_rc_set(s, c.buf, ci % s->rb_entries, v - 1);
            c.dirty = true;
        }
    }
    if (ret == 0) {
        ret = rc_cursor_flush(img, &c);
    }
    g_free(c.buf);
    return ret;
}

/*
 * Flush: (1) fdatasync: the data of every L2 entry set in memory so far is
 * durable; (2) write those entries (dirty L2 tables); (3) fdatasync: the
 * entries are durable; (4) apply the frees queued before (2), which only
 * concern clusters those entries no longer point to.  (1) and (2) run
 * under meta_lock so that no entry whose data (1) did not cover sneaks
 * into (2).
 */
int qcow2_flush_and_free(ChainImage *img)
{
    BDRVQcow2State *s = img->opaque;
    g_autoptr(GArray) frees = NULL;
    int ret;

    g_mutex_lock(&img->meta_lock);
    frees = s->pending_frees;
    s->pending_frees = g_array_new(FALSE, FALSE, sizeof(Qcow2PendingFree));
    ret = qcow2_sync_meta(img);
    if (ret == 0) {
        ret = qcow2_cache_write_dirty(img);
    }
    g_mutex_unlock(&img->meta_lock);

    /* Nothing new to make durable (overwrites in place only): one sync. */
    if (ret > 0 || (ret == 0 && frees->len > 0)) {
        ret = chain_image_datasync(img);
    }
    g_mutex_lock(&img->meta_lock);
    if (ret < 0) {
        /* Not durable: keep them for the next flush. */
        g_array_append_vals(s->pending_frees, frees->data, frees->len);
    } else {
        /* A failed decrement only leaks: never fail the flush for it. */
        int r = frees->len > 0 ? qcow2_apply_frees(img, frees) : 0;
        if (r < 0) {
            g_warning("%s: cannot release freed clusters: %s", img->path,
                      g_strerror(-r));
        }
        /*
         * Give the unused batch back at every flush: the image may be
         * reopened read-only right after (chain_image_reopen does not
         * close the driver), and a clean image must not show leaks.
         * No sync needed: losing these writes only leaks.
         */
        qcow2_release_pool_locked(img, false);
    }
    g_mutex_unlock(&img->meta_lock);
    return ret;
}

void qcow2_release_pool_locked(ChainImage *img, bool sync)
{
    BDRVQcow2State *s = img->opaque;
    RcCursor c = { .blk_index = UINT64_MAX };
    int ret = 0;

    if (s->pool_next >= s->pool_end) {
        return;
    }
    uint64_t ci0 = s->pool_next >> s->cluster_bits;
    uint64_t ci1 = s->pool_end >> s->cluster_bits;
    for (uint64_t ci = ci0; ci < ci1 && ret == 0; ci++) {
        ret = rc_cursor_load(img, &c, ci);
        if (ret == 0) {
            qcow2_rc_set(s, c.buf, ci % s->rb_entries, 0);
            c.dirty = true;
        }
    }
    if (ret == 0) {
        ret = rc_cursor_flush(img, &c);
    }
    /*
     * Refcounts first, then the file shrinks.  Should the truncation reach
     * the disk before the refcounts, clusters past the end of the file
     * keep refcount 1; qemu-img check does not look past the end of the
     * file, and our next batch sets them again anyway.
     */
    if (ret == 0 && sync) {
        ret = chain_image_datasync(img);
    }
    if (ret == 0) {
        s->pool_end = s->pool_next;
        if (ftruncate(img->fd, (off_t)s->pool_next) == 0) {
            s->file_end = s->pool_next;
            if (sync) {
                chain_image_datasync(img);
            }
        }
    }
    g_free(c.buf);
}

void qcow2_release_pool(ChainImage *img)
{
    g_mutex_lock(&img->meta_lock);
    qcow2_release_pool_locked(img, true);
    g_mutex_unlock(&img->meta_lock);
}
