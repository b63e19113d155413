/*
 * qcow2-validate.c: what an image's header-level tables may look like
 * before we trust them, and the metadata map built from them
 * (qcow2-overlap.c).
 *
 * Tables named by the header (L1, refcount table, snapshot table and the
 * snapshots' L1 tables, bitmap directory and bitmap tables) are checked
 * at open: inside the file, aligned, within QEMU's size limits, clear of
 * each other.  One that is not refuses the image, since nothing it leads
 * to can be trusted.  Tables one step further (L2 tables, refcount blocks)
 * are checked too, but a bad one only spoils what it covers: the reads of
 * that L2 range fail with EIO (s->bad_l2), and a bad refcount block makes
 * the image read-only (it is refused read-write), since allocation would
 * write through it.  Data and compressed offsets are checked when a read
 * reaches them (qcow2.c), never by a scan here.
 *
 * Limits, as QEMU's: at most 65536 snapshots in at most 64 MiB of table,
 * at most 1 KiB of extra data per snapshot; at most 65535 bitmaps in at
 * most 64 MiB of directory.  Only reads the file.
 */
#include <errno.h>
#include <string.h>

#include "qcow2-int.h"

#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_MAX_SNAPSHOTS_SIZE (64ULL << 20)
#define QCOW2_MAX_SNAPSHOT_EXTRA 1024
#define QCOW2_MAX_BITMAPS 65535
#define QCOW2_MAX_BITMAP_DIR_SIZE (64ULL << 20)
#define QCOW2_BITMAP_ENTRY_MIN 24

static bool aligned(BDRVQcow2State *s, uint64_t off)
{
    return (off & (s->cluster_size - 1)) == 0;
}

/* [off, off+len) lies inside the file (len may be 0). */
static bool inside(BDRVQcow2State *s, uint64_t off, uint64_t len)
{
    return off <= s->file_end && len <= s->file_end - off;
}

/*
 * Record a header-level table, refusing the image when it overlaps one
 * recorded before.  what names the table for the message.
 */
static bool add_table(ChainImage *img, Qcow2MetaKind kind, uint64_t off,
                      uint64_t len, const char *what, GError **error)
{
    BDRVQcow2State *s = img->opaque;
    Qcow2MetaRange clash;

    if (len == 0 || qcow2_meta_add(s, kind, off, len, &clash)) {
        return true;
    }
    chainfs_set_error(error, EINVAL,
                      "%s: corrupt qcow2 image: the %s at host offset %"
                      G_GUINT64_FORMAT " overlaps the %s at host offset %"
                      G_GUINT64_FORMAT, img->path, what, off,
                      qcow2_meta_name(clash.kind),
                      MAX(clash.start, off & ~(uint64_t)(s->cluster_size - 1)));
    return false;
}

/* Check one snapshot's L1 table and record it. */
static bool check_snapshot_l1(ChainImage *img, uint32_t i, uint64_t l1_off,
                              uint32_t l1_size, GError **error)
{
    BDRVQcow2State *s = img->opaque;
    g_autofree char *what = g_strdup_printf("L1 table of snapshot %u", i);

    if (l1_size == 0) {
        return true;
    }
    if ((uint64_t)l1_size * 8 > QCOW2_MAX_L1_BYTES || !aligned(s, l1_off) ||
        l1_off == 0 || !inside(s, l1_off, (uint64_t)l1_size * 8)) {
        chainfs_set_error(error, EINVAL,
                          "%s: corrupt qcow2 image: the %s at host offset %"
                          G_GUINT64_FORMAT " (%u entries) is misaligned, too "
                          "large or past the end of the file", img->path,
                          what, l1_off, l1_size);
        return false;
    }
    return add_table(img, QCOW2_META_SNAPSHOT_L1, l1_off,
                     (uint64_t)l1_size * 8, what, error);
}

/*
 * Walk the snapshot table entry by entry: its size comes from the
 * entries, bounded by the file and by QEMU's limits.
 */
