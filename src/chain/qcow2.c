/*
 * qcow2.c: the qcow2 driver's table, header parsing (open/probe and the
 * refusals), header rewrites (set_backing, grow), image creation and the
 * read path.  The write path is in qcow2-cluster.c, refcounts and the
 * allocation pool in qcow2-refcount.c.
 *
 * Format: QEMU's docs/interop/qcow2.txt (versions 2 and 3).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h> /* renameat2 */
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qcow2-int.h"

/* ---- full-length I/O helpers ----------------------------------------- */

/*
 * Read len bytes at off.  A short read at end of file fills the rest with
 * zeros: QEMU may leave the last cluster of a file (compressed data) short.
 */
int qcow2_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    uint8_t *p = buf;

    while (len > 0) {
        ssize_t r = pread(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        if (r == 0) {
            memset(p, 0, len);
            return 0;
        }
        p += r;
        off += (uint64_t)r;
        len -= (size_t)r;
    }
    return 0;
}

int qcow2_pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
    const uint8_t *p = buf;

    while (len > 0) {
        ssize_t r = pwrite(fd, p, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        p += r;
        off += (uint64_t)r;
        len -= (size_t)r;
    }
    return 0;
}

int qcow2_datasync(int fd)
{
    while (fdatasync(fd) < 0) {
        if (errno != EINTR) {
            return -errno;
        }
    }
    return 0;
}

static uint64_t qcow2_file_size(int fd)
{
    struct stat st;

    if (fstat(fd, &st) < 0) {
        return 0;
    }
    return (uint64_t)st.st_size;
}

/* ---- probe ------------------------------------------------------------ */

static int qcow2_probe(const uint8_t *buf, size_t len)
{
    if (len >= 8 && qcow2_be32(buf) == QCOW2_MAGIC) {
        uint32_t v = qcow2_be32(buf + 4);
        return (v == 2 || v == 3) ? 100 : 50;
    }
    return 0;
}

/* ---- open ------------------------------------------------------------- */

static void qcow2_ext_free(gpointer p)
{
    Qcow2Ext *e = p;

    g_free(e->data);
    g_free(e);
}

static void qcow2_state_free(BDRVQcow2State *s)
{
    if (!s) {
        return;
    }
    qcow2_cache_free(s);
    qcow2_meta_free(s);
    if (s->bad_l2) {
        g_hash_table_unref(s->bad_l2);
    }
    g_free(s->l1_table);
    g_free(s->rt);
    g_free(s->header_raw);
    if (s->exts) {
        g_ptr_array_unref(s->exts);
    }
    if (s->pending_frees) {
        g_array_unref(s->pending_frees);
    }
    if (s->inflight) {
        g_hash_table_unref(s->inflight);
    }
    g_cond_clear(&s->inflight_cond);
    g_free(s);
}

/* Name of an incompatible feature bit from the feature-name table. */
static char *qcow2_feature_name(const uint8_t *table, uint32_t len, int type,
                                int bit)
{
    for (uint32_t i = 0; i + 48 <= len; i += 48) {
        if (table[i] == type && table[i + 1] == bit) {
            return g_strndup((const char *)table + i + 2, 46);
        }
    }
    return NULL;
}

/*
 * Parse the header extensions in cluster 0 from ext_off up to ext_end.
 * Fills img->backing_fmt and s->exts (everything but the backing format);
 * feat and feat_len point into hdr at the feature-name table, if any.
 */
static bool qcow2_parse_exts(ChainImage *img, BDRVQcow2State *s,
                             const uint8_t *hdr, uint64_t ext_off,
                             uint64_t ext_end, const uint8_t **feat,
                             uint32_t *feat_len, GError **error)
{
    *feat = NULL;
    *feat_len = 0;
    while (ext_off + 8 <= ext_end) {
        uint32_t type = qcow2_be32(hdr + ext_off);
        uint32_t len = qcow2_be32(hdr + ext_off + 4);

        if (type == QCOW2_EXT_END) {
            return true;
        }
        if (ext_off + 8 + (uint64_t)len > ext_end) {
            chainfs_set_error(error, EINVAL,
                              "%s: corrupt qcow2 header: extension 0x%08x "
                              "overruns the header cluster", img->path, type);
            return false;
        }
        const uint8_t *data = hdr + ext_off + 8;
        if (type == QCOW2_EXT_BACKING_FORMAT) {
            g_free(img->backing_fmt);
            img->backing_fmt = g_strndup((const char *)data, len);
        } else {
            Qcow2Ext *e = g_new0(Qcow2Ext, 1);
            e->type = type;
            e->len = len;
            e->data = g_memdup2(data, len);
            g_ptr_array_add(s->exts, e);
            if (type == QCOW2_EXT_FEATURE_TABLE) {
                *feat = data;
                *feat_len = len;
            }
        }
        ext_off += 8 + (((uint64_t)len + 7) & ~7ULL);
    }
    return true;
}

/*
 * Refuse what we cannot handle, naming the feature and the file.  Nothing
 * is written to the file before every check passed.
 */
