/*
 * test-chain-io.c: chain resolution, the chain map, locks, discovery and
 * the state file.
 *
 * Chains are built with qemu-img / qemu-io (the oracle) in a fresh
 * temporary directory per test; what the library reads is compared with
 * `qemu-img convert` of the same image and with a per-layer walk
 * (chain_image_read_through), so a wrong map entry shows up as a byte
 * difference.  Randomness is seeded.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib.h>
#include <glib/gstdio.h>

#include "chain-io.h"
#include "chain.h"
#include "directory.h"
#include "lock.h"

#define MiB (1024 * 1024)

/* ---- helpers ---------------------------------------------------------- */

typedef struct {
    char *dir;
} Fixture;

static void fixture_setup(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;

    f->dir = g_dir_make_tmp("chain-io-XXXXXX", &err);
    g_assert_no_error(err);
}

static void rm_rf(const char *path)
{
    GDir *d = g_dir_open(path, 0, NULL);
    const char *name;

    if (d) {
        while ((name = g_dir_read_name(d))) {
            g_autofree char *p = g_build_filename(path, name, NULL);

            if (g_file_test(p, G_FILE_TEST_IS_DIR) &&
                !g_file_test(p, G_FILE_TEST_IS_SYMLINK)) {
                rm_rf(p);
            } else {
                g_unlink(p);
            }
        }
        g_dir_close(d);
    }
    g_rmdir(path);
}

static void fixture_teardown(Fixture *f, gconstpointer data)
{
    rm_rf(f->dir);
    g_free(f->dir);
}

/* Run a shell command in dir; return its exit status, stderr in *err_out. */
static int run_status(const char *dir, char **err_out, const char *fmt, ...)
    G_GNUC_PRINTF(3, 4);
