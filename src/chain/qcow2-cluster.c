/*
 * qcow2-cluster.c: the L2 table cache, guest-to-host cluster mapping, and
 * the write path (allocation, copy-on-write, zero clusters).
 *
 * Write ordering, relied on for crash safety (SIGKILL at any instant leaves
 * an image `qemu-img check` finds consistent, leaks aside; a power loss
 * loses nothing acknowledged before the last flush):
 *   1. new host clusters come from a batch whose refcounts are already 1
 *      (written; qcow2-refcount.c), and those writes are durable before
 *      any pointer to the batch is: L2 entries by rule 3, whose fdatasync
 *      covers them, the L1 entry of a new table by rule 4; so no durable
 *      L2 or L1 entry ever points to a cluster with refcount 0;
 *   2. a new cluster's data (the guest bytes and the copy-on-write fill) is
 *      written completely before its L2 entry is set, and the entry is set
 *      only in the cached table, which becomes dirty and stays in memory;
 *   3. dirty tables reach the disk only after an fdatasync made the data
 *      they point to durable (qcow2_flush_and_free, or qcow2_cache_victim
 *      when every slot is dirty), both steps under meta_lock.  Writing the
 *      entry straight away would let a power loss keep the entry and lose
 *      the copy-on-write fill, so that bytes the guest never touched
 *      (backing data acknowledged long ago) would read as zeros;
 *   4. a new L2 table is written before the L1 entry that points to it (a
 *      copied one, which holds entries that are already durable, is also
 *      synced first, and so is a fresh one while the refcounts of the
 *      current batch are not known durable: s->rc_unsynced);
 *   5. what the old entries pointed to is released (refcount decremented)
 *      only after the fdatasync that made the dirty tables durable, and
 *      freed clusters are never reused.
 * A write acknowledged but not flushed may therefore be lost by a crash of
 * the process, as with QEMU's writeback L2 cache; flush makes it durable.
 * The guest clusters whose allocation is in flight are in s->inflight:
 * a second writer of such a cluster waits on inflight_cond, so two writes
 * never both allocate the same cluster, and readers keep seeing the old
 * mapping until the new one is complete.
 */
#include <errno.h>
#include <string.h>
#include <zlib.h>

#include "qcow2-int.h"

/* ---- L2 cache --------------------------------------------------------- */

void qcow2_cache_init(BDRVQcow2State *s)
{
    /* About 4 MiB of tables: 64 tables of 64 KiB clusters (32 GiB of guest
     * disk), at least 8 and at most 1024 tables.  Buffers come lazily. */
    uint64_t n = (4ULL << 20) / s->cluster_size;
    s->cache_n = (unsigned)CLAMP(n, 8, 1024);
    s->cache = g_new0(Qcow2CacheEntry, s->cache_n);
}

void qcow2_cache_free(BDRVQcow2State *s)
{
    if (!s->cache) {
        return;
    }
    for (unsigned i = 0; i < s->cache_n; i++) {
        g_free(s->cache[i].table);
    }
    g_clear_pointer(&s->cache, g_free);
}

void qcow2_cache_forget(BDRVQcow2State *s, uint64_t l2_offset)
{
    for (unsigned i = 0; i < s->cache_n; i++) {
        if (s->cache[i].offset == l2_offset) {
            g_assert(!s->cache[i].dirty);
            s->cache[i].offset = 0;
        }
    }
}

/* Whether the table at l2_offset is cached with changes not on disk. */
static bool qcow2_cache_is_dirty(BDRVQcow2State *s, uint64_t l2_offset)
{
    for (unsigned i = 0; i < s->cache_n; i++) {
        if (s->cache[i].offset == l2_offset && s->cache[i].dirty) {
            return true;
        }
    }
    return false;
}

/*
 * Write every dirty table's changed entries.  meta_lock held.  The caller
 * made the data they point to durable first (see the top of this file).
 */
int qcow2_cache_write_dirty(ChainImage *img)
{
    BDRVQcow2State *s = img->opaque;
    int written = 0;

    for (unsigned i = 0; i < s->cache_n; i++) {
        Qcow2CacheEntry *e = &s->cache[i];
        if (!e->dirty) {
            continue;
        }
        int ret = qcow2_pwrite_meta(img, QCOW2_META_L2,
                                    e->table + e->dirty_lo,
                                    (e->dirty_hi - e->dirty_lo) * 8,
                                    e->offset + e->dirty_lo * 8);
        if (ret < 0) {
            return ret;
        }
        e->dirty = false;
        written++;
    }
    return written;
}

/*
 * A slot for a new table: a free one, else the least recently used clean
 * one.  Dirty tables are never evicted; when every slot is dirty they are
 * written back first (data synced, then the tables), under meta_lock.
 */
