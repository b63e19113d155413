/*
 * job.c: the job core (see job.h), after QEMU's job.c: the state machine
 * is two tables, so that every allowed move can be read in one place and an
 * illegal verb is a clear error, never a silent no-op.
 *
 * Threads: the job's own thread runs the driver; verbs come from FUSE
 * threads.  Every field of Job below `lock` is guarded by it, and every
 * change signals `cond`, which the job thread waits on when paused, when
 * rate-limited and when READY.  The driver's I/O never runs under it.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <string.h>

#include "job.h"
#include "json.h"

static const char *const job_status_names[JOB_STATUS__MAX] = {
    [JOB_STATUS_CREATED] = "created",
    [JOB_STATUS_RUNNING] = "running",
    [JOB_STATUS_PAUSED] = "paused",
    [JOB_STATUS_READY] = "ready",
    [JOB_STATUS_STANDBY] = "standby",
    [JOB_STATUS_PENDING] = "pending",
    [JOB_STATUS_ABORTING] = "aborting",
    [JOB_STATUS_COMPLETED] = "completed",
    [JOB_STATUS_FAILED] = "failed",
    [JOB_STATUS_CANCELLED] = "cancelled",
};

/* What design.md calls them: transient states show as the nearest one. */
static const char *const job_status_public_names[JOB_STATUS__MAX] = {
    [JOB_STATUS_CREATED] = "running",
    [JOB_STATUS_RUNNING] = "running",
    [JOB_STATUS_PAUSED] = "paused",
    [JOB_STATUS_READY] = "ready",
    [JOB_STATUS_STANDBY] = "paused",
    [JOB_STATUS_PENDING] = "running",
    [JOB_STATUS_ABORTING] = "running",
    [JOB_STATUS_COMPLETED] = "completed",
    [JOB_STATUS_FAILED] = "failed",
    [JOB_STATUS_CANCELLED] = "cancelled",
};

static const char *const job_verb_names[JOB_VERB__MAX] = {
    [JOB_VERB_START] = "start",
    [JOB_VERB_PAUSE] = "pause",
    [JOB_VERB_RESUME] = "resume",
    [JOB_VERB_SET_SPEED] = "set speed",
    [JOB_VERB_COMPLETE] = "pivot",
    [JOB_VERB_CANCEL] = "cancel",
};

/* job_sta_table[from][to]: 1 when the move is legal. */
static const bool job_sta_table[JOB_STATUS__MAX][JOB_STATUS__MAX] = {
    /*                        C  R  P  Y  S  N  A  D  F  X */
    [JOB_STATUS_CREATED]   = {0, 1, 0, 0, 0, 0, 1, 0, 0, 0},
    [JOB_STATUS_RUNNING]   = {0, 0, 1, 1, 0, 1, 1, 0, 0, 0},
    [JOB_STATUS_PAUSED]    = {0, 1, 0, 0, 1, 0, 1, 0, 0, 0},
    [JOB_STATUS_READY]     = {0, 0, 0, 0, 1, 1, 1, 0, 0, 0},
    [JOB_STATUS_STANDBY]   = {0, 0, 0, 1, 0, 0, 1, 0, 0, 0},
    [JOB_STATUS_PENDING]   = {0, 0, 0, 0, 0, 0, 1, 1, 0, 0},
    [JOB_STATUS_ABORTING]  = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1},
    [JOB_STATUS_COMPLETED] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
    [JOB_STATUS_FAILED]    = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
    [JOB_STATUS_CANCELLED] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
};

