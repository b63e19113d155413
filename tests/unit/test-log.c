/*
 * test-log.c: the journal writer of chain-log.c against a socket the test
 * binds (no journald runs here): the native protocol's two field forms, a
 * message too big for a datagram passed as a sealed memfd, PRIORITY and
 * the CHAINFS_* fields, debug messages kept back.
 */
#define G_LOG_DOMAIN "chainfs-test"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "chain-error.h"
#include "chain-log.h"

static int sink_fd = -1;

/* Bind the socket chainfs_log_setup() will send to. */
static void sink_open(const char *dir)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    g_autofree char *path = g_build_filename(dir, "journal.sock", NULL);
    int sndbuf = 1 << 20;

    g_assert_cmpuint(strlen(path), <, sizeof(addr.sun_path));
    strcpy(addr.sun_path, path);
    sink_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    g_assert_cmpint(sink_fd, >=, 0);
    g_assert_cmpint(bind(sink_fd, (struct sockaddr *)&addr, sizeof(addr)), ==, 0);
    g_assert_cmpint(setsockopt(sink_fd, SOL_SOCKET, SO_RCVBUF, &sndbuf,
                               sizeof(sndbuf)), ==, 0);
    g_setenv("CHAINFS_JOURNAL_SOCKET", path, TRUE);
}

/*
 * The next datagram (or the memfd it passes) as the fields it holds; NULL
 * when none waits.  *via_memfd tells which.
 */
static GHashTable *sink_next(bool *via_memfd)
{
    static char buf[1 << 20];
    union {
        struct cmsghdr hdr;
        char space[CMSG_SPACE(sizeof(int))];
    } control;
    struct iovec iov = { buf, sizeof(buf) };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                          .msg_control = &control,
                          .msg_controllen = sizeof(control) };
    g_autoptr(GByteArray) data = g_byte_array_new();
    GHashTable *fields;
    ssize_t n = recvmsg(sink_fd, &msg, MSG_DONTWAIT);
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    size_t i = 0;

    if (n < 0) {
        g_assert_cmpint(errno, ==, EAGAIN);
        return NULL;
    }
    *via_memfd = false;
    if (cmsg && cmsg->cmsg_type == SCM_RIGHTS) {
        int fd;
        ssize_t got;

        memcpy(&fd, CMSG_DATA(cmsg), sizeof(int));
        /* journald wants it sealed against change */
        g_assert_true(fcntl(fd, F_GET_SEALS) & F_SEAL_WRITE);
        while ((got = pread(fd, buf, sizeof(buf), (off_t)data->len)) > 0) {
            g_byte_array_append(data, (guint8 *)buf, (guint)got);
        }
        close(fd);
        *via_memfd = true;
    } else {
        g_byte_array_append(data, (guint8 *)buf, (guint)n);
    }

    fields = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
    while (i < data->len) {
        const char *line = (const char *)data->data + i;
        const char *nl = memchr(line, '\n', data->len - i);
        const char *eq;

        g_assert_nonnull(nl);
        eq = memchr(line, '=', (size_t)(nl - line));
        if (eq) {
            g_hash_table_insert(fields, g_strndup(line, (gsize)(eq - line)),
                                g_strndup(eq + 1, (gsize)(nl - eq - 1)));
            i += (size_t)(nl - line) + 1;
        } else {
            guint64 len;

            memcpy(&len, nl + 1, sizeof(len));
            len = GUINT64_FROM_LE(len);
            g_assert_cmpint(nl[1 + 8 + len], ==, '\n');
            g_hash_table_insert(fields, g_strndup(line, (gsize)(nl - line)),
                                g_strndup(nl + 1 + 8, (gsize)len));
            i += (size_t)(nl - line) + 1 + 8 + len + 1;
        }
    }
    return fields;
}

static void test_export_and_job_fields(void)
{
    g_autoptr(GHashTable) f = NULL;
    bool memfd;

    chainfs_log(G_LOG_LEVEL_MESSAGE, "vm1", "commit-3", "two\nlines");
    f = sink_next(&memfd);
    g_assert_nonnull(f);
    g_assert_false(memfd);
    /* a value with a newline goes in the length-prefixed form */
    g_assert_cmpstr(g_hash_table_lookup(f, "MESSAGE"), ==, "vm1: two\nlines");
    g_assert_cmpstr(g_hash_table_lookup(f, "PRIORITY"), ==, "5");
    g_assert_cmpstr(g_hash_table_lookup(f, "CHAINFS_EXPORT"), ==, "vm1");
    g_assert_cmpstr(g_hash_table_lookup(f, "CHAINFS_JOB"), ==, "commit-3");
    g_assert_cmpstr(g_hash_table_lookup(f, "SYSLOG_IDENTIFIER"), ==, "chainfs");
    g_assert_cmpstr(g_hash_table_lookup(f, "GLIB_DOMAIN"), ==, "chainfs-test");
    g_assert_true(g_str_has_suffix(g_hash_table_lookup(f, "CODE_FILE"),
                                   "test-log.c"));
    g_assert_nonnull(g_hash_table_lookup(f, "CODE_LINE"));
    g_assert_null(sink_next(&memfd));
}

