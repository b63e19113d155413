/*
 * job.h: the job core, after QEMU's job.c: a state machine with a table of
 * legal transitions and a table of the verbs each state accepts, one
 * thread per job, driver callbacks run / prepare / abort / clean, a rate
 * limit, and the pause / cancel / error-policy points a driver calls
 * between chunks.  Knows nothing of chains (tests drive it with fake
 * drivers).
 *
 * A driver's state embeds Job first (`CommitJob { MergeJob common; ... }`,
 * `MergeJob { Job job; ... }`, as QEMU's BlockJob embeds Job), allocated
 * by job_new() at the driver's instance_size and reached with
 * container_of().
 *
 * Life of a job:
 *
 *   CREATED -start-> RUNNING -(run returns 0)-> PENDING -(prepare)-> COMPLETED
 *                    RUNNING <-> PAUSED            (pause / resume, or an
 *                                                  error under on-error=stop)
 *                    RUNNING -> READY <-> STANDBY  (drivers that wait for
 *                                                  complete, e.g. active commit)
 *                    READY -complete-> PENDING
 *   any live state -cancel-> ABORTING -> CANCELLED
 *   RUNNING/PENDING -(error)-> ABORTING -> FAILED
 *
 * The terminal status is set only after the driver's clean() returned, so
 * a job seen as completed/failed/cancelled no longer touches the chain.
 * PAUSED (and STANDBY) is entered by the job thread at its pause point,
 * when none of the job's I/O is in flight: the pause verb only asks.  An
 * illegal transition is a bug and aborts the process (QEMU asserts too);
 * a verb the state does not accept is refused with a message.
 * Outside (design.md) the states are named running, paused, ready,
 * completed, failed, cancelled: CREATED, PENDING and ABORTING show as
 * running, STANDBY as paused.
 */
#ifndef CHAINFS_JOB_H
#define CHAINFS_JOB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <glib.h>

#include "job-rate.h"
#include "merge.h"

#ifndef container_of
/* The struct of type that holds ptr as its member. */
#define container_of(ptr, type, member) \
    ((type *)(void *)((char *)(ptr) - offsetof(type, member)))
#endif

typedef enum {
    JOB_STATUS_CREATED = 0,
    JOB_STATUS_RUNNING,
    JOB_STATUS_PAUSED,
    JOB_STATUS_READY,
    JOB_STATUS_STANDBY,   /* paused while ready */
    JOB_STATUS_PENDING,   /* work done, making it permanent (prepare) */
    JOB_STATUS_ABORTING,  /* cancelled or failed, undoing (abort) */
    JOB_STATUS_COMPLETED,
    JOB_STATUS_FAILED,
    JOB_STATUS_CANCELLED,
    JOB_STATUS__MAX,
} JobStatus;

typedef enum {
    JOB_VERB_START = 0,
    JOB_VERB_PAUSE,
    JOB_VERB_RESUME,
    JOB_VERB_SET_SPEED,
    JOB_VERB_COMPLETE,    /* pivot */
    JOB_VERB_CANCEL,
    JOB_VERB__MAX,
} JobVerb;

/* Token bucket (ratelimit.c).  Not thread-safe: guarded by its owner. */
typedef struct {
    uint64_t speed;       /* bytes per second; 0 unlimited */
    double tokens;        /* may go negative: a debt paid by waiting */
    int64_t last_ns;      /* monotonic time of the last refill */
} RateLimit;

void ratelimit_init(RateLimit *rl, uint64_t speed);
void ratelimit_set_speed(RateLimit *rl, uint64_t speed);
/*
 * Ask to send bytes at time now_ns.  Returns 0 and charges the bucket when
 * allowed now, else the nanoseconds to wait before asking again (nothing
 * charged).  The long-run rate stays at speed; a burst is at most a tenth
 * of a second of speed (or one request).
 */
int64_t ratelimit_delay(RateLimit *rl, uint64_t bytes, int64_t now_ns);