static bool check_snapshots(ChainImage *img, GError **error)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t off = s->snapshots_offset, pos = 0;

    if (s->nb_snapshots == 0) {
        return true;
    }
    if (s->nb_snapshots > QCOW2_MAX_SNAPSHOTS || !aligned(s, off) ||
        off == 0 ||
        !inside(s, off, (uint64_t)s->nb_snapshots * QCOW2_SNAPSHOT_ENTRY_MIN)) {
        chainfs_set_error(error, EINVAL,
                          "%s: corrupt qcow2 header: snapshot table at host "
                          "offset %" G_GUINT64_FORMAT " (%u snapshots) is "
                          "misaligned, has more than %d snapshots or lies "
                          "past the end of the file", img->path, off,
                          s->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
        return false;
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        uint8_t e[QCOW2_SNAPSHOT_ENTRY_MIN];
        int ret;

        if (!inside(s, off + pos, sizeof(e)) ||
            pos + sizeof(e) > QCOW2_MAX_SNAPSHOTS_SIZE) {
            goto too_large;
        }
        ret = qcow2_pread_full(img->fd, e, sizeof(e), off + pos);
        if (ret < 0) {
            chainfs_set_error(error, -ret, "%s: cannot read the snapshot "
                              "table: %s", img->path, g_strerror(-ret));
            return false;
        }
        uint32_t extra = qcow2_be32(e + 36);
        if (extra > QCOW2_MAX_SNAPSHOT_EXTRA) {
            chainfs_set_error(error, EINVAL,
                              "%s: corrupt qcow2 image: snapshot %u in the "
                              "snapshot table has %u bytes of extra data (at "
                              "most %d)", img->path, i, extra,
                              QCOW2_MAX_SNAPSHOT_EXTRA);
            return false;
        }
        uint64_t len = sizeof(e) + extra + qcow2_be16(e + 12) +
                       qcow2_be16(e + 14);
        /* QEMU does not write the padding of the last entry: the file
         * may end before it. */
        if (pos + len > QCOW2_MAX_SNAPSHOTS_SIZE ||
            !inside(s, off, pos + len)) {
            goto too_large;
        }
        pos += (len + 7) & ~7ULL;
        if (!check_snapshot_l1(img, i, qcow2_be64(e), qcow2_be32(e + 8),
                               error)) {
            return false;
        }
    }
    s->snapshots_size = pos;
    return add_table(img, QCOW2_META_SNAPSHOTS, off, pos, "snapshot table",
                     error);

too_large:
    chainfs_set_error(error, EINVAL,
                      "%s: corrupt qcow2 image: the snapshot table at host "
                      "offset %" G_GUINT64_FORMAT " (%u snapshots) is larger "
                      "than %llu MiB or runs past the end of the file",
                      img->path, off, s->nb_snapshots,
                      QCOW2_MAX_SNAPSHOTS_SIZE >> 20);
    return false;
}

const Qcow2Ext *qcow2_valid_bitmaps_ext(BDRVQcow2State *s)
{
    if (s->version < 3 || !(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS)) {
        return NULL; /* QEMU ignores an extension not marked consistent */
    }
    for (guint i = 0; i < s->exts->len; i++) {
        const Qcow2Ext *e = g_ptr_array_index(s->exts, i);
        if (e->type == QCOW2_EXT_BITMAPS) {
            return e;
        }
    }
    return NULL;
}

/* Check each directory entry's bitmap table and record it. */
static bool check_bitmap_tables(ChainImage *img, const uint8_t *dir,
                                uint64_t dir_size, uint32_t nb,
                                GError **error)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t pos = 0;

    for (uint32_t i = 0; i < nb; i++) {
        if (pos + QCOW2_BITMAP_ENTRY_MIN > dir_size) {
            goto bad_dir;
        }
        const uint8_t *e = dir + pos;
        uint64_t t_off = qcow2_be64(e);
        uint64_t t_len = (uint64_t)qcow2_be32(e + 8) * 8;
        uint64_t len = QCOW2_BITMAP_ENTRY_MIN + qcow2_be16(e + 18) +
                       qcow2_be32(e + 20);
        g_autofree char *what = g_strdup_printf("bitmap table of bitmap %u",
                                                i);

        pos += (len + 7) & ~7ULL;
        if (pos > dir_size) {
            goto bad_dir;
        }
        if (t_len > 0 && (!aligned(s, t_off) || t_off == 0 ||
                          !inside(s, t_off, t_len))) {
            chainfs_set_error(error, EINVAL,
                              "%s: corrupt qcow2 image: the %s at host offset "
                              "%" G_GUINT64_FORMAT " is misaligned or past the "
                              "end of the file", img->path, what, t_off);
            return false;
        }
        if (!add_table(img, QCOW2_META_BITMAP_TABLE, t_off, t_len, what,
                       error)) {
            return false;
        }
    }
    return true;

