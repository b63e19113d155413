/*
 * qcow2-overlap.c: where an image's metadata lies, so that no write lands
 * on it (after QEMU's metadata overlap check), and what happens when one
 * would: the image is marked corrupt and goes read-only.
 *
 * The map is a sorted array of disjoint host ranges, each of one kind
 * (header, L1 table, an L2 table, ...), cluster aligned, adjacent ranges of
 * one kind merged.  It is built at open from the header-level tables and
 * the entries of the L1 and refcount tables, and kept current by the code
 * that allocates or drops metadata (new L2 tables, refcount blocks, a
 * larger refcount or L1 table).  A check is a binary search: O(log n) per
 * write, whatever the image size, never a scan of the tables.
 *
 * Every function here runs with img->meta_lock held: the map is part of
 * the metadata it guards.  Data writes are checked under the lock before
 * the data pwrite runs outside it; that is safe because new metadata only
 * ever comes from clusters no mapping points to (fresh ones from the
 * allocation pool), so a range checked clean cannot become metadata before
 * the data write that was checked reaches it.
 */
#include <errno.h>
#include <string.h>

#include "qcow2-int.h"

static const char *const meta_names[] = {
    [QCOW2_META_DATA] = "guest data",
    [QCOW2_META_HEADER] = "header",
    [QCOW2_META_L1] = "L1 table",
    [QCOW2_META_L2] = "L2 table",
    [QCOW2_META_RT] = "refcount table",
    [QCOW2_META_RB] = "refcount block",
    [QCOW2_META_SNAPSHOTS] = "snapshot table",
    [QCOW2_META_SNAPSHOT_L1] = "L1 table of a snapshot",
    [QCOW2_META_BITMAP_DIR] = "bitmap directory",
    [QCOW2_META_BITMAP_TABLE] = "bitmap table",
};

const char *qcow2_meta_name(Qcow2MetaKind kind)
{
    return (unsigned)kind < G_N_ELEMENTS(meta_names) ? meta_names[kind] : "?";
}

void qcow2_meta_init(BDRVQcow2State *s)
{
    s->meta = g_array_new(FALSE, FALSE, sizeof(Qcow2MetaRange));
}

void qcow2_meta_free(BDRVQcow2State *s)
{
    if (s->meta) {
        g_array_unref(s->meta);
        s->meta = NULL;
    }
}

static Qcow2MetaRange *meta_at(BDRVQcow2State *s, guint i)
{
    return &g_array_index(s->meta, Qcow2MetaRange, i);
}