static bool qcow2_check_features(ChainImage *img, BDRVQcow2State *s,
                                 uint32_t crypt, uint8_t compression_type,
                                 const uint8_t *feat, uint32_t feat_len,
                                 GError **error)
{
    if (crypt != 0) {
        chainfs_set_error(error, EOPNOTSUPP,
                          "%s: qcow2 encryption (method %u) is not supported",
                          img->path, crypt);
        return false;
    }
    /* Both bits leave the mapping (L1, L2) readable but the refcounts
     * untrustworthy.  A corrupt image, like QEMU, is read, never written.
     * A dirty one (lazy refcounts not written back) is read as it is and,
     * before it is first written, has its refcounts rebuilt
     * (qcow2-repair.c), as QEMU repairs a dirty image it opens
     * read-write. */
    if (s->incompat & QCOW2_INCOMPAT_CORRUPT) {
        g_autofree char *why = g_strdup_printf(
            "%s: qcow2 image is marked corrupt (corrupt bit set) and cannot "
            "be written; repair it with 'qemu-img check -r all %s'",
            img->path, img->path);

        if (img->writable) {
            chainfs_set_error(error, EOPNOTSUPP, "%s", why);
            return false;
        }
        chain_image_mark_read_only(img, why);
    }
    if (s->incompat & QCOW2_INCOMPAT_DATA_FILE) {
        chainfs_set_error(error, EOPNOTSUPP,
                          "%s: qcow2 external data file is not supported",
                          img->path);
        return false;
    }
    if (s->incompat & QCOW2_INCOMPAT_EXTL2) {
        chainfs_set_error(error, EOPNOTSUPP,
                          "%s: qcow2 extended L2 entries (subclusters) are "
                          "not supported", img->path);
        return false;
    }
    if (s->incompat & QCOW2_INCOMPAT_COMPRESSION) {
        if (compression_type == 1) {
            chainfs_set_error(error, EOPNOTSUPP,
                              "%s: qcow2 zstd compression is not supported",
                              img->path);
        } else {
            chainfs_set_error(error, EOPNOTSUPP,
                              "%s: qcow2 compression type %u is not supported",
                              img->path, compression_type);
        }
        return false;
    }
    if (compression_type != 0) {
        chainfs_set_error(error, EINVAL,
                          "%s: corrupt qcow2 header: compression type %u "
                          "without its incompatible feature bit",
                          img->path, compression_type);
        return false;
    }
    uint64_t unknown = s->incompat & ~0x1fULL;
    if (unknown) {
        int bit = __builtin_ctzll(unknown);
        g_autofree char *name = qcow2_feature_name(feat, feat_len, 0, bit);
        if (name && name[0]) {
            chainfs_set_error(error, EOPNOTSUPP,
                              "%s: unsupported qcow2 incompatible feature "
                              "'%s' (bit %d)", img->path, name, bit);
        } else {
            chainfs_set_error(error, EOPNOTSUPP,
                              "%s: unsupported qcow2 incompatible feature "
                              "bit %d", img->path, bit);
        }
        return false;
    }
    return true;
}

