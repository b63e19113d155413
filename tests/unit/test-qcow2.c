/*
 * test-qcow2.c: format-level tests of the qcow2 driver, with qemu-img and
 * qemu-io as the oracle: header parsing and refusals, reads of every
 * cluster kind, create / set_backing / grow round trips, and the write path
 * (random unaligned writes from several threads checked against a model,
 * then `qemu-img check` and `qemu-img compare`).
 *
 * The driver is driven directly, on ChainImage structs built here.  For
 * copy-on-write from a backing file this test provides
 * chain_image_read_below() itself, reading the raw file that the test
 * image names as its backing file: the test thereby does not depend on
 * chain-io.c, and qemu-img compare sees the same backing content.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <glib.h>
#include <glib/gstdio.h>

#include "qcow2-int.h"

/* ---- fixtures ---------------------------------------------------------- */

static char *tmpdir;

static char *tpath(const char *name)
{
    return g_build_filename(tmpdir, name, NULL);
}

/* Run argv (NULL-terminated); return its exit status, stdout in *out. */
static int run_cmd(char **out, const char *first, ...)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new();
    g_autofree char *so = NULL;
    g_autofree char *se = NULL;
    g_autoptr(GError) err = NULL;
    va_list ap;
    int status = -1;

    g_ptr_array_add(argv, (char *)first);
    va_start(ap, first);
    for (const char *a = va_arg(ap, const char *); a;
         a = va_arg(ap, const char *)) {
        g_ptr_array_add(argv, (char *)a);
    }
    va_end(ap);
    g_ptr_array_add(argv, NULL);
    if (!g_spawn_sync(NULL, (char **)argv->pdata, NULL, G_SPAWN_SEARCH_PATH,
                      NULL, NULL, &so, &se, &status, &err)) {
        g_error("cannot run %s: %s", first, err->message);
    }
    if (out) {
        *out = g_strconcat(so, se, NULL);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

#define QEMU_OK(...)                                                        \
    do {                                                                    \
        g_autofree char *o_ = NULL;                                         \
        int rc_ = run_cmd(&o_, __VA_ARGS__, NULL);                          \
        /* qemu-io reports failed reads on stdout and exits 0. */        \
        if (rc_ != 0 || strstr(o_, "Pattern verification failed") ||     \
            strstr(o_, "failed:")) {                                        \
            g_error("command failed (%d): %s", rc_, o_);                   \
        }                                                                   \
    } while (0)

/* `qemu-img check` must find no errors and no leaks. */
static void assert_check_clean(const char *path)
{
    g_autofree char *out = NULL;
    int rc = run_cmd(&out, "qemu-img", "check", path, NULL);
    if (rc != 0) {
        g_error("qemu-img check %s: exit %d\n%s", path, rc, out);
    }
}

static void assert_compare(const char *img, const char *raw)
{
    g_autofree char *out = NULL;
    int rc = run_cmd(&out, "qemu-img", "compare", "-F", "raw", img, raw,
                     NULL);
    if (rc != 0) {
        g_error("qemu-img compare %s %s: exit %d\n%s", img, raw, rc, out);
    }
}

static ChainImage *img_open(const char *path, bool writable, GError **error)
{
    ChainImage *img = g_new0(ChainImage, 1);

    img->drv = &qcow2_driver;
    img->path = g_strdup(path);
    img->name = g_path_get_basename(path);
    img->dir = g_path_get_dirname(path);
    img->writable = writable;
    g_mutex_init(&img->meta_lock);
    img->fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    g_assert_cmpint(img->fd, >=, 0);
    if (!img->drv->open(img, error)) {
        close(img->fd);
        g_free(img->path);
        g_free(img->name);
        g_free(img->dir);
        g_mutex_clear(&img->meta_lock);
        g_free(img);
        return NULL;
    }
    return img;
}

static void img_close(ChainImage *img)
{
    if (img->writable) {
        g_assert_cmpint(img->drv->flush(img), ==, 0);
    }
    img->drv->close(img);
    close(img->fd);
    if (img->backing) {
        close(img->backing->fd);
        g_free(img->backing);
    }
    g_free(img->backing_ref);
    g_free(img->backing_fmt);
    g_free(img->path);
    g_free(img->name);
    g_free(img->dir);
    g_mutex_clear(&img->meta_lock);
    g_free(img);
}

/* Give img a stand-in backing image: the raw file its header names. */
static void img_attach_raw_backing(ChainImage *img)
{
    g_autofree char *p = g_build_filename(img->dir, img->backing_ref, NULL);
    struct stat st;

    img->backing = g_new0(ChainImage, 1);
    img->backing->fd = open(p, O_RDONLY | O_CLOEXEC);
    g_assert_cmpint(img->backing->fd, >=, 0);
    g_assert_cmpint(fstat(img->backing->fd, &st), ==, 0);
    img->backing->virtual_size = (uint64_t)st.st_size;
}

int chain_image_read_below(ChainImage *img, uint64_t offset, void *buf,
                           uint64_t bytes)
{
    ChainImage *b = img->backing;

    memset(buf, 0, bytes);
    if (!b || offset >= b->virtual_size) {
        return 0;
    }
    uint64_t n = MIN(bytes, b->virtual_size - offset);
    return pread(b->fd, buf, n, (off_t)offset) == (ssize_t)n ? 0 : -EIO;
}

/* Read a layer as the chain would: unallocated ranges from below. */
static void layer_read(ChainImage *img, uint64_t off, uint8_t *buf,
                       uint64_t len)
{
    while (len > 0) {
        uint64_t pnum = 0;
        int st = img->drv->block_status(img, off, len, &pnum);
        g_assert_cmpint(st, >=, 0);
        g_assert_cmpuint(pnum, >, 0);
        g_assert_cmpuint(pnum, <=, len);
        int r = st == BLOCK_UNALLOCATED
                ? chain_image_read_below(img, off, buf, pnum)
                : img->drv->pread(img, off, buf, pnum);
        g_assert_cmpint(r, ==, 0);
        off += pnum;
        buf += pnum;
        len -= pnum;
    }
}

/* Plain write (g_file_set_contents would fsync: slow, and not needed). */
static void write_file(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(write(fd, data, len), ==, (ssize_t)len);
    close(fd);
}

static uint8_t *read_file(const char *path, size_t *len)
{
    g_autoptr(GError) err = NULL;
    char *data = NULL;
    gsize l = 0;
    g_assert_true(g_file_get_contents(path, &data, &l, &err));
    *len = l;
    return (uint8_t *)data;
}

/* Patch bytes of a file. */
static void patch(const char *path, uint64_t off, const void *data,
                  size_t len)
{
    int fd = open(path, O_WRONLY);
    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(pwrite(fd, data, len, (off_t)off), ==, (ssize_t)len);
    close(fd);
}

static void patch_be32(const char *path, uint64_t off, uint32_t v)
{
    uint8_t b[4];
    qcow2_put_be32(b, v);
    patch(path, off, b, 4);
}

static void patch_be64(const char *path, uint64_t off, uint64_t v)
{
    uint8_t b[8];
    qcow2_put_be64(b, v);
    patch(path, off, b, 8);
}

/* ---- refusals ---------------------------------------------------------- */

typedef struct {
    const char *what;
    int code;
    const char *needle;
} Refusal;

/* Open must fail with code and a message naming the file and needle, and
 * the file must not change (opened read-write). */
static void assert_refused(const char *path, int code, const char *needle)
{
    g_autoptr(GError) err = NULL;
    size_t l1, l2;
    g_autofree uint8_t *before = read_file(path, &l1);
    ChainImage *img = img_open(path, true, &err);
    g_autofree uint8_t *after = read_file(path, &l2);

    g_assert_null(img);
    g_assert_error(err, CHAINFS_ERROR, code);
    g_assert_nonnull(strstr(err->message, path));
    if (!strstr(err->message, needle)) {
        g_error("message '%s' does not name '%s'", err->message, needle);
    }
    g_assert_cmpuint(l1, ==, l2);
    g_assert_cmpmem(before, l1, after, l2);
}

static void test_refusals(void)
{
    g_autofree char *p = tpath("refuse.qcow2");

    /* Feature bits and methods patched into a valid v3 image. */
    struct {
        unsigned off;
        int width;
        uint64_t val;
        int code;
        const char *needle;
    } cases[] = {
        { 32, 4, 1, EOPNOTSUPP, "encryption" },
        /* the dirty bit: repaired, not refused (tests/test_dirty_repair.py) */
        { 72, 8, QCOW2_INCOMPAT_CORRUPT, EOPNOTSUPP, "corrupt" },
        { 72, 8, QCOW2_INCOMPAT_DATA_FILE, EOPNOTSUPP, "external data file" },
        { 72, 8, QCOW2_INCOMPAT_EXTL2, EOPNOTSUPP, "extended L2" },
        { 72, 8, 1ULL << 10, EOPNOTSUPP, "bit 10" },
        { 0, 4, 0x12345678, EINVAL, "magic" },
        { 4, 4, 4, EINVAL, "version 4" },
        { 20, 4, 30, EINVAL, "cluster_bits 30" },
        { 20, 4, 8, EINVAL, "cluster_bits 8" },
        { 96, 4, 7, EINVAL, "refcount_order 7" },
        { 40, 8, 1ULL << 40, EINVAL, "L1 table" },
        { 40, 8, 65536 + 512, EINVAL, "L1 table" },
        { 36, 4, 0, EINVAL, "L1 table too small" },
        { 48, 8, 1ULL << 40, EINVAL, "refcount table" },
        { 100, 4, 96, EINVAL, "header_length" },
    };
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_unlink(p);
        QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", p, "16M");
        if (cases[i].width == 4) {
            patch_be32(p, cases[i].off, (uint32_t)cases[i].val);
        } else {
            patch_be64(p, cases[i].off, cases[i].val);
        }
        assert_refused(p, cases[i].code, cases[i].needle);
    }

    /* Images made by qemu-img with features we refuse. */
    g_autofree char *data = tpath("refuse.data");
    g_unlink(p);
    QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", "-o",
            "extended_l2=on", p, "16M");
    assert_refused(p, EOPNOTSUPP, "extended L2");
    g_unlink(p);
    QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", "-o",
            "compression_type=zstd", p, "16M");
    assert_refused(p, EOPNOTSUPP, "zstd");
    g_unlink(p);
    QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=refuse.data",
            p, "16M");
    assert_refused(p, EOPNOTSUPP, "external data file");
    g_unlink(data);

    /* An unknown bit named by the feature-name table gets that name:
     * renumber the table's entry for incompatible bit 0 to bit 9. */
    g_unlink(p);
    QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", p, "16M");
    {
        size_t len;
        g_autofree uint8_t *d = read_file(p, &len);
        uint64_t off = qcow2_be32(d + 100);
        bool done = false;
        while (!done && qcow2_be32(d + off) != 0) {
            uint32_t l = qcow2_be32(d + off + 4);
            if (qcow2_be32(d + off) == QCOW2_EXT_FEATURE_TABLE) {
                for (uint32_t k = 0; k + 48 <= l; k += 48) {
                    if (d[off + 8 + k] == 0 && d[off + 8 + k + 1] == 0) {
                        const uint8_t nine = 9;
                        patch(p, off + 8 + k + 1, &nine, 1);
                        g_autofree char *name = g_strndup(
                            (char *)d + off + 8 + k + 2, 46);
                        g_assert_cmpstr(name, ==, "dirty bit");
                        done = true;
                    }
                }
            }
            off += 8 + ((l + 7) & ~7U);
        }
        g_assert_true(done);
    }
    patch_be64(p, 72, 1ULL << 9);
    assert_refused(p, EOPNOTSUPP, "'dirty bit' (bit 9)");
    g_unlink(p);
}