static int qcow2_cache_victim(ChainImage *img, Qcow2CacheEntry **out)
{
    BDRVQcow2State *s = img->opaque;
    Qcow2CacheEntry *victim = NULL;

    for (int pass = 0; pass < 2; pass++) {
        for (unsigned i = 0; i < s->cache_n; i++) {
            Qcow2CacheEntry *e = &s->cache[i];
            if (e->offset == 0) {
                victim = e;
                break;
            }
            if (!e->dirty && (!victim || e->lru < victim->lru)) {
                victim = e;
            }
        }
        if (victim) {
            break;
        }
        int ret = qcow2_sync_meta(img);
        if (ret == 0) {
            ret = qcow2_cache_write_dirty(img);
        }
        if (ret < 0) {
            return ret;
        }
    }
    g_assert(victim);
    if (!victim->table) {
        victim->table = g_malloc(s->cluster_size);
    }
    victim->offset = 0;
    *out = victim;
    return 0;
}

/*
 * The L2 table at l2_offset, loaded if needed.  meta_lock held.  The
 * pointer stays valid until the next cache call under the same hold.
 */
static int qcow2_cache_get(ChainImage *img, uint64_t l2_offset,
                           uint64_t **table)
{
    BDRVQcow2State *s = img->opaque;
    Qcow2CacheEntry *victim;
    int ret;

    if ((l2_offset & (s->cluster_size - 1)) || l2_offset < s->cluster_size) {
        g_warning("%s: corrupt L2 table offset %" G_GUINT64_FORMAT,
                  img->path, l2_offset);
        return -EIO;
    }
    for (unsigned i = 0; i < s->cache_n; i++) {
        Qcow2CacheEntry *e = &s->cache[i];
        if (e->offset == l2_offset) {
            e->lru = ++s->lru_clock;
            *table = e->table;
            return 0;
        }
    }
    ret = qcow2_cache_victim(img, &victim);
    if (ret < 0) {
        return ret;
    }
    ret = qcow2_pread_full(img->fd, victim->table, s->cluster_size,
                           l2_offset);
    if (ret < 0) {
        return ret;
    }
    victim->offset = l2_offset;
    victim->lru = ++s->lru_clock;
    *table = victim->table;
    return 0;
}

/* Put a table we just wrote into the cache (content in `data`), clean. */
static int qcow2_cache_put(ChainImage *img, uint64_t l2_offset,
                           const void *data)
{
    BDRVQcow2State *s = img->opaque;
    Qcow2CacheEntry *victim;
    int ret;

    qcow2_cache_forget(s, l2_offset);
    ret = qcow2_cache_victim(img, &victim);
    if (ret < 0) {
        return ret;
    }
    memcpy(victim->table, data, s->cluster_size);
    victim->offset = l2_offset;
    victim->lru = ++s->lru_clock;
    return 0;
}

/* Entries [lo, hi) of the cached table at l2_offset changed in memory. */
static void qcow2_cache_mark_dirty(BDRVQcow2State *s, uint64_t l2_offset,
                                   uint64_t lo, uint64_t hi)
{
    for (unsigned i = 0; i < s->cache_n; i++) {
        Qcow2CacheEntry *e = &s->cache[i];
        if (e->offset == l2_offset) {
            if (!e->dirty) {
                e->dirty = true;
                e->dirty_lo = lo;
                e->dirty_hi = hi;
            } else {
                e->dirty_lo = MIN(e->dirty_lo, lo);
                e->dirty_hi = MAX(e->dirty_hi, hi);
            }
            return;
        }
    }
    g_assert_not_reached();
}

/* ---- entries ---------------------------------------------------------- */

Qcow2ClusterType qcow2_entry_type(BDRVQcow2State *s, uint64_t l2e)
{
    if (l2e & QCOW2_OFLAG_COMPRESSED) {
        return QCOW2_CL_COMPRESSED;
    }
    if ((l2e & QCOW2_OFLAG_ZERO) && s->version >= 3) {
        return (l2e & QCOW2_L2E_OFFSET_MASK) ? QCOW2_CL_ZERO_ALLOC
                                             : QCOW2_CL_ZERO_PLAIN;
    }
    if (l2e & QCOW2_L2E_OFFSET_MASK) {
        return QCOW2_CL_NORMAL;
    }
    return QCOW2_CL_UNALLOCATED;
}

typedef enum {
    ENTRY_SOUND,
    ENTRY_MISALIGNED,
    ENTRY_PAST_EOF,
    ENTRY_ON_METADATA,
} EntryFault;