bad_dir:
    chainfs_set_error(error, EINVAL, "%s: corrupt qcow2 image: the bitmap "
                      "directory is shorter than its %u entries", img->path,
                      nb);
    return false;
}

static bool check_bitmaps(ChainImage *img, GError **error)
{
    BDRVQcow2State *s = img->opaque;
    const Qcow2Ext *ext = qcow2_valid_bitmaps_ext(s);
    g_autofree uint8_t *dir = NULL;
    int ret;

    if (!ext) {
        return true;
    }
    if (ext->len < 24) {
        chainfs_set_error(error, EINVAL, "%s: corrupt qcow2 header: bitmaps "
                          "extension of %u bytes", img->path, ext->len);
        return false;
    }
    uint32_t nb = qcow2_be32(ext->data);
    uint64_t size = qcow2_be64(ext->data + 8);
    uint64_t off = qcow2_be64(ext->data + 16);

    if (nb == 0 || nb > QCOW2_MAX_BITMAPS || size > QCOW2_MAX_BITMAP_DIR_SIZE ||
        size < (uint64_t)nb * QCOW2_BITMAP_ENTRY_MIN || !aligned(s, off) ||
        off == 0 || !inside(s, off, size)) {
        chainfs_set_error(error, EINVAL,
                          "%s: corrupt qcow2 header: the bitmap directory at "
                          "host offset %" G_GUINT64_FORMAT " (%" G_GUINT64_FORMAT
                          " bytes, %u bitmaps) is misaligned, too large or "
                          "past the end of the file", img->path, off, size, nb);
        return false;
    }
    if (!add_table(img, QCOW2_META_BITMAP_DIR, off, size, "bitmap directory",
                   error)) {
        return false;
    }
    dir = g_malloc(size);
    ret = qcow2_pread_full(img->fd, dir, size, off);
    if (ret < 0) {
        chainfs_set_error(error, -ret, "%s: cannot read the bitmap directory: "
                          "%s", img->path, g_strerror(-ret));
        return false;
    }
    return check_bitmap_tables(img, dir, size, nb, error);
}

/*
 * Refcount blocks: a bad one makes the image unwritable (allocation and
 * frees write through it) but leaves every read sound.  Returns the
 * reason of the first bad one, or NULL.
 */
static char *map_refcount_blocks(ChainImage *img)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t cs = s->cluster_size;

    for (uint64_t i = 0; i < s->rt_entries; i++) {
        uint64_t off = s->rt[i] & QCOW2_RTE_OFFSET_MASK;
        Qcow2MetaRange clash;

        if (!off) {
            continue;
        }
        if (!aligned(s, off) || !inside(s, off, cs)) {
            return g_strdup_printf("%s: corrupt qcow2 image: refcount block %"
                                   G_GUINT64_FORMAT " at host offset %"
                                   G_GUINT64_FORMAT " is misaligned or past "
                                   "the end of the file; the image cannot be "
                                   "written", img->path, i, off);
        }
        if (!qcow2_meta_add(s, QCOW2_META_RB, off, cs, &clash)) {
            return g_strdup_printf("%s: corrupt qcow2 image: refcount block %"
                                   G_GUINT64_FORMAT " at host offset %"
                                   G_GUINT64_FORMAT " overlaps the %s at "
                                   "host offset %" G_GUINT64_FORMAT "; the "
                                   "image cannot be written", img->path, i,
                                   off, qcow2_meta_name(clash.kind),
                                   MAX(clash.start, off));
        }
    }
    return NULL;
}