/* ---- open and header parsing ------------------------------------------ */

static void test_open_fields(void)
{
    g_autofree char *base = tpath("fields-base.raw");
    g_autofree char *p = tpath("fields.qcow2");
    g_autoptr(GError) err = NULL;

    g_unlink(p);
    write_file(base, "", 0);
    QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", "-o",
            "cluster_size=4096,refcount_bits=8,compat=1.1", "-b",
            "fields-base.raw", "-F", "raw", p, "100M");
    ChainImage *img = img_open(p, false, &err);
    g_assert_no_error(err);
    g_assert_cmpuint(img->virtual_size, ==, 100 << 20);
    g_assert_cmpuint(img->cluster_size, ==, 4096);
    g_assert_cmpstr(img->backing_ref, ==, "fields-base.raw");
    g_assert_cmpstr(img->backing_fmt, ==, "raw");
    BDRVQcow2State *s = img->opaque;
    g_assert_cmpint(s->version, ==, 3);
    g_assert_cmpuint(s->refcount_order, ==, 3);
    img_close(img);

    g_unlink(p);
    QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", "-o",
            "compat=0.10,cluster_size=512", p, "1G");
    img = img_open(p, false, &err);
    g_assert_no_error(err);
    s = img->opaque;
    g_assert_cmpint(s->version, ==, 2);
    g_assert_cmpuint(img->cluster_size, ==, 512);
    g_assert_null(img->backing_ref);
    g_assert_null(img->backing_fmt);
    img_close(img);

    /* Probe. */
    uint8_t hdr[512] = { 0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3 };
    g_assert_cmpint(qcow2_driver.probe(hdr, sizeof(hdr)), ==, 100);
    hdr[0] = 0;
    g_assert_cmpint(qcow2_driver.probe(hdr, sizeof(hdr)), ==, 0);

    /* Autoclear bits are kept by an open, read-only or read-write, that
     * writes nothing; the first write clears them. */
    g_unlink(p);
    QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", p, "16M");
    patch_be64(p, 88, 1);
    img = img_open(p, false, &err);
    g_assert_no_error(err);
    img_close(img);
    size_t l;
    g_autofree uint8_t *h1 = read_file(p, &l);
    g_assert_cmpuint(qcow2_be64(h1 + 88), ==, 1);
    img = img_open(p, true, &err);
    g_assert_no_error(err);
    img_close(img);
    g_autofree uint8_t *h2 = read_file(p, &l);
    g_assert_cmpuint(qcow2_be64(h2 + 88), ==, 1);
    img = img_open(p, true, &err);
    g_assert_no_error(err);
    g_assert_cmpint(img->drv->pwrite(img, 4096, "y", 1), ==, 0);
    img_close(img);
    g_autofree uint8_t *h2w = read_file(p, &l);
    g_assert_cmpuint(qcow2_be64(h2w + 88), ==, 0);
    assert_check_clean(p);

    /* Opened read-only, then switched to read-write the way
     * chain_image_reopen does (new fd, no new open): the first write
     * clears them. */
    patch_be64(p, 88, 1);
    img = img_open(p, false, &err);
    g_assert_no_error(err);
    int rw = open(p, O_RDWR | O_CLOEXEC);
    g_assert_cmpint(rw, >=, 0);
    close(img->fd);
    img->fd = rw;
    img->writable = true;
    g_assert_cmpint(img->drv->pwrite(img, 12345, "x", 1), ==, 0);
    img_close(img);
    g_autofree uint8_t *h3 = read_file(p, &l);
    g_assert_cmpuint(qcow2_be64(h3 + 88), ==, 0);
    assert_check_clean(p);
    QEMU_OK("qemu-io", "-t", "writeback", "-c", "read -P 0x78 12345 1", p);
    g_unlink(p);
    g_unlink(base);
}