/* The check behind qcow2_entry_fault, cheap enough for every lookup. */
static EntryFault entry_check(BDRVQcow2State *s, uint64_t l2e, uint64_t *host,
                              const Qcow2MetaRange **onto)
{
    uint64_t cs = s->cluster_size;
    uint64_t off, len;

    switch (qcow2_entry_type(s, l2e)) {
    case QCOW2_CL_NORMAL:
    case QCOW2_CL_ZERO_ALLOC:
        off = l2e & QCOW2_L2E_OFFSET_MASK;
        len = cs;
        *host = off;
        /* What it lands on first: a pointer into the header is about the
         * header, though also misaligned. */
        *onto = qcow2_meta_find(s, off, len, QCOW2_META_DATA);
        if (*onto) {
            return ENTRY_ON_METADATA;
        }
        if (off & (cs - 1)) {
            return ENTRY_MISALIGNED;
        }
        /* The last cluster may be short (a file QEMU left so). */
        if (off >= ((s->file_end + cs - 1) & ~(cs - 1))) {
            return ENTRY_PAST_EOF;
        }
        return ENTRY_SOUND;
    case QCOW2_CL_COMPRESSED: {
        uint64_t nb = ((l2e >> s->csize_shift) & s->csize_mask) + 1;
        off = l2e & s->coffset_mask;
        len = nb * 512 - (off & 511);
        *host = off;
        /* Compressed data ends within its last 512-byte sector. */
        if (off + len > ((s->file_end + 511) & ~511ULL)) {
            return ENTRY_PAST_EOF;
        }
        break;
    }
    default:
        return ENTRY_SOUND;
    }
    *onto = qcow2_meta_find(s, off, len, QCOW2_META_DATA);
    return *onto ? ENTRY_ON_METADATA : ENTRY_SOUND;
}

char *qcow2_entry_fault(BDRVQcow2State *s, uint64_t l2e)
{
    const Qcow2MetaRange *onto = NULL;
    uint64_t host = 0;

    switch (entry_check(s, l2e, &host, &onto)) {
    case ENTRY_MISALIGNED:
        return g_strdup_printf("host offset %" G_GUINT64_FORMAT " is "
                               "misaligned", host);
    case ENTRY_PAST_EOF:
        return g_strdup_printf("host offset %" G_GUINT64_FORMAT " lies past "
                               "the end of the file (%" G_GUINT64_FORMAT
                               " bytes)", host, s->file_end);
    case ENTRY_ON_METADATA:
        return g_strdup_printf("host offset %" G_GUINT64_FORMAT " is on the "
                               "%s at host offset %" G_GUINT64_FORMAT, host,
                               qcow2_meta_name(onto->kind),
                               MAX(onto->start, host & ~(uint64_t)
                                   (s->cluster_size - 1)));
    default:
        return NULL;
    }
}

/* The type a read goes by: a NORMAL or COMPRESSED entry that points
 * somewhere it cannot is CORRUPT. */
static Qcow2ClusterType qcow2_read_type(BDRVQcow2State *s, uint64_t l2e)
{
    Qcow2ClusterType t = qcow2_entry_type(s, l2e);
    const Qcow2MetaRange *onto;
    uint64_t host;

    if (t == QCOW2_CL_ZERO_ALLOC) {
        return QCOW2_CL_ZERO_PLAIN;
    }
    if ((t == QCOW2_CL_NORMAL || t == QCOW2_CL_COMPRESSED) &&
        entry_check(s, l2e, &host, &onto) != ENTRY_SOUND) {
        return QCOW2_CL_CORRUPT;
    }
    return t;
}

int qcow2_get_run(ChainImage *img, uint64_t offset, uint64_t bytes,
                  bool want_contig, Qcow2ClusterType *type, uint64_t *host,
                  uint64_t *pnum)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t done = 0;
    uint64_t expect_host = 0;
    bool first = true;

    *type = QCOW2_CL_UNALLOCATED;
    *host = 0;
    while (done < bytes) {
        uint64_t cur = offset + done;
        uint64_t gc = cur >> s->cluster_bits;
        uint64_t l1i = gc >> s->l2_bits;
        uint64_t l2i = gc & (s->l2_size - 1);
        uint64_t *table;
        int ret;

        bool no_table = l1i >= s->l1_size ||
                        !(s->l1_table[l1i] & QCOW2_L1E_OFFSET_MASK);
        if (no_table || qcow2_bad_l2(s, l1i)) {
            /* A whole L2 range (or everything past L1) is unallocated, or
             * its table cannot be trusted. */
            Qcow2ClusterType t = no_table ? QCOW2_CL_UNALLOCATED
                                          : QCOW2_CL_CORRUPT;
            if (!first && *type != t) {
                break;
            }
            first = false;
            *type = t;
            uint64_t span_end = l1i >= s->l1_size
                                ? offset + bytes
                                : ((l1i + 1) << (s->l2_bits + s->cluster_bits));
            done = MIN(bytes, span_end - offset);
            if (t == QCOW2_CL_CORRUPT && want_contig) {
                break;
            }
            continue;
        }
        ret = qcow2_cache_get(img, s->l1_table[l1i] & QCOW2_L1E_OFFSET_MASK,
                              &table);
        if (ret < 0) {
            return ret;
        }
        for (; l2i < s->l2_size && done < bytes; l2i++) {
            uint64_t e = GUINT64_FROM_BE(table[l2i]);
            Qcow2ClusterType t = qcow2_read_type(s, e);
            uint64_t intra = (offset + done) & (cs - 1);
            uint64_t chunk = MIN(cs - intra, bytes - done);

            if (first) {
                first = false;
                *type = t;
                if (t == QCOW2_CL_NORMAL) {
                    uint64_t h = e & QCOW2_L2E_OFFSET_MASK;
                    *host = h + intra;
                    expect_host = h + intra + chunk;
                } else if (t == QCOW2_CL_COMPRESSED ||
                           t == QCOW2_CL_CORRUPT) {
                    *host = e;
                }
                done += chunk;
                if ((t == QCOW2_CL_COMPRESSED || t == QCOW2_CL_CORRUPT) &&
                    want_contig) {
                    goto out;
                }
                continue;
            }
            if (t != *type || (t == QCOW2_CL_CORRUPT && want_contig)) {
                goto out;
            }
            if (t == QCOW2_CL_NORMAL && want_contig) {
                if ((e & QCOW2_L2E_OFFSET_MASK) != expect_host) {
                    goto out;
                }
                expect_host += chunk;
            }
            if (t == QCOW2_CL_COMPRESSED && want_contig) {
                goto out;
            }
            done += chunk;
        }
    }
