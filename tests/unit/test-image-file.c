/*
 * test-image-file.c: opening image files without blocking (image-file.c)
 * and reading what a header names (image-refs.c) from crafted bytes.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <glib.h>
#include <glib/gstdio.h>

#include "image-file.h"
#include "image-refs.h"

/* ---- image_file_open ---------------------------------------------------- */

static char *make_dir(void)
{
    g_autoptr(GError) err = NULL;
    char *dir = g_dir_make_tmp("chainfs-imgfile-XXXXXX", &err);

    g_assert_no_error(err);
    return dir;
}

static void expect_type_refusal(const char *path, const char *words)
{
    g_autoptr(GError) err = NULL;
    int fd = image_file_open(path, O_RDONLY, "thing", NULL, &err);

    g_assert_cmpint(fd, ==, -1);
    g_assert_error(err, CHAINFS_ERROR, EINVAL);
    if (!strstr(err->message, words)) {
        g_error("message '%s' does not say '%s'", err->message, words);
    }
}

static void test_open_refuses_special(void)
{
    g_autofree char *dir = make_dir();
    g_autofree char *fifo = g_build_filename(dir, "fifo", NULL);
    g_autofree char *sock = g_build_filename(dir, "sock", NULL);
    g_autofree char *sub = g_build_filename(dir, "sub", NULL);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int s = socket(AF_UNIX, SOCK_STREAM, 0);

    g_assert_cmpint(mkfifo(fifo, 0600), ==, 0);
    g_assert_cmpint(s, >=, 0);
    g_strlcpy(sa.sun_path, sock, sizeof(sa.sun_path));
    g_assert_cmpint(bind(s, (struct sockaddr *)&sa, sizeof(sa)), ==, 0);
    close(s);
    g_assert_cmpint(g_mkdir(sub, 0700), ==, 0);

    /* A plain open() of the FIFO would wait for a writer forever. */
    expect_type_refusal(fifo, "thing is a FIFO, not an image file");
    expect_type_refusal(sock, "thing is a socket, not an image file");
    expect_type_refusal(sub, "thing is a directory, not an image file");
    expect_type_refusal("/dev/null",
                        "thing is a character device, not an image file");

    g_autoptr(GError) err = NULL;
    g_assert_cmpint(image_file_open(fifo, O_RDWR, NULL, NULL, &err), ==, -1);
    g_assert_nonnull(strstr(err->message, "is a FIFO"));

    g_unlink(fifo);
    g_unlink(sock);
    g_rmdir(sub);
    g_rmdir(dir);
}

static void test_open_regular_is_blocking(void)
{
    g_autofree char *dir = make_dir();
    g_autofree char *path = g_build_filename(dir, "img", NULL);
    g_autoptr(GError) err = NULL;
    struct stat st;

    g_assert_true(g_file_set_contents(path, "data", 4, &err));
    int fd = image_file_open(path, O_RDWR, NULL, &st, &err);

    g_assert_no_error(err);
    g_assert_cmpint(fd, >=, 0);
    g_assert_true(S_ISREG(st.st_mode));
    g_assert_cmpint(st.st_size, ==, 4);
    g_assert_cmpint(fcntl(fd, F_GETFL) & (O_NONBLOCK | O_ACCMODE), ==,
                    O_RDWR);
    g_assert_cmpint(fcntl(fd, F_GETFD) & FD_CLOEXEC, ==, FD_CLOEXEC);
    close(fd);

    g_clear_error(&err);
    g_assert_cmpint(image_file_open(dir, O_RDONLY, NULL, NULL, &err), ==, -1);
    g_clear_error(&err);
    g_unlink(path);
    g_assert_cmpint(image_file_open(path, O_RDONLY, NULL, NULL, &err), ==, -1);
    g_assert_error(err, CHAINFS_ERROR, ENOENT);
    g_rmdir(dir);
}

/* ---- image_refs_read ---------------------------------------------------- */

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = v;
}

static void put64(uint8_t *p, uint64_t v)
{
    put32(p, v >> 32);
    put32(p + 4, (uint32_t)v);
}

/* A v3 header with 512-byte clusters (so the extensions end at 512). */
static void v3_header(uint8_t *buf, size_t len)
{
    memset(buf, 0, len);
    memcpy(buf, "QFI\xfb", 4);
    put32(buf + 4, 3);
    put32(buf + 20, 9);
    put32(buf + 100, 104);
}