/* ---- reads -------------------------------------------------------------- */

static void check_reads_against_qemu(const char *p, const char *raw)
{
    g_autoptr(GError) err = NULL;
    size_t len;
    g_autofree uint8_t *ref = NULL;

    QEMU_OK("qemu-img", "convert", "-O", "raw", p, raw);
    ref = read_file(raw, &len);
    ChainImage *img = img_open(p, false, &err);
    g_assert_no_error(err);
    g_assert_cmpuint(img->virtual_size, ==, len);
    g_autofree uint8_t *buf = g_malloc(len);
    /* Whole image in one call, then odd-sized pieces. */
    g_assert_cmpint(img->drv->pread(img, 0, buf, len), ==, 0);
    g_assert_cmpmem(buf, len, ref, len);
    memset(buf, 0xaa, len);
    for (uint64_t off = 0; off < len;) {
        uint64_t n = MIN(len - off, 77777);
        g_assert_cmpint(img->drv->pread(img, off, buf + off, n), ==, 0);
        off += n;
    }
    g_assert_cmpmem(buf, len, ref, len);
    img_close(img);
}

static void test_read_kinds(void)
{
    g_autofree char *p = tpath("kinds.qcow2");
    g_autofree char *raw = tpath("kinds.raw");
    g_autoptr(GError) err = NULL;

    g_unlink(p);
    QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", p, "8M");
    QEMU_OK("qemu-io", "-t", "writeback", "-c", "write -P 0x11 0 256k", "-c",
            "write -P 0x22 1M 128k", "-c", "write -z 2M 192k", "-c",
            "write -c -P 0x33 3M 64k", "-c", "write -c -P 0x44 3136k 64k",
            "-c", "write -P 0x55 8000k 100", p);
    check_reads_against_qemu(p, raw);

    /* Runs: [0,256k) data, [256k,1M) unallocated, ..., compressed
     * clusters one run of two. */
    ChainImage *img = img_open(p, false, &err);
    g_assert_no_error(err);
    uint64_t pnum;
    g_assert_cmpint(img->drv->block_status(img, 0, 8 << 20, &pnum), ==,
                    BLOCK_DATA);
    g_assert_cmpuint(pnum, ==, 256 << 10);
    g_assert_cmpint(img->drv->block_status(img, 256 << 10, (8 << 20) - (256 << 10), &pnum),
                    ==, BLOCK_UNALLOCATED);
    g_assert_cmpuint(pnum, ==, (1 << 20) - (256 << 10));
    g_assert_cmpint(img->drv->block_status(img, 2 << 20, 1 << 20, &pnum), ==,
                    BLOCK_ZERO);
    g_assert_cmpuint(pnum, ==, 192 << 10);
    g_assert_cmpint(img->drv->block_status(img, 3 << 20, 1 << 20, &pnum), ==,
                    BLOCK_COMPRESSED);
    g_assert_cmpuint(pnum, ==, 128 << 10);
    /* A run never exceeds the request. */
    g_assert_cmpint(img->drv->block_status(img, 4096, 100, &pnum), ==,
                    BLOCK_DATA);
    g_assert_cmpuint(pnum, ==, 100);
    img_close(img);

    /* Fully compressed image, v2 image, small clusters. */
    g_autofree char *c = tpath("kinds-c.qcow2");
    g_unlink(c);
    QEMU_OK("qemu-img", "convert", "-c", "-O", "qcow2", "-o",
            "cluster_size=4096", p, c);
    check_reads_against_qemu(c, raw);
    g_unlink(c);
    QEMU_OK("qemu-img", "convert", "-O", "qcow2", "-o",
            "compat=0.10,cluster_size=512", p, c);
    check_reads_against_qemu(c, raw);
    g_unlink(c);
    QEMU_OK("qemu-img", "convert", "-c", "-O", "qcow2", "-o",
            "cluster_size=2M", p, c);
    check_reads_against_qemu(c, raw);
    g_unlink(c);
    g_unlink(p);
    g_unlink(raw);
}