out:
    *pnum = done;
    return 0;
}

int qcow2_read_compressed(ChainImage *img, uint64_t l2e, uint8_t *out)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t coffset = l2e & s->coffset_mask;
    uint64_t nb_sectors = ((l2e >> s->csize_shift) & s->csize_mask) + 1;
    uint64_t csize = nb_sectors * 512 - (coffset & 511);
    g_autofree uint8_t *in = g_malloc(csize);
    z_stream z;
    int ret;

    ret = qcow2_pread_full(img->fd, in, csize, coffset);
    if (ret < 0) {
        return ret;
    }
    memset(&z, 0, sizeof(z));
    if (inflateInit2(&z, -12) != Z_OK) {
        return -ENOMEM;
    }
    z.next_in = in;
    z.avail_in = (uInt)csize;
    z.next_out = out;
    z.avail_out = s->cluster_size;
    ret = inflate(&z, Z_FINISH);
    bool ok = (ret == Z_STREAM_END || ret == Z_BUF_ERROR) && z.avail_out == 0;
    inflateEnd(&z);
    if (!ok) {
        g_warning("%s: cannot decompress the cluster at host offset %"
                  G_GUINT64_FORMAT, img->path, coffset);
        return -EIO;
    }
    return 0;
}

/* ---- write path ------------------------------------------------------- */

/*
 * Make the L2 table covering L1 index l1i writable by us: allocate it when
 * absent, copy it when shared with a snapshot (L1 entry without COPIED).
 * meta_lock held.  0 or negative errno.
 */
static int qcow2_l2_prepare(ChainImage *img, uint64_t l1i)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t l1e = s->l1_table[l1i];
    uint64_t old = l1e & QCOW2_L1E_OFFSET_MASK;
    g_autofree uint64_t *content = g_malloc0(s->cluster_size);
    uint64_t new_off;
    uint8_t be[8];
    int ret;

    const char *bad = qcow2_bad_l2(s, l1i);
    if (bad) {
        /* Writing through it would write onto whatever it points at. */
        return qcow2_signal_corruption(img, "preventing a write through "
                                       "a corrupt L2 table: %s", bad);
    }
    if (old && (l1e & QCOW2_OFLAG_COPIED)) {
        return 0;
    }
    if (old) {
        uint64_t *t;
        /* A table changed through another L1 entry, which claims it alone
         * (COPIED), cannot be shared with a snapshot too: two L1 entries
         * name it and the image is corrupt.  Refuse rather than copy it
         * and drop the change (fuzz-qcow2 regression l2-shared-dirty). */
        if (qcow2_cache_is_dirty(s, old)) {
            g_warning("%s: L2 table at %" G_GUINT64_FORMAT " is named by "
                      "more than one L1 entry; refusing the write",
                      img->path, old);
            return -EIO;
        }
        ret = qcow2_cache_get(img, old, &t);
        if (ret < 0) {
            return ret;
        }
        memcpy(content, t, s->cluster_size);
    }
    ret = qcow2_alloc_clusters(img, 1, &new_off);
    if (ret < 0) {
        return ret;
    }
    /* The new table is metadata from now on (a fresh cluster: no clash). */
    if (!qcow2_meta_add(s, QCOW2_META_L2, new_off, s->cluster_size, NULL)) {
        return qcow2_signal_corruption(img, "new L2 table at host offset %"
                                       G_GUINT64_FORMAT " lands on metadata",
                                       new_off);
    }
    ret = qcow2_pwrite_meta(img, QCOW2_META_L2, content, s->cluster_size,
                            new_off);
    if (ret == 0 && (old || s->rc_unsynced)) {
        /* A copied table's content, or the new cluster's refcount (see
         * qcow2-refcount.c), must be durable before the L1 entry is. */
        ret = qcow2_sync_meta(img);
    }
    if (ret < 0) {
        return ret;
    }
    qcow2_put_be64(be, new_off | QCOW2_OFLAG_COPIED);
    ret = qcow2_pwrite_meta(img, QCOW2_META_L1, be, 8,
                            s->l1_offset + l1i * 8);
    if (ret < 0) {
        return ret;
    }
    s->l1_table[l1i] = new_off | QCOW2_OFLAG_COPIED;
    ret = qcow2_cache_put(img, new_off, content);
    if (ret < 0) {
        return ret;
    }
    if (old) {
        /* The snapshot keeps the old table; we drop our reference (and
         * stop tracking it: inactive L2 tables are not checked, as in
         * QEMU's default overlap checks). */
        qcow2_cache_forget(s, old);
        qcow2_meta_remove(s, QCOW2_META_L2, old, s->cluster_size);
        qcow2_defer_free(s, old, s->cluster_size);
    }
    return 0;
}