static bool qcow2_open(ChainImage *img, GError **error)
{
    BDRVQcow2State *s = g_new0(BDRVQcow2State, 1);
    uint8_t first[QCOW2_V3_HEADER_LEN + 512];
    g_autofree uint8_t *hdr = NULL;
    uint64_t file_size = qcow2_file_size(img->fd);
    const uint8_t *feat;
    uint32_t feat_len;
    int ret;

    g_cond_init(&s->inflight_cond);
    s->exts = g_ptr_array_new_with_free_func(qcow2_ext_free);
    s->pending_frees = g_array_new(FALSE, FALSE, sizeof(Qcow2PendingFree));
    s->inflight = g_hash_table_new(g_direct_hash, g_direct_equal);

    if (file_size < QCOW2_V2_HEADER_LEN) {
        chainfs_set_error(error, EINVAL, "%s: not a qcow2 image (file too "
                          "short for a header)", img->path);
        goto fail;
    }
    ret = qcow2_pread_full(img->fd, first, sizeof(first), 0);
    if (ret < 0) {
        chainfs_set_error(error, -ret, "%s: cannot read the qcow2 header: %s",
                          img->path, g_strerror(-ret));
        goto fail;
    }
    if (qcow2_be32(first) != QCOW2_MAGIC) {
        chainfs_set_error(error, EINVAL, "%s: not a qcow2 image (bad magic)",
                          img->path);
        goto fail;
    }
    s->version = (int)qcow2_be32(first + 4);
    if (s->version != 2 && s->version != 3) {
        chainfs_set_error(error, EINVAL,
                          "%s: corrupt qcow2 header: unknown version %d", img->path,
                          s->version);
        goto fail;
    }
    uint64_t backing_off = qcow2_be64(first + 8);
    uint32_t backing_len = qcow2_be32(first + 16);
    s->cluster_bits = qcow2_be32(first + 20);
    uint64_t size = qcow2_be64(first + 24);
    uint32_t crypt = qcow2_be32(first + 32);
    s->l1_size = qcow2_be32(first + 36);
    s->l1_offset = qcow2_be64(first + 40);
    s->rt_offset = qcow2_be64(first + 48);
    s->rt_clusters = qcow2_be32(first + 56);
    s->nb_snapshots = qcow2_be32(first + 60);
    s->snapshots_offset = qcow2_be64(first + 64);
    uint8_t compression_type = 0;

    if (s->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        s->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        chainfs_set_error(error, EINVAL,
                          "%s: corrupt qcow2 header: cluster_bits %u out of "
                          "range %d..%d", img->path, s->cluster_bits,
                          QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
        goto fail;
    }
    s->cluster_size = 1U << s->cluster_bits;
    uint64_t cs = s->cluster_size;

    if (s->version == 2) {
        s->header_len = QCOW2_V2_HEADER_LEN;
        s->refcount_order = 4;
    } else {
        s->incompat = qcow2_be64(first + 72);
        s->compat = qcow2_be64(first + 80);
        s->autoclear = qcow2_be64(first + 88);
        s->refcount_order = qcow2_be32(first + 96);
        s->header_len = qcow2_be32(first + 100);
        if (s->header_len < QCOW2_V3_HEADER_MIN || s->header_len > cs ||
            s->header_len % 8 != 0) {
            chainfs_set_error(error, EINVAL,
                              "%s: corrupt qcow2 header: header_length %u",
                              img->path, s->header_len);
            goto fail;
        }
        if (s->header_len > QCOW2_V3_HEADER_MIN) {
            compression_type = first[104];
        }
        if (s->refcount_order > 6) {
            chainfs_set_error(error, EINVAL,
                              "%s: corrupt qcow2 header: refcount_order %u "
                              "(at most 6)", img->path, s->refcount_order);
            goto fail;
        }
    }
    /* The whole header cluster: header, extensions, backing file name. */
    hdr = g_malloc0(cs);
    ret = qcow2_pread_full(img->fd, hdr, cs, 0);
    if (ret < 0) {
        chainfs_set_error(error, -ret, "%s: cannot read the qcow2 header: %s",
                          img->path, g_strerror(-ret));
        goto fail;
    }
    s->header_raw = g_memdup2(hdr, s->header_len);

    uint64_t ext_end = cs;
    if (backing_off) {
        if (backing_len > QCOW2_MAX_BACKING_NAME ||
            backing_off + backing_len > cs || backing_off < s->header_len) {
            chainfs_set_error(error, EINVAL,
                              "%s: corrupt qcow2 header: backing file name "
                              "at %" G_GUINT64_FORMAT " (%u bytes) outside "
                              "the header cluster", img->path, backing_off,
                              backing_len);
            goto fail;
        }
        ext_end = backing_off;
        img->backing_ref = g_strndup((const char *)hdr + backing_off,
                                     backing_len);
    }
    if (!qcow2_parse_exts(img, s, hdr, s->header_len, ext_end, &feat,
                          &feat_len, error)) {
        goto fail;
    }
    if (!qcow2_check_features(img, s, crypt, compression_type, feat, feat_len,
                              error)) {
        goto fail;
    }

    /* Geometry. */
    s->l2_bits = s->cluster_bits - 3;
    s->l2_size = cs / 8;
    s->refcount_bits = 1U << s->refcount_order;
    s->refcount_max = s->refcount_bits == 64 ? UINT64_MAX
                                             : (1ULL << s->refcount_bits) - 1;
    s->rb_entries = (cs * 8) >> s->refcount_order;
    s->csize_shift = 62 - (s->cluster_bits - 8);
    s->csize_mask = (1ULL << (s->cluster_bits - 8)) - 1;
    s->coffset_mask = (1ULL << s->csize_shift) - 1;

    /* L1 table. */
    uint64_t l2_span = cs * s->l2_size;
    uint64_t l1_needed = (size + l2_span - 1) / l2_span;
    if ((uint64_t)s->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        chainfs_set_error(error, EINVAL,
                          "%s: corrupt qcow2 header: L1 table too large "
                          "(%u entries)", img->path, s->l1_size);
        goto fail;
    }
    if (s->l1_size < l1_needed) {
        chainfs_set_error(error, EINVAL,
                          "%s: corrupt qcow2 header: L1 table too small "
                          "(%u entries) for virtual size %" G_GUINT64_FORMAT,
                          img->path, s->l1_size, size);
        goto fail;
    }
    if (s->l1_size > 0 &&
        ((s->l1_offset & (cs - 1)) ||
         s->l1_offset + (uint64_t)s->l1_size * 8 > file_size ||
         s->l1_offset < cs)) {
        chainfs_set_error(error, EINVAL,
                          "%s: corrupt qcow2 header: L1 table at %"
                          G_GUINT64_FORMAT " lies outside the file or is "
                          "misaligned", img->path, s->l1_offset);
        goto fail;
    }
    s->l1_table = g_new0(uint64_t, MAX(s->l1_size, 1));
    if (s->l1_size > 0) {
        ret = qcow2_pread_full(img->fd, s->l1_table,
                               (size_t)s->l1_size * 8, s->l1_offset);
        if (ret < 0) {
            chainfs_set_error(error, -ret, "%s: cannot read the L1 table: %s",
                              img->path, g_strerror(-ret));
            goto fail;
        }
        for (uint32_t i = 0; i < s->l1_size; i++) {
            s->l1_table[i] = GUINT64_FROM_BE(s->l1_table[i]);
        }
    }

    /* Refcount table. */
    if (s->rt_clusters == 0 || (s->rt_offset & (cs - 1)) ||
        s->rt_offset < cs ||
        (uint64_t)s->rt_clusters * cs > QCOW2_MAX_RT_BYTES ||
        s->rt_offset + (uint64_t)s->rt_clusters * cs > file_size) {
        chainfs_set_error(error, EINVAL,
                          "%s: corrupt qcow2 header: refcount table at %"
                          G_GUINT64_FORMAT " (%u clusters) lies outside the "
                          "file or is misaligned", img->path, s->rt_offset,
                          s->rt_clusters);
        goto fail;
    }
    s->rt_entries = (uint64_t)s->rt_clusters * cs / 8;
    s->rt = g_new0(uint64_t, s->rt_entries);
    ret = qcow2_pread_full(img->fd, s->rt, s->rt_entries * 8, s->rt_offset);
    if (ret < 0) {
        chainfs_set_error(error, -ret, "%s: cannot read the refcount table: "
                          "%s", img->path, g_strerror(-ret));
        goto fail;
    }
    for (uint64_t i = 0; i < s->rt_entries; i++) {
        s->rt[i] = GUINT64_FROM_BE(s->rt[i]);
    }
    /* Every header-level table checked, the metadata map built.  It
     * needs img->opaque for its messages; nothing reads it meanwhile. */
    s->file_end = file_size;
    img->opaque = s;
    if (!qcow2_validate_and_map(img, error)) {
        img->opaque = NULL;
        goto fail;
    }
    img->opaque = NULL;

    qcow2_cache_init(s);
    s->pool_next = s->pool_end = (file_size + cs - 1) & ~(cs - 1);

    img->virtual_size = size;
    img->cluster_size = s->cluster_size;
    img->opaque = s;
    s->autoclear_pending = s->autoclear != 0;

    if (img->writable && (s->incompat & QCOW2_INCOMPAT_DIRTY) &&
        !qcow2_repair_refcounts(img, img->fd, error)) {
        img->opaque = NULL;
        goto fail;
    }

    /*
     * Autoclear bits name extensions (bitmaps, raw external data) that we
     * would not keep consistent while writing: they are cleared, as the
     * spec asks of an editor that does not know them, before the first
     * write (qcow2_before_write), not here: an image opened read-write but
     * never written (a mount with no guest write, a layer a job never
     * touched) stays byte for byte as it was, its bitmaps valid for QEMU.
     */
    return true;

fail:
    g_clear_pointer(&img->backing_ref, g_free);
    g_clear_pointer(&img->backing_fmt, g_free);
    qcow2_state_free(s);
    return false;
}

static void qcow2_close(ChainImage *img)
{
    BDRVQcow2State *s = img->opaque;

    if (!s) {
        return;
    }
    if (img->writable) {
        qcow2_flush_and_free(img);
        qcow2_release_pool(img);
    }
    qcow2_state_free(s);
    img->opaque = NULL;
}

/* Write one 64-bit header field (and keep header_raw in step). */
int qcow2_write_header_field64(ChainImage *img, unsigned off, uint64_t v)
{
    BDRVQcow2State *s = img->opaque;
    uint8_t b[8];

    if (chain_image_io_latched(img)) {
        return -EIO; /* no metadata writes: see image.h */
    }
    qcow2_put_be64(b, v);
    if (off + 8 <= s->header_len) {
        memcpy(s->header_raw + off, b, 8);
    }
    return qcow2_pwrite_meta(img, QCOW2_META_HEADER, b, 8, off);
}

/* ---- read path -------------------------------------------------------- */

static int qcow2_block_status(ChainImage *img, uint64_t offset,
                              uint64_t bytes, uint64_t *pnum)
{
    Qcow2ClusterType type;
    uint64_t host;
    int ret;

    g_mutex_lock(&img->meta_lock);
    ret = qcow2_get_run(img, offset, bytes, false, &type, &host, pnum);
    g_mutex_unlock(&img->meta_lock);
    if (ret < 0) {
        return ret;
    }
    switch (type) {
    case QCOW2_CL_NORMAL:
    case QCOW2_CL_CORRUPT:
        /* This layer owns it: reads come here, and fail. */
        return BLOCK_DATA;
    case QCOW2_CL_COMPRESSED:
        return BLOCK_COMPRESSED;
    case QCOW2_CL_ZERO_PLAIN:
    case QCOW2_CL_ZERO_ALLOC:
        return BLOCK_ZERO;
    default:
        return BLOCK_UNALLOCATED;
    }
}

/*
 * Reads look the run up under meta_lock and read its data outside it, in
 * one pread() per host-contiguous run.  A cluster whose allocation is in
 * flight still maps to its old content until its L2 entry is written,
 * which happens only after the new data is complete (qcow2-cluster.c);
 * clusters are never reused after being freed, so a racing read of an old
 * mapping still reads the old bytes.
 */
/*
 * A read reached a corrupt table or entry: one log line naming the image,
 * the guest offset and what is wrong (which host offset, pointing where),
 * and EIO for this read only.  l2e is what qcow2_get_run returned in
 * *host for the CORRUPT run: the L2 entry, or 0 for a bad L2 table.
 */
static int qcow2_read_corrupt(ChainImage *img, uint64_t offset, uint64_t l2e)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t l1i = (offset >> s->cluster_bits) >> s->l2_bits;
    g_autofree char *why = NULL;

    g_mutex_lock(&img->meta_lock);
    const char *bad_table = qcow2_bad_l2(s, l1i);
    if (bad_table) {
        why = g_strdup(bad_table);
    } else {
        g_autofree char *fault = qcow2_entry_fault(s, l2e);
        why = g_strdup_printf("its L2 entry is corrupt: %s",
                              fault ? fault : "invalid");
    }
    g_mutex_unlock(&img->meta_lock);
    g_warning("%s: read of guest offset %" G_GUINT64_FORMAT " refused: %s",
              img->path, offset, why);
    return -EIO;
}