/* ---- create, set_backing, grow ------------------------------------------ */

static void test_create(void)
{
    g_autofree char *p = tpath("create.qcow2");
    g_autoptr(GError) err = NULL;
    struct {
        uint64_t size;
        uint32_t cs;
        int version;
    } cases[] = {
        { 64 << 20, 65536, 3 }, { 64 << 20, 65536, 2 },
        { 1ULL << 30, 512, 3 }, { 10ULL << 30, 2 << 20, 3 },
        { 0, 4096, 3 },         { 12345, 1024, 2 },
    };
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autofree char *out = NULL;
        g_unlink(p);
        g_assert_true(qcow2_create(p, cases[i].size, cases[i].cs,
                                   cases[i].version, NULL, NULL, &err));
        g_assert_no_error(err);
        assert_check_clean(p);
        g_assert_cmpint(run_cmd(&out, "qemu-img", "info", "--output=json", p,
                                NULL), ==, 0);
        /* Sizes are rounded up to whole 512-byte sectors. */
        g_autofree char *vs = g_strdup_printf("\"virtual-size\": %" G_GUINT64_FORMAT ",",
                                              (guint64)((cases[i].size + 511) & ~511ULL));
        g_autofree char *cs = g_strdup_printf("\"cluster-size\": %u,",
                                              cases[i].cs);
        g_assert_nonnull(strstr(out, vs));
        g_assert_nonnull(strstr(out, cs));
        g_assert_nonnull(strstr(out, cases[i].version == 3 ? "\"compat\": \"1.1\""
                                                           : "\"compat\": \"0.10\""));
    }
    /* Refuses an existing file, and leaves it alone. */
    g_assert_false(qcow2_create(p, 1 << 20, 65536, 3, NULL, NULL, &err));
    g_assert_error(err, CHAINFS_ERROR, EEXIST);
    g_clear_error(&err);
    g_assert_false(qcow2_create(p, 1 << 20, 3000, 3, NULL, NULL, &err));
    g_assert_error(err, CHAINFS_ERROR, EINVAL);
    g_clear_error(&err);
    g_unlink(p);

    /* With a backing reference and format. */
    g_autofree char *base = tpath("create-base.qcow2");
    g_autofree char *out = NULL;
    g_unlink(base);
    QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", base, "32M");
    g_assert_true(qcow2_create(p, 32 << 20, 65536, 3, "create-base.qcow2",
                               "qcow2", &err));
    assert_check_clean(p);
    g_assert_cmpint(run_cmd(&out, "qemu-img", "info", p, NULL), ==, 0);
    g_assert_nonnull(strstr(out, "backing file: create-base.qcow2"));
    g_assert_nonnull(strstr(out, "backing file format: qcow2"));
    ChainImage *img = img_open(p, false, &err);
    g_assert_no_error(err);
    g_assert_cmpstr(img->backing_ref, ==, "create-base.qcow2");
    g_assert_cmpstr(img->backing_fmt, ==, "qcow2");
    img_close(img);
    g_unlink(p);
    g_unlink(base);
}