static bool qcow2_in_place(uint64_t l1e, uint64_t l2e, BDRVQcow2State *s)
{
    return (l1e & QCOW2_OFLAG_COPIED) &&
           qcow2_entry_type(s, l2e) == QCOW2_CL_NORMAL &&
           (l2e & QCOW2_OFLAG_COPIED);
}

/*
 * Fill out (one cluster) with what guest cluster gc showed before, given
 * its old L2 entry: the backing chain for unallocated, zeros, the old data
 * (shared or compressed).  No lock held.
 */
static int qcow2_cow_fill(ChainImage *img, uint64_t gc, uint64_t old,
                          uint8_t *out)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t goff = gc << s->cluster_bits;

    switch (qcow2_entry_type(s, old)) {
    case QCOW2_CL_UNALLOCATED: {
        uint64_t len = goff < img->virtual_size
                       ? MIN(cs, img->virtual_size - goff) : 0;
        memset(out + len, 0, cs - len);
        if (len == 0) {
            return 0;
        }
        if (!img->backing) {
            memset(out, 0, len);
            return 0;
        }
        return chain_image_read_below(img, goff, out, len);
    }
    case QCOW2_CL_NORMAL:
        return qcow2_pread_full(img->fd, out, cs,
                                old & QCOW2_L2E_OFFSET_MASK);
    case QCOW2_CL_COMPRESSED:
        return qcow2_read_compressed(img, old, out);
    default:
        memset(out, 0, cs);
        return 0;
    }
}

static bool qcow2_inflight_has(BDRVQcow2State *s, uint64_t gc)
{
    return g_hash_table_contains(s->inflight, GSIZE_TO_POINTER(gc + 1));
}

/*
 * An overwrite in place of the cluster entry e0 names, at [host, host+len)
 * (host includes the offset into the cluster): the cluster must be
 * aligned, inside the file and clear of metadata.  Else the image is
 * marked corrupt and the write fails with EIO.  meta_lock held.
 */
static int qcow2_check_data_write(ChainImage *img, uint64_t e0, uint64_t host,
                                  uint64_t len)
{
    BDRVQcow2State *s = img->opaque;
    g_autofree char *fault = qcow2_entry_fault(s, e0);

    if (fault) {
        return qcow2_signal_corruption(img, "preventing a guest write of %"
                                       G_GUINT64_FORMAT " bytes at host "
                                       "offset %" G_GUINT64_FORMAT ": %s",
                                       len, host, fault);
    }
    return qcow2_check_write(img, QCOW2_META_DATA, host, len);
}

/* Entries a write replaces must be sound (see qcow2_entry_fault). */
static int qcow2_check_old_entries(ChainImage *img, const uint64_t *old,
                                   uint64_t n)
{
    BDRVQcow2State *s = img->opaque;

    for (uint64_t i = 0; i < n; i++) {
        g_autofree char *fault = qcow2_entry_fault(s, old[i]);
        if (fault) {
            return qcow2_signal_corruption(img, "preventing a write over a "
                                           "corrupt L2 entry: %s", fault);
        }
    }
    return 0;
}

/*
 * One step of a write: the longest run from offset that is either written
 * in place (owned, host-contiguous clusters) or allocated in one go.
 * Returns the bytes written (> 0) or negative errno.
 */