static int qcow2_pread(ChainImage *img, uint64_t offset, void *buf,
                       uint64_t bytes)
{
    BDRVQcow2State *s = img->opaque;
    uint8_t *p = buf;
    g_autofree uint8_t *bounce = NULL;

    while (bytes > 0) {
        Qcow2ClusterType type;
        uint64_t host, n;
        int ret;

        g_mutex_lock(&img->meta_lock);
        ret = qcow2_get_run(img, offset, bytes, true, &type, &host, &n);
        g_mutex_unlock(&img->meta_lock);
        if (ret < 0) {
            return ret;
        }
        switch (type) {
        case QCOW2_CL_NORMAL:
            ret = qcow2_pread_full(img->fd, p, n, host);
            break;
        case QCOW2_CL_CORRUPT:
            return qcow2_read_corrupt(img, offset, host);
        case QCOW2_CL_COMPRESSED: {
            uint64_t intra = offset & (s->cluster_size - 1);
            if (!bounce) {
                bounce = g_malloc(s->cluster_size);
            }
            ret = qcow2_read_compressed(img, host, bounce);
            if (ret == 0) {
                memcpy(p, bounce + intra, n);
            }
            break;
        }
        default:
            memset(p, 0, n);
            break;
        }
        if (ret < 0) {
            return ret;
        }
        p += n;
        offset += n;
        bytes -= n;
    }
    return 0;
}