/* job_verb_table[verb][state]: 1 when the state accepts the verb. */
static const bool job_verb_table[JOB_VERB__MAX][JOB_STATUS__MAX] = {
    /*                        C  R  P  Y  S  N  A  D  F  X */
    [JOB_VERB_START]       = {1, 0, 0, 0, 0, 0, 0, 0, 0, 0},
    [JOB_VERB_PAUSE]       = {0, 1, 0, 1, 0, 0, 0, 0, 0, 0},
    [JOB_VERB_RESUME]      = {0, 0, 1, 0, 1, 0, 0, 0, 0, 0},
    [JOB_VERB_SET_SPEED]   = {1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
    [JOB_VERB_COMPLETE]    = {0, 0, 0, 1, 0, 0, 0, 0, 0, 0},
    [JOB_VERB_CANCEL]      = {1, 1, 1, 1, 1, 0, 0, 0, 0, 0},
};

const char *job_status_name(JobStatus s)
{
    return (unsigned)s < JOB_STATUS__MAX ? job_status_names[s] : "?";
}

const char *job_status_public(JobStatus s)
{
    return (unsigned)s < JOB_STATUS__MAX ? job_status_public_names[s] : "?";
}

const char *job_verb_name(JobVerb v)
{
    return (unsigned)v < JOB_VERB__MAX ? job_verb_names[v] : "?";
}

bool job_status_is_terminal(JobStatus s)
{
    return s == JOB_STATUS_COMPLETED || s == JOB_STATUS_FAILED ||
           s == JOB_STATUS_CANCELLED;
}

bool job_transition_allowed(JobStatus s, JobStatus t)
{
    return (unsigned)s < JOB_STATUS__MAX && (unsigned)t < JOB_STATUS__MAX &&
           job_sta_table[s][t];
}

bool job_verb_allowed(JobStatus s, JobVerb v)
{
    return (unsigned)s < JOB_STATUS__MAX && (unsigned)v < JOB_VERB__MAX &&
           job_verb_table[v][s];
}

/* Set once at daemon start, before any job exists: read without a lock. */
static JobTransitionHook job_transition_hook;

void job_set_transition_hook(JobTransitionHook hook)
{
    job_transition_hook = hook;
}

/* Call with job->lock held.  An illegal move is a bug in this file: the
 * state would no longer say what the job does, so stop here (as QEMU's
 * job_state_transition asserts). */
static void job_state_transition(Job *job, JobStatus t)
{
    JobStatus from = job->status;

    if (job->status == t) {
        return;
    }
    if (!job_transition_allowed(job->status, t)) {
        g_error("job %s: illegal transition %s -> %s", job->id,
                job_status_name(job->status), job_status_name(t));
    }
    job->status = t;
    g_cond_broadcast(&job->cond);
    if (job_transition_hook) {
        job_transition_hook(job, from, t);
    }
}

/* Call with job->lock held. */
static bool job_apply_verb(Job *job, JobVerb v, GError **error)
{
    if (v == JOB_VERB_PAUSE && job->pause_requested &&
        job_verb_allowed(job->status, v)) {
        chainfs_set_error(error, EBUSY, "job in state %s cannot %s: a pause "
                          "is already pending", job_status_name(job->status),
                          job_verb_name(v));
        return false;
    }
    if (job_verb_allowed(job->status, v)) {
        return true;
    }
    chainfs_set_error(error, EBUSY, "job in state %s cannot %s",
                      job_status_name(job->status), job_verb_name(v));
    return false;
}

Job *job_new(const JobDriver *driver, const char *id, const char *top,
             const char *base, uint64_t speed)
{
    Job *job;

    g_assert(driver->instance_size >= sizeof(Job));
    job = g_malloc0(driver->instance_size);

    job->driver = driver;
    job->id = g_strdup(id);
    job->top = g_strdup(top);
    job->base = g_strdup(base);
    g_mutex_init(&job->lock);
    g_cond_init(&job->cond);
    job->status = JOB_STATUS_CREATED;
    ratelimit_init(&job->limit, speed);
    return job;
}

void job_free(Job *job)
{
    if (!job) {
        return;
    }
    if (job->thread) {
        g_thread_join(job->thread);
        job->thread = NULL;
    }
    if (job->driver->free) {
        job->driver->free(job);
    }
    g_free(job->id);
    g_free(job->top);
    g_free(job->base);
    g_free(job->error);
    g_free(job->stop_error);
    g_mutex_clear(&job->lock);
    g_cond_clear(&job->cond);
    g_free(job);
}

static gpointer job_thread_main(gpointer opaque)
{
    Job *job = opaque;
    int ret;
    JobStatus final;

    ret = job->driver->run(job);

    g_mutex_lock(&job->lock);
    /* A pause asked too late for run to take it: nothing left to pause. */
    job->pause_requested = false;
    if (ret == 0 && job->cancel_requested) {
        ret = -ECANCELED;
    }
    if (ret == 0) {
        job_state_transition(job, JOB_STATUS_PENDING);
        g_mutex_unlock(&job->lock);
        ret = job->driver->prepare ? job->driver->prepare(job) : 0;
        g_mutex_lock(&job->lock);
    }
    if (ret < 0) {
        job_state_transition(job, JOB_STATUS_ABORTING);
        if (ret != -ECANCELED && !job->error) {
            job->err = -ret;
            job->error = g_strdup(g_strerror(-ret));
        }
        g_mutex_unlock(&job->lock);
        if (job->driver->abort) {
            job->driver->abort(job);
        }
        g_mutex_lock(&job->lock);
    }
    g_mutex_unlock(&job->lock);

    if (job->driver->clean) {
        job->driver->clean(job);
    }

    g_mutex_lock(&job->lock);
    final = ret == 0 ? JOB_STATUS_COMPLETED :
            ret == -ECANCELED ? JOB_STATUS_CANCELLED : JOB_STATUS_FAILED;
    if (final == JOB_STATUS_CANCELLED) {
        /* A cancel ends the error that paused the job, if any. */
        g_clear_pointer(&job->error, g_free);
        job->err = 0;
    }
    job_state_transition(job, final);
    job->finished = true;
    g_cond_broadcast(&job->cond);
    g_mutex_unlock(&job->lock);
    return NULL;
}

bool job_start(Job *job, GError **error)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);
    g_autoptr(GError) thread_err = NULL;

    if (!job_apply_verb(job, JOB_VERB_START, error)) {
        return false;
    }
    /* The thread waits for the lock we hold: it sees RUNNING first. */
    job->thread = g_thread_try_new(job->id, job_thread_main, job,
                                   &thread_err);
    if (!job->thread) {
        /* Nothing ran: it ends through the table, with no callback (the
         * error first, so that the job-failed event carries it). */
        job->err = EAGAIN;
        job->error = g_strdup_printf("cannot start the job thread: %s",
                                     thread_err->message);
        job_state_transition(job, JOB_STATUS_ABORTING);
        job_state_transition(job, JOB_STATUS_FAILED);
        job->finished = true;
        chainfs_set_error(error, EAGAIN, "%s", job->error);
        return false;
    }
    job_state_transition(job, JOB_STATUS_RUNNING);
    return true;
}