static gboolean has_ext(const char *path, uint32_t type)
{
    size_t len;
    g_autofree uint8_t *d = read_file(path, &len);
    uint32_t hl = qcow2_be32(d + 4) == 3 ? qcow2_be32(d + 100) : 72;
    for (uint64_t off = hl; off + 8 <= len;) {
        uint32_t t = qcow2_be32(d + off), l = qcow2_be32(d + off + 4);
        if (t == 0) {
            return FALSE;
        }
        if (t == type) {
            return TRUE;
        }
        off += 8 + ((l + 7) & ~7U);
    }
    return FALSE;
}

static void test_set_backing(void)
{
    g_autofree char *p = tpath("setb.qcow2");
    g_autofree char *b1 = tpath("setb-b1.raw");
    g_autoptr(GError) err = NULL;
    g_autofree char *out = NULL;

    g_unlink(p);
    write_file(b1, "", 0);
    QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", p, "16M");
    QEMU_OK("qemu-io", "-t", "writeback", "-c", "write -P 0x66 64k 64k", p);
    /* An unknown extension (as a newer qemu might write), kept verbatim. */
    const uint8_t ext[24] = { 0x12, 0x34, 0x56, 0x78, 0, 0, 0, 5,
                              'h', 'e', 'l', 'l', 'o', 0, 0, 0 };
    uint64_t end = 112;
    {
        size_t len;
        g_autofree uint8_t *d = read_file(p, &len);
        while (qcow2_be32(d + end) != 0) {
            end += 8 + ((qcow2_be32(d + end + 4) + 7) & ~7U);
        }
    }
    patch(p, end, ext, sizeof(ext));
    g_assert_true(has_ext(p, 0x12345678));
    g_assert_true(has_ext(p, QCOW2_EXT_FEATURE_TABLE));

    ChainImage *img = img_open(p, true, &err);
    g_assert_no_error(err);
    g_assert_true(img->drv->set_backing(img, "setb-b1.raw", "raw", &err));
    g_assert_no_error(err);
    g_assert_cmpstr(img->backing_ref, ==, "setb-b1.raw");
    img_close(img);
    assert_check_clean(p);
    g_assert_cmpint(run_cmd(&out, "qemu-img", "info", p, NULL), ==, 0);
    g_assert_nonnull(strstr(out, "backing file: setb-b1.raw"));
    g_assert_nonnull(strstr(out, "backing file format: raw"));
    g_assert_true(has_ext(p, 0x12345678));
    g_assert_true(has_ext(p, QCOW2_EXT_FEATURE_TABLE));
    g_assert_true(has_ext(p, QCOW2_EXT_BACKING_FORMAT));
    QEMU_OK("qemu-io", "-t", "writeback", "-c", "read -P 0x66 64k 64k", p);

    /* Reopen: the driver reads what it wrote. */
    img = img_open(p, true, &err);
    g_assert_no_error(err);
    g_assert_cmpstr(img->backing_ref, ==, "setb-b1.raw");
    g_assert_cmpstr(img->backing_fmt, ==, "raw");
    /* Without a format: the extension goes away. */
    g_assert_true(img->drv->set_backing(img, "setb-b1.raw", NULL, &err));
    img_close(img);
    g_assert_false(has_ext(p, QCOW2_EXT_BACKING_FORMAT));
    g_assert_true(has_ext(p, 0x12345678));

    /* Too long for the header cluster: ENOSPC, file unchanged. */
    img = img_open(p, true, &err);
    g_assert_no_error(err);
    g_autofree char *huge = g_strnfill(1000, 'x');
    size_t l1, l2;
    g_autofree uint8_t *before = read_file(p, &l1);
    /* 64k clusters fit 1000 bytes: refuse by length instead (EINVAL). */
    g_autofree char *toolong = g_strnfill(1100, 'y');
    g_assert_false(img->drv->set_backing(img, toolong, "raw", &err));
    g_assert_error(err, CHAINFS_ERROR, EINVAL);
    g_clear_error(&err);
    g_autofree uint8_t *after = read_file(p, &l2);
    g_assert_cmpmem(before, l1, after, l2);

    /* Remove the backing file. */
    g_assert_true(img->drv->set_backing(img, NULL, NULL, &err));
    img_close(img);
    g_free(out);
    out = NULL;
    g_assert_cmpint(run_cmd(&out, "qemu-img", "info", p, NULL), ==, 0);
    g_assert_null(strstr(out, "backing file"));
    assert_check_clean(p);
    g_unlink(p);

    /* 512-byte clusters: the header cluster is small. */
    QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", "-o",
            "cluster_size=512", p, "16M");
    img = img_open(p, true, &err);
    g_assert_no_error(err);
    g_free(before);
    before = read_file(p, &l1);
    huge[450] = 0;
    g_assert_false(img->drv->set_backing(img, huge, "raw", &err));
    g_assert_error(err, CHAINFS_ERROR, ENOSPC);
    g_clear_error(&err);
    g_free(after);
    after = read_file(p, &l2);
    g_assert_cmpmem(before, l1, after, l2);
    g_assert_true(img->drv->set_backing(img, "setb-b1.raw", "raw", &err));
    img_close(img);
    assert_check_clean(p);
    g_unlink(p);
    g_unlink(b1);
}