static size_t put_ext(uint8_t *buf, size_t off, uint32_t type,
                      const char *data, uint32_t len)
{
    put32(buf + off, type);
    put32(buf + off + 4, len);
    memcpy(buf + off + 8, data, len);
    return off + 8 + ((len + 7) & ~7U);
}

static bool refs_of(const uint8_t *buf, size_t len, ImageRefs *refs,
                    GError **error)
{
    int fd = memfd_create("refs", MFD_CLOEXEC);

    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(write(fd, buf, len), ==, (ssize_t)len);

    bool ok = image_refs_read(fd, "img", refs, error);

    close(fd);
    return ok;
}

static void test_refs_names(void)
{
    uint8_t buf[4096];
    ImageRefs refs;
    g_autoptr(GError) err = NULL;
    size_t off;

    v3_header(buf, sizeof(buf));
    off = put_ext(buf, 104, 0xe2792acaU, "raw", 3);
    off = put_ext(buf, off, 0x6803f857U, "ignored", 7);
    off = put_ext(buf, off, 0x44415441U, "/etc/data", 9);
    put_ext(buf, off, 0, "", 0);
    memcpy(buf + 400, "base.img", 8);
    put64(buf + 8, 400);
    put32(buf + 16, 8);

    g_assert_true(refs_of(buf, sizeof(buf), &refs, &err));
    g_assert_no_error(err);
    g_assert_true(refs.qcow2);
    g_assert_cmpstr(refs.backing, ==, "base.img");
    g_assert_cmpstr(refs.backing_fmt, ==, "raw");
    g_assert_cmpstr(refs.data_file, ==, "/etc/data");
    image_refs_clear(&refs);

    /* Not qcow2, or too short to be: names nothing. */
    g_assert_true(refs_of((const uint8_t *)"just some raw bytes here", 24,
                          &refs, &err));
    g_assert_false(refs.qcow2);
    g_assert_null(refs.backing);
    g_assert_true(refs_of(buf, 10, &refs, &err));
    g_assert_false(refs.qcow2);
}

static void test_refs_hostile(void)
{
    uint8_t buf[1024];
    ImageRefs refs;
    g_autoptr(GError) err = NULL;

    /* An extension that overruns the header cluster ends the walk. */
    v3_header(buf, sizeof(buf));
    put32(buf + 104, 0x44415441U);
    put32(buf + 108, 1000);
    g_assert_true(refs_of(buf, sizeof(buf), &refs, &err));
    g_assert_null(refs.data_file);
    image_refs_clear(&refs);

    /* Extensions past the end of a short file, and a header_length that
     * makes no sense: nothing found, nothing read out of bounds. */
    v3_header(buf, sizeof(buf));
    put32(buf + 100, 0xfffffff0U);
    g_assert_true(refs_of(buf, sizeof(buf), &refs, &err));
    g_assert_null(refs.data_file);
    image_refs_clear(&refs);
    v3_header(buf, sizeof(buf));
    put32(buf + 20, 40); /* cluster_bits out of range */
    put_ext(buf, 104, 0x44415441U, "d", 1);
    g_assert_true(refs_of(buf, sizeof(buf), &refs, &err));
    g_assert_null(refs.data_file);
    image_refs_clear(&refs);

    /* A backing file name running off the file is an error. */
    v3_header(buf, sizeof(buf));
    put64(buf + 8, 1000);
    put32(buf + 16, 100);
    g_assert_false(refs_of(buf, sizeof(buf), &refs, &err));
    g_assert_error(err, CHAINFS_ERROR, EINVAL);
    g_assert_null(refs.backing);
    g_clear_error(&err);

    /* An unknown version is an error naming it. */
    v3_header(buf, sizeof(buf));
    put32(buf + 4, 7);
    g_assert_false(refs_of(buf, sizeof(buf), &refs, &err));
    g_assert_nonnull(strstr(err->message, "version 7"));
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/image-file/refuses-special", test_open_refuses_special);
    g_test_add_func("/image-file/regular-is-blocking",
                    test_open_regular_is_blocking);
    g_test_add_func("/image-refs/names", test_refs_names);
    g_test_add_func("/image-refs/hostile", test_refs_hostile);
    return g_test_run();
}