static int run_status(const char *dir, char **err_out, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    g_autofree char *cmd = g_strdup_vprintf(fmt, ap);
    va_end(ap);

    const char *argv[] = { "/bin/sh", "-c", cmd, NULL };
    g_autofree char *out = NULL;
    g_autofree char *errs = NULL;
    g_autoptr(GError) error = NULL;
    int status = 0;

    g_spawn_sync(dir, (char **)argv, NULL, 0, NULL, NULL, &out, &errs,
                 &status, &error);
    g_assert_no_error(error);
    if (err_out) {
        *err_out = g_strconcat(out ? out : "", errs ? errs : "", NULL);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

#define run(dir, ...)                                                     \
    do {                                                                  \
        g_autofree char *run_err_ = NULL;                                 \
        int run_rc_ = run_status(dir, &run_err_, __VA_ARGS__);            \
        if (run_rc_ != 0) {                                               \
            g_error("command failed (%d): %s", run_rc_, run_err_);        \
        }                                                                 \
    } while (0)

static uint8_t *read_file(const char *path, gsize *len)
{
    g_autoptr(GError) err = NULL;
    char *data = NULL;

    g_file_get_contents(path, &data, len, &err);
    g_assert_no_error(err);
    return (uint8_t *)data;
}

/* Report the first difference, not a megabyte of hex. */
static void assert_same_bytes(const uint8_t *a, const uint8_t *b,
                              uint64_t len, const char *what)
{
    for (uint64_t i = 0; i < len; i++) {
        if (a[i] != b[i]) {
            g_error("%s: first difference at byte %" G_GUINT64_FORMAT
                    " (%u != %u)", what, i, a[i], b[i]);
        }
    }
}

/* The whole flat disk through chain_pread, in seeded, unaligned chunks. */
static uint8_t *chain_read_all(Chain *chain, GRand *rnd)
{
    uint64_t size = chain_size(chain);
    uint8_t *buf = g_malloc(size);
    uint64_t off = 0;

    while (off < size) {
        /* MIN() evaluates its arguments twice: draw first. */
        uint64_t want = g_rand_int_range(rnd, 1, 300000);
        uint64_t n = MIN(size - off, want);
        int ret = chain_pread(chain, off, buf + off, n);

        g_assert_cmpint(ret, ==, 0);
        off += n;
    }
    return buf;
}

/* Compare chain_pread with qemu-img convert and with a per-layer walk,
 * and chain_range_kind with a walk of chain_status_above. */
static void check_chain_against_oracles(const char *dir, Chain *chain,
                                        const char *top, guint32 seed)
{
    g_autoptr(GRand) rnd = g_rand_new_with_seed(seed);
    uint64_t size = chain_size(chain);
    g_autofree uint8_t *mapped = chain_read_all(chain, rnd);
    g_autofree uint8_t *walked = g_malloc(size);
    g_autofree char *ref_path = g_build_filename(dir, "oracle.raw", NULL);
    gsize ref_len;

    chain_topo_rdlock(chain);
    g_assert_cmpint(chain_image_read_through(chain_layer(chain, 0), 0, walked,
                                             size), ==, 0);
    chain_topo_unlock(chain);
    assert_same_bytes(mapped, walked, size, "map vs walk");

    run(dir, "qemu-img convert -U -O raw %s oracle.raw", top);
    g_autofree uint8_t *ref = read_file(ref_path, &ref_len);

    g_assert_cmpuint(ref_len, ==, size);
    assert_same_bytes(mapped, ref, size, "chain vs qemu-img convert");
    g_unlink(ref_path);

    /* Every byte that the range kinds call a hole must read as zero, and
     * data ranges must agree with what the layers say. */
    for (uint64_t off = 0; off < size;) {
        uint64_t n;
        int kind = chain_range_kind(chain, off, size - off, &n);

        g_assert_cmpint(kind, >=, 0);
        g_assert_cmpuint(n, >, 0);
        g_assert_cmpuint(off + n, <=, size);
        if (kind == CHAIN_HOLE) {
            for (uint64_t i = off; i < off + n; i++) {
                if (mapped[i]) {
                    g_error("byte %" G_GUINT64_FORMAT " in a hole is %u", i,
                            mapped[i]);
                }
            }
        } else {
            uint64_t p;
            int owner;

            chain_topo_rdlock(chain);
            int st = chain_status_above(chain, 0, chain_depth(chain), off,
                                        n, &p, &owner);
            chain_topo_unlock(chain);
            g_assert_cmpint(st, ==, BLOCK_DATA);
            g_assert_cmpint(owner, >=, 0);
        }
        off += n;
    }
}

static Chain *open_chain(const char *dir, const char *top, bool rw,
                         ImageSet **set_out)
{
    g_autoptr(GError) err = NULL;
    ImageSet *set = image_set_new(dir, &err);

    g_assert_no_error(err);

    Chain *chain = chain_open(set, top, NULL, rw, &err);

    g_assert_no_error(err);
    g_assert_nonnull(chain);
    *set_out = set;
    return chain;
}

static void close_chain(Chain *chain, ImageSet *set)
{
    chain_free(chain);
    image_set_free(set);
}

/* Expect chain_open(top) to fail with errnum and a message holding each of
 * the NULL-terminated words. */
static void expect_refusal(const char *dir, const char *top, int errnum, ...)
{
    g_autoptr(GError) err = NULL;
    ImageSet *set = image_set_new(dir, &err);
    va_list ap;
    const char *word;

    g_assert_no_error(err);
    Chain *chain = chain_open(set, top, NULL, false, &err);

    g_assert_null(chain);
    g_assert_error(err, CHAINFS_ERROR, errnum);
    va_start(ap, errnum);
    while ((word = va_arg(ap, const char *))) {
        if (!strstr(err->message, word)) {
            g_error("message '%s' does not name '%s'", err->message, word);
        }
    }
    va_end(ap);
    image_set_free(set);
}

/* ---- resolution refusals ----------------------------------------------- */

static void test_refuse_loop(Fixture *f, gconstpointer data)
{
    run(f->dir, "qemu-img create -q -f qcow2 -u -b b.qcow2 -F qcow2 "
        "a.qcow2 1M && qemu-img create -q -f qcow2 -u -b a.qcow2 -F qcow2 "
        "b.qcow2 1M && qemu-img create -q -f qcow2 self.qcow2 1M && "
        "qemu-img rebase -u -b self.qcow2 -F qcow2 self.qcow2");
    expect_refusal(f->dir, "a.qcow2", ELOOP, "loops", "a.qcow2", "b.qcow2",
                   NULL);
    expect_refusal(f->dir, "self.qcow2", ELOOP, "self.qcow2", NULL);
}

static void test_refuse_missing(Fixture *f, gconstpointer data)
{
    run(f->dir, "qemu-img create -q -f qcow2 -u -b gone.qcow2 -F qcow2 "
        "top.qcow2 1M");
    expect_refusal(f->dir, "top.qcow2", ENOENT, "gone.qcow2", "top.qcow2",
                   NULL);
    expect_refusal(f->dir, "nothere.qcow2", ENOENT, "nothere.qcow2", NULL);
}

static void test_refuse_outside(Fixture *f, gconstpointer data)
{
    g_autofree char *images = g_build_filename(f->dir, "images", NULL);

    g_mkdir(images, 0755);
    run(f->dir, "qemu-img create -q -f qcow2 outside.qcow2 1M");
    run(images, "qemu-img create -q -f qcow2 -b ../outside.qcow2 -F qcow2 "
        "top.qcow2 1M && ln -s ../outside.qcow2 link.qcow2 && "
        "qemu-img create -q -f qcow2 -b link.qcow2 -F qcow2 viasym.qcow2 1M");

    g_autofree char *canon_images = realpath(images, NULL);

    expect_refusal(images, "top.qcow2", EACCES, "../outside.qcow2",
                   canon_images, "top.qcow2", NULL);
    /* A symlink inside that points outside is outside too. */
    expect_refusal(images, "viasym.qcow2", EACCES, "link.qcow2",
                   canon_images, NULL);
    /* Opening a top by a path that leaves the directory, likewise. */
    expect_refusal(images, "../outside.qcow2", EACCES, "../outside.qcow2",
                   canon_images, NULL);
}

static void test_refuse_format(Fixture *f, gconstpointer data)
{
    run(f->dir, "qemu-img create -q -f qcow2 base.qcow2 1M && "
        "qemu-img create -q -f qcow2 -u -b base.qcow2 -F raw top.qcow2 1M && "
        "qemu-img create -q -f raw plain.img 1M && "
        "qemu-img create -q -f qcow2 -u -b plain.img -F qcow2 top2.qcow2 1M");
    expect_refusal(f->dir, "top2.qcow2", EINVAL, "plain.img", "top2.qcow2",
                   NULL);

    /* A recorded raw format wins over what the bytes look like (as in
     * QEMU): base.qcow2 is read as raw, its qcow2 header as data. */
    ImageSet *set;
    Chain *chain = open_chain(f->dir, "top.qcow2", false, &set);

    g_assert_cmpuint(chain_depth(chain), ==, 2);
    g_assert_true(chain_layer(chain, 1)->drv == &raw_driver);
    close_chain(chain, set);
}

/*
 * A chain deeper than CHAIN_MAX_DEPTH.  Made by copying one qemu-img
 * template image and patching its backing name (same length), which takes
 * a fraction of a second instead of a thousand qemu-img runs.
 */
static void test_refuse_depth(Fixture *f, gconstpointer data)
{
    struct rlimit rl;

    /* Resolving opens every layer: make room for them. */
    g_assert_cmpint(getrlimit(RLIMIT_NOFILE, &rl), ==, 0);
    if (rl.rlim_cur < CHAIN_MAX_DEPTH + 64) {
        rl.rlim_cur = MIN(rl.rlim_max, (rlim_t)CHAIN_MAX_DEPTH * 2 + 64);
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur < CHAIN_MAX_DEPTH + 64) {
        g_test_skip("not enough file descriptors for a deep chain");
        return;
    }
    run(f->dir, "qemu-img create -q -f qcow2 -u -b L99999.qcow2 -F qcow2 "
        "template.qcow2 1M");

    g_autofree char *tpath = g_build_filename(f->dir, "template.qcow2", NULL);
    gsize tlen;
    g_autofree uint8_t *tmpl = read_file(tpath, &tlen);
    uint8_t *name = memmem(tmpl, tlen, "L99999.qcow2", 12);

    g_assert_nonnull(name);
    for (int i = 0; i <= CHAIN_MAX_DEPTH; i++) {
        g_autofree char *file = g_strdup_printf("%s/L%05d.qcow2", f->dir, i);
        char next[13];
        g_autoptr(GError) err = NULL;

        g_snprintf(next, sizeof(next), "L%05d.qcow2", i + 1);
        memcpy(name, next, 12);
        g_file_set_contents(file, (char *)tmpl, tlen, &err);
        g_assert_no_error(err);
    }
    expect_refusal(f->dir, "L00000.qcow2", ELOOP, "L00000.qcow2", "deeper",
                   NULL);

    /* One layer less than the limit resolves (the bottom is missing, so it
     * stops with ENOENT rather than ELOOP: the depth check did not fire). */
    g_autofree char *cut = g_strdup_printf("%s/L%05d.qcow2", f->dir,
                                           CHAIN_MAX_DEPTH - 1);
    g_unlink(cut);
    expect_refusal(f->dir, "L00000.qcow2", ENOENT, NULL);
}

/* ---- the chain map against the oracles --------------------------------- */

/* Write seeded patterns with qemu-io into a layer. */
static void fill_layer(const char *dir, const char *file, GRand *rnd,
                       uint64_t size, int count, int pattern)
{
    g_autoptr(GString) cmd = g_string_new("qemu-io -f qcow2 -t writeback");

    for (int i = 0; i < count; i++) {
        uint64_t len = g_rand_int_range(rnd, 1, 200) * 512;
        uint64_t off = (uint64_t)g_rand_int_range(rnd, 0,
                                                  (size - len) / 512) * 512;

        if (g_rand_int_range(rnd, 0, 6) == 0) {
            g_string_append_printf(cmd, " -c 'write -z %" G_GUINT64_FORMAT
                                   " %" G_GUINT64_FORMAT "'", off, len);
        } else {
            g_string_append_printf(cmd, " -c 'write -P %d %" G_GUINT64_FORMAT
                                   " %" G_GUINT64_FORMAT "'",
                                   pattern + i % 7, off, len);
        }
    }
    g_string_append_printf(cmd, " %s >/dev/null", file);
    run(dir, "%s", cmd->str);
}

static void test_map_mixed_chain(Fixture *f, gconstpointer data)
{
    g_autoptr(GRand) rnd = g_rand_new_with_seed(1234);
    uint64_t size = 16 * MiB;
    ImageSet *set;

    /* A raw base with holes, then qcow2 layers of varied cluster sizes,
     * a shorter middle layer and a v2 (compat=0.10) one. */
    run(f->dir, "qemu-img create -q -f raw base.raw 16M && "
        "qemu-io -f raw -c 'write -P 9 0 3M' -c 'write -P 8 10M 64k' "
        "base.raw >/dev/null");
    run(f->dir, "qemu-img create -q -f qcow2 -o cluster_size=65536 "
        "-b base.raw -F raw l1.qcow2 16M");
    fill_layer(f->dir, "l1.qcow2", rnd, size, 20, 10);
    run(f->dir, "qemu-img create -q -f qcow2 -o cluster_size=4096,"
        "compat=0.10 -b l1.qcow2 -F qcow2 l2.qcow2 12M");
    fill_layer(f->dir, "l2.qcow2", rnd, 12 * MiB, 20, 20);
    run(f->dir, "qemu-img create -q -f qcow2 -o cluster_size=131072 "
        "-b l2.qcow2 -F qcow2 l3.qcow2 16M");
    fill_layer(f->dir, "l3.qcow2", rnd, size, 20, 30);
    run(f->dir, "qemu-img create -q -f qcow2 -o cluster_size=512 "
        "-b l3.qcow2 -F qcow2 top.qcow2 16M");
    fill_layer(f->dir, "top.qcow2", rnd, size, 30, 40);

    Chain *chain = open_chain(f->dir, "top.qcow2", false, &set);

    g_assert_cmpuint(chain_depth(chain), ==, 5);
    g_assert_cmpstr(chain->name, ==, "top");
    g_assert_cmpint(chain_find_layer(chain, "l2.qcow2"), ==, 2);
    g_assert_cmpint(chain_find_layer(chain, "base.raw"), ==, 4);
    g_assert_cmpint(chain_find_layer(chain, "nope.qcow2"), ==, -1);
    check_chain_against_oracles(f->dir, chain, "top.qcow2", 7);
    close_chain(chain, set);
}

static void test_map_deep_chain(Fixture *f, gconstpointer data)
{
    g_autoptr(GString) cmd = g_string_new("qemu-img create -q -f qcow2 "
                                          "d00.qcow2 8M");
    const int depth = 40;
    ImageSet *set;

    for (int i = 1; i < depth; i++) {
        g_string_append_printf(cmd, " && qemu-img create -q -f qcow2 -b "
                               "d%02d.qcow2 -F qcow2 d%02d.qcow2 8M", i - 1,
                               i);
    }
    run(f->dir, "%s", cmd->str);
    /* Each layer owns one 64 KiB slot, the bottom owns the first 1 MiB. */
    g_string_assign(cmd, "qemu-io -c 'write -P 1 0 1M' d00.qcow2 >/dev/null");
    for (int i = 1; i < depth; i++) {
        g_string_append_printf(cmd, " && qemu-io -c 'write -P %d %d 64k' "
                               "d%02d.qcow2 >/dev/null", i + 1,
                               (i % 20) * 65536 * 3, i);
    }
    run(f->dir, "%s", cmd->str);

    g_autofree char *top = g_strdup_printf("d%02d.qcow2", depth - 1);
    Chain *chain = open_chain(f->dir, top, false, &set);

    g_assert_cmpuint(chain_depth(chain), ==, depth);
    check_chain_against_oracles(f->dir, chain, top, 11);
    close_chain(chain, set);
}

/* Guest writes through the chain keep the map current. */
static void test_map_writes(Fixture *f, gconstpointer data)
{
    g_autoptr(GRand) rnd = g_rand_new_with_seed(99);
    uint64_t size = 8 * MiB;
    ImageSet *set;

    run(f->dir, "qemu-img create -q -f qcow2 -o cluster_size=4096 "
        "base.qcow2 8M && qemu-io -c 'write -P 5 0 8M' base.qcow2 >/dev/null"
        " && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "
        "top.qcow2 8M");

    Chain *chain = open_chain(f->dir, "top.qcow2", true, &set);
    g_autofree uint8_t *model = g_malloc(size);
    g_autofree uint8_t *buf = g_malloc(256 * 1024);

    memset(model, 5, size);
    /* Build the whole map first, so that writes must update it. */
    g_free(chain_read_all(chain, rnd));
    for (int i = 0; i < 400; i++) {
        uint64_t len = g_rand_int_range(rnd, 1, 200 * 1024);
        uint64_t off = g_rand_int_range(rnd, 0, size - len);

        if (g_rand_int_range(rnd, 0, 4) == 0) {
            g_assert_cmpint(chain_pwrite_zeroes(chain, off, len), ==, 0);
            memset(model + off, 0, len);
        } else {
            for (uint64_t j = 0; j < len; j++) {
                buf[j] = g_rand_int(rnd);
            }
            g_assert_cmpint(chain_pwrite(chain, off, buf, len), ==, 0);
            memcpy(model + off, buf, len);
        }
        /* Read back around the write at once. */
        uint64_t s = off > 70000 ? off - 70000 : 0;
        uint64_t e = MIN(size, off + len + 70000);
        g_autofree uint8_t *back = g_malloc(e - s);

        g_assert_cmpint(chain_pread(chain, s, back, e - s), ==, 0);
        assert_same_bytes(back, model + s, e - s, "read after write");
    }
    g_assert_cmpint(chain_flush(chain), ==, 0);
    {
        g_autofree uint8_t *all = chain_read_all(chain, rnd);

        assert_same_bytes(all, model, size, "whole disk after writes");
    }
    close_chain(chain, set);

    /* And the files say the same to qemu-img. */
    chain = open_chain(f->dir, "top.qcow2", false, &set);
    check_chain_against_oracles(f->dir, chain, "top.qcow2", 3);
    close_chain(chain, set);
    run(f->dir, "qemu-img check -q top.qcow2");
}

/*
 * Writers race with map rebuilds: one thread keeps forgetting the map (as a
 * topology change would) and reading, so regions are rebuilt while writes
 * complete.  Each writer owns a slice; every acknowledged write must read
 * back at once, and the whole disk must match the model at the end.
 */
typedef struct {
    Chain *chain;
    uint8_t *model;
    uint64_t slice_start;
    uint64_t slice_len;
    guint32 seed;
    gint *stop;
    int failures;
} RaceWriter;

static gpointer race_writer(gpointer p)
{
    RaceWriter *w = p;
    g_autoptr(GRand) rnd = g_rand_new_with_seed(w->seed);
    g_autofree uint8_t *buf = g_malloc(64 * 1024);
    g_autofree uint8_t *back = g_malloc(64 * 1024);

    for (int i = 0; i < 300; i++) {
        uint64_t len = g_rand_int_range(rnd, 1, 64 * 1024);
        uint64_t off = w->slice_start +
                       g_rand_int_range(rnd, 0, w->slice_len - len);
        int ret;

        if (g_rand_int_range(rnd, 0, 5) == 0) {
            memset(buf, 0, len);
            ret = chain_pwrite_zeroes(w->chain, off, len);
        } else {
            for (uint64_t j = 0; j < len; j++) {
                buf[j] = g_rand_int(rnd) | 1;
            }
            ret = chain_pwrite(w->chain, off, buf, len);
        }
        if (ret < 0 || chain_pread(w->chain, off, back, len) < 0 ||
            memcmp(buf, back, len) != 0) {
            w->failures++;
        }
        memcpy(w->model + off, buf, len);
    }
    g_atomic_int_inc(w->stop);
    return NULL;
}

static void test_map_concurrent(Fixture *f, gconstpointer data)
{
    const uint64_t size = 8 * MiB;
    const int nwriters = 4;
    ImageSet *set;
    gint stopped = 0;
    g_autoptr(GRand) rnd = g_rand_new_with_seed(4242);

    run(f->dir, "qemu-img create -q -f qcow2 base.qcow2 8M && "
        "qemu-io -c 'write -P 7 0 8M' base.qcow2 >/dev/null && "
        "qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 "
        "-F qcow2 top.qcow2 8M");

    Chain *chain = open_chain(f->dir, "top.qcow2", true, &set);
    g_autofree uint8_t *model = g_malloc(size);
    RaceWriter w[4];
    GThread *th[4];

    memset(model, 7, size);
    for (int i = 0; i < nwriters; i++) {
        w[i] = (RaceWriter) {
            .chain = chain, .model = model,
            .slice_start = i * (size / nwriters),
            .slice_len = size / nwriters, .seed = 100 + i,
            .stop = &stopped,
        };
        th[i] = g_thread_new("writer", race_writer, &w[i]);
    }
    while (g_atomic_int_get(&stopped) < nwriters) {
        uint8_t b[4096];

        chain_topo_wrlock(chain);
        chain_map_invalidate(chain);
        chain_topo_unlock(chain);
        g_assert_cmpint(chain_pread(chain, g_rand_int_range(rnd, 0,
                                                           size - 4096),
                                    b, sizeof(b)), ==, 0);
    }
    for (int i = 0; i < nwriters; i++) {
        g_thread_join(th[i]);
        g_assert_cmpint(w[i].failures, ==, 0);
    }

    g_autofree uint8_t *all = chain_read_all(chain, rnd);

    assert_same_bytes(all, model, size, "after racing writes");
    close_chain(chain, set);
}

/* A write on a read-only chain is refused; writes past the end too. */
static void test_write_refusals(Fixture *f, gconstpointer data)
{
    ImageSet *set;
    char byte = 1;

    run(f->dir, "qemu-img create -q -f qcow2 top.qcow2 1M");

    Chain *chain = open_chain(f->dir, "top.qcow2", false, &set);

    g_assert_cmpint(chain_pwrite(chain, 0, &byte, 1), ==, -EROFS);
    close_chain(chain, set);
    chain = open_chain(f->dir, "top.qcow2", true, &set);
    g_assert_cmpint(chain_pwrite(chain, MiB, &byte, 1), ==, -EINVAL);
    g_assert_cmpint(chain_pwrite(chain, MiB - 1, &byte, 1), ==, 0);
    close_chain(chain, set);
}

/* ---- topology changes ------------------------------------------------ */

static void test_push_and_drop(Fixture *f, gconstpointer data)
{
    ImageSet *set;
    g_autoptr(GError) err = NULL;
    uint8_t b[4];

    run(f->dir, "qemu-img create -q -f qcow2 base.qcow2 4M && "
        "qemu-io -c 'write -P 1 0 4M' base.qcow2 >/dev/null && "
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 4M && "
        "qemu-io -c 'write -P 2 1M 1M' mid.qcow2 >/dev/null && "
        "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 4M && "
        "qemu-img create -q -f qcow2 -b top.qcow2 -F qcow2 snap.qcow2 4M");

    Chain *chain = open_chain(f->dir, "top.qcow2", true, &set);

    g_assert_cmpint(chain_pread(chain, MiB, b, 4), ==, 0);
    g_assert_cmpuint(b[0], ==, 2);

    /* Live snapshot: a new empty top; the map stays valid. */
    ChainImage *snap = image_set_open(set, "snap.qcow2", true, &err);

    g_assert_no_error(err);
    chain_topo_wrlock(chain);
    chain_push_top(chain, snap);
    g_assert_true(chain_layer(chain, 0)->backing == chain_layer(chain, 1));
    /* The topology lock nests within a thread. */
    g_assert_cmpuint(chain_size(chain), ==, 4 * MiB);
    g_assert_cmpint(chain_pread(chain, MiB, b, 4), ==, 0);
    chain_topo_unlock(chain);
    g_assert_cmpint(chain_pread(chain, MiB, b, 4), ==, 0);
    g_assert_cmpuint(b[0], ==, 2);
    memset(b, 3, 4);
    g_assert_cmpint(chain_pwrite(chain, 0, b, 4), ==, 0);
    g_assert_cmpint(chain_pread(chain, 0, b, 4), ==, 0);
    g_assert_cmpuint(b[0], ==, 3);

    /* Drop mid (as after a commit of mid into base): reads now show base
     * there, the map was forgotten. */
    chain_topo_wrlock(chain);
    chain_drop_layers(chain, 2, 2);
    g_assert_cmpuint(chain_depth(chain), ==, 3);
    g_assert_true(chain_layer(chain, 1)->backing == chain_layer(chain, 2));
    chain_topo_unlock(chain);
    g_assert_cmpint(chain_pread(chain, MiB, b, 4), ==, 0);
    g_assert_cmpuint(b[0], ==, 1);
    g_assert_cmpint(chain_pread(chain, 0, b, 4), ==, 0);
    g_assert_cmpuint(b[0], ==, 3);
    close_chain(chain, set);
}

/* ---- locks --------------------------------------------------------------- */

static void test_locks(Fixture *f, gconstpointer data)
{
    ImageSet *set;
    g_autoptr(GError) err = NULL;
    g_autofree char *out = NULL;

    run(f->dir, "qemu-img create -q -f qcow2 base.qcow2 1M && "
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 1M");

    Chain *chain = open_chain(f->dir, "top.qcow2", true, &set);

    /* QEMU refuses to write the active layer, and the base. */
    g_assert_cmpint(run_status(f->dir, &out, "qemu-io -c 'write 0 512' "
                               "top.qcow2"), !=, 0);
    g_assert_nonnull(strstr(out, "Failed to get \"write\" lock"));
    g_clear_pointer(&out, g_free);
    g_assert_cmpint(run_status(f->dir, &out, "qemu-io -f qcow2 -c 'write 0 "
                               "512' base.qcow2"), !=, 0);
    g_assert_nonnull(strstr(out, "lock"));
    g_clear_pointer(&out, g_free);
    /* ... but reads with -U. */
    g_assert_cmpint(run_status(f->dir, &out, "qemu-img info -U top.qcow2"),
                    ==, 0);
    g_clear_pointer(&out, g_free);
    g_assert_cmpint(run_status(f->dir, &out, "qemu-img convert -U -O raw "
                               "top.qcow2 copy.raw"), ==, 0);
    g_clear_pointer(&out, g_free);

    /* A second user in another ImageSet (as a second chainfs would be) is
     * refused the active layer, read-only or not, with EBUSY naming it. */
    ImageSet *set2 = image_set_new(f->dir, &err);

    g_assert_no_error(err);
    g_assert_null(chain_open(set2, "top.qcow2", NULL, false, &err));
    g_assert_error(err, CHAINFS_ERROR, EBUSY);
    g_assert_nonnull(strstr(err->message, "top.qcow2"));
    g_clear_error(&err);
    /* The shared base can be read by both. */
    ChainImage *b2 = image_set_open(set2, "base.qcow2", false, &err);

    g_assert_no_error(err);

    /* Reopening base read-write now conflicts with that reader, and leaves
     * base as it was. */
    ChainImage *base = chain_layer(chain, 1);

    chain_topo_wrlock(chain);
    g_assert_false(chain_image_reopen(base, true, &err));
    g_assert_error(err, CHAINFS_ERROR, EBUSY);
    g_clear_error(&err);
    g_assert_false(base->writable);
    chain_topo_unlock(chain);
    image_set_release(set2, b2);

    /* Alone again: reopen works both ways, and reads still work. */
    chain_topo_wrlock(chain);
    g_assert_true(chain_image_reopen(base, true, &err));
    g_assert_no_error(err);
    g_assert_true(base->writable);
    chain_topo_unlock(chain);
    g_assert_cmpint(run_status(f->dir, &out, "qemu-img info -U base.qcow2"),
                    ==, 0);
    g_clear_pointer(&out, g_free);
    /* A reader elsewhere is now refused base (it is being written). */
    g_assert_null(image_set_open(set2, "base.qcow2", false, &err));
    g_assert_error(err, CHAINFS_ERROR, EBUSY);
    g_clear_error(&err);
    chain_topo_wrlock(chain);
    g_assert_true(chain_image_reopen(base, false, &err));
    g_assert_no_error(err);
    chain_topo_unlock(chain);
    b2 = image_set_open(set2, "base.qcow2", false, &err);
    g_assert_no_error(err);
    image_set_release(set2, b2);
    image_set_free(set2);

    uint8_t buf[512];

    g_assert_cmpint(chain_pread(chain, 0, buf, 512), ==, 0);
    close_chain(chain, set);

    /* Everything released: QEMU may write again. */
    g_assert_cmpint(run_status(f->dir, &out, "qemu-io -c 'write 0 512' "
                               "top.qcow2"), ==, 0);
}

/* Two chains sharing a base share one ChainImage. */
static void test_shared_base(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;

    run(f->dir, "qemu-img create -q -f qcow2 base.qcow2 1M && "
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 a.qcow2 1M && "
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 b.qcow2 1M");

    ImageSet *set = image_set_new(f->dir, &err);
    Chain *a = chain_open(set, "a.qcow2", NULL, true, &err);

    g_assert_no_error(err);
    Chain *b = chain_open(set, "./b.qcow2", "bee", true, &err);

    g_assert_no_error(err);
    g_assert_cmpstr(b->name, ==, "bee");
    g_assert_true(chain_layer(a, 1) == chain_layer(b, 1));
    g_assert_cmpint(chain_layer(a, 1)->refcnt, ==, 2);
    chain_free(a);
    g_assert_cmpint(chain_layer(b, 1)->refcnt, ==, 1);
    chain_free(b);
    image_set_free(set);
}

/* ---- discovery and the state file -------------------------------------- */

static void drop_d(GKeyFile *state, void *opaque)
{
    g_key_file_set_string(state, "dropped", "d.qcow2", "1");
    g_key_file_set_string(state, "exports", "golden-vm", "c.qcow2");
}

static void test_discover(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(GPtrArray) warnings = g_ptr_array_new_with_free_func(g_free);

    run(f->dir, "qemu-img create -q -f qcow2 base.qcow2 1M && "
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 a.qcow2 1M && "
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 b.qcow2 1M && "
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 1M && "
        "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 c.qcow2 1M && "
        "qemu-img create -q -f raw rawbase 1M && "
        "qemu-img create -q -f qcow2 -b rawbase -F raw r.qcow2 1M && "
        "qemu-img create -q -f raw disk.img 1M && "
        "qemu-img create -q -f qcow2 -b disk.img -F raw d.qcow2 1M && "
        "echo hello > notes.txt && "
        "printf 'QFI\\373\\0\\0\\0\\11xxxxxxxxxxxxxxxxx' > broken.qcow2 && "
        "qemu-img create -q -f qcow2 a.raw 1M");

    /* Before d.qcow2 is dropped it is a chain and disk.img is its base. */
    g_autoptr(GPtrArray) chains = dir_discover(f->dir, warnings, &err);

    g_assert_no_error(err);
    {
        g_autoptr(GString) got = g_string_new("");

        for (guint i = 0; i < chains->len; i++) {
            DirChain *c = g_ptr_array_index(chains, i);

            g_string_append_printf(got, "%s=%s ", c->export_name,
                                   c->top_file);
        }
        /* a.raw is a qcow2 whose name clashes with a.qcow2: the later in
         * file-name order gets its full name. */
        g_assert_cmpstr(got->str, ==, "a=a.qcow2 a.raw=a.raw b=b.qcow2 "
                        "c=c.qcow2 d=d.qcow2 r=r.qcow2 ");
    }
    g_assert_cmpuint(warnings->len, ==, 1);
    g_assert_nonnull(strstr(g_ptr_array_index(warnings, 0),
                            "broken.qcow2"));

    g_assert_true(dir_state_update(f->dir, drop_d, NULL, &err));
    g_assert_no_error(err);
    g_clear_pointer(&chains, g_ptr_array_unref);
    chains = dir_discover(f->dir, NULL, &err);
    g_assert_no_error(err);
    {
        g_autoptr(GString) got = g_string_new("");

        for (guint i = 0; i < chains->len; i++) {
            DirChain *c = g_ptr_array_index(chains, i);

            g_string_append_printf(got, "%s=%s ", c->export_name,
                                   c->top_file);
        }
        /* d.qcow2 dropped: not a chain, and disk.img (raw by its
         * extension) is a chain of its own now. */
        g_assert_cmpstr(got->str, ==, "a=a.qcow2 a.raw=a.raw b=b.qcow2 "
                        "disk=disk.img golden-vm=c.qcow2 r=r.qcow2 ");
    }

    /* Users of base other than chain a: b, c (through mid), mid. */
    g_autoptr(GPtrArray) except = g_ptr_array_new();

    g_ptr_array_add(except, "a.qcow2");
    g_ptr_array_add(except, "base.qcow2");

    g_autoptr(GPtrArray) users = dir_users_of(f->dir, "base.qcow2", except,
                                              &err);

    g_assert_no_error(err);
    g_assert_cmpuint(users->len, ==, 3);
    g_assert_cmpstr(g_ptr_array_index(users, 0), ==, "b.qcow2");
    g_assert_cmpstr(g_ptr_array_index(users, 1), ==, "c.qcow2");
    g_assert_cmpstr(g_ptr_array_index(users, 2), ==, "mid.qcow2");
    /* The dropped d.qcow2 does not count as a user of disk.img. */
    g_autoptr(GPtrArray) none = dir_users_of(f->dir, "disk.img", NULL, &err);

    g_assert_no_error(err);
    g_assert_cmpuint(none->len, ==, 0);
}

static void set_job_keys(GKeyFile *state, void *opaque)
{
    g_key_file_set_string(state, "job vm1", "offset", opaque);
}

static void test_state_file(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(GKeyFile) empty = dir_state_load(f->dir, &err);

    g_assert_no_error(err);
    g_assert_nonnull(empty);
    g_assert_false(dir_state_is_dropped(empty, "x.qcow2"));

    g_autoptr(GKeyFile) st = g_key_file_new();

    g_key_file_set_string(st, "dropped", "old.qcow2", "1");
    g_key_file_set_string(st, "dropped", "kept.qcow2", "0");
    g_key_file_set_string(st, "exports", "vm1", "vm1-snap.qcow2");
    g_assert_true(dir_state_save(f->dir, st, &err));
    g_assert_no_error(err);
    g_assert_true(dir_state_update(f->dir, set_job_keys, "4096", &err));
    g_assert_no_error(err);

    g_autoptr(GKeyFile) back = dir_state_load(f->dir, &err);

    g_assert_no_error(err);
    g_assert_true(dir_state_is_dropped(back, "old.qcow2"));
    g_assert_false(dir_state_is_dropped(back, "kept.qcow2"));
    g_assert_false(dir_state_is_dropped(back, "other.qcow2"));
    g_autofree char *exp = g_key_file_get_string(back, "exports", "vm1",
                                                 NULL);
    g_autofree char *off = g_key_file_get_string(back, "job vm1", "offset",
                                                 NULL);

    g_assert_cmpstr(exp, ==, "vm1-snap.qcow2");
    g_assert_cmpstr(off, ==, "4096");

    /* No temporary file left behind. */
    GDir *d = g_dir_open(f->dir, 0, NULL);
    const char *name;
    int n = 0;

    while ((name = g_dir_read_name(d))) {
        g_assert_cmpstr(name, ==, CHAINFS_STATE_FILE);
        n++;
    }
    g_dir_close(d);
    g_assert_cmpint(n, ==, 1);

    /* A garbled state file is an error, not an empty state. */
    g_autofree char *path = g_build_filename(f->dir, CHAINFS_STATE_FILE,
                                             NULL);

    g_file_set_contents(path, "[unterminated\n", -1, NULL);
    g_assert_null(dir_state_load(f->dir, &err));
    g_assert_nonnull(err);
}

static void test_export_names(void)
{
    static const char *const cases[][2] = {
        { "vm1.qcow2", "vm1" },
        { "disk.img", "disk" },
        { "a.b.qcow2", "a.b" },
        { "noext", "noext" },
        { ".hidden", ".hidden" },
        { "trailing.", "trailing." },
        { "/abs/path/vm2.qcow2", "vm2" },
    };

    for (gsize i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autofree char *n = chain_export_name_for(cases[i][0]);

        g_assert_cmpstr(n, ==, cases[i][1]);
    }
}

/* ---- raw driver ---------------------------------------------------------- */

static void test_raw_layer(Fixture *f, gconstpointer data)
{
    ImageSet *set;
    uint8_t buf[4096];

    run(f->dir, "qemu-img create -q -f raw disk.img 4M && "
        "qemu-io -f raw -c 'write -P 7 1M 128k' disk.img >/dev/null");

    Chain *chain = open_chain(f->dir, "disk.img", true, &set);
    uint64_t n;

    g_assert_cmpstr(chain_layer(chain, 0)->drv->format_name, ==, "raw");
    /* qemu-img allocates the first block of a raw file (for its alignment
     * probe); the status unit is 64 KiB. */
    g_assert_cmpint(chain_range_kind(chain, 0, 4 * MiB, &n), ==, CHAIN_DATA);
    g_assert_cmpuint(n, ==, 65536);
    g_assert_cmpint(chain_range_kind(chain, 65536, 4 * MiB - 65536, &n), ==,
                    CHAIN_HOLE);
    g_assert_cmpuint(n, ==, MiB - 65536);
    g_assert_cmpint(chain_range_kind(chain, MiB, 3 * MiB, &n), ==,
                    CHAIN_DATA);
    g_assert_cmpuint(n, ==, 128 * 1024);
    g_assert_cmpint(chain_pwrite_zeroes(chain, MiB, 128 * 1024), ==, 0);
    g_assert_cmpint(chain_range_kind(chain, 65536, 4 * MiB - 65536, &n), ==,
                    CHAIN_HOLE);
    g_assert_cmpuint(n, ==, 4 * MiB - 65536);
    memset(buf, 6, sizeof(buf));
    g_assert_cmpint(chain_pwrite(chain, 3 * MiB, buf, sizeof(buf)), ==, 0);
    memset(buf, 0, sizeof(buf));
    g_assert_cmpint(chain_pread(chain, 3 * MiB, buf, sizeof(buf)), ==, 0);
    g_assert_cmpuint(buf[4095], ==, 6);

    g_autoptr(GError) err = NULL;

    g_assert_false(chain_layer(chain, 0)->drv->set_backing(
        chain_layer(chain, 0), "x", "raw", &err));
    g_assert_error(err, CHAINFS_ERROR, EOPNOTSUPP);
    close_chain(chain, set);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);

#define ADD(name, fn) \
    g_test_add(name, Fixture, NULL, fixture_setup, fn, fixture_teardown)
    ADD("/chain/refuse/loop", test_refuse_loop);
    ADD("/chain/refuse/missing", test_refuse_missing);
    ADD("/chain/refuse/outside", test_refuse_outside);
    ADD("/chain/refuse/format", test_refuse_format);
    ADD("/chain/refuse/depth", test_refuse_depth);
    ADD("/chain/map/mixed", test_map_mixed_chain);
    ADD("/chain/map/deep", test_map_deep_chain);
    ADD("/chain/map/writes", test_map_writes);
    ADD("/chain/map/concurrent", test_map_concurrent);
    ADD("/chain/write-refusals", test_write_refusals);
    ADD("/chain/push-drop", test_push_and_drop);
    ADD("/chain/locks", test_locks);
    ADD("/chain/shared-base", test_shared_base);
    ADD("/chain/raw", test_raw_layer);
    ADD("/dir/discover", test_discover);
    ADD("/dir/state-file", test_state_file);
    g_test_add_func("/chain/export-names", test_export_names);
#undef ADD
    return g_test_run();
}
