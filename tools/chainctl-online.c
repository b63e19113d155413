/*
 * chainctl-online.c: chainctl on a mounted export (MOUNTPOINT/NAME).
 *
 * Everything goes through the user.chainfs.* extended attributes of the
 * exported file (design.md "Control surface"): a command is one
 * setxattr, whose failure leaves the daemon's message in
 * user.chainfs.last_error; status is read from user.chainfs.job and
 * user.chainfs.chain.  Waiting for a job polls user.chainfs.job every
 * CTL_POLL_MS; the daemon offers no notification to block on.  The one
 * exception is commit --dry-run, whose answer (the daemon's estimate) only
 * the control file MOUNTPOINT/.control can give back: an attribute write
 * has no reply.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "chainctl.h"
#include "json.h"

#define CTL_XATTR_PREFIX "user.chainfs."
#define CTL_POLL_MS 50
/* How long to wait for a cancel to take effect before giving up. */
#define CTL_CANCEL_GRACE_S 60.0

/* ---- attribute access ---------------------------------------------- */

/* chainctl.h.  The value may grow between asking its size and reading it
 * (a job's JSON does), so ERANGE retries. */
char *ctl_xattr_get(const char *path, const char *attr)
{
    g_autofree char *name = g_strconcat(CTL_XATTR_PREFIX, attr, NULL);

    for (int tries = 0; tries < 100; tries++) {
        ssize_t len = getxattr(path, name, NULL, 0);
        if (len < 0) {
            if (errno == EINTR) {
                continue;
            }
            return NULL;
        }
        g_autofree char *buf = g_malloc((gsize)len + 1);
        ssize_t got = getxattr(path, name, buf, (size_t)len);
        if (got < 0) {
            if (errno == ERANGE || errno == EINTR) {
                continue;
            }
            return NULL;
        }
        buf[got] = '\0';
        return g_steal_pointer(&buf);
    }
    errno = EAGAIN;
    return NULL;
}

int ctl_target_is_export(const char *path)
{
    struct stat st;

    if (stat(path, &st) < 0) {
        return -errno;
    }
    if (!S_ISREG(st.st_mode)) {
        return 0;
    }
    if (getxattr(path, CTL_XATTR_PREFIX "chain", NULL, 0) >= 0) {
        return 1;
    }
    /* No such attribute, or none on this filesystem: an ordinary file.
     * Anything else (EACCES: an export we may not read) is reported. */
    if (errno == ENODATA || errno == ENOTSUP) {
        return 0;
    }
    return -errno;
}

/* The export name: the file name under the mount point. */
static char *ctl_export_name(const char *path)
{
    return g_path_get_basename(path);
}

/*
 * Run one command: write value to user.chainfs.<attr>.  On refusal print
 * the daemon's last_error (or, when the daemon never saw the request, as
 * with a permission check in the kernel, the errno) and return
 * CTL_EXIT_FAIL.
 */
static int ctl_command(const char *path, const char *attr, const char *value)
{
    g_autofree char *name = g_strconcat(CTL_XATTR_PREFIX, attr, NULL);
    g_autofree char *before = ctl_xattr_get(path, "last_error");
    g_autofree char *after = NULL;
    g_autofree char *export_name = ctl_export_name(path);
    int err;
    int r;

    do {
        r = setxattr(path, name, value, strlen(value), 0);
    } while (r < 0 && errno == EINTR);
    if (r == 0) {
        return CTL_EXIT_OK;
    }
    err = errno;
    after = ctl_xattr_get(path, "last_error");
    if (after && after[0] &&
        (g_strcmp0(before, after) != 0 ||
         (err != EACCES && err != EPERM && err != ENOTSUP))) {
        return ctl_fail("%s", after);
    }
    return ctl_fail("%s on %s refused: %s", attr, export_name,
                    g_strerror(err));
}

/* ---- job status ---------------------------------------------------- */

typedef struct {
    char *json;     /* the whole user.chainfs.job value */
    char *id;       /* NULL: no job yet ("{}") */
    char *type;
    char *state;
    char *error;
    uint64_t offset;
    uint64_t len;
    uint64_t speed;
    uint64_t rate;  /* bytes written per second lately; 0 from old daemons */
    bool has_eta;   /* the daemon knows the time left */
    uint64_t eta;   /* seconds */
} CtlJob;