static void test_plain_glib_message(void)
{
    g_autoptr(GHashTable) f = NULL;
    bool memfd;

    g_message("no export here");
    f = sink_next(&memfd);
    g_assert_nonnull(f);
    g_assert_cmpstr(g_hash_table_lookup(f, "MESSAGE"), ==, "no export here");
    g_assert_cmpstr(g_hash_table_lookup(f, "PRIORITY"), ==, "5");
    g_assert_null(g_hash_table_lookup(f, "CHAINFS_EXPORT"));
    g_assert_null(g_hash_table_lookup(f, "CHAINFS_JOB"));
}

static void test_priorities(void)
{
    static const struct {
        GLogLevelFlags level;
        const char *priority;
    } cases[] = {
        { G_LOG_LEVEL_CRITICAL, "3" },
        { G_LOG_LEVEL_WARNING, "4" },
        { G_LOG_LEVEL_MESSAGE, "5" },
    };

    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        g_autoptr(GHashTable) f = NULL;
        bool memfd;

        chainfs_log(cases[i].level, NULL, "job-1", "level %zu", i);
        f = sink_next(&memfd);
        g_assert_nonnull(f);
        g_assert_cmpstr(g_hash_table_lookup(f, "PRIORITY"), ==,
                        cases[i].priority);
        g_assert_cmpstr(g_hash_table_lookup(f, "CHAINFS_JOB"), ==, "job-1");
        g_assert_null(g_hash_table_lookup(f, "CHAINFS_EXPORT"));
    }
}

static void test_debug_kept_back(void)
{
    bool memfd;

    chainfs_log(G_LOG_LEVEL_DEBUG, "vm1", NULL, "not without -d");
    g_assert_null(sink_next(&memfd));
}

static void test_big_message_as_memfd(void)
{
    g_autofree char *big = g_malloc(600 * 1024 + 1);
    g_autoptr(GHashTable) f = NULL;
    bool memfd = false;

    memset(big, 'x', 600 * 1024);
    big[600 * 1024] = '\0';
    chainfs_log(G_LOG_LEVEL_MESSAGE, "vm1", NULL, "%s", big);
    f = sink_next(&memfd);
    g_assert_nonnull(f);
    g_assert_true(memfd);
    g_assert_cmpuint(strlen(g_hash_table_lookup(f, "MESSAGE")), ==,
                     strlen("vm1: ") + 600 * 1024);
    g_assert_cmpstr(g_hash_table_lookup(f, "CHAINFS_EXPORT"), ==, "vm1");
}

static void test_parse_target(void)
{
    g_autoptr(GError) err = NULL;
    ChainfsLogTarget t = CHAINFS_LOG_STDERR;

    g_assert_true(chainfs_log_parse_target("journal", &t, NULL));
    g_assert_cmpint(t, ==, CHAINFS_LOG_JOURNAL);
    g_assert_true(chainfs_log_parse_target("auto", &t, NULL));
    g_assert_cmpint(t, ==, CHAINFS_LOG_AUTO);
    g_assert_false(chainfs_log_parse_target("syslog", &t, &err));
    g_assert_error(err, CHAINFS_ERROR, EINVAL);
}

int main(int argc, char **argv)
{
    g_autofree char *dir = NULL;
    int ret;

    g_test_init(&argc, &argv, NULL);
    /* The warnings and criticals below are the test's subject, not
     * failures. */
    g_log_set_always_fatal(G_LOG_FATAL_MASK);
    g_unsetenv("G_MESSAGES_DEBUG");
    dir = g_dir_make_tmp("chainfs-test-log-XXXXXX", NULL);
    g_assert_nonnull(dir);
    sink_open(dir);
    chainfs_log_setup(CHAINFS_LOG_JOURNAL, false);
    g_assert_cmpstr(chainfs_log_destination(), ==, "journal");

    g_test_add_func("/log/export-and-job-fields", test_export_and_job_fields);
    g_test_add_func("/log/plain-glib-message", test_plain_glib_message);
    g_test_add_func("/log/priorities", test_priorities);
    g_test_add_func("/log/debug-kept-back", test_debug_kept_back);
    g_test_add_func("/log/big-message-as-memfd", test_big_message_as_memfd);
    g_test_add_func("/log/parse-target", test_parse_target);
    ret = g_test_run();

    close(sink_fd);
    {
        g_autofree char *path = g_build_filename(dir, "journal.sock", NULL);
        unlink(path);
    }
    rmdir(dir);
    return ret;
}