bool job_pause(Job *job, GError **error)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    if (!job_apply_verb(job, JOB_VERB_PAUSE, error)) {
        return false;
    }
    /* The job thread enters PAUSED at its pause point (job_pause_point),
     * once nothing of the job is in flight. */
    job->pause_requested = true;
    g_cond_broadcast(&job->cond);
    return true;
}

bool job_wait_paused(Job *job, int64_t timeout_us)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);
    int64_t end = g_get_monotonic_time() + timeout_us;

    while (job->pause_requested && !job->cancel_requested &&
           job->status != JOB_STATUS_PAUSED &&
           job->status != JOB_STATUS_STANDBY && !job->finished) {
        if (!g_cond_wait_until(&job->cond, &job->lock, end)) {
            break;
        }
    }
    return job->status == JOB_STATUS_PAUSED ||
           job->status == JOB_STATUS_STANDBY;
}

bool job_resume(Job *job, GError **error)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    if (!job_apply_verb(job, JOB_VERB_RESUME, error)) {
        return false;
    }
    job->pause_requested = false;
    job->resumes++;
    if (job->paused_on_error) {
        /* The error was why it paused; resuming retries, so it goes. */
        job->paused_on_error = false;
        g_clear_pointer(&job->error, g_free);
        job->err = 0;
    }
    job_state_transition(job, job->status == JOB_STATUS_STANDBY ?
                         JOB_STATUS_READY : JOB_STATUS_RUNNING);
    return true;
}

bool job_set_speed(Job *job, uint64_t speed, GError **error)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    if (!job_apply_verb(job, JOB_VERB_SET_SPEED, error)) {
        return false;
    }
    ratelimit_set_speed(&job->limit, speed);
    g_cond_broadcast(&job->cond);
    return true;
}

bool job_is_rate_limited(Job *job)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    return job->limit.speed != 0;
}

bool job_complete(Job *job, GError **error)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    if (!job_apply_verb(job, JOB_VERB_COMPLETE, error)) {
        return false;
    }
    job->complete_requested = true;
    g_cond_broadcast(&job->cond);
    return true;
}

/* Call with job->lock held; the verb was accepted. */
static void job_request_cancel(Job *job)
{
    job->cancel_requested = true;
    job->pause_requested = false;
    if (job->status == JOB_STATUS_CREATED) {
        /* Never started: nothing to undo. */
        job_state_transition(job, JOB_STATUS_ABORTING);
        job_state_transition(job, JOB_STATUS_CANCELLED);
        job->finished = true;
    } else {
        job_state_transition(job, JOB_STATUS_ABORTING);
    }
    g_cond_broadcast(&job->cond);
}

