/*
 * qcow2-repair.c: rebuild the refcounts of a dirty image before it is
 * written.
 *
 * An image created with lazy_refcounts carries the dirty bit while QEMU
 * has it open for writing; QEMU then writes L2 entries without the
 * refcount updates that go with them.  When that QEMU is killed, the
 * tables (L1, L2, snapshots) are right and the refcounts are stale.
 * Reading such an image needs no refcount, so a layer that is only read
 * is left as it is.  Writing it needs them (allocation trusts them), so
 * before the first write the refcounts are computed again from the
 * tables, as QEMU does when it opens a dirty image read-write
 * (qcow2_check_refcounts with fix), and written as a new refcount
 * structure.
 *
 * Crash safety, in the order qcow2_repair_refcounts enforces it:
 *   1. the new refcount blocks and table are written past the end of the
 *      file, where nothing points: a crash leaves the image as it was
 *      (dirty, still repairable) plus unreferenced clusters at its end;
 *   2. fdatasync: the new structure is durable before anything names it;
 *   3. one write of header bytes 48..79 (refcount table offset and
 *      clusters, incompatible features without the dirty bit), which lies
 *      in the first 512-byte sector and so reaches the disk whole or not
 *      at all: before it the image is the old dirty one, after it a clean
 *      image whose refcounts are the new ones;
 *   4. fdatasync, before any allocation trusts the new refcounts.
 * The old refcount table and blocks are left in place with refcount 0 in
 * the new structure: free space, referenced by nothing.
 *
 * Counting follows the format (docs/interop/qcow2.txt): one reference for
 * the header cluster, each cluster of the active and of each snapshot's
 * L1 table, of the snapshot table and of the new refcount structure; one
 * per L1 entry naming an L2 table; one per L2 entry (of every L1 entry
 * naming it) naming a data cluster, a preallocated zero cluster or the
 * host clusters a compressed cluster spans.  A table or entry that points
 * past the end of the file or onto metadata, and a valid bitmaps
 * extension (whose tables this code does not walk), make the repair
 * refuse: `qemu-img check -r all` is then the tool.
 */
#include <errno.h>
#include <string.h>

#include "chain-error.h"
#include "chain-log.h"
#include "qcow2-int.h"

typedef struct {
    ChainImage *img;
    BDRVQcow2State *s;
    uint32_t *counts;    /* references per host cluster */
    uint64_t nclusters;  /* host clusters the counts cover */
    uint8_t *l2buf;      /* one L2 table, as on disk */
} RefcountRebuild;

/* EOPNOTSUPP, whatever stops the rebuild: the image cannot be written, and
 * the daemon serves it read-only (export.c), as QEMU reads it. */
static bool refuse(RefcountRebuild *r, GError **error, const char *what)
{
    chainfs_set_error(error, EOPNOTSUPP, "%s: qcow2 image is dirty (lazy refcounts "
                      "were not written back) and its refcounts cannot be "
                      "rebuilt: %s; run 'qemu-img check -r all %s'",
                      r->img->path, what, r->img->path);
    return false;
}

/* One reference to every host cluster of [off, off + len). */
static bool count_range(RefcountRebuild *r, uint64_t off, uint64_t len,
                        const char *what, GError **error)
{
    uint64_t cs = r->s->cluster_size;

    if (len == 0) {
        return true;
    }
    uint64_t first = off / cs, last = (off + len - 1) / cs;
    if (last >= r->nclusters) {
        g_autofree char *why = g_strdup_printf(
            "the %s at host offset %" G_GUINT64_FORMAT " lies past the end "
            "of the file", what, off);
        return refuse(r, error, why);
    }
    for (uint64_t i = first; i <= last; i++) {
        if (r->counts[i] == UINT32_MAX) {
            return refuse(r, error, "a cluster has too many "
                          "references");
        }
        r->counts[i]++;
    }
    return true;
}

/* An L2 table and what its entries point to. */
static bool count_l2(RefcountRebuild *r, uint64_t l2_off, GError **error)
{
    BDRVQcow2State *s = r->s;
    int ret;

    if (l2_off & (s->cluster_size - 1)) {
        return refuse(r, error, "an L2 table is misaligned");
    }
    if (!count_range(r, l2_off, s->cluster_size, "L2 table", error)) {
        return false;
    }
    ret = qcow2_pread_full(r->img->fd, r->l2buf, s->cluster_size, l2_off);
    if (ret < 0) {
        chainfs_set_error(error, -ret, "%s: cannot read the L2 table at host "
                          "offset %" G_GUINT64_FORMAT ": %s", r->img->path,
                          l2_off, g_strerror(-ret));
        return false;
    }
    for (uint64_t i = 0; i < s->l2_size; i++) {
        uint64_t e = qcow2_be64(r->l2buf + 8 * i);
        g_autofree char *fault = NULL;
        bool ok = true;

        switch (qcow2_entry_type(s, e)) {
        case QCOW2_CL_NORMAL:
        case QCOW2_CL_ZERO_ALLOC:
            fault = qcow2_entry_fault(s, e);
            ok = !fault && count_range(r, e & QCOW2_L2E_OFFSET_MASK,
                                       s->cluster_size, "data cluster", error);
            break;
        case QCOW2_CL_COMPRESSED: {
            uint64_t nb = ((e >> s->csize_shift) & s->csize_mask) + 1;
            uint64_t off = e & s->coffset_mask;

            fault = qcow2_entry_fault(s, e);
            ok = !fault && count_range(r, off, nb * 512 - (off & 511),
                                       "compressed cluster", error);
            break;
        }
        default:
            break;
        }
        if (fault) {
            g_autofree char *why = g_strdup_printf(
                "an L2 entry of the table at host offset %" G_GUINT64_FORMAT
                " is corrupt (%s)", l2_off, fault);
            return refuse(r, error, why);
        }
        if (!ok) {
            return false;
        }
    }
    return true;
}