static void ctl_job_clear(CtlJob *j)
{
    g_free(j->json);
    g_free(j->id);
    g_free(j->type);
    g_free(j->state);
    g_free(j->error);
    memset(j, 0, sizeof(*j));
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(CtlJob, ctl_job_clear)

/* Read the job of path into j (cleared first).  FALSE with errno set
 * when the attribute cannot be read. */
static bool ctl_job_read(const char *path, CtlJob *j)
{
    ctl_job_clear(j);
    j->json = ctl_xattr_get(path, "job");
    if (!j->json) {
        return false;
    }
    j->id = json_get_member(j->json, "id");
    j->type = json_get_member(j->json, "type");
    j->state = json_get_member(j->json, "state");
    j->error = json_get_member(j->json, "error");
    if (g_strcmp0(j->error, "null") == 0) {
        g_clear_pointer(&j->error, g_free);
    }
    json_get_uint(j->json, "offset", &j->offset);
    json_get_uint(j->json, "len", &j->len);
    json_get_uint(j->json, "speed", &j->speed);
    json_get_uint(j->json, "rate", &j->rate);
    /* null (not known) is no number. */
    j->has_eta = json_get_uint(j->json, "eta", &j->eta);
    return true;
}

static bool ctl_state_is_final(const char *state)
{
    return g_strcmp0(state, "completed") == 0 ||
           g_strcmp0(state, "failed") == 0 ||
           g_strcmp0(state, "cancelled") == 0;
}

/* virsh's name for a job type. */
static const char *ctl_job_label(const char *type)
{
    if (g_strcmp0(type, "active-commit") == 0) {
        return "Active Block Commit";
    }
    if (g_strcmp0(type, "stream") == 0) {
        return "Block Pull";
    }
    return "Block Commit";
}

/*
 * "    Rate: 1.50 MiB/s    Time left: 0:01:05" for a running job (as
 * virsh's --verbose progress, plus the time left), "" for any other state:
 * a paused or finished job has no pace.  Newly allocated.
 */
static char *ctl_job_pace_text(const CtlJob *j)
{
    static const char *const units[] = { "B/s", "KiB/s", "MiB/s", "GiB/s" };
    double v = (double)j->rate;
    unsigned u = 0;
    g_autofree char *left = NULL;

    if (g_strcmp0(j->state, "running") != 0) {
        return g_strdup("");
    }
    while (v >= 1024.0 && u + 1 < G_N_ELEMENTS(units)) {
        v /= 1024.0;
        u++;
    }
    if (j->has_eta) {
        left = g_strdup_printf("%" PRIu64 ":%02u:%02u", j->eta / 3600,
                               (unsigned)(j->eta / 60 % 60),
                               (unsigned)(j->eta % 60));
    }
    return g_strdup_printf("    Rate: %.*f %s    Time left: %s", u ? 2 : 0, v,
                           units[u], left ? left : "unknown");
}

/*
 * One progress line (CtlProgress, after virsh --verbose) for the job j:
 * "Block Commit: [ 42 %]" and its pace, redrawn when the percentage
 * changes.  A running job shows at most 99 %: "[100 %]" is the line of a
 * job that says it is done (or ready), and is so always printed last.
 */
static void ctl_progress_show(CtlProgress *p, const CtlJob *j)
{
    bool done = g_strcmp0(j->state, "completed") == 0 ||
                g_strcmp0(j->state, "ready") == 0;
    g_autofree char *pace = NULL;
    g_autofree char *line = NULL;
    int percent = 100;

    if (!done) {
        percent = j->len ? (int)MIN((double)j->offset * 100.0 /
                                    (double)j->len, 99.0)
                         : 0;
    }
    if (percent == p->last_percent) {
        return;
    }
    p->last_percent = percent;
    pace = ctl_job_pace_text(j);
    line = g_strdup_printf("%s: [%3d %%]%s", p->label, percent, pace);
    if (p->tty) {
        /* Padded: a shorter line must cover the longer one it replaces. */
        printf("\r%-72s", line);
    } else {
        printf("%s\n", line);
    }
    fflush(stdout);
}

static double ctl_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* How a wait ended. */
typedef enum {
    CTL_WAIT_SETTLED,     /* the job reached a state the caller waits for */
    CTL_WAIT_TIMED_OUT,   /* deadline passed (job cancelled if asked) */
    CTL_WAIT_INTERRUPTED, /* Ctrl-C (job cancelled if asked) */
    CTL_WAIT_ERROR,       /* could not read the status; message printed */
} CtlWaitResult;

typedef struct {
    const char *path;
    const char *id;        /* the job waited on; NULL: whichever is current */
    bool stop_at_ready;    /* ready counts as settled */
    bool stop_at_paused;   /* paused counts as settled */
    CtlProgress *progress; /* NULL: quiet */
    double deadline;       /* ctl_now() value, 0: none */
    bool cancel;           /* cancel the job on timeout / interrupt */
} CtlWait;

/*
 * Cancel the job and wait (a bounded time) until it has ended, so that
 * the chain is settled when chainctl exits.
 */
static void ctl_cancel_and_settle(const CtlWait *w)
{
    g_auto(CtlJob) j = { 0 };
    double until = ctl_now() + CTL_CANCEL_GRACE_S;
    int r;

    do {
        r = setxattr(w->path, CTL_XATTR_PREFIX "job.cancel", "", 0, 0);
    } while (r < 0 && errno == EINTR);
    while (ctl_now() < until) {
        if (!ctl_job_read(w->path, &j) || ctl_state_is_final(j.state) ||
            (w->id && g_strcmp0(j.id, w->id) != 0)) {
            return;
        }
        ctl_nap(CTL_POLL_MS);
    }
}

/*
 * Poll the job of w->path until it settles: completed, failed or
 * cancelled, or ready/paused when w says so.  On exit *j holds the last
 * status read (for CTL_WAIT_SETTLED: the settled one).
 */
static CtlWaitResult ctl_wait_job(const CtlWait *w, CtlJob *j)
{
    for (;;) {
        if (!ctl_job_read(w->path, j)) {
            ctl_fail("cannot read the job of %s: %s", w->path,
                     g_strerror(errno));
            return CTL_WAIT_ERROR;
        }
        if (w->id && g_strcmp0(j->id, w->id) != 0) {
            ctl_fail("job %s on %s was replaced by job %s", w->id, w->path,
                     j->id ? j->id : "(none)");
            return CTL_WAIT_ERROR;
        }
        if (!j->state) {
            ctl_fail("no job on %s", w->path);
            return CTL_WAIT_ERROR;
        }
        if (w->progress) {
            /* Done means 100 %, even for a job of length 0. */
            ctl_progress_show(w->progress, j);
        }
        if (ctl_state_is_final(j->state) ||
            (w->stop_at_ready && g_strcmp0(j->state, "ready") == 0) ||
            (w->stop_at_paused && g_strcmp0(j->state, "paused") == 0)) {
            if (w->progress) {
                ctl_progress_done(w->progress);
            }
            return CTL_WAIT_SETTLED;
        }
        if (ctl_interrupted) {
            if (w->progress) {
                ctl_progress_done(w->progress);
            }
            if (w->cancel) {
                ctl_cancel_and_settle(w);
            }
            return CTL_WAIT_INTERRUPTED;
        }
        if (w->deadline > 0 && ctl_now() >= w->deadline) {
            if (w->progress) {
                ctl_progress_done(w->progress);
            }
            if (w->cancel) {
                ctl_cancel_and_settle(w);
            }
            return CTL_WAIT_TIMED_OUT;
        }
        ctl_nap(CTL_POLL_MS);
    }
}

/* Exit status and message for a wait that did not settle. */
static int ctl_wait_failed(CtlWaitResult r, const CtlWait *w, double timeout,
                           const char *name)
{
    switch (r) {
    case CTL_WAIT_TIMED_OUT:
        if (w->cancel) {
            return ctl_fail("timed out after %g s: job %s on %s cancelled",
                            timeout, w->id ? w->id : "", name);
        }
        return ctl_fail("timed out after %g s waiting for the job on %s",
                        timeout, name);
    case CTL_WAIT_INTERRUPTED:
        if (w->cancel) {
            return ctl_fail("interrupted: job %s on %s cancelled",
                            w->id ? w->id : "", name);
        }
        return ctl_fail("interrupted while waiting for the job on %s", name);
    default:
        return CTL_EXIT_FAIL; /* message already printed */
    }
}

/* A job that ended other than completed: its error, as one line. */
static int ctl_job_ended_badly(const CtlJob *j, const char *name)
{
    if (g_strcmp0(j->state, "failed") == 0) {
        return ctl_fail("job %s on %s failed: %s", j->id ? j->id : "", name,
                        j->error && j->error[0] ? j->error : "unknown error");
    }
    return ctl_fail("job %s on %s ended %s", j->id ? j->id : "", name,
                    j->state ? j->state : "(no state)");
}

/*
 * Start a job with one command and return its id in *id (after the
 * command succeeded).  The daemon registers the job before the setxattr
 * returns, so the job read right after is the new one.
 */
static int ctl_start_job(const char *path, const char *attr,
                         const char *words, char **id)
{
    g_auto(CtlJob) j = { 0 };
    int r = ctl_command(path, attr, words);

    if (r != CTL_EXIT_OK) {
        return r;
    }
    if (!ctl_job_read(path, &j) || !j.id) {
        return ctl_fail("%s started, but its job cannot be read: %s", attr,
                        g_strerror(errno ? errno : EIO));
    }
    *id = g_steal_pointer(&j.id);
    return CTL_EXIT_OK;
}

/*
 * Wait as w says (path, id, stop_at_*, cancel set) until the job settles,
 * showing progress under label when verbose and giving up timeout seconds
 * from now (0: never).  Returns -1 once it settled, *j its status; else
 * the exit status, the message printed.  A further wait on w keeps the
 * deadline and is quiet.
 */
static int ctl_wait_settled(CtlWait *w, const char *label, bool verbose,
                            double timeout, CtlJob *j)
{
    g_autofree char *name = ctl_export_name(w->path);
    CtlProgress progress;
    CtlWaitResult wr;

    if (timeout > 0) {
        w->deadline = ctl_now() + timeout;
    }
    if (verbose) {
        ctl_progress_init(&progress, label);
        w->progress = &progress;
    }
    wr = ctl_wait_job(w, j);
    w->progress = NULL; /* progress ends here, with this function */
    if (wr != CTL_WAIT_SETTLED) {
        return ctl_wait_failed(wr, w, timeout, name);
    }
    return -1;
}

/*
 * Start a job with one command, then do as run says: without wait print
 * "LABEL started" and leave the job running; else wait until it settles
 * (w->stop_at_ready set by the caller), cancelling it on timeout or
 * Ctrl-C.  *id gets the job's id, which w then points to.  Returns -1
 * once the job settled, *j its status; else the exit status.
 */
static int ctl_run_job(const char *path, const char *attr, const char *words,
                       const char *label, const CtlRunArgs *run, CtlWait *w,
                       char **id, CtlJob *j)
{
    int r;

    if (run->wait) {
        /* Catch Ctrl-C before the job exists: no window to lose it in. */
        ctl_catch_sigint(false);
    }
    r = ctl_start_job(path, attr, words, id);
    if (r != CTL_EXIT_OK) {
        return r;
    }
    if (!run->wait) {
        printf("%s started\n", label);
        return CTL_EXIT_OK;
    }
    w->path = path;
    w->id = *id;
    w->cancel = true;
    return ctl_wait_settled(w, label, run->verbose, run->timeout, j);
}

/* ---- info ---------------------------------------------------------- */

static void ctl_print_job_line(const CtlJob *j)
{
    int percent = j->len ? (int)((double)j->offset * 100.0 / (double)j->len)
                         : (g_strcmp0(j->state, "completed") == 0 ? 100 : 0);
    g_autofree char *pace = ctl_job_pace_text(j);

    printf("%s: [%3d %%]    State: %s", ctl_job_label(j->type), percent,
           j->state);
    if (j->speed) {
        printf("    Bandwidth limit: %" PRIu64 " bytes/s", j->speed);
    }
    printf("%s\n", pace);
}

int ctl_online_info(const char *path, bool json)
{
    g_autofree char *chain = ctl_xattr_get(path, "chain");
    g_auto(CtlJob) j = { 0 };
    int r;

    if (!chain) {
        return ctl_fail("cannot read the chain of %s: %s", path,
                        g_strerror(errno));
    }
    if (!ctl_job_read(path, &j)) {
        return ctl_fail("cannot read the job of %s: %s", path,
                        g_strerror(errno));
    }
    if (json) {
        /* design.md's chain object, with the job as one more member. */
        g_autoptr(GString) out = g_string_new(g_strstrip(chain));
        if (out->len == 0 || out->str[out->len - 1] != '}') {
            return ctl_fail("malformed chain JSON from %s", path);
        }
        g_string_truncate(out, out->len - 1);
        json_append_key(out, "job");
        g_string_append(out, g_strstrip(j.json));
        g_string_append(out, "}");
        printf("%s\n", out->str);
        return CTL_EXIT_OK;
    }
    r = ctl_print_chain(chain, path);
    if (r == CTL_EXIT_OK && j.state) {
        printf("\n");
        ctl_print_job_line(&j);
    }
    return r;
}

/* ---- commit -------------------------------------------------------- */

static char *ctl_commit_words(const CtlCommitArgs *a)
{
    GString *w = g_string_new(NULL);

    if (a->top) {
        g_string_append_printf(w, " top=%s", a->top);
    }
    if (a->base) {
        g_string_append_printf(w, " base=%s", a->base);
    }
    if (a->shallow) {
        g_string_append(w, " shallow");
    }
    if (a->active) {
        g_string_append(w, " active");
    }
    if (a->delete_dropped) {
        g_string_append(w, " delete");
    }
    if (a->keep_relative) {
        g_string_append(w, " keep-relative");
    }
    if (a->force) {
        g_string_append(w, " force");
    }
    if (a->run.has_bandwidth) {
        g_string_append_printf(w, " bandwidth=%" PRIu64, a->run.bandwidth);
    }
    if (w->len > 0) {
        g_string_erase(w, 0, 1);
    }
    return g_string_free(w, FALSE);
}

/*
 * Read the whole reply of the control file open on fd (direct I/O: its
 * size says nothing, read until EOF).  Newly allocated; NULL with errno
 * set on failure.
 */
static char *ctl_control_read_reply(int fd)
{
    g_autoptr(GString) reply = g_string_new(NULL);
    char buf[4096];

    for (;;) {
        ssize_t n = pread(fd, buf, sizeof(buf), (off_t)reply->len);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            return NULL;
        }
        if (n == 0) {
            return g_string_free(g_steal_pointer(&reply), FALSE);
        }
        g_string_append_len(reply, buf, n);
    }
}