bool job_cancel(Job *job, GError **error)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    if (!job_apply_verb(job, JOB_VERB_CANCEL, error)) {
        return false;
    }
    job_request_cancel(job);
    return true;
}

void job_interrupt(Job *job)
{
    g_mutex_lock(&job->lock);
    if (job_verb_allowed(job->status, JOB_VERB_CANCEL)) {
        job->interrupted = true;
        job_request_cancel(job);
    }
    g_mutex_unlock(&job->lock);
    job_wait_finished(job);
}

void job_wait_finished(Job *job)
{
    g_mutex_lock(&job->lock);
    while (!job->finished && job->thread) {
        g_cond_wait(&job->cond, &job->lock);
    }
    g_mutex_unlock(&job->lock);
}

JobStatus job_get_status(Job *job)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    return job->status;
}

bool job_is_cancelled(Job *job)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    return job->cancel_requested;
}

bool job_is_interrupted(Job *job)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    return job->interrupted;
}

/* Call with job->lock held, in the job thread, nothing in flight: takes
 * an asked pause (the one place PAUSED and STANDBY are entered) and waits
 * it out.  job_resume moves the state back.  TRUE when cancelled. */
static bool job_pause_point_locked(Job *job)
{
    unsigned resumes = job->resumes;

    if (job->pause_requested && !job->cancel_requested) {
        job_state_transition(job, job->status == JOB_STATUS_READY ?
                             JOB_STATUS_STANDBY : JOB_STATUS_PAUSED);
        if (job->stop_error) {
            g_free(job->error);
            job->error = g_steal_pointer(&job->stop_error);
            job->err = job->stop_err;
            job->paused_on_error = true;
        }
    }
    /* Until this pause ends.  A pause asked again right after the resume
     * (a worker's error) is not this one: the caller must first see that
     * nothing is in flight again. */
    while (job->pause_requested && !job->cancel_requested &&
           job->resumes == resumes) {
        g_cond_wait(&job->cond, &job->lock);
    }
    return job->cancel_requested;
}

bool job_pause_point(Job *job)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    return job_pause_point_locked(job);
}

bool job_pause_requested(Job *job)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    return job->pause_requested && !job->cancel_requested;
}

bool job_wait_unpaused(Job *job)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    while (job->pause_requested && !job->cancel_requested) {
        g_cond_wait(&job->cond, &job->lock);
    }
    return job->cancel_requested;
}

/* Call with job->lock held: should a wait of the job end now? */
static bool job_wait_interrupted(Job *job)
{
    return job->cancel_requested || job->pause_requested;
}

bool job_rate_limit(Job *job, uint64_t bytes)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);
    uint64_t ticket = job->rate_next_ticket++;

    for (;;) {
        int64_t delay;

        if (job_wait_interrupted(job)) {
            /* A pause ends the wait uncharged (at most one step of the
             * job goes free); the caller pauses next.  Every waiter
             * leaves, so the queue starts again empty. */
            job->rate_serving = job->rate_next_ticket;
            g_cond_broadcast(&job->cond);
            return job->cancel_requested;
        }
        if (ticket > job->rate_serving) {
            /* Not our turn: the one before us wakes us when it passes. */
            g_cond_wait(&job->cond, &job->lock);
            continue;
        }
        delay = ratelimit_delay(&job->limit, bytes,
                                g_get_monotonic_time() * 1000);
        if (delay == 0) {
            job->rate_serving = MAX(job->rate_serving, ticket + 1);
            g_cond_broadcast(&job->cond);
            return false;
        }
        /* Woken early by a speed change, a pause or a cancel. */
        g_cond_wait_until(&job->cond, &job->lock,
                          g_get_monotonic_time() + delay / 1000 + 1);
    }
}

bool job_sleep(Job *job, int64_t us)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);
    int64_t until = g_get_monotonic_time() + us;

    for (;;) {
        if (job_wait_interrupted(job)) {
            return job->cancel_requested;
        }
        if (g_get_monotonic_time() >= until) {
            return false;
        }
        g_cond_wait_until(&job->cond, &job->lock, until);
    }
}

void job_set_progress(Job *job, uint64_t offset, uint64_t len)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    job->offset = offset;
    job->len = len;
    job_rate_note(&job->rate, g_get_monotonic_time(), job->offset,
                  job->copied);
}

void job_add_copied(Job *job, uint64_t bytes)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    job->copied += bytes;
    job_rate_note(&job->rate, g_get_monotonic_time(), job->offset,
                  job->copied);
}