/* An L1 table (host byte order entries) and everything below it. */
static bool count_l1(RefcountRebuild *r, const uint64_t *l1, uint32_t n,
                     GError **error)
{
    for (uint32_t i = 0; i < n; i++) {
        uint64_t off = l1[i] & QCOW2_L1E_OFFSET_MASK;

        if (off && !count_l2(r, off, error)) {
            return false;
        }
    }
    return true;
}

/* Each snapshot's L1 table and its tree (the table was checked at open). */
static bool count_snapshots(RefcountRebuild *r, GError **error)
{
    BDRVQcow2State *s = r->s;
    g_autofree uint8_t *tab = NULL;
    uint64_t pos = 0;
    int ret;

    if (s->nb_snapshots == 0) {
        return true;
    }
    if (!count_range(r, s->snapshots_offset, s->snapshots_size,
                     "snapshot table", error)) {
        return false;
    }
    /* QEMU does not write the padding of the last entry: the file may
     * end inside the table's last 8 bytes (checked at open). */
    tab = g_malloc0(s->snapshots_size);
    ret = qcow2_pread_full(r->img->fd, tab,
                           MIN(s->snapshots_size,
                               s->file_end - s->snapshots_offset),
                           s->snapshots_offset);
    if (ret < 0) {
        chainfs_set_error(error, -ret, "%s: cannot read the snapshot table: "
                          "%s", r->img->path, g_strerror(-ret));
        return false;
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        const uint8_t *e = tab + pos;
        uint64_t l1_off = qcow2_be64(e);
        uint32_t l1_n = qcow2_be32(e + 8);
        g_autofree uint64_t *l1 = g_new0(uint64_t, MAX(l1_n, 1));

        pos += (QCOW2_SNAPSHOT_ENTRY_MIN + qcow2_be32(e + 36) +
                qcow2_be16(e + 12) + qcow2_be16(e + 14) + 7) & ~7ULL;
        if (l1_n == 0) {
            continue;
        }
        if (!count_range(r, l1_off, (uint64_t)l1_n * 8, "snapshot L1 table",
                         error)) {
            return false;
        }
        ret = qcow2_pread_full(r->img->fd, l1, (size_t)l1_n * 8, l1_off);
        if (ret < 0) {
            chainfs_set_error(error, -ret, "%s: cannot read the L1 table of "
                              "snapshot %u: %s", r->img->path, i,
                              g_strerror(-ret));
            return false;
        }
        for (uint32_t j = 0; j < l1_n; j++) {
            l1[j] = GUINT64_FROM_BE(l1[j]);
        }
        if (!count_l1(r, l1, l1_n, error)) {
            return false;
        }
    }
    return true;
}

/*
 * How many refcount blocks and table clusters a structure placed at
 * cluster `start` needs to cover itself and everything before it.
 */
static void size_structure(BDRVQcow2State *s, uint64_t start, uint64_t *rb_n,
                           uint64_t *rt_n)
{
    uint64_t cs = s->cluster_size;

    *rb_n = *rt_n = 0;
    for (;;) {
        uint64_t total = start + *rb_n + *rt_n;
        uint64_t rb = (total + s->rb_entries - 1) / s->rb_entries;
        uint64_t rt = (rb * 8 + cs - 1) / cs;

        if (rb == *rb_n && rt == *rt_n) {
            return;
        }
        *rb_n = rb;
        *rt_n = rt;
    }
}