static int64_t qcow2_write_step(ChainImage *img, uint64_t offset,
                                const uint8_t *buf, uint64_t bytes)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t gc0 = offset >> s->cluster_bits;
    uint64_t intra = offset & (cs - 1);
    uint64_t l1i = gc0 >> s->l2_bits;
    uint64_t l2i = gc0 & (s->l2_size - 1);
    uint64_t *table;
    uint64_t n, len, host;
    g_autofree uint64_t *old = NULL;
    int ret;

    g_mutex_lock(&img->meta_lock);
retry:
    if (l1i >= s->l1_size) {
        g_mutex_unlock(&img->meta_lock);
        return -EIO;
    }
    if (qcow2_inflight_has(s, gc0)) {
        g_cond_wait(&s->inflight_cond, &img->meta_lock);
        goto retry;
    }
    uint64_t l1e = s->l1_table[l1i];
    if (!(l1e & QCOW2_L1E_OFFSET_MASK) || !(l1e & QCOW2_OFLAG_COPIED) ||
        qcow2_bad_l2(s, l1i)) {
        /* (refuses a corrupt table, marking the image corrupt) */
        ret = qcow2_l2_prepare(img, l1i);
        if (ret < 0) {
            g_mutex_unlock(&img->meta_lock);
            return ret;
        }
        goto retry;
    }
    uint64_t l2off = l1e & QCOW2_L1E_OFFSET_MASK;
    ret = qcow2_cache_get(img, l2off, &table);
    if (ret < 0) {
        g_mutex_unlock(&img->meta_lock);
        return ret;
    }
    uint64_t e0 = GUINT64_FROM_BE(table[l2i]);

    if (qcow2_in_place(l1e, e0, s)) {
        /* Owned clusters: overwrite in place, as far as host-contiguous. */
        host = e0 & QCOW2_L2E_OFFSET_MASK;
        len = MIN(cs - intra, bytes);
        for (uint64_t i = l2i + 1; i < s->l2_size && len < bytes; i++) {
            uint64_t e = GUINT64_FROM_BE(table[i]);
            if (!qcow2_in_place(l1e, e, s) ||
                (e & QCOW2_L2E_OFFSET_MASK) != host + (i - l2i) * cs) {
                break;
            }
            len = MIN(len + cs, bytes);
        }
        ret = qcow2_check_data_write(img, e0, host + intra, len);
        g_mutex_unlock(&img->meta_lock);
        if (ret < 0) {
            return ret;
        }
        ret = qcow2_pwrite_full(img->fd, buf, len, host + intra);
        return ret < 0 ? ret : (int64_t)len;
    }

    /* Allocation: the run of clusters that are not ours to overwrite. */
    uint64_t last_gc = (offset + bytes - 1) >> s->cluster_bits;
    uint64_t max_n = MIN(last_gc - gc0 + 1, s->l2_size - l2i);
    uint64_t left = qcow2_pool_left(s);
    if (left > 0) {
        max_n = MIN(max_n, left);
    }
    max_n = MIN(max_n, MAX(1, (32ULL << 20) / cs));
    n = 1;
    while (n < max_n) {
        uint64_t e = GUINT64_FROM_BE(table[l2i + n]);
        if (qcow2_in_place(l1e, e, s) || qcow2_inflight_has(s, gc0 + n)) {
            break;
        }
        n++;
    }
    ret = qcow2_alloc_clusters(img, n, &host);
    if (ret < 0) {
        g_mutex_unlock(&img->meta_lock);
        return ret;
    }
    /* The allocation may have synced: the table pointer is still ours
     * (nothing else ran under this hold), but refetch for clarity. */
    ret = qcow2_cache_get(img, l2off, &table);
    if (ret < 0) {
        g_mutex_unlock(&img->meta_lock);
        return ret;
    }
    old = g_new(uint64_t, n);
    for (uint64_t i = 0; i < n; i++) {
        old[i] = GUINT64_FROM_BE(table[l2i + i]);
    }
    /* The old entries are read (copy-on-write) and released: a corrupt
     * one would copy metadata into the guest's data and drop a refcount
     * of metadata.  The new clusters are fresh; checked all the same. */
    ret = qcow2_check_old_entries(img, old, n);
    if (ret == 0) {
        ret = qcow2_check_write(img, QCOW2_META_DATA, host, n * cs);
    }
    if (ret < 0) {
        g_mutex_unlock(&img->meta_lock);
        return ret;
    }
    for (uint64_t i = 0; i < n; i++) {
        g_hash_table_add(s->inflight, GSIZE_TO_POINTER(gc0 + i + 1));
    }
    g_mutex_unlock(&img->meta_lock);

    /* Data and copy-on-write fill, outside the lock. */
    len = MIN(n * cs - intra, bytes);
    uint64_t end_in_last = (intra + len) - (n - 1) * cs; /* 1..cs */
    bool head_partial = intra > 0 || (n == 1 && end_in_last < cs);
    bool tail_partial = n > 1 && end_in_last < cs;
    g_autofree uint8_t *hb = NULL;
    g_autofree uint8_t *tb = NULL;

    ret = 0;
    if (head_partial) {
        hb = g_malloc(cs);
        ret = qcow2_cow_fill(img, gc0, old[0], hb);
        if (ret == 0) {
            uint64_t hl = MIN(cs - intra, len);
            memcpy(hb + intra, buf, hl);
            ret = qcow2_pwrite_full(img->fd, hb, cs, host);
        }
    }
    if (ret == 0 && tail_partial) {
        tb = g_malloc(cs);
        ret = qcow2_cow_fill(img, gc0 + n - 1, old[n - 1], tb);
        if (ret == 0) {
            memcpy(tb, buf + (len - end_in_last), end_in_last);
            ret = qcow2_pwrite_full(img->fd, tb, cs, host + (n - 1) * cs);
        }
    }
    if (ret == 0) {
        /* The clusters fully covered by the write: straight from buf. */
        uint64_t first_full = head_partial ? 1 : 0;
        uint64_t last_full = tail_partial ? n - 1 : n;
        if (last_full > first_full) {
            const uint8_t *src = buf + (first_full ? cs - intra : 0);
            ret = qcow2_pwrite_full(img->fd, src,
                                    (last_full - first_full) * cs,
                                    host + first_full * cs);
        }
    }

    g_mutex_lock(&img->meta_lock);
    if (ret == 0) {
        /* Data complete: now publish the new mapping (table still ours:
         * a COPIED table is never replaced while we hold in-flight marks). */
        ret = qcow2_cache_get(img, l2off, &table);
    }
    if (ret == 0) {
        /* In memory now (readers see it); on disk at the next flush or
         * writeback, after an fdatasync of this data. */
        for (uint64_t i = 0; i < n; i++) {
            table[l2i + i] = GUINT64_TO_BE((host + i * cs) |
                                           QCOW2_OFLAG_COPIED);
            qcow2_defer_free_entry(s, old[i]);
        }
        qcow2_cache_mark_dirty(s, l2off, l2i, l2i + n);
    }
    for (uint64_t i = 0; i < n; i++) {
        g_hash_table_remove(s->inflight, GSIZE_TO_POINTER(gc0 + i + 1));
    }
    g_cond_broadcast(&s->inflight_cond);
    g_mutex_unlock(&img->meta_lock);
    return ret < 0 ? ret : (int64_t)len;
}