void job_set_error(Job *job, int err, const char *fmt, ...)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);
    va_list ap;

    if (job->error) {
        return;
    }
    va_start(ap, fmt);
    job->error = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    job->err = err;
}

JobErrorAction job_handle_error(Job *job, OnErrorPolicy policy, int err,
                                const char *what, int *ret_out)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    *ret_out = -err;
    switch (policy) {
    case ON_ERROR_IGNORE:
        g_message("job %s: ignoring error: %s: %s", job->id, what,
                  g_strerror(err));
        return JOB_ERROR_SKIP;
    case ON_ERROR_STOP:
        if (job->cancel_requested) {
            *ret_out = -ECANCELED;
            return JOB_ERROR_FAIL;
        }
        /* Shown with the pause, so that a job that shows the error is
         * paused. */
        g_free(job->stop_error);
        job->stop_error = g_strdup_printf("%s: %s", what, g_strerror(err));
        job->stop_err = err;
        /* Paused at the caller's pause point, with the rest of the job's
         * I/O ended: the caller retries after it. */
        job->pause_requested = true;
        g_cond_broadcast(&job->cond);
        return JOB_ERROR_RETRY;
    case ON_ERROR_REPORT:
    default:
        if (!job->error) {
            job->error = g_strdup_printf("%s: %s", what, g_strerror(err));
            job->err = err;
        }
        return JOB_ERROR_FAIL;
    }
}

void job_transition_to_ready(Job *job)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);

    /* Called by run between its pause points, so never PAUSED here; a
     * cancel that came first (ABORTING) is seen by job_wait_complete. */
    if (job->status == JOB_STATUS_RUNNING) {
        job_state_transition(job, JOB_STATUS_READY);
    }
}

int job_wait_complete(Job *job, int64_t timeout_us)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);
    int64_t end = g_get_monotonic_time() + timeout_us;

    for (;;) {
        /* Nothing in flight while the driver waits here. */
        if (job_pause_point_locked(job)) {
            return -ECANCELED;
        }
        if (job->complete_requested) {
            return 0;
        }
        if (!g_cond_wait_until(&job->cond, &job->lock, end)) {
            return job->cancel_requested ? -ECANCELED : -ETIMEDOUT;
        }
    }
}

/* "rate" and "eta" of job_info_json.  job->lock held. */
static void job_append_rate_json(Job *job, GString *out)
{
    /* PENDING shows as "running" too: copied all, finishing (a commit
     * dropping its layers), so its pace is its last one and nothing is
     * left.  CREATED and ABORTING have none: not copying yet, or no more. */
    bool running = job->status == JOB_STATUS_RUNNING ||
                   job->status == JOB_STATUS_PENDING;
    double copy_rate = 0, progress_rate = 0;

    if (running || job->status == JOB_STATUS_READY) {
        job_rate_estimate(&job->rate, g_get_monotonic_time(), job->offset,
                          job->copied, &copy_rate, &progress_rate);
    }
    json_append_member_uint(out, "rate", (uint64_t)copy_rate);
    json_append_key(out, "eta");
    /* len 0: the driver has not set its length yet (it does first thing
     * in run), so "at the end" would be a lie; not known. */
    if (running && job->len > 0 && job->offset >= job->len) {
        g_string_append(out, "0");
    } else if (running && progress_rate > 0) {
        /* Rounded up: a job with a byte left has a second left. */
        g_string_append_printf(out, "%" G_GUINT64_FORMAT,
                               (guint64)((double)(job->len - job->offset) /
                                         progress_rate + 0.999));
    } else {
        g_string_append(out, "null");
    }
}

char *job_info_json(Job *job)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&job->lock);
    GString *out = g_string_new("{");

    json_append_member_string(out, "id", job->id);
    json_append_member_string(out, "type", job->driver->type);
    json_append_member_string(out, "state", job_status_public(job->status));
    json_append_member_string(out, "status", job_status_name(job->status));
    json_append_member_string(out, "top", job->top);
    json_append_member_string(out, "base", job->base);
    json_append_member_uint(out, "offset", job->offset);
    json_append_member_uint(out, "len", job->len);
    json_append_member_uint(out, "speed", job->limit.speed);
    json_append_member_uint(out, "copied", job->copied);
    job_append_rate_json(job, out);
    json_append_member_string(out, "error", job->error);
    g_string_append_c(out, '}');
    return g_string_free(out, FALSE);
}