static int qcow2_pwrite(ChainImage *img, uint64_t offset, const void *buf,
                        uint64_t bytes)
{
    return qcow2_co_pwrite(img, offset, buf, bytes);
}

static int qcow2_pwrite_zeroes(ChainImage *img, uint64_t offset,
                               uint64_t bytes, bool may_unmap)
{
    return qcow2_co_pwrite_zeroes(img, offset, bytes, may_unmap);
}

static int qcow2_flush(ChainImage *img)
{
    /* Latched, even read-only by now: the lost write-back stays lost. */
    if (chain_image_io_latched(img)) {
        return -EIO;
    }
    if (!img->writable) {
        return 0;
    }
    return qcow2_flush_and_free(img);
}

static uint64_t qcow2_allocated_bytes(ChainImage *img)
{
    struct stat st;

    if (fstat(img->fd, &st) < 0) {
        return 0;
    }
    return (uint64_t)st.st_blocks * 512;
}

/* ---- grow ------------------------------------------------------------- */

/* Control paths that write: refused with EROFS on an image opened
 * read-only or made read-only since (the reason then says why). */
static bool qcow2_may_write(ChainImage *img, GError **error)
{
    const char *why = chain_image_read_only_reason(img);

    if (why) {
        chainfs_set_error(error, EROFS, "%s", why);
        return false;
    }
    if (!img->writable) {
        chainfs_set_error(error, EROFS, "%s: image is open read-only",
                          img->path);
        return false;
    }
    return true;
}

/* Before a control path changes what the image holds (grow): the autoclear
 * bits go first, as before a guest write. */
static bool qcow2_first_write(ChainImage *img, GError **error)
{
    int ret = qcow2_before_write(img);

    if (ret < 0) {
        chainfs_set_error(error, -ret, "%s: cannot clear autoclear feature "
                          "bits: %s", img->path, g_strerror(-ret));
        return false;
    }
    return true;
}

/*
 * A larger L1 table, for grow: written and synced in fresh clusters, then
 * the header switches to it (l1_size and l1_offset together, in one
 * pwrite of header bytes 36..48; the size stays as it is, and an L1 table
 * longer than the size needs is valid, for QEMU too), synced; the old
 * table is freed only after that sync.  A crash before the header write
 * leaves the old table in use (the new clusters leak); after it, the new
 * one, which holds the same entries.  meta_lock held.  0 or -errno.
 */
static int qcow2_grow_l1(ChainImage *img, uint64_t l1_needed)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t nbytes = (l1_needed * 8 + cs - 1) & ~(cs - 1);
    g_autofree uint64_t *t = g_malloc0(nbytes);
    uint64_t new_off;
    uint8_t h[12];
    int ret;

    for (uint32_t i = 0; i < s->l1_size; i++) {
        t[i] = GUINT64_TO_BE(s->l1_table[i]);
    }
    ret = qcow2_alloc_clusters(img, nbytes / cs, &new_off);
    if (ret == 0 &&
        !qcow2_meta_add(s, QCOW2_META_L1, new_off, nbytes, NULL)) {
        ret = qcow2_signal_corruption(img, "new L1 table at host offset %"
                                      G_GUINT64_FORMAT " lands on "
                                      "metadata", new_off);
    }
    if (ret == 0) {
        ret = qcow2_pwrite_meta(img, QCOW2_META_L1, t, nbytes, new_off);
    }
    if (ret == 0) {
        ret = qcow2_sync_meta(img);
    }
    if (ret < 0) {
        return ret;
    }
    qcow2_put_be32(h, (uint32_t)l1_needed);
    qcow2_put_be64(h + 4, new_off);
    ret = qcow2_pwrite_meta(img, QCOW2_META_HEADER, h, sizeof(h), 36);
    if (ret == 0) {
        memcpy(s->header_raw + 36, h, sizeof(h));
        ret = qcow2_sync_meta(img);
    }
    if (ret < 0) {
        return ret;
    }
    if (s->l1_size > 0) {
        qcow2_defer_free(s, s->l1_offset, (uint64_t)s->l1_size * 8);
        qcow2_meta_remove(s, QCOW2_META_L1, s->l1_offset,
                          (uint64_t)s->l1_size * 8);
    }
    for (uint64_t i = 0; i < l1_needed; i++) {
        t[i] = GUINT64_FROM_BE(t[i]);
    }
    g_free(s->l1_table);
    s->l1_table = g_steal_pointer(&t);
    s->l1_size = (uint32_t)l1_needed;
    s->l1_offset = new_off;
    return 0;
}