/* The counting and the writes, meta_lock held. */
static bool rebuild_locked(ChainImage *img, int fd, GError **error)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t cs = s->cluster_size;
    RefcountRebuild r = { .img = img, .s = s };
    g_autofree uint8_t *l2buf = g_malloc(cs);
    g_autofree uint32_t *counts = NULL;
    g_autofree uint8_t *blocks = NULL;
    g_autofree uint64_t *rt_be = NULL;
    uint64_t rb_n, rt_n, old_rt_off = s->rt_offset;
    uint32_t old_rt_clusters = s->rt_clusters;
    uint8_t hdr[32];
    int ret;

    if (s->bad_l2) {
        return refuse(&r, error, "an L2 table is corrupt");
    }
    if (qcow2_valid_bitmaps_ext(s)) {
        return refuse(&r, error, "it has persistent bitmaps");
    }

    /* Count the references the tables make. */
    uint64_t start = (s->file_end + cs - 1) / cs;
    r.nclusters = start;
    r.counts = counts = g_new0(uint32_t, MAX(start, 1));
    r.l2buf = l2buf;
    if (!count_range(&r, 0, cs, "header", error) ||
        !count_range(&r, s->l1_offset, (uint64_t)s->l1_size * 8, "L1 table",
                     error) ||
        !count_l1(&r, s->l1_table, s->l1_size, error) ||
        !count_snapshots(&r, error)) {
        return false;
    }

    /* The new structure, after the last cluster of the file, counting
     * itself. */
    size_structure(s, start, &rb_n, &rt_n);
    if (rt_n * cs > QCOW2_MAX_RT_BYTES) {
        return refuse(&r, error, "the refcount table would be too "
                      "large");
    }
    uint64_t total = start + rb_n + rt_n;
    r.counts = counts = g_renew(uint32_t, counts, total);
    for (uint64_t i = start; i < total; i++) {
        counts[i] = 1;
    }
    blocks = g_malloc0(rb_n * cs);
    for (uint64_t i = 0; i < total; i++) {
        if (counts[i] > s->refcount_max) {
            g_autofree char *why = g_strdup_printf(
                "host cluster %" G_GUINT64_FORMAT " has %u references, more "
                "than %u-bit refcounts hold", i, counts[i], s->refcount_bits);
            return refuse(&r, error, why);
        }
        qcow2_rc_set(s, blocks + (i / s->rb_entries) * cs, i % s->rb_entries,
                     counts[i]);
    }
    uint64_t rt_entries = rt_n * cs / 8;
    rt_be = g_new0(uint64_t, rt_entries);
    for (uint64_t b = 0; b < rb_n; b++) {
        rt_be[b] = GUINT64_TO_BE((start + b) * cs);
    }

    /* Steps 1 and 2: the structure, durable before anything names it. */
    ret = qcow2_pwrite_full(fd, blocks, rb_n * cs, start * cs);
    if (ret == 0) {
        ret = qcow2_pwrite_full(fd, rt_be, rt_n * cs, (start + rb_n) * cs);
    }
    if (ret == 0) {
        ret = qcow2_datasync(fd);
    }
    /* Steps 3 and 4: one sector-sized header write switches to it. */
    if (ret == 0) {
        ret = qcow2_pread_full(fd, hdr, sizeof(hdr), 48);
    }
    if (ret == 0) {
        qcow2_put_be64(hdr, (start + rb_n) * cs);
        qcow2_put_be32(hdr + 8, (uint32_t)rt_n);
        qcow2_put_be64(hdr + 24, s->incompat & ~QCOW2_INCOMPAT_DIRTY);
        ret = qcow2_pwrite_full(fd, hdr, sizeof(hdr), 48);
    }
    if (ret == 0) {
        ret = qcow2_datasync(fd);
    }
    if (ret < 0) {
        chainfs_set_error(error, -ret, "%s: rebuilding the refcounts of the "
                          "dirty image failed: %s", img->path,
                          g_strerror(-ret));
        return false;
    }

    /* The driver state follows the file. */
    qcow2_meta_remove(s, QCOW2_META_RT, old_rt_off,
                      (uint64_t)old_rt_clusters * cs);
    for (uint64_t i = 0; i < s->rt_entries; i++) {
        uint64_t off = s->rt[i] & QCOW2_RTE_OFFSET_MASK;
        if (off) {
            qcow2_meta_remove(s, QCOW2_META_RB, off, cs);
        }
    }
    g_free(s->rt);
    s->rt = g_new(uint64_t, rt_entries);
    for (uint64_t i = 0; i < rt_entries; i++) {
        s->rt[i] = GUINT64_FROM_BE(rt_be[i]);
    }
    s->rt_offset = (start + rb_n) * cs;
    s->rt_clusters = (uint32_t)rt_n;
    s->rt_entries = rt_entries;
    qcow2_meta_add(s, QCOW2_META_RB, start * cs, rb_n * cs, NULL);
    qcow2_meta_add(s, QCOW2_META_RT, s->rt_offset, rt_n * cs, NULL);
    s->incompat &= ~QCOW2_INCOMPAT_DIRTY;
    memcpy(s->header_raw + 48, hdr, sizeof(hdr));
    s->file_end = total * cs;
    s->pool_next = s->pool_end = total * cs;
    return true;
}

bool qcow2_repair_refcounts(ChainImage *img, int fd, GError **error)
{
    /* The metadata map (qcow2_entry_fault) and the tables are read, and
     * the state changed, under meta_lock: on a reopen, readers of the
     * image run meanwhile (no writer: the image was read-only). */
    g_mutex_lock(&img->meta_lock);
    bool ok = rebuild_locked(img, fd, error);
    g_mutex_unlock(&img->meta_lock);
    if (ok) {
        chainfs_log(G_LOG_LEVEL_MESSAGE, NULL, NULL,
                    "%s: rebuilt the refcounts of a dirty image (lazy "
                    "refcounts not written back by its last writer)",
                    img->path);
    }
    return ok;
}