/*
 * --dry-run on an export: "commit NAME WORDS dry-run" on the mount's
 * control file, whose reply carries the daemon's own estimate (what its
 * up-front ENOSPC check compares with the room on base's filesystem).
 * The daemon starts nothing and writes nothing.
 */
static int ctl_online_commit_dry_run(const char *path, const CtlCommitArgs *a)
{
    g_autofree char *real = realpath(path, NULL);
    g_autofree char *mount_root = NULL;
    g_autofree char *control = NULL;
    g_autofree char *name = NULL;
    g_autofree char *words = ctl_commit_words(a);
    g_autofree char *line = NULL;
    g_autofree char *reply = NULL;
    g_autofree char *estimate = NULL;
    int fd, err = 0;
    ssize_t w;

    if (!real) {
        return ctl_fail("%s: %s", path, g_strerror(errno));
    }
    /* Exports sit at the mount root, beside the control file. */
    mount_root = g_path_get_dirname(real);
    name = g_path_get_basename(real);
    control = g_build_filename(mount_root, ".control", NULL);
    line = g_strdup_printf("commit %s%s%s dry-run", name, words[0] ? " " : "",
                           words);
    fd = open(control, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        return ctl_fail("cannot open the control file %s: %s", control,
                        g_strerror(errno));
    }
    do {
        w = write(fd, line, strlen(line));
    } while (w < 0 && errno == EINTR);
    if (w < 0) {
        err = errno;
    }
    reply = ctl_control_read_reply(fd);
    close(fd);
    if (err) {
        /* The reply to a refused command is {"ok": false, "error": ...}. */
        g_autofree char *msg = reply ? json_get_member(reply, "error") : NULL;

        if (msg && msg[0]) {
            return ctl_fail("%s", msg);
        }
        return ctl_fail("commit dry run on %s refused: %s", name,
                        g_strerror(err));
    }
    estimate = reply ? json_get_member(reply, "estimate") : NULL;
    if (!estimate) {
        return ctl_fail("the daemon serving %s gave no commit estimate", path);
    }
    return ctl_print_commit_room(estimate, control);
}