/*
 * Grow in three steps, each durable before the next starts, so that a
 * crash (or a failure) at any point leaves an image that reads exactly as
 * before (old size, old content) or as grown (new size, the new range
 * zeros), and so does every export that has it as a layer.  First the
 * autoclear bits go (qcow2_first_write): a bitmap table sized for the old
 * size would make QEMU refuse the image, a cleared bit only makes it
 * ignore the stale bitmaps.  Then:
 *   1. the L1 table grows when the new size needs more entries
 *      (qcow2_grow_l1); the size in the header is unchanged.
 *   2. the new range [old, new) is zeroed wherever it would not read
 *      zeros (chain_image_zero_exposed): where the backing chain is
 *      longer and holds data there, zero clusters on v3 and zero data on
 *      v2, as QEMU's truncate does; then flushed, which writes the L2
 *      tables only after the data they point to is durable
 *      (qcow2-cluster.c).  Until step 3 the header still says the old
 *      size, and nothing reads past it: neither QEMU nor chainfs
 *      consults this image's L2 entries beyond its size, and a layer
 *      above reads zeros past our end.  [0, old) is not changed: the
 *      partial cluster at old is completed from what it showed.
 *   3. the new size goes into the header (bytes 24..32), synced.  Only
 *      now is the range visible, and it is zeros on disk already.
 * Called with the topology write lock of every chain using img held (or
 * offline): no I/O runs, so virtual_size may be the new size in memory
 * during step 2 (the write path refuses writes past it).
 */
static bool qcow2_grow(ChainImage *img, uint64_t new_size, GError **error)
{
    BDRVQcow2State *s = img->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t l2_span = cs * s->l2_size;
    uint64_t old_size = img->virtual_size;
    int ret;

    /* QEMU sees disks in 512-byte sectors: round up as qemu-img does. */
    new_size = (new_size + 511) & ~511ULL;
    if (new_size < old_size) {
        chainfs_set_error(error, EINVAL, "%s: cannot shrink a qcow2 image",
                          img->path);
        return false;
    }
    if (new_size == old_size) {
        return true;
    }
    if (!qcow2_may_write(img, error) || !qcow2_first_write(img, error)) {
        return false;
    }
    uint64_t l1_needed = (new_size + l2_span - 1) / l2_span;
    if (l1_needed * 8 > QCOW2_MAX_L1_BYTES) {
        chainfs_set_error(error, EFBIG, "%s: %" G_GUINT64_FORMAT " bytes is "
                          "too large for this cluster size", img->path,
                          new_size);
        return false;
    }

    /* Step 1. */
    g_mutex_lock(&img->meta_lock);
    ret = l1_needed > s->l1_size ? qcow2_grow_l1(img, l1_needed) : 0;
    g_mutex_unlock(&img->meta_lock);
    if (ret < 0) {
        chainfs_set_error(error, -ret, "%s: cannot grow the L1 table: %s",
                          img->path, g_strerror(-ret));
        return false;
    }

    /* Step 2 (block_status and the write path take meta_lock). */
    img->virtual_size = new_size;
    ret = chain_image_zero_exposed(img, old_size, new_size);
    if (ret == 0) {
        ret = qcow2_flush_and_free(img);
    }
    if (ret < 0) {
        img->virtual_size = old_size;
        chainfs_set_error(error, -ret, "%s: cannot zero the new range from "
                          "%" G_GUINT64_FORMAT " to %" G_GUINT64_FORMAT
                          " bytes: %s", img->path, old_size, new_size,
                          g_strerror(-ret));
        return false;
    }

    /* Step 3. */
    g_mutex_lock(&img->meta_lock);
    ret = qcow2_write_header_field64(img, 24, new_size);
    if (ret == 0) {
        ret = qcow2_sync_meta(img);
    }
    g_mutex_unlock(&img->meta_lock);
    if (ret < 0) {
        /* The header on disk may say either size; both read the same. */
        if (s->header_len >= 32) {
            qcow2_put_be64(s->header_raw + 24, old_size);
        }
        img->virtual_size = old_size;
        chainfs_set_error(error, -ret, "%s: cannot write the new size: %s",
                          img->path, g_strerror(-ret));
        return false;
    }
    return true;
}

/* ---- header rewrite (set_backing) ------------------------------------ */

/*
 * Lay out header + extensions + backing name into buf (cluster_size bytes,
 * zeroed).  Returns the used length, or -ENOSPC when it does not fit in the
 * header cluster.
 */
static int64_t qcow2_build_header(BDRVQcow2State *s, const char *ref,
                                  const char *fmt, uint8_t *buf)
{
    uint64_t cs = s->cluster_size;
    uint64_t off = s->header_len;

    memcpy(buf, s->header_raw, s->header_len);
    if (ref && fmt) {
        size_t l = strlen(fmt);
        if (off + 8 + ((l + 7) & ~7ULL) > cs) {
            return -ENOSPC;
        }
        qcow2_put_be32(buf + off, QCOW2_EXT_BACKING_FORMAT);
        qcow2_put_be32(buf + off + 4, (uint32_t)l);
        memcpy(buf + off + 8, fmt, l);
        off += 8 + ((l + 7) & ~7ULL);
    }
    for (guint i = 0; i < s->exts->len; i++) {
        Qcow2Ext *e = g_ptr_array_index(s->exts, i);
        uint64_t padded = ((uint64_t)e->len + 7) & ~7ULL;
        if (off + 8 + padded > cs) {
            return -ENOSPC;
        }
        qcow2_put_be32(buf + off, e->type);
        qcow2_put_be32(buf + off + 4, e->len);
        memcpy(buf + off + 8, e->data, e->len);
        off += 8 + padded;
    }
    if (off + 8 > cs) {
        return -ENOSPC;
    }
    off += 8; /* end-of-extensions marker: zeros */
    if (ref) {
        size_t l = strlen(ref);
        if (off + l > cs) {
            return -ENOSPC;
        }
        memcpy(buf + off, ref, l);
        qcow2_put_be64(buf + 8, off);
        qcow2_put_be32(buf + 16, (uint32_t)l);
        off += l;
    } else {
        qcow2_put_be64(buf + 8, 0);
        qcow2_put_be32(buf + 16, 0);
    }
    return (int64_t)off;
}