typedef struct Job Job;

typedef struct JobDriver {
    const char *type;     /* "commit", "active-commit", "stream" */
    size_t instance_size; /* of the driver's struct, Job first */

    /*
     * In the job thread.  Does the work, calling job_pause_point() (and
     * job_rate_limit()) between chunks and returning -ECANCELED when they
     * say so.  Returns 0 when done (a driver that needs complete calls
     * job_transition_to_ready() and job_wait_complete() first), or a
     * negative errno with job_set_error() called.
     */
    int (*run)(Job *job);
    /* In the job thread, status PENDING: make the result permanent.
     * 0 or negative errno (with job_set_error): then abort runs too. */
    int (*prepare)(Job *job);
    /* In the job thread, status ABORTING: undo what must be undone.  A job
     * that never started (job_start failed) runs no callback at all. */
    void (*abort)(Job *job);
    /* In the job thread, always last: release what run took. */
    void (*clean)(Job *job);
    /* Free what the driver's part holds (not the struct itself); any
     * thread, job finished or never started. */
    void (*free)(Job *job);
} JobDriver;

struct Job {
    const JobDriver *driver;
    char *id;             /* fixed */
    char *top;            /* fixed: for the info JSON */
    char *base;           /* fixed */

    GMutex lock;          /* guards every field below */
    GCond cond;           /* signalled on every change of the fields below */
    JobStatus status;
    bool cancel_requested;
    bool pause_requested;
    bool complete_requested;
    bool interrupted;     /* stopped by shutdown, not by the user */
    bool paused_on_error; /* PAUSED by on-error=stop */
    unsigned resumes;     /* counts resume verbs: ends one pause point's
                             wait even when a new pause is asked at once */
    uint64_t offset;      /* progress, 0 <= offset <= len */
    uint64_t len;
    uint64_t copied;      /* bytes actually written by this run */
    JobRate rate;         /* recent pace of offset and copied */
    int err;              /* errno of the error, 0 none */
    char *error;          /* message of the error, NULL none */
    char *stop_error;     /* on-error=stop: becomes error when the pause
                             it asked is taken */
    int stop_err;
    RateLimit limit;
    /* Waiters of job_rate_limit pass in the order they came (a ticket
     * each): without it the copy workers raced for each refill and one
     * window could lose for seconds, holding back the copied prefix (the
     * job's offset, its checkpoints, its time left). */
    uint64_t rate_next_ticket;
    uint64_t rate_serving;
    GThread *thread;
    bool finished;        /* thread done: terminal status set */
};

const char *job_status_name(JobStatus s);     /* internal name */
const char *job_status_public(JobStatus s);   /* design.md name */
const char *job_verb_name(JobVerb v);
bool job_status_is_terminal(JobStatus s);
/* The tables: may a job go from s to t?  Does state s accept verb v? */
bool job_transition_allowed(JobStatus s, JobStatus t);
bool job_verb_allowed(JobStatus s, JobVerb v);

/* A job in CREATED: driver->instance_size bytes, zeroed but for Job. */
Job *job_new(const JobDriver *driver, const char *id, const char *top,
             const char *base, uint64_t speed);
/* Join the thread (the job must be finished or never started), free. */
void job_free(Job *job);

/* Verbs (any thread).  EBUSY "job in state S cannot V" when refused.
 * job_start fails (EAGAIN) only when no thread can be made: the job then
 * ends FAILED without having run any driver callback. */
bool job_start(Job *job, GError **error);
/* Asks for a pause; the job enters PAUSED at its next pause point.  A
 * second pause while one is pending is refused. */
bool job_pause(Job *job, GError **error);
/* Wait (at most timeout_us) until a requested pause took effect, the pause
 * was withdrawn or the job finished.  TRUE when paused. */