static void test_grow(void)
{
    g_autofree char *p = tpath("grow.qcow2");
    g_autoptr(GError) err = NULL;
    g_autofree char *out = NULL;

    g_unlink(p);
    /* 512-byte clusters: an L2 table maps 32 KiB, so the L1 table must
     * move to grow from 1 MiB to 100 MiB. */
    QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", "-o",
            "cluster_size=512", p, "1M");
    QEMU_OK("qemu-io", "-t", "writeback", "-c", "write -P 7 0 1M", p);
    ChainImage *img = img_open(p, true, &err);
    g_assert_no_error(err);
    g_assert_false(img->drv->grow(img, 512 << 10, &err));
    g_assert_error(err, CHAINFS_ERROR, EINVAL);
    g_clear_error(&err);
    g_assert_true(img->drv->grow(img, 100 << 20, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(img->virtual_size, ==, 100 << 20);
    /* Writes past the old end work right away. */
    uint8_t buf[1000];
    memset(buf, 9, sizeof(buf));
    g_assert_cmpint(img->drv->pwrite(img, (99 << 20) + 3, buf, sizeof(buf)),
                    ==, 0);
    img_close(img);
    assert_check_clean(p);
    g_assert_cmpint(run_cmd(&out, "qemu-img", "info", "--output=json", p,
                            NULL), ==, 0);
    g_assert_nonnull(strstr(out, "\"virtual-size\": 104857600,"));
    QEMU_OK("qemu-io", "-t", "writeback", "-c", "read -P 7 0 1M", "-c", "read -P 0 1M 98M",
            "-c", "read -P 9 103809027 1000", p);

    /* Within the L1 table: only the size changes. */
    img = img_open(p, true, &err);
    g_assert_true(img->drv->grow(img, (100 << 20) + 12345, &err));
    img_close(img);
    assert_check_clean(p);
    g_unlink(p);
}

/* ---- writes ------------------------------------------------------------- */

typedef struct {
    ChainImage *img;
    uint8_t *model;
    uint64_t lo, span;
    guint32 seed;
    int iters;
} Worker;

/* Random unaligned writes and zero writes inside [lo, lo+span), checked
 * by reading back ranges against the model (which only this thread
 * touches in that region). */
static gpointer write_worker(gpointer opaque)
{
    Worker *w = opaque;
    g_autoptr(GRand) r = g_rand_new_with_seed(w->seed);
    g_autofree uint8_t *buf = g_malloc(1 << 20);
    g_autofree uint8_t *rb = g_malloc(1 << 20);

    for (int i = 0; i < w->iters; i++) {
        uint64_t len = g_rand_int_range(r, 0, 4) == 0
                       ? (uint64_t)g_rand_int_range(r, 1, 1 << 20)
                       : (uint64_t)g_rand_int_range(r, 1, 10000);
        len = MIN(len, w->span);
        uint64_t off = w->lo + (uint64_t)(g_rand_double(r) *
                                          (double)(w->span - len));
        int kind = g_rand_int_range(r, 0, 10);
        if (kind == 0) {
            g_assert_cmpint(w->img->drv->pwrite_zeroes(
                                w->img, off, len, g_rand_boolean(r)), ==, 0);
            memset(w->model + off, 0, len);
        } else {
            /* Cheap bytes: xorshift seeded from the test's GRand. */
            uint64_t x = ((uint64_t)g_rand_int(r) << 32) | g_rand_int(r) | 1;
            for (uint64_t j = 0; j < len; j++) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf[j] = (uint8_t)x;
            }
            g_assert_cmpint(w->img->drv->pwrite(w->img, off, buf, len), ==, 0);
            memcpy(w->model + off, buf, len);
        }
        if (kind == 1 && g_rand_int_range(r, 0, 10) == 0) {
            g_assert_cmpint(w->img->drv->flush(w->img), ==, 0);
        }
        if (kind <= 3) {
            uint64_t ro = w->lo + (uint64_t)(g_rand_double(r) *
                                             (double)(w->span - 1));
            uint64_t rl = (uint64_t)g_rand_int_range(r, 1, 1 << 20);
            rl = MIN(rl, w->lo + w->span - ro); /* MIN evaluates twice */
            layer_read(w->img, ro, rb, rl);
            if (memcmp(rb, w->model + ro, rl)) {
                uint64_t k = 0;
                while (rb[k] == w->model[ro + k]) {
                    k++;
                }
                uint64_t pn = 0;
                int st = w->img->drv->block_status(w->img, ro + k, 1, &pn);
                g_error("iteration %d: mismatch at %" G_GUINT64_FORMAT
                        " (status %d): read %u, expected %u", i, ro + k, st,
                        rb[k], w->model[ro + k]);
            }
        }
    }
    return NULL;
}

/*
 * Write randomly into p (whose current content, read through the chain,
 * is init) from nthreads threads, then check the content, qemu-img check
 * and qemu-img compare.
 */
static void random_writes(const char *p, const char *model_raw,
                          uint8_t *init, uint64_t size, int nthreads,
                          int iters, guint32 seed)
{
    g_autoptr(GError) err = NULL;
    ChainImage *img = img_open(p, true, &err);
    g_assert_no_error(err);
    g_assert_cmpuint(img->virtual_size, ==, size);
    if (img->backing_ref) {
        img_attach_raw_backing(img);
    }
    Worker w[4];
    GThread *th[4];
    g_assert_cmpint(nthreads, <=, 4);
    for (int i = 0; i < nthreads; i++) {
        w[i] = (Worker){ img, init, size / nthreads * i, size / nthreads,
                         seed * 31 + i, iters };
        th[i] = g_thread_new("writer", write_worker, &w[i]);
    }
    for (int i = 0; i < nthreads; i++) {
        g_thread_join(th[i]);
    }
    g_autofree uint8_t *all = g_malloc(size);
    layer_read(img, 0, all, size);
    g_assert_cmpmem(all, size, init, size);
    img_close(img);
    write_file(model_raw, init, size);
    assert_check_clean(p);
    assert_compare(p, model_raw);
}