static bool qcow2_set_backing(ChainImage *img, const char *ref,
                              const char *fmt, GError **error)
{
    BDRVQcow2State *s = img->opaque;
    g_autofree uint8_t *buf = NULL;
    int64_t len;
    int ret;

    if (!qcow2_may_write(img, error)) {
        return false;
    }
    if (ref && strlen(ref) > QCOW2_MAX_BACKING_NAME) {
        chainfs_set_error(error, EINVAL, "%s: backing file name too long "
                          "(%zu bytes, at most %d)", img->path, strlen(ref),
                          QCOW2_MAX_BACKING_NAME);
        return false;
    }
    if (ref && !ref[0]) {
        ref = NULL;
    }
    g_mutex_lock(&img->meta_lock);
    buf = g_malloc0(s->cluster_size);
    len = qcow2_build_header(s, ref, fmt, buf);
    if (len < 0) {
        g_mutex_unlock(&img->meta_lock);
        chainfs_set_error(error, ENOSPC, "%s: the new backing reference does "
                          "not fit in the qcow2 header cluster (%u bytes)",
                          img->path, s->cluster_size);
        return false;
    }
    /* One pwrite of the whole header cluster: the stale tail is zeroed
     * (never on a latched image: qcow2_pwrite_meta refuses it). */
    ret = qcow2_pwrite_meta(img, QCOW2_META_HEADER, buf, s->cluster_size, 0);
    if (ret == 0) {
        ret = qcow2_sync_meta(img);
    }
    if (ret < 0) {
        g_mutex_unlock(&img->meta_lock);
        chainfs_set_error(error, -ret, "%s: cannot rewrite the header: %s",
                          img->path, g_strerror(-ret));
        return false;
    }
    memcpy(s->header_raw, buf, s->header_len);
    g_free(img->backing_ref);
    g_free(img->backing_fmt);
    img->backing_ref = g_strdup(ref);
    img->backing_fmt = ref ? g_strdup(fmt) : NULL;
    g_mutex_unlock(&img->meta_lock);
    return true;
}

/* ---- create ----------------------------------------------------------- */

static void qcow2_set_refcount16(uint8_t *block, uint64_t i, uint16_t v)
{
    block[i * 2] = v >> 8;
    block[i * 2 + 1] = v & 0xff;
}

/*
 * Put a file holding buf at path, atomically as far as a power cut goes:
 * the name path appears only with all of buf behind it.  Written under the
 * hidden name .NAME.chainfs-new in the same directory (discovery skips
 * dot files), fsync'ed, renamed to NAME without replacing anything (EEXIST
 * if it exists: the O_EXCL of a plain create), then the directory is
 * fsync'ed.  Written in place instead, the directory entry could reach the
 * disk before the content (the page cache writes back in any order and the
 * journal commits the entry on its own): a crash would leave an overlay
 * with a header and no refcount block, that discovery takes for the top of
 * the chain.  A stale hidden file left by such a crash is removed first.
 */
static bool qcow2_create_file(const char *path, const void *buf, size_t len,
                              GError **error)
{
    g_autofree char *dir = g_path_get_dirname(path);
    g_autofree char *base = g_path_get_basename(path);
    g_autofree char *tmp_name = g_strdup_printf(".%s.chainfs-new", base);
    g_autofree char *tmp = g_build_filename(dir, tmp_name, NULL);
    const char *what;
    int fd, dfd, ret, e;

    if (unlink(tmp) < 0 && errno != ENOENT) {
        e = errno;
        chainfs_set_error(error, e, "%s: cannot remove the stale %s: %s",
                          path, tmp_name, g_strerror(e));
        return false;
    }
    fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        e = errno;
        chainfs_set_error(error, e, "%s: cannot create %s: %s", path,
                          tmp_name, g_strerror(e));
        return false;
    }
    what = "write the new image";
    ret = qcow2_pwrite_full(fd, buf, len, 0);
    if (ret == 0 && fsync(fd) < 0) {
        ret = -errno;
    }
    close(fd);
    if (ret == 0) {
        what = "rename the new image into place";
        if (renameat2(AT_FDCWD, tmp, AT_FDCWD, path, RENAME_NOREPLACE) < 0) {
            ret = -errno;
        }
    }
    if (ret < 0) {
        chainfs_set_error(error, -ret, "%s: cannot %s: %s", path, what,
                          g_strerror(-ret));
        unlink(tmp);
        return false;
    }
    /* The rename is durable only with its directory: before this returns,
     * the caller may make the image part of a chain. */
    dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0 || fsync(dfd) < 0) {
        e = errno;
        if (dfd >= 0) {
            close(dfd);
        }
        unlink(path);
        chainfs_set_error(error, e, "%s: cannot sync the directory: %s",
                          path, g_strerror(e));
        return false;
    }
    close(dfd);
    return true;
}

/*
 * Layout of a new image: cluster 0 header (+ extensions, backing name),
 * then the refcount table, the refcount blocks and the L1 table, all with
 * refcount 1 (16-bit refcounts).  The sizes depend on each other: iterate
 * to a fixed point.
 */