int ctl_online_commit(const char *path, const CtlCommitArgs *a)
{
    const char *label = a->active ? "Active Block Commit" : "Block Commit";
    g_autofree char *words = NULL;
    g_autofree char *id = NULL;
    g_autofree char *name = ctl_export_name(path);
    g_auto(CtlJob) j = { 0 };
    CtlWait w = { 0 };
    CtlWaitResult wr;
    int r;

    if (a->dry_run) {
        return ctl_online_commit_dry_run(path, a);
    }
    words = ctl_commit_words(a);
    w.stop_at_ready = a->active;
    r = ctl_run_job(path, "commit", words, label, &a->run, &w, &id, &j);
    if (r >= 0) {
        return r;
    }
    if (g_strcmp0(j.state, "completed") == 0) {
        printf("Commit complete\n");
        return CTL_EXIT_OK;
    }
    if (g_strcmp0(j.state, "ready") != 0) {
        return ctl_job_ended_badly(&j, name);
    }
    /* Active commit in ready: base is in sync. */
    if (!a->pivot && !a->keep_overlay) {
        printf("Now in synchronized phase\n");
        return CTL_EXIT_OK;
    }
    r = ctl_command(path, a->pivot ? "job.pivot" : "job.cancel", "");
    if (r != CTL_EXIT_OK) {
        return r;
    }
    /* The deadline of the first wait holds: --timeout counts from the
     * start.  A pivot asked for must not turn into a cancel on Ctrl-C. */
    w.stop_at_ready = false;
    w.cancel = false;
    wr = ctl_wait_job(&w, &j);
    if (wr != CTL_WAIT_SETTLED) {
        return ctl_wait_failed(wr, &w, a->run.timeout, name);
    }
    if (a->pivot && g_strcmp0(j.state, "completed") == 0) {
        printf("Successfully pivoted\n");
        return CTL_EXIT_OK;
    }
    if (a->keep_overlay && g_strcmp0(j.state, "cancelled") == 0) {
        printf("Commit complete, overlay image kept\n");
        return CTL_EXIT_OK;
    }
    return ctl_job_ended_badly(&j, name);
}