static void test_write_model(void)
{
    g_autofree char *p = tpath("w.qcow2");
    g_autofree char *raw = tpath("w.raw");
    g_autofree char *base = tpath("w-base.raw");
    uint64_t size = 24 << 20;
    struct {
        const char *opts;
        bool backing;
        bool compressed;
        bool snapshot;
    } cases[] = {
        { "cluster_size=65536", false, false, false },
        { "cluster_size=65536", true, false, false },
        { "cluster_size=4096,refcount_bits=1", true, false, false },
        { "cluster_size=512,refcount_bits=64", false, false, false },
        { "cluster_size=2M,refcount_bits=4", true, false, false },
        { "compat=0.10,cluster_size=16384", true, false, false },
        { "cluster_size=8192", false, true, false },
        { "cluster_size=65536,refcount_bits=2", false, false, true },
        { "compat=0.10", false, true, true },
    };

    /* A backing file with a pattern everywhere, shorter than the disk. */
    g_autofree uint8_t *pat = g_malloc(size - 1000);
    for (uint64_t i = 0; i < size - 1000; i++) {
        pat[i] = (uint8_t)(i * 7 + i / 4096);
    }
    write_file(base, pat, size - 1000);

    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autofree uint8_t *init = NULL;
        size_t len;
        g_test_message("case %zu: %s%s%s%s", i, cases[i].opts,
                       cases[i].backing ? " backing" : "",
                       cases[i].compressed ? " compressed" : "",
                       cases[i].snapshot ? " snapshot" : "");
        g_unlink(p);
        g_unlink(raw);
        if (cases[i].backing) {
            QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    cases[i].opts, "-b", "w-base.raw", "-F", "raw", p, "24M");
        } else {
            QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    cases[i].opts, p, "24M");
        }
        QEMU_OK("qemu-io", "-t", "writeback", "-c", "write -P 0x21 1M 3M", "-c",
                "write -z 6M 1M", "-c", "write -P 0x22 9437696 70k", p);
        if (cases[i].compressed) {
            g_autofree char *c = tpath("w-c.qcow2");
            g_autofree char *o = g_strdup_printf("%s", cases[i].opts);
            QEMU_OK("qemu-img", "convert", "-c", "-O", "qcow2", "-o", o, p, c);
            g_rename(c, p);
        }
        g_autofree char *snap_raw = tpath("w-snap.raw");
        if (cases[i].snapshot) {
            QEMU_OK("qemu-img", "snapshot", "-c", "s1", p);
            QEMU_OK("qemu-img", "convert", "-O", "raw", p, snap_raw);
        }
        QEMU_OK("qemu-img", "convert", "-O", "raw", p, raw);
        init = read_file(raw, &len);
        g_assert_cmpuint(len, ==, size);
        random_writes(p, raw, init, size, i % 2 ? 4 : 2, 70,
                      (guint32)(1000 + i));
        if (cases[i].snapshot) {
            /* The internal snapshot still holds what it held. */
            g_autofree char *o = tpath("w-snap-out.raw");
            size_t l1, l2;
            QEMU_OK("qemu-img", "convert", "-l", "s1", "-O", "raw", p, o);
            g_autofree uint8_t *a = read_file(snap_raw, &l1);
            g_autofree uint8_t *b = read_file(o, &l2);
            g_assert_cmpmem(a, l1, b, l2);
            g_unlink(o);
            g_unlink(snap_raw);
        }
    }
    g_unlink(p);
    g_unlink(raw);
    g_unlink(base);
}

/* Zero writes: whole clusters become zero clusters on v3. */
static void test_zero_clusters(void)
{
    g_autofree char *p = tpath("z.qcow2");
    g_autofree char *out = NULL;
    g_autoptr(GError) err = NULL;

    g_unlink(p);
    QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", p, "4M");
    QEMU_OK("qemu-io", "-t", "writeback", "-c", "write -P 0x11 0 4M", p);
    ChainImage *img = img_open(p, true, &err);
    g_assert_no_error(err);
    g_assert_cmpint(img->drv->pwrite_zeroes(img, 100, (1 << 20) - 100, true),
                    ==, 0);
    uint64_t pnum;
    g_assert_cmpint(img->drv->block_status(img, 0, 4 << 20, &pnum), ==,
                    BLOCK_DATA);
    g_assert_cmpuint(pnum, ==, 65536);
    g_assert_cmpint(img->drv->block_status(img, 65536, (4 << 20) - 65536,
                                           &pnum), ==, BLOCK_ZERO);
    g_assert_cmpuint(pnum, ==, (1 << 20) - 65536);
    g_assert_cmpint(img->drv->block_status(img, 1 << 20, 65536, &pnum), ==,
                    BLOCK_DATA);
    /* Keep the allocation (may_unmap false): still zero. */
    g_assert_cmpint(img->drv->pwrite_zeroes(img, 2 << 20, 1 << 20, false),
                    ==, 0);
    g_assert_cmpint(img->drv->block_status(img, 2 << 20, 1 << 20, &pnum), ==,
                    BLOCK_ZERO);
    g_assert_cmpuint(pnum, ==, 1 << 20);
    /* Overwrite part of a kept zero cluster: the rest reads zeros. */
    uint8_t b[10] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 };
    g_assert_cmpint(img->drv->pwrite(img, (2 << 20) + 5, b, sizeof(b)), ==, 0);
    img_close(img);
    assert_check_clean(p);
    QEMU_OK("qemu-io", "-t", "writeback", "-c", "read -P 0x11 0 100", "-c",
            "read -P 0 100 1048476", "-c", "read -P 0x11 1M 1M", "-c",
            "read -P 0 2M 5", "-c", "read -P 0 2097167 1048561", "-c",
            "read -P 0x11 3M 1M", p);
    g_assert_cmpint(run_cmd(&out, "qemu-img", "map", "--output=json", p,
                            NULL), ==, 0);
    g_assert_nonnull(strstr(out, "\"zero\": true, \"data\": false"));
    g_unlink(p);
}