bool qcow2_create(const char *path, uint64_t virtual_size,
                  uint32_t cluster_size, int version, const char *backing_ref,
                  const char *backing_fmt, GError **error)
{
    uint64_t cs = cluster_size;

    if (cluster_size < 512 || cluster_size > (2U << 20) ||
        (cluster_size & (cluster_size - 1))) {
        chainfs_set_error(error, EINVAL, "%s: invalid qcow2 cluster size %u "
                          "(a power of two from 512 to 2M)", path,
                          cluster_size);
        return false;
    }
    if (version != 2 && version != 3) {
        chainfs_set_error(error, EINVAL, "%s: invalid qcow2 version %d", path,
                          version);
        return false;
    }
    if (backing_ref && strlen(backing_ref) > QCOW2_MAX_BACKING_NAME) {
        chainfs_set_error(error, EINVAL, "%s: backing file name too long",
                          path);
        return false;
    }
    /* QEMU sees disks in 512-byte sectors: round up as qemu-img does. */
    virtual_size = (virtual_size + 511) & ~511ULL;
    unsigned cluster_bits = (unsigned)__builtin_ctz(cluster_size);
    uint64_t l2_span = cs * (cs / 8);
    uint64_t l1_size = (virtual_size + l2_span - 1) / l2_span;
    if (l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        chainfs_set_error(error, EFBIG, "%s: virtual size too large for "
                          "cluster size %u", path, cluster_size);
        return false;
    }
    uint64_t l1_clusters = (l1_size * 8 + cs - 1) / cs;
    uint64_t rb_entries = cs / 2;
    uint64_t rt_clusters = 1, rb_count = 1;
    for (;;) {
        uint64_t total = 1 + rt_clusters + rb_count + l1_clusters;
        uint64_t rb = (total + rb_entries - 1) / rb_entries;
        uint64_t rt = MAX(1, (rb * 8 + cs - 1) / cs);
        if (rb == rb_count && rt == rt_clusters) {
            break;
        }
        rb_count = rb;
        rt_clusters = rt;
    }
    uint64_t total = 1 + rt_clusters + rb_count + l1_clusters;
    uint64_t rt_off = cs;
    uint64_t rb_off = rt_off + rt_clusters * cs;
    uint64_t l1_off = rb_off + rb_count * cs;
    g_autofree uint8_t *img = g_malloc0(total * cs);
    uint8_t *h = img;

    qcow2_put_be32(h, QCOW2_MAGIC);
    qcow2_put_be32(h + 4, (uint32_t)version);
    qcow2_put_be32(h + 20, cluster_bits);
    qcow2_put_be64(h + 24, virtual_size);
    qcow2_put_be32(h + 36, (uint32_t)l1_size);
    qcow2_put_be64(h + 40, l1_off);
    qcow2_put_be64(h + 48, rt_off);
    qcow2_put_be32(h + 56, (uint32_t)rt_clusters);
    uint64_t off = QCOW2_V2_HEADER_LEN;
    if (version == 3) {
        qcow2_put_be32(h + 96, 4);
        qcow2_put_be32(h + 100, QCOW2_V3_HEADER_LEN);
        off = QCOW2_V3_HEADER_LEN;
    }
    if (backing_ref && backing_fmt) {
        size_t l = strlen(backing_fmt);
        qcow2_put_be32(h + off, QCOW2_EXT_BACKING_FORMAT);
        qcow2_put_be32(h + off + 4, (uint32_t)l);
        if (off + 16 + ((l + 7) & ~7ULL) > cs) {
            goto nospace;
        }
        memcpy(h + off + 8, backing_fmt, l);
        off += 8 + ((l + 7) & ~7ULL);
    }
    off += 8; /* end of extensions */
    if (backing_ref) {
        size_t l = strlen(backing_ref);
        if (off + l > cs) {
            goto nospace;
        }
        memcpy(h + off, backing_ref, l);
        qcow2_put_be64(h + 8, off);
        qcow2_put_be32(h + 16, (uint32_t)l);
    }
    for (uint64_t i = 0; i < rb_count; i++) {
        qcow2_put_be64(img + rt_off + i * 8, rb_off + i * cs);
    }
    for (uint64_t i = 0; i < total; i++) {
        qcow2_set_refcount16(img + rb_off, i, 1);
    }

    return qcow2_create_file(path, img, total * cs, error);

nospace:
    chainfs_set_error(error, ENOSPC, "%s: backing reference does not fit in "
                      "the header cluster", path);
    return false;
}

/* A dirty image opened read-only gets its refcounts rebuilt before it is
 * written (qcow2-repair.c). */
static bool qcow2_prepare_writable(ChainImage *img, int fd, GError **error)
{
    BDRVQcow2State *s = img->opaque;

    if (!(s->incompat & QCOW2_INCOMPAT_DIRTY)) {
        return true;
    }
    return qcow2_repair_refcounts(img, fd, error);
}

const ImageDriver qcow2_driver = {
    .format_name = "qcow2",
    .probe = qcow2_probe,
    .open = qcow2_open,
    .close = qcow2_close,
    .block_status = qcow2_block_status,
    .pread = qcow2_pread,
    .pwrite = qcow2_pwrite,
    .pwrite_zeroes = qcow2_pwrite_zeroes,
    .flush = qcow2_flush,
    .grow = qcow2_grow,
    .prepare_writable = qcow2_prepare_writable,
    .set_backing = qcow2_set_backing,
    .allocated_bytes = qcow2_allocated_bytes,
};
