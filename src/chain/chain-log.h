/*
 * chain-log.h: structured log messages, to stderr or to the systemd
 * journal.
 *
 * Every message of chainfs goes through GLib's structured logging.  A
 * message about an export or a job says so with chainfs_log(), which adds
 * the journal fields CHAINFS_EXPORT and CHAINFS_JOB (so that
 * `journalctl CHAINFS_EXPORT=vm1` shows one disk's story) and starts the
 * text with "EXPORT: ".  Plain g_message()/g_warning() still work and
 * take the same path, without those fields.
 *
 * It lives in src/chain, the library every part links, because the job
 * sites of src/merge are to use it too (with the job's id), and src/merge
 * may use src/chain only.
 *
 * Where messages go is chosen once, by the program (chainfs_log_setup):
 * plain lines on stderr in GLib's usual format, or native journal
 * datagrams with a PRIORITY.  Without chainfs_log_setup (chainctl, the
 * tests' tools) GLib's default writer prints them.
 */
#ifndef CHAINFS_CHAIN_LOG_H
#define CHAINFS_CHAIN_LOG_H

#include <stdbool.h>
#include <glib.h>

typedef enum {
    CHAINFS_LOG_AUTO,     /* the journal when stderr is connected to it, or
                           * once a daemonized process lost its stderr */
    CHAINFS_LOG_STDERR,
    CHAINFS_LOG_JOURNAL,
} ChainfsLogTarget;

/* "auto", "stderr" or "journal"; EINVAL otherwise. */
bool chainfs_log_parse_target(const char *name, ChainfsLogTarget *target,
                              GError **error);

/*
 * Install the writer (once per process, before any thread starts).
 * daemonizing: the process is about to go to the background, where
 * stderr is /dev/null.  The journal socket is /run/systemd/journal/socket,
 * or $CHAINFS_JOURNAL_SOCKET (for tests, which bind a socket of their own
 * since no journald runs there).  Asking for the journal where there is
 * no socket logs to stderr and says so.
 */
void chainfs_log_setup(ChainfsLogTarget target, bool daemonizing);
/*
 * The process is in the background now: under AUTO, messages that went to
 * stderr and the journal go to the journal only.
 */
void chainfs_log_daemonized(void);
/* Where messages go now: "stderr", "journal" or "stderr+journal". */
const char *chainfs_log_destination(void);

/*
 * Log one message.  export_name and job_id may be NULL; when given they
 * become the fields CHAINFS_EXPORT and CHAINFS_JOB, and export_name
 * prefixes the text ("vm1: flush failed: ...").
 */
#define chainfs_log(level, export_name, job_id, ...)                       \
    chainfs_log_full(G_LOG_DOMAIN, (level), (export_name), (job_id),        \
                     __FILE__, G_STRINGIFY(__LINE__), G_STRFUNC, __VA_ARGS__)

void chainfs_log_full(const char *domain, GLogLevelFlags level,
                      const char *export_name, const char *job_id,
                      const char *file, const char *line, const char *func,
                      const char *fmt, ...) G_GNUC_PRINTF(8, 9);

#endif