/*
 * Before the first write: the image may carry autoclear bits, which name
 * extensions we would not keep consistent; they are cleared here, not at
 * open, so that an image never written is never changed.
 */
int qcow2_before_write(ChainImage *img)
{
    BDRVQcow2State *s = img->opaque;
    int ret = 0;

    if (!img->writable || chain_image_read_only_reason(img)) {
        return -EROFS;
    }
    if (!g_atomic_int_get(&s->autoclear_pending)) {
        return 0;
    }
    g_mutex_lock(&img->meta_lock);
    if (s->autoclear) {
        ret = qcow2_write_header_field64(img, 88, 0);
        if (ret == 0) {
            ret = qcow2_sync_meta(img);
        }
        if (ret == 0) {
            s->autoclear = 0;
            g_atomic_int_set(&s->autoclear_pending, 0);
        }
    }
    g_mutex_unlock(&img->meta_lock);
    return ret;
}

int qcow2_co_pwrite(ChainImage *img, uint64_t offset, const void *buf,
                    uint64_t bytes)
{
    const uint8_t *p = buf;
    int ret = qcow2_before_write(img);

    if (ret < 0) {
        return ret;
    }
    if (offset + bytes > img->virtual_size || offset + bytes < offset) {
        return -EINVAL;
    }
    while (bytes > 0) {
        int64_t r = qcow2_write_step(img, offset, p, bytes);
        if (r < 0) {
            return (int)r;
        }
        p += r;
        offset += (uint64_t)r;
        bytes -= (uint64_t)r;
    }
    return 0;
}

/* Write zeros as data (partial clusters, v2). */
static int qcow2_write_zero_data(ChainImage *img, uint64_t offset,
                                 uint64_t bytes)
{
    uint64_t chunk = MIN(bytes, 1ULL << 20);
    g_autofree uint8_t *z = g_malloc0(chunk);

    while (bytes > 0) {
        uint64_t n = MIN(bytes, chunk);
        int ret = qcow2_co_pwrite(img, offset, z, n);
        if (ret < 0) {
            return ret;
        }
        offset += n;
        bytes -= n;
    }
    return 0;
}

/*
 * v3: whole clusters become zero clusters, one L2 table at a time.
 * Clusters that are unallocated in an image without a backing file already
 * read as zeros and stay unallocated.
 */
