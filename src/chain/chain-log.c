/*
 * chain-log.c: the log writer of chainfs (chain-log.h).
 *
 * The journal is reached through its native protocol, written here by
 * hand so that chainfs needs no libsystemd: one datagram per message on
 * the journal's Unix socket, each field "KEY=value\n", or, for a value
 * holding a newline, "KEY\n" + its length as 64-bit little endian + the
 * value + "\n".  A message too large for one datagram goes in a sealed
 * memfd passed with SCM_RIGHTS, as journald expects.
 *
 * A log call must never hold up guest I/O or a job: datagrams are sent
 * with MSG_DONTWAIT, and a message the journal cannot take at once goes
 * to stderr instead (under systemd, stderr is the journal's stream too).
 *
 * The writer's state is the process's: GLib has one writer per process.
 * It is set before any thread starts; the only later change (the target
 * after daemonizing) is one atomic int.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "chain-error.h"
#include "chain-log.h"

#define LOG_TO_STDERR  1
#define LOG_TO_JOURNAL 2

#define JOURNAL_SOCKET_PATH "/run/systemd/journal/socket"

static struct {
    gint targets;                 /* LOG_TO_*; atomic */
    bool journal_after_daemonize; /* AUTO: journal only once in background */
    int journal_fd;               /* SOCK_DGRAM, unconnected; -1 none */
    struct sockaddr_un journal_addr;
    socklen_t journal_addr_len;
} log_state = { .targets = LOG_TO_STDERR, .journal_fd = -1 };

bool chainfs_log_parse_target(const char *name, ChainfsLogTarget *target,
                              GError **error)
{
    if (strcmp(name, "auto") == 0) {
        *target = CHAINFS_LOG_AUTO;
    } else if (strcmp(name, "stderr") == 0) {
        *target = CHAINFS_LOG_STDERR;
    } else if (strcmp(name, "journal") == 0) {
        *target = CHAINFS_LOG_JOURNAL;
    } else {
        chainfs_set_error(error, EINVAL,
                          "bad log target \"%s\": auto, stderr or journal",
                          name);
        return false;
    }
    return true;
}

/* syslog priorities (journald's PRIORITY field). */
static const char *log_priority(GLogLevelFlags level)
{
    if (level & G_LOG_LEVEL_ERROR) {
        return "2";       /* crit: GLib aborts after an error */
    }
    if (level & G_LOG_LEVEL_CRITICAL) {
        return "3";       /* err: a bug of chainfs */
    }
    if (level & G_LOG_LEVEL_WARNING) {
        return "4";
    }
    if (level & G_LOG_LEVEL_MESSAGE) {
        return "5";       /* notice */
    }
    if (level & G_LOG_LEVEL_INFO) {
        return "6";
    }
    return "7";
}

/* journald drops a field whose name is not [A-Z0-9_], up to 64, not
 * starting with '_' (trusted fields) or a digit. */
static bool journal_field_name_ok(const char *key)
{
    size_t n = strlen(key);

    if (n == 0 || n > 64 || key[0] == '_' || g_ascii_isdigit(key[0])) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        if (!(g_ascii_isupper(key[i]) || g_ascii_isdigit(key[i]) ||
              key[i] == '_')) {
            return false;
        }
    }
    return true;
}

static void journal_append_field(GString *buf, const char *key,
                                 const void *value, gssize length)
{
    size_t n = length < 0 ? strlen(value) : (size_t)length;

    g_string_append(buf, key);
    if (memchr(value, '\n', n)) {
        guint64 le = GUINT64_TO_LE((guint64)n);

        g_string_append_c(buf, '\n');
        g_string_append_len(buf, (const char *)&le, sizeof(le));
    } else {
        g_string_append_c(buf, '=');
    }
    g_string_append_len(buf, value, n);
    g_string_append_c(buf, '\n');
}