/* Index of the first range whose end lies after off (len if none). */
static guint meta_first_after(BDRVQcow2State *s, uint64_t off)
{
    guint lo = 0, hi = s->meta->len;

    while (lo < hi) {
        guint mid = lo + (hi - lo) / 2;
        if (meta_at(s, mid)->end <= off) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* [off, off+len) widened to whole clusters; len 0 counts as one byte. */
static void meta_align(BDRVQcow2State *s, uint64_t off, uint64_t len,
                       uint64_t *start, uint64_t *end)
{
    uint64_t cs = s->cluster_size;
    uint64_t last = off + MAX(len, 1) - 1;

    if (last < off) {
        last = UINT64_MAX;
    }
    *start = off & ~(cs - 1);
    *end = (last | (cs - 1)) == UINT64_MAX ? UINT64_MAX
                                           : (last | (cs - 1)) + 1;
}

const Qcow2MetaRange *qcow2_meta_find(BDRVQcow2State *s, uint64_t off,
                                      uint64_t len, Qcow2MetaKind allowed)
{
    uint64_t start, end;

    meta_align(s, off, len, &start, &end);
    for (guint i = meta_first_after(s, start); i < s->meta->len; i++) {
        const Qcow2MetaRange *r = meta_at(s, i);
        if (r->start >= end) {
            break;
        }
        if (r->kind != allowed) {
            return r;
        }
    }
    return NULL;
}

bool qcow2_meta_add(BDRVQcow2State *s, Qcow2MetaKind kind, uint64_t off,
                    uint64_t len, Qcow2MetaRange *clash)
{
    uint64_t start, end;
    guint i;

    meta_align(s, off, len, &start, &end);
    i = meta_first_after(s, start);
    if (i < s->meta->len && meta_at(s, i)->start < end) {
        if (clash) {
            *clash = *meta_at(s, i);
        }
        return false;
    }
    /* Merge with a neighbour of the same kind that touches it. */
    if (i > 0 && meta_at(s, i - 1)->end == start &&
        meta_at(s, i - 1)->kind == kind) {
        meta_at(s, i - 1)->end = end;
        if (i < s->meta->len && meta_at(s, i)->start == end &&
            meta_at(s, i)->kind == kind) {
            meta_at(s, i - 1)->end = meta_at(s, i)->end;
            g_array_remove_index(s->meta, i);
        }
        return true;
    }
    if (i < s->meta->len && meta_at(s, i)->start == end &&
        meta_at(s, i)->kind == kind) {
        meta_at(s, i)->start = start;
        return true;
    }
    Qcow2MetaRange r = { .start = start, .end = end, .kind = kind };
    g_array_insert_val(s->meta, i, r);
    return true;
}

void qcow2_meta_remove(BDRVQcow2State *s, Qcow2MetaKind kind, uint64_t off,
                       uint64_t len)
{
    uint64_t start, end;
    guint i;

    meta_align(s, off, len, &start, &end);
    i = meta_first_after(s, start);
    while (i < s->meta->len && meta_at(s, i)->start < end) {
        Qcow2MetaRange *r = meta_at(s, i);

        if (r->kind != kind) {
            i++;
            continue;
        }
        if (r->start < start && r->end > end) {
            /* Cut out of the middle: split in two. */
            Qcow2MetaRange tail = { .start = end, .end = r->end,
                                    .kind = kind };
            r->end = start;
            g_array_insert_val(s->meta, i + 1, tail);
            return;
        }
        if (r->start < start) {
            r->end = start;
            i++;
        } else if (r->end > end) {
            r->start = end;
            i++;
        } else {
            g_array_remove_index(s->meta, i);
        }
    }
}

/*
 * Mark the image corrupt, as QEMU's qcow2_signal_corruption does for a
 * fatal event: the corrupt bit goes into the header (version 3 has it),
 * and the image takes no new write for the rest of the mount.  One log
 * line, for the first event only; later ones are already refused as
 * read-only before they get here.
 */
int qcow2_signal_corruption(ChainImage *img, const char *fmt, ...)
{
    BDRVQcow2State *s = img->opaque;
    g_autofree char *what = NULL;
    g_autofree char *reason = NULL;
    va_list ap;

    va_start(ap, fmt);
    what = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    reason = g_strdup_printf("%s: %s; image marked corrupt and read-only "
                             "(repair it with 'qemu-img check -r all %s')",
                             img->path, what, img->path);
    if (!chain_image_mark_read_only(img, reason)) {
        return -EIO;
    }
    g_warning("%s", reason);
    if (s->version >= 3 && img->writable &&
        !(s->incompat & QCOW2_INCOMPAT_CORRUPT)) {
        uint8_t b[8];
        int ret;

        s->incompat |= QCOW2_INCOMPAT_CORRUPT;
        qcow2_put_be64(b, s->incompat);
        memcpy(s->header_raw + 72, b, 8);
        /* The header is never anything but the header: no check needed. */
        ret = qcow2_pwrite_full(img->fd, b, 8, 72);
        if (ret == 0) {
            ret = qcow2_sync_meta(img);
        }
        if (ret < 0) {
            g_warning("%s: cannot set the corrupt bit: %s", img->path,
                      g_strerror(-ret));
        }
    }
    return -EIO;
}

int qcow2_check_write(ChainImage *img, Qcow2MetaKind kind, uint64_t off,
                      uint64_t len)
{
    BDRVQcow2State *s = img->opaque;
    const Qcow2MetaRange *r = qcow2_meta_find(s, off, len, kind);

    if (!r) {
        return 0;
    }
    return qcow2_signal_corruption(img, "preventing a write of %s (%"
                                   G_GUINT64_FORMAT " bytes at host offset %"
                                   G_GUINT64_FORMAT "): it overlaps the %s at "
                                   "host offset %" G_GUINT64_FORMAT,
                                   qcow2_meta_name(kind), len, off,
                                   qcow2_meta_name(r->kind),
                                   MAX(r->start, off & ~(uint64_t)
                                       (s->cluster_size - 1)));
}

int qcow2_pwrite_meta(ChainImage *img, Qcow2MetaKind kind, const void *buf,
                      size_t len, uint64_t off)
{
    int ret;

    /* A latched image takes no metadata writes (image.h): its tables could
     * come to point at data whose write-back was lost. */
    if (chain_image_io_latched(img)) {
        return -EIO;
    }
    ret = qcow2_check_write(img, kind, off, len);
    if (ret < 0) {
        return ret;
    }
    return qcow2_pwrite_full(img->fd, buf, len, off);
}