/* ---- stream -------------------------------------------------------- */

int ctl_online_stream(const char *path, const CtlStreamArgs *a)
{
    g_autoptr(GString) words = g_string_new(NULL);
    g_autofree char *id = NULL;
    g_autofree char *name = ctl_export_name(path);
    g_auto(CtlJob) j = { 0 };
    CtlWait w = { 0 };
    int r;

    if (a->base) {
        g_string_append_printf(words, "base=%s", a->base);
    }
    if (a->run.has_bandwidth) {
        g_string_append_printf(words, "%sbandwidth=%" PRIu64,
                               words->len ? " " : "", a->run.bandwidth);
    }
    r = ctl_run_job(path, "stream", words->str, "Block Pull", &a->run, &w,
                    &id, &j);
    if (r >= 0) {
        return r;
    }
    if (g_strcmp0(j.state, "completed") == 0) {
        printf("Pull complete\n");
        return CTL_EXIT_OK;
    }
    return ctl_job_ended_badly(&j, name);
}

/* ---- job ----------------------------------------------------------- */

int ctl_online_job(const char *path, const CtlJobArgs *a)
{
    g_autofree char *name = ctl_export_name(path);
    g_autofree char *id = NULL;
    g_auto(CtlJob) j = { 0 };
    CtlWait w = { 0 };
    int r = CTL_EXIT_OK;

    if (!ctl_job_read(path, &j)) {
        return ctl_fail("cannot read the job of %s: %s", path,
                        g_strerror(errno));
    }
    switch (a->verb) {
    case CTL_JOB_INFO:
        if (!a->wait) {
            if (a->json) {
                printf("%s\n", g_strstrip(j.json));
            } else if (!j.state) {
                printf("No current block job for %s\n", name);
            } else {
                ctl_print_job_line(&j);
                if (j.error && j.error[0]) {
                    printf("Error: %s\n", j.error);
                }
            }
            return CTL_EXIT_OK;
        }
        break;
    case CTL_JOB_ABORT:
        r = ctl_command(path, "job.cancel", "");
        break;
    case CTL_JOB_PIVOT:
        r = ctl_command(path, "job.pivot", "");
        break;
    case CTL_JOB_PAUSE:
        r = ctl_command(path, "job.pause", "");
        break;
    case CTL_JOB_RESUME:
        r = ctl_command(path, "job.resume", "");
        break;
    case CTL_JOB_SPEED: {
        g_autofree char *v = g_strdup_printf("%" PRIu64, a->speed);
        r = ctl_command(path, "job.speed", v);
        break;
    }
    }
    if (r != CTL_EXIT_OK || !a->wait) {
        return r;
    }
    if (!j.state) {
        return ctl_fail("no job on %s", name);
    }
    /*
     * --wait: until the job settles.  After --pause that is paused; an
     * active commit also settles in ready, except after --pivot or
     * --abort, which end it.
     */
    ctl_catch_sigint(false);
    id = g_strdup(j.id);
    w.path = path;
    w.id = id;
    w.stop_at_paused = a->verb == CTL_JOB_PAUSE;
    w.stop_at_ready = a->verb != CTL_JOB_PIVOT && a->verb != CTL_JOB_ABORT;
    w.cancel = false; /* chainctl job waits on a job it did not start */
    r = ctl_wait_settled(&w, ctl_job_label(j.type), a->verbose, a->timeout,
                         &j);
    if (r >= 0) {
        return r;
    }
    if (g_strcmp0(j.state, "failed") == 0) {
        return ctl_job_ended_badly(&j, name);
    }
    if (a->verb == CTL_JOB_PIVOT) {
        if (g_strcmp0(j.state, "completed") != 0) {
            return ctl_job_ended_badly(&j, name);
        }
        printf("Successfully pivoted\n");
    } else if (a->verb == CTL_JOB_ABORT) {
        printf("Job %s\n", j.state);
    } else {
        ctl_print_job_line(&j);
    }
    return CTL_EXIT_OK;
}