bool job_wait_paused(Job *job, int64_t timeout_us);
bool job_resume(Job *job, GError **error);
bool job_set_speed(Job *job, uint64_t speed, GError **error);
bool job_complete(Job *job, GError **error);
bool job_cancel(Job *job, GError **error);
/* Shutdown: cancel whatever the state, marked interrupted; then wait. */
void job_interrupt(Job *job);
/* Wait until the job finished (terminal status). */
void job_wait_finished(Job *job);
/* Status now (takes the lock). */
JobStatus job_get_status(Job *job);

/* ---- for drivers, in the job thread ----------------------------------- */

/* The pause point: call only when none of the job's I/O is in flight.
 * When a pause is asked, enter PAUSED (STANDBY when ready) and block until
 * resumed.  TRUE when the job must stop (cancelled). */
bool job_pause_point(Job *job);
/* Is a pause asked for (and not yet taken)?  A worker that sees it stops
 * between steps so that the job thread can reach its pause point. */
bool job_pause_requested(Job *job);
/* For a job's worker threads: block while a pause is asked or in force
 * (the job thread does the state change).  TRUE when cancelled. */
bool job_wait_unpaused(Job *job);
/* Wait until bytes may go at the job's speed; cut short by a pause request
 * (the caller reaches its pause point next) or a cancel.  TRUE when the
 * job must stop. */
bool job_rate_limit(Job *job, uint64_t bytes);
/* Wait us microseconds; cut short by a pause request or a cancel.  TRUE
 * when the job must stop. */
bool job_sleep(Job *job, int64_t us);
/* Does a speed limit apply now? */
bool job_is_rate_limited(Job *job);
/* Record progress. */
void job_set_progress(Job *job, uint64_t offset, uint64_t len);
void job_add_copied(Job *job, uint64_t bytes);
/* Record the job's error (the first one wins unless replace). */
void job_set_error(Job *job, int err, const char *fmt, ...)
    G_GNUC_PRINTF(3, 4);

/*
 * An I/O error on a range under policy (QEMU's block_job_error_action):
 * returns JOB_ERROR_RETRY (stop policy: the error is recorded and a pause
 * asked; the caller retries after its pause point, which holds it until
 * resume), JOB_ERROR_SKIP (ignore: the driver goes on, but must never drop
 * a layer whose data it skipped), or JOB_ERROR_FAIL (report; or already
 * cancelled: then -ECANCELED is the caller's return).  *ret_out gets what
 * run should return on FAIL.
 */
typedef enum {
    JOB_ERROR_RETRY,
    JOB_ERROR_SKIP,
    JOB_ERROR_FAIL,
} JobErrorAction;
JobErrorAction job_handle_error(Job *job, OnErrorPolicy policy, int err,
                                const char *what, int *ret_out);

/* RUNNING -> READY (announce convergence); a pause asked meanwhile is
 * taken by job_wait_complete (READY -> STANDBY). */
void job_transition_to_ready(Job *job);
/* In READY, a pause point: wait for complete (returns 0) or cancel
 * (-ECANCELED), or until timeout_us passes (returns -ETIMEDOUT), so the
 * driver can keep working; a pause is taken here. */
int job_wait_complete(Job *job, int64_t timeout_us);
bool job_is_cancelled(Job *job);
bool job_is_interrupted(Job *job);

/* {"id","type","state",...,"rate","eta"}; newly allocated.  rate: bytes
 * written per second lately (job-rate.h), 0 unless running or ready; eta:
 * seconds left at the recent pace of progress, null when not running or
 * not known. */
char *job_info_json(Job *job);

/*
 * Observe every state change (one process-wide hook; NULL: none).  Called
 * with job->lock held, in whatever thread made the change (the job's, or a
 * verb's), after the status changed: the hook may read the job's fields
 * but must not call back into the job nor block (libmerge's event hook,
 * merge-job.c, builds an event and hands it on).
 */
typedef void (*JobTransitionHook)(Job *job, JobStatus from, JobStatus to);
void job_set_transition_hook(JobTransitionHook hook);

#endif