/* Threads writing disjoint quarters of the same unallocated clusters. */
typedef struct {
    ChainImage *img;
    int quarter;
    guint32 seed;
} SameWorker;

static gpointer same_cluster_worker(gpointer opaque)
{
    SameWorker *w = opaque;
    ChainImage *img = w->img;
    uint64_t cs = img->cluster_size, q = cs / 4;
    uint64_t n = img->virtual_size / cs;
    g_autoptr(GRand) r = g_rand_new_with_seed(w->seed);
    g_autofree uint8_t *buf = g_malloc(q);
    g_autofree uint64_t *order = g_new(uint64_t, n);

    memset(buf, 0xa0 + w->quarter, q);
    for (uint64_t i = 0; i < n; i++) {
        order[i] = i;
    }
    for (uint64_t i = n - 1; i > 0; i--) {
        uint64_t j = (uint64_t)g_rand_int_range(r, 0, (gint32)i + 1);
        uint64_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint64_t off = order[i] * cs + (uint64_t)w->quarter * q;
        g_assert_cmpint(img->drv->pwrite(img, off, buf, q), ==, 0);
        /* Our own bytes read back at once, whoever allocated. */
        g_autofree uint8_t *rb = g_malloc(q);
        layer_read(img, off, rb, q);
        g_assert_cmpmem(rb, q, buf, q);
    }
    return NULL;
}

static void test_concurrent_same_cluster(void)
{
    g_autofree char *p = tpath("same.qcow2");
    g_autofree char *base = tpath("same-base.raw");
    g_autofree char *raw = tpath("same.raw");
    g_autoptr(GError) err = NULL;
    uint64_t size = 4 << 20;
    g_autofree uint8_t *model = g_malloc(size);

    for (uint64_t i = 0; i < size; i++) {
        model[i] = (uint8_t)(i % 251);
    }
    write_file(base, model, size);
    for (int round = 0; round < 3; round++) {
        g_unlink(p);
        QEMU_OK("qemu-img", "create", "-q", "-f", "qcow2", "-o",
                round == 1 ? "cluster_size=4096" : "cluster_size=65536",
                "-b", "same-base.raw", "-F", "raw", p, "4M");
        ChainImage *img = img_open(p, true, &err);
        g_assert_no_error(err);
        img_attach_raw_backing(img);
        /* The first three quarters of every cluster are written, the
         * last one must keep the backing file's bytes. */
        SameWorker w[3];
        GThread *th[3];
        for (int t = 0; t < 3; t++) {
            w[t] = (SameWorker){ img, t, (guint32)(round * 10 + t) };
            th[t] = g_thread_new("same", same_cluster_worker, &w[t]);
        }
        for (int t = 0; t < 3; t++) {
            g_thread_join(th[t]);
        }
        g_autofree uint8_t *expect = g_memdup2(model, size);
        uint64_t cs = img->cluster_size, q = cs / 4;
        for (uint64_t c = 0; c < size / cs; c++) {
            for (int t = 0; t < 3; t++) {
                memset(expect + c * cs + t * q, 0xa0 + t, q);
            }
        }
        g_autofree uint8_t *all = g_malloc(size);
        layer_read(img, 0, all, size);
        g_assert_cmpmem(all, size, expect, size);
        img_close(img);
        write_file(raw, expect, size);
        assert_check_clean(p);
        assert_compare(p, raw);
    }
    g_unlink(p);
    g_unlink(raw);
    g_unlink(base);
}

int main(int argc, char **argv)
{
    g_autoptr(GError) err = NULL;
    int ret;

    g_test_init(&argc, &argv, NULL);
    tmpdir = g_dir_make_tmp("test-qcow2-XXXXXX", &err);
    g_assert_no_error(err);
    /* qemu-img resolves relative backing names; run inside tmpdir. */
    g_assert_cmpint(chdir(tmpdir), ==, 0);

    g_test_add_func("/qcow2/refusals", test_refusals);
    g_test_add_func("/qcow2/open-fields", test_open_fields);
    g_test_add_func("/qcow2/read-kinds", test_read_kinds);
    g_test_add_func("/qcow2/create", test_create);
    g_test_add_func("/qcow2/set-backing", test_set_backing);
    g_test_add_func("/qcow2/grow", test_grow);
    g_test_add_func("/qcow2/zero-clusters", test_zero_clusters);
    g_test_add_func("/qcow2/same-cluster", test_concurrent_same_cluster);
    g_test_add_func("/qcow2/write-model", test_write_model);
    ret = g_test_run();
    /* Remove the directory and anything a failed test left in it. */
    GDir *d = g_dir_open(tmpdir, 0, NULL);
    if (d) {
        const char *n;
        while ((n = g_dir_read_name(d))) {
            g_autofree char *f = g_build_filename(tmpdir, n, NULL);
            g_unlink(f);
        }
        g_dir_close(d);
    }
    g_rmdir(tmpdir);
    g_free(tmpdir);
    return ret;
}