/* ---- snapshot ------------------------------------------------------ */

int ctl_online_snapshot(const char *path, const char *file)
{
    g_autofree char *name = ctl_export_name(path);
    int r;

    if (strpbrk(file, " \t\r\n")) {
        return ctl_fail("snapshot file name \"%s\" must not hold blanks",
                        file);
    }
    r = ctl_command(path, "snapshot", file);
    if (r != CTL_EXIT_OK) {
        return r;
    }
    printf("Snapshot %s created: now the active layer of %s\n", file, name);
    return CTL_EXIT_OK;
}

/* ---- resize -------------------------------------------------------- */

/*
 * Online, resize is truncate(2) of the export, the call a hypervisor or
 * `truncate -s` makes too; the daemon grows the active layer
 * (fuse-ops.c) and leaves the reason of a refusal in last_error.
 */
int ctl_online_resize(const char *path, const CtlResizeArgs *a)
{
    g_autofree char *name = ctl_export_name(path);
    g_autofree char *before = ctl_xattr_get(path, "last_error");
    g_autofree char *after = NULL;
    struct stat st;
    uint64_t target;
    int r, err;

    if (stat(path, &st) < 0) {
        return ctl_fail("%s: %s", path, g_strerror(errno));
    }
    r = ctl_resize_target(a, (uint64_t)st.st_size, name, &target);
    if (r != CTL_EXIT_OK) {
        return r;
    }
    if (target > (uint64_t)INT64_MAX) {
        return ctl_fail("%s: %" PRIu64 " bytes is too large", name, target);
    }
    do {
        r = truncate(path, (off_t)target);
    } while (r < 0 && errno == EINTR);
    if (r < 0) {
        err = errno;
        after = ctl_xattr_get(path, "last_error");
        if (after && after[0] && g_strcmp0(before, after) != 0) {
            return ctl_fail("%s", after);
        }
        return ctl_fail("resize of %s refused: %s", name, g_strerror(err));
    }
    printf("Resized %s from %" PRIu64 " to %" PRIu64 " bytes\n", name,
           (uint64_t)st.st_size, target);
    return CTL_EXIT_OK;
}