/* Too big for a datagram: hand journald a sealed memfd holding it. */
static bool journal_send_memfd(const GString *buf)
{
    union {
        struct cmsghdr hdr;
        char space[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr msg = { 0 };
    struct cmsghdr *cmsg;
    bool ok = false;
    int fd;

    fd = memfd_create("chainfs-journal", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) {
        return false;
    }
    if (write(fd, buf->str, buf->len) != (ssize_t)buf->len ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE |
              F_SEAL_SEAL) != 0) {
        goto out;
    }
    memset(&control, 0, sizeof(control));
    msg.msg_name = &log_state.journal_addr;
    msg.msg_namelen = log_state.journal_addr_len;
    msg.msg_control = &control;
    msg.msg_controllen = sizeof(control.space);
    cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
    ok = sendmsg(log_state.journal_fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0;
out:
    close(fd);
    return ok;
}

static bool journal_send(GLogLevelFlags level, const GLogField *fields,
                         gsize n_fields)
{
    g_autoptr(GString) buf = g_string_sized_new(256);
    bool has_priority = false;
    bool has_identifier = false;

    for (gsize i = 0; i < n_fields; i++) {
        if (!journal_field_name_ok(fields[i].key) || !fields[i].value) {
            continue;
        }
        has_priority |= strcmp(fields[i].key, "PRIORITY") == 0;
        has_identifier |= strcmp(fields[i].key, "SYSLOG_IDENTIFIER") == 0;
        journal_append_field(buf, fields[i].key, fields[i].value,
                             fields[i].length);
    }
    if (!has_priority) {
        journal_append_field(buf, "PRIORITY", log_priority(level), -1);
    }
    if (!has_identifier) {
        journal_append_field(buf, "SYSLOG_IDENTIFIER", "chainfs", -1);
    }
    if (sendto(log_state.journal_fd, buf->str, buf->len,
               MSG_DONTWAIT | MSG_NOSIGNAL,
               (const struct sockaddr *)&log_state.journal_addr,
               log_state.journal_addr_len) >= 0) {
        return true;
    }
    if (errno == EMSGSIZE || errno == ENOBUFS) {
        return journal_send_memfd(buf);
    }
    return false;
}

static const char *log_field(const GLogField *fields, gsize n_fields,
                             const char *key)
{
    for (gsize i = 0; i < n_fields; i++) {
        if (strcmp(fields[i].key, key) == 0 && fields[i].length < 0) {
            return fields[i].value;
        }
    }
    return NULL;
}

/* Debug and info messages only with -d or G_MESSAGES_DEBUG, as GLib's
 * default writer does. */
static bool log_would_drop(GLogLevelFlags level, const GLogField *fields,
                           gsize n_fields)
{
#if GLIB_CHECK_VERSION(2, 68, 0)
    return g_log_writer_default_would_drop(
        level, log_field(fields, n_fields, "GLIB_DOMAIN"));
#else
    return (level & (G_LOG_LEVEL_DEBUG | G_LOG_LEVEL_INFO)) &&
           !g_getenv("G_MESSAGES_DEBUG");
#endif
}

static GLogWriterOutput log_writer(GLogLevelFlags level,
                                   const GLogField *fields, gsize n_fields,
                                   gpointer user_data)
{
    int targets = g_atomic_int_get(&log_state.targets);
    bool sent = false;

    if (log_would_drop(level, fields, n_fields)) {
        return G_LOG_WRITER_HANDLED;
    }
    if (targets & LOG_TO_JOURNAL) {
        sent = journal_send(level, fields, n_fields);
    }
    if ((targets & LOG_TO_STDERR) || !sent) {
        return g_log_writer_standard_streams(level, fields, n_fields,
                                             user_data);
    }
    return G_LOG_WRITER_HANDLED;
}

/* systemd sets JOURNAL_STREAM=DEV:INO for the stream it connected to
 * stdout/stderr; it only counts while stderr is still that stream. */
static bool stderr_is_journal(void)
{
    const char *env = g_getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;

    if (!env || sscanf(env, "%llu:%llu", &dev, &ino) != 2 ||
        fstat(STDERR_FILENO, &st) != 0) {
        return false;
    }
    return (unsigned long long)st.st_dev == dev &&
           (unsigned long long)st.st_ino == ino;
}

/* Open the socket to path when it is a socket; false otherwise. */
static bool journal_open(const char *path)
{
    struct stat st;

    if (strlen(path) >= sizeof(log_state.journal_addr.sun_path) ||
        stat(path, &st) != 0 || !S_ISSOCK(st.st_mode)) {
        return false;
    }
    log_state.journal_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (log_state.journal_fd < 0) {
        return false;
    }
    log_state.journal_addr.sun_family = AF_UNIX;
    strcpy(log_state.journal_addr.sun_path, path);
    log_state.journal_addr_len = (socklen_t)(
        offsetof(struct sockaddr_un, sun_path) + strlen(path) + 1);
    return true;
}

void chainfs_log_setup(ChainfsLogTarget target, bool daemonizing)
{
    const char *path = g_getenv("CHAINFS_JOURNAL_SOCKET");
    bool journal = false;
    int targets = LOG_TO_STDERR;

    if (!path || !*path) {
        path = JOURNAL_SOCKET_PATH;
    }
    if (target == CHAINFS_LOG_JOURNAL ||
        (target == CHAINFS_LOG_AUTO && (stderr_is_journal() || daemonizing))) {
        journal = journal_open(path);
    }
    if (journal) {
        if (target == CHAINFS_LOG_AUTO && !stderr_is_journal()) {
            /* Until the fork, the terminal that ran mount sees them too. */
            targets = LOG_TO_STDERR | LOG_TO_JOURNAL;
            log_state.journal_after_daemonize = true;
        } else {
            targets = LOG_TO_JOURNAL;
        }
    }
    g_atomic_int_set(&log_state.targets, targets);
    g_log_set_writer_func(log_writer, NULL, NULL);
    if (target == CHAINFS_LOG_JOURNAL && !journal) {
        g_warning("no journal socket at %s: logging to stderr", path);
    }
}

void chainfs_log_daemonized(void)
{
    if (log_state.journal_after_daemonize) {
        g_atomic_int_set(&log_state.targets, LOG_TO_JOURNAL);
    }
}

const char *chainfs_log_destination(void)
{
    switch (g_atomic_int_get(&log_state.targets)) {
    case LOG_TO_JOURNAL:
        return "journal";
    case LOG_TO_STDERR | LOG_TO_JOURNAL:
        return "stderr+journal";
    default:
        return "stderr";
    }
}

void chainfs_log_full(const char *domain, GLogLevelFlags level,
                      const char *export_name, const char *job_id,
                      const char *file, const char *line, const char *func,
                      const char *fmt, ...)
{
    g_autofree char *text = NULL;
    g_autofree char *message = NULL;
    GLogField fields[8];
    gsize n = 0;
    va_list ap;

    va_start(ap, fmt);
    text = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    message = export_name ? g_strdup_printf("%s: %s", export_name, text)
                          : g_steal_pointer(&text);

    fields[n++] = (GLogField){ "MESSAGE", message, -1 };
    fields[n++] = (GLogField){ "PRIORITY", log_priority(level), -1 };
    fields[n++] = (GLogField){ "GLIB_DOMAIN", domain, -1 };
    fields[n++] = (GLogField){ "CODE_FILE", file, -1 };
    fields[n++] = (GLogField){ "CODE_LINE", line, -1 };
    fields[n++] = (GLogField){ "CODE_FUNC", func, -1 };
    if (export_name) {
        fields[n++] = (GLogField){ "CHAINFS_EXPORT", export_name, -1 };
    }
    if (job_id) {
        fields[n++] = (GLogField){ "CHAINFS_JOB", job_id, -1 };
    }
    g_log_structured_array(level, fields, n);
}