static int qcow2_zero_clusters(ChainImage *img, uint64_t gc, uint64_t count,
                               bool may_unmap)
{
    BDRVQcow2State *s = img->opaque;
    bool no_backing = !img->backing && !img->backing_ref;
    int ret = 0;

    g_mutex_lock(&img->meta_lock);
    while (count > 0) {
        uint64_t l1i = gc >> s->l2_bits;
        uint64_t l2i = gc & (s->l2_size - 1);
        uint64_t n = MIN(count, s->l2_size - l2i);
        uint64_t *table;
        bool waited = false;

        if (l1i >= s->l1_size) {
            ret = -EIO;
            break;
        }
        for (uint64_t i = 0; i < n; i++) {
            if (qcow2_inflight_has(s, gc + i)) {
                g_cond_wait(&s->inflight_cond, &img->meta_lock);
                waited = true;
                break;
            }
        }
        if (waited) {
            continue;
        }
        if (no_backing && !(s->l1_table[l1i] & QCOW2_L1E_OFFSET_MASK)) {
            gc += n;
            count -= n;
            continue;
        }
        ret = qcow2_l2_prepare(img, l1i);
        if (ret < 0) {
            break;
        }
        uint64_t l2off = s->l1_table[l1i] & QCOW2_L1E_OFFSET_MASK;
        ret = qcow2_cache_get(img, l2off, &table);
        if (ret < 0) {
            break;
        }
        g_autofree uint64_t *old = g_new(uint64_t, n);
        for (uint64_t i = 0; i < n; i++) {
            old[i] = GUINT64_FROM_BE(table[l2i + i]);
        }
        /* Their clusters are released: none may be metadata. */
        ret = qcow2_check_old_entries(img, old, n);
        if (ret < 0) {
            break;
        }
        for (uint64_t i = 0; i < n; i++) {
            uint64_t e = GUINT64_FROM_BE(table[l2i + i]);
            Qcow2ClusterType t = qcow2_entry_type(s, e);
            uint64_t ne = QCOW2_OFLAG_ZERO;

            old[i] = 0;
            if (t == QCOW2_CL_UNALLOCATED && no_backing) {
                continue;
            }
            if (!may_unmap && (e & QCOW2_OFLAG_COPIED) &&
                (t == QCOW2_CL_NORMAL || t == QCOW2_CL_ZERO_ALLOC)) {
                /* Keep the allocation, mark it zero. */
                ne = (e & QCOW2_L2E_OFFSET_MASK) | QCOW2_OFLAG_COPIED |
                     QCOW2_OFLAG_ZERO;
            } else {
                old[i] = e;
            }
            table[l2i + i] = GUINT64_TO_BE(ne);
        }
        qcow2_cache_mark_dirty(s, l2off, l2i, l2i + n);
        for (uint64_t i = 0; i < n; i++) {
            qcow2_defer_free_entry(s, old[i]);
        }
        gc += n;
        count -= n;
    }
    g_mutex_unlock(&img->meta_lock);
    return ret;
}

int qcow2_co_pwrite_zeroes(ChainImage *img, uint64_t offset, uint64_t bytes,
                           bool may_unmap)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t cs = s->cluster_size;
    int ret = qcow2_before_write(img);

    if (ret < 0) {
        return ret;
    }
    if (offset + bytes > img->virtual_size || offset + bytes < offset) {
        return -EINVAL;
    }
    if (s->version < 3) {
        bool no_backing = !img->backing && !img->backing_ref;
        while (bytes > 0) {
            Qcow2ClusterType t;
            uint64_t host, n;
            g_mutex_lock(&img->meta_lock);
            ret = qcow2_get_run(img, offset, bytes, false, &t, &host, &n);
            g_mutex_unlock(&img->meta_lock);
            if (ret < 0) {
                return ret;
            }
            if (!(t == QCOW2_CL_UNALLOCATED && no_backing)) {
                ret = qcow2_write_zero_data(img, offset, n);
                if (ret < 0) {
                    return ret;
                }
            }
            offset += n;
            bytes -= n;
        }
        return 0;
    }

    uint64_t start = (offset + cs - 1) & ~(cs - 1);
    uint64_t end = (offset + bytes) & ~(cs - 1);
    /* The image's last cluster may be partial: zero it whole when the
     * request reaches the end of the disk. */
    if (offset + bytes == img->virtual_size) {
        end = (offset + bytes + cs - 1) & ~(cs - 1);
    }
    if (start >= end) {
        return qcow2_write_zero_data(img, offset, bytes);
    }
    if (offset < start) {
        ret = qcow2_write_zero_data(img, offset, start - offset);
        if (ret < 0) {
            return ret;
        }
    }
    ret = qcow2_zero_clusters(img, start >> s->cluster_bits,
                              (end - start) >> s->cluster_bits, may_unmap);
    if (ret < 0) {
        return ret;
    }
    if (end < offset + bytes) {
        ret = qcow2_write_zero_data(img, end, offset + bytes - end);
    }
    return ret;
}