static void mark_bad_l2(BDRVQcow2State *s, uint64_t l1i, char *reason)
{
    if (!s->bad_l2) {
        s->bad_l2 = g_hash_table_new_full(g_direct_hash, g_direct_equal, NULL,
                                          g_free);
    }
    g_hash_table_replace(s->bad_l2, GSIZE_TO_POINTER(l1i + 1), reason);
}

const char *qcow2_bad_l2(BDRVQcow2State *s, uint64_t l1i)
{
    return s->bad_l2 ? g_hash_table_lookup(s->bad_l2,
                                           GSIZE_TO_POINTER(l1i + 1))
                     : NULL;
}

/*
 * L2 tables: a bad one (misaligned, past the end of the file, on other
 * metadata, or the table of two L1 entries, which makes both suspect)
 * spoils only its own range.
 */
static void map_l2_tables(ChainImage *img)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t cs = s->cluster_size;
    g_autoptr(GHashTable) owner = g_hash_table_new(g_int64_hash,
                                                   g_int64_equal);
    g_autofree uint64_t *offs = g_new(uint64_t, MAX(s->l1_size, 1));

    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t off = s->l1_table[i] & QCOW2_L1E_OFFSET_MASK;
        Qcow2MetaRange clash;

        offs[i] = off;
        if (!off) {
            continue;
        }
        /* What it lands on first: a pointer into the header is about the
         * header, though also misaligned. */
        const Qcow2MetaRange *onto = qcow2_meta_find(s, off, cs,
                                                     QCOW2_META_DATA);
        if (!onto && (!aligned(s, off) || !inside(s, off, cs))) {
            mark_bad_l2(s, i, g_strdup_printf(
                "L2 table at host offset %" G_GUINT64_FORMAT " (L1 index %u) "
                "is misaligned or past the end of the file", off, i));
            continue;
        }
        if (!onto && qcow2_meta_add(s, QCOW2_META_L2, off, cs, &clash)) {
            g_hash_table_insert(owner, &offs[i], GUINT_TO_POINTER(i + 1));
            continue;
        }
        if (onto) {
            clash = *onto;
        }
        mark_bad_l2(s, i, g_strdup_printf(
            "L2 table at host offset %" G_GUINT64_FORMAT " (L1 index %u) "
            "overlaps the %s at host offset %" G_GUINT64_FORMAT, off, i,
            qcow2_meta_name(clash.kind), MAX(clash.start, off)));
        if (clash.kind == QCOW2_META_L2) {
            guint other = GPOINTER_TO_UINT(g_hash_table_lookup(owner,
                                                               &offs[i]));
            if (other) {
                mark_bad_l2(s, other - 1, g_strdup_printf(
                    "L2 table at host offset %" G_GUINT64_FORMAT " (L1 index "
                    "%u) is also the table of L1 index %u", off, other - 1,
                    i));
            }
        }
    }
}

bool qcow2_validate_and_map(ChainImage *img, GError **error)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t cs = s->cluster_size;
    g_autofree char *rb_bad = NULL;

    qcow2_meta_init(s);
    qcow2_meta_add(s, QCOW2_META_HEADER, 0, cs, NULL);
    if (s->l1_size > 0 &&
        !add_table(img, QCOW2_META_L1, s->l1_offset,
                   (uint64_t)s->l1_size * 8, "L1 table", error)) {
        return false;
    }
    if (!add_table(img, QCOW2_META_RT, s->rt_offset,
                   (uint64_t)s->rt_clusters * cs, "refcount table", error) ||
        !check_snapshots(img, error) || !check_bitmaps(img, error)) {
        return false;
    }
    rb_bad = map_refcount_blocks(img);
    if (rb_bad) {
        if (img->writable) {
            chainfs_set_error(error, EROFS, "%s", rb_bad);
            return false;
        }
        chain_image_mark_read_only(img, rb_bad);
    }
    map_l2_tables(img);
    return true;
}
