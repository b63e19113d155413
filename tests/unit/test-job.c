/*
 * test-job.c: the job core with fake drivers (as QEMU's
 * tests/unit/test-blockjob.c), the copy engine with a fake step, the rate
 * limit, and the command words.
 */
#include <errno.h>
#include <string.h>

#include "job.h"
#include "json.h"
#include "merge.h"
#include "merge-int.h"

/* ---- command words ---------------------------------------------------- */

static void test_parse_size(void)
{
    uint64_t v = 0;

    g_assert_true(parse_size("0", &v));
    g_assert_cmpuint(v, ==, 0);
    g_assert_true(parse_size("512", &v));
    g_assert_cmpuint(v, ==, 512);
    g_assert_true(parse_size("4K", &v));
    g_assert_cmpuint(v, ==, 4096);
    g_assert_true(parse_size("50M", &v));
    g_assert_cmpuint(v, ==, 52428800);
    g_assert_true(parse_size("2g", &v));
    g_assert_cmpuint(v, ==, 2ULL << 30);
    g_assert_true(parse_size("3MiB", &v));
    g_assert_cmpuint(v, ==, 3ULL << 20);
    g_assert_false(parse_size("", &v));
    g_assert_false(parse_size("M", &v));
    g_assert_false(parse_size("-1", &v));
    g_assert_false(parse_size("1.5M", &v));
    g_assert_false(parse_size("10X", &v));
    g_assert_false(parse_size("10 M", &v));
    g_assert_false(parse_size("99999999999999999999", &v));
    g_assert_false(parse_size("17179869184G", &v));
}

static void test_commit_words(void)
{
    CommitOptions o = { 0 };
    g_autoptr(GError) err = NULL;

    g_assert_true(commit_options_parse(
        "top=snap1.qcow2 base=base.img delete keep-relative bandwidth=50M "
        "on-error=stop force", &o, &err));
    g_assert_no_error(err);
    g_assert_cmpstr(o.top, ==, "snap1.qcow2");
    g_assert_cmpstr(o.base, ==, "base.img");
    g_assert_true(o.delete_dropped && o.keep_relative && o.force);
    g_assert_false(o.shallow || o.active);
    g_assert_cmpuint(o.bandwidth, ==, 50ULL << 20);
    g_assert_cmpint(o.on_error, ==, ON_ERROR_STOP);
    commit_options_clear(&o);

    g_assert_true(commit_options_parse("", &o, &err));
    g_assert_null(o.top);
    g_assert_null(o.base);
    g_assert_cmpint(o.on_error, ==, ON_ERROR_REPORT);
    commit_options_clear(&o);

    g_assert_true(commit_options_parse("  shallow\tactive  ", &o, &err));
    g_assert_true(o.shallow && o.active);
    commit_options_clear(&o);

    g_assert_true(commit_options_parse("on-error=ignore", &o, &err));
    g_assert_cmpint(o.on_error, ==, ON_ERROR_IGNORE);
    commit_options_clear(&o);
}

static void test_commit_words_bad(void)
{
    static const char *const bad[] = {
        "shallow base=b.img", "top=", "bandwidth=fast", "on-error=panic",
        "frobnicate", "top=a top=b", "active=1", "delete=yes", "base",
        NULL,
    };

    for (guint i = 0; bad[i]; i++) {
        CommitOptions o = { 0 };
        g_autoptr(GError) err = NULL;

        g_assert_false(commit_options_parse(bad[i], &o, &err));
        g_assert_error(err, CHAINFS_ERROR, EINVAL);
        commit_options_clear(&o);
    }
    {
        CommitOptions o = { 0 };
        g_autoptr(GError) err = NULL;

        g_assert_false(commit_options_parse("top=a bogus", &o, &err));
        g_assert_nonnull(strstr(err->message, "bogus"));
        commit_options_clear(&o);
    }
}

static void test_stream_words(void)
{
    StreamOptions o = { 0 };
    g_autoptr(GError) err = NULL;

    g_assert_true(stream_options_parse("base=b.qcow2 bandwidth=1K", &o, &err));
    g_assert_cmpstr(o.base, ==, "b.qcow2");
    g_assert_cmpuint(o.bandwidth, ==, 1024);
    stream_options_clear(&o);
    g_assert_true(stream_options_parse("", &o, &err));
    g_assert_null(o.base);
    stream_options_clear(&o);
    g_assert_false(stream_options_parse("top=a", &o, &err));
    g_assert_error(err, CHAINFS_ERROR, EINVAL);
    stream_options_clear(&o);
}

/* ---- tables ------------------------------------------------------------ */

static void test_tables(void)
{
    /* Terminal states accept no verb and go nowhere. */
    for (int s = JOB_STATUS_COMPLETED; s <= JOB_STATUS_CANCELLED; s++) {
        for (int v = 0; v < JOB_VERB__MAX; v++) {
            g_assert_false(job_verb_allowed(s, v));
        }
        for (int t = 0; t < JOB_STATUS__MAX; t++) {
            g_assert_false(job_transition_allowed(s, t));
        }
    }
    g_assert_true(job_verb_allowed(JOB_STATUS_READY, JOB_VERB_COMPLETE));
    g_assert_false(job_verb_allowed(JOB_STATUS_RUNNING, JOB_VERB_COMPLETE));
    g_assert_false(job_verb_allowed(JOB_STATUS_PAUSED, JOB_VERB_PAUSE));
    g_assert_false(job_verb_allowed(JOB_STATUS_RUNNING, JOB_VERB_RESUME));
    g_assert_true(job_transition_allowed(JOB_STATUS_RUNNING,
                                         JOB_STATUS_READY));
    g_assert_false(job_transition_allowed(JOB_STATUS_CREATED,
                                          JOB_STATUS_COMPLETED));
    g_assert_cmpstr(job_status_public(JOB_STATUS_STANDBY), ==, "paused");
    g_assert_cmpstr(job_status_public(JOB_STATUS_PENDING), ==, "running");
}

/* ---- fake drivers ------------------------------------------------------- */

typedef struct {
    Job job;
    int steps;            /* chunks to "copy" */
    int done;
    bool needs_complete;  /* waits in READY like active commit */
    int fail_at;          /* step that fails (-1 never) */
    int fail_errno;
    OnErrorPolicy policy;
    int skipped;
    int prepared, aborted, cleaned;
    int in_flight;        /* a step is "writing" (atomic) */
    GThread *abort_thread;/* where abort ran */
    GMutex gate_lock;     /* the test holds it to stop the job mid-way */
} FakeJob;

static FakeJob *fake_job(Job *job)
{
    return container_of(job, FakeJob, job);
}

static int fake_run(Job *job)
{
    FakeJob *f = fake_job(job);

    while (f->done < f->steps) {
        if (job_pause_point(job)) {
            return -ECANCELED;
        }
        /* A step in flight: the gate holds it mid-way. */
        g_atomic_int_set(&f->in_flight, 1);
        g_mutex_lock(&f->gate_lock);
        g_mutex_unlock(&f->gate_lock);
        g_atomic_int_set(&f->in_flight, 0);
        if (f->done == f->fail_at) {
            int r;

            switch (job_handle_error(job, f->policy, f->fail_errno,
                                     "fake step", &r)) {
            case JOB_ERROR_RETRY:
                f->fail_at = -1;  /* the room came back */
                continue;
            case JOB_ERROR_SKIP:
                f->skipped++;
                g_atomic_int_inc(&f->done); /* read by the test thread */
                continue;
            case JOB_ERROR_FAIL:
                return r;
            }
        }
        g_atomic_int_inc(&f->done);
        job_set_progress(job, (uint64_t)f->done, (uint64_t)f->steps);
        if (job_rate_limit(job, 1)) {
            return -ECANCELED;
        }
    }
    if (f->needs_complete) {
        job_transition_to_ready(job);
        for (;;) {
            int r = job_wait_complete(job, 1000 * 1000);

            if (r != -ETIMEDOUT) {
                return r;
            }
        }
    }
    return 0;
}

static int fake_prepare(Job *job)
{
    fake_job(job)->prepared++;
    return 0;
}

static void fake_abort(Job *job)
{
    fake_job(job)->aborted++;
    fake_job(job)->abort_thread = g_thread_self();
}

static void fake_clean(Job *job)
{
    fake_job(job)->cleaned++;
}

static void fake_free(Job *job)
{
    g_mutex_clear(&fake_job(job)->gate_lock);
}

static const JobDriver fake_driver = {
    .type = "commit",
    .instance_size = sizeof(FakeJob),
    .run = fake_run,
    .prepare = fake_prepare,
    .abort = fake_abort,
    .clean = fake_clean,
    .free = fake_free,
};

static FakeJob *fake_new(int steps, const char *id, const char *top,
                         const char *base, uint64_t speed)
{
    FakeJob *f = fake_job(job_new(&fake_driver, id, top, base, speed));

    f->steps = steps;
    f->fail_at = -1;
    g_mutex_init(&f->gate_lock);
    return f;
}

static JobStatus wait_status(Job *job, JobStatus want)
{
    gint64 deadline = g_get_monotonic_time() + 20 * G_TIME_SPAN_SECOND;
    JobStatus s;

    while ((s = job_get_status(job)) != want &&
           g_get_monotonic_time() < deadline) {
        g_usleep(1000);
    }
    return s;
}

static void test_job_completes(void)
{
    FakeJob *f;
    Job *job;
    g_autofree char *info = NULL;
    g_autofree char *state = NULL;
    uint64_t off = 0;

    f = fake_new(100, "commit-1", "top.qcow2", "base.img", 0);
    job = &f->job;
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_CREATED);
    g_assert_true(job_start(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_COMPLETED);
    g_assert_cmpint(f->done, ==, 100);
    g_assert_cmpint(f->prepared, ==, 1);
    g_assert_cmpint(f->aborted, ==, 0);
    g_assert_cmpint(f->cleaned, ==, 1);
    info = job_info_json(job);
    state = json_get_member(info, "state");
    g_assert_cmpstr(state, ==, "completed");
    g_assert_true(json_get_uint(info, "offset", &off));
    g_assert_cmpuint(off, ==, 100);
    g_assert_nonnull(strstr(info, "\"top\":\"top.qcow2\""));
    g_assert_nonnull(strstr(info, "\"error\":null"));
    job_free(job);
}

static void test_job_illegal_verbs(void)
{
    FakeJob *f;
    Job *job;
    g_autoptr(GError) err = NULL;

    f = fake_new(10, "commit-2", "t", "b", 0);
    job = &f->job;
    g_assert_false(job_complete(job, &err));
    g_assert_error(err, CHAINFS_ERROR, EBUSY);
    g_assert_cmpstr(err->message, ==, "job in state created cannot pivot");
    g_clear_error(&err);
    g_assert_false(job_resume(job, &err));
    g_assert_error(err, CHAINFS_ERROR, EBUSY);
    g_clear_error(&err);

    /* Hold the job mid-way to try verbs while it runs. */
    g_mutex_lock(&f->gate_lock);
    g_assert_true(job_start(job, NULL));
    g_assert_false(job_start(job, &err));
    g_assert_cmpstr(err->message, ==, "job in state running cannot start");
    g_clear_error(&err);
    g_assert_false(job_complete(job, &err));
    g_assert_cmpstr(err->message, ==, "job in state running cannot pivot");
    g_clear_error(&err);
    g_assert_true(job_pause(job, NULL));
    /* Asked, not taken: the step in flight holds the job RUNNING. */
    g_assert_false(job_pause(job, &err));
    g_assert_cmpstr(err->message, ==, "job in state running cannot pause: "
                    "a pause is already pending");
    g_clear_error(&err);
    g_assert_false(job_resume(job, &err));
    g_assert_cmpstr(err->message, ==, "job in state running cannot resume");
    g_clear_error(&err);
    g_mutex_unlock(&f->gate_lock);
    g_assert_true(job_wait_paused(job, 20 * G_USEC_PER_SEC));
    g_assert_false(job_pause(job, &err));
    g_assert_cmpstr(err->message, ==, "job in state paused cannot pause");
    g_clear_error(&err);
    g_assert_true(job_set_speed(job, 1000, NULL));
    g_assert_true(job_resume(job, NULL));
    g_assert_true(job_set_speed(job, 0, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_COMPLETED);
    g_assert_false(job_cancel(job, &err));
    g_assert_cmpstr(err->message, ==, "job in state completed cannot cancel");
    g_clear_error(&err);
    job_free(job);
}

static void test_job_pause_holds(void)
{
    FakeJob *f;
    Job *job;
    int done;

    f = fake_new(1000000, "commit-3", "t", "b", 0);
    job = &f->job;
    g_mutex_lock(&f->gate_lock);
    g_assert_true(job_start(job, NULL));
    g_assert_true(job_pause(job, NULL));
    done = g_atomic_int_get(&f->done);
    g_mutex_unlock(&f->gate_lock);
    g_assert_true(job_wait_paused(job, 20 * G_USEC_PER_SEC));
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_PAUSED);
    g_assert_true(job_cancel(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_CANCELLED);
    g_assert_cmpint(f->aborted, ==, 1);
    g_assert_cmpint(f->prepared, ==, 0);
    g_assert_cmpint(f->cleaned, ==, 1);
    /* Only the step in flight when it paused completed. */
    g_assert_cmpint(f->done, <=, done + 1);
    job_free(job);
}

static void test_job_ready_pivot(void)
{
    FakeJob *f;
    Job *job;
    g_autoptr(GError) err = NULL;

    f = fake_new(10, "active-1", "t", "b", 0);
    job = &f->job;
    f->needs_complete = true;
    g_assert_true(job_start(job, NULL));
    g_assert_cmpint(wait_status(job, JOB_STATUS_READY), ==, JOB_STATUS_READY);
    g_assert_true(job_pause(job, NULL));
    g_assert_true(job_wait_paused(job, 20 * G_USEC_PER_SEC));
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_STANDBY);
    g_assert_false(job_complete(job, &err));
    g_assert_cmpstr(err->message, ==, "job in state standby cannot pivot");
    g_clear_error(&err);
    g_assert_true(job_resume(job, NULL));
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_READY);
    g_assert_true(job_complete(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_COMPLETED);
    g_assert_cmpint(f->prepared, ==, 1);
    job_free(job);
}

static void test_job_ready_cancel(void)
{
    FakeJob *f;
    Job *job;

    f = fake_new(10, "active-2", "t", "b", 0);
    job = &f->job;
    f->needs_complete = true;
    g_assert_true(job_start(job, NULL));
    g_assert_cmpint(wait_status(job, JOB_STATUS_READY), ==, JOB_STATUS_READY);
    g_assert_true(job_cancel(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_CANCELLED);
    g_assert_cmpint(f->prepared, ==, 0);
    g_assert_cmpint(f->aborted, ==, 1);
    job_free(job);
}

static void test_job_error_report(void)
{
    FakeJob *f;
    Job *job;
    g_autofree char *info = NULL;
    g_autofree char *error = NULL;

    f = fake_new(10, "commit-4", "t", "b", 0);
    job = &f->job;
    f->fail_at = 4;
    f->fail_errno = ENOSPC;
    f->policy = ON_ERROR_REPORT;
    g_assert_true(job_start(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_FAILED);
    g_assert_cmpint(f->done, ==, 4);
    g_assert_cmpint(f->aborted, ==, 1);
    info = job_info_json(job);
    error = json_get_member(info, "error");
    g_assert_nonnull(error);
    g_assert_nonnull(strstr(error, g_strerror(ENOSPC)));
    job_free(job);
}

static void test_job_error_stop(void)
{
    FakeJob *f;
    Job *job;
    g_autofree char *info = NULL;
    g_autofree char *error = NULL;

    f = fake_new(10, "commit-5", "t", "b", 0);
    job = &f->job;
    f->fail_at = 3;
    f->fail_errno = ENOSPC;
    f->policy = ON_ERROR_STOP;
    g_assert_true(job_start(job, NULL));
    g_assert_cmpint(wait_status(job, JOB_STATUS_PAUSED), ==,
                    JOB_STATUS_PAUSED);
    info = job_info_json(job);
    error = json_get_member(info, "error");
    g_assert_nonnull(strstr(error, g_strerror(ENOSPC)));
    g_assert_cmpint(f->done, ==, 3);
    g_assert_true(job_resume(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_COMPLETED);
    g_assert_cmpint(f->done, ==, 10);
    g_assert_cmpint(f->skipped, ==, 0);
    g_clear_pointer(&info, g_free);
    info = job_info_json(job);
    g_assert_nonnull(strstr(info, "\"error\":null"));
    job_free(job);
}

static void test_job_error_ignore(void)
{
    FakeJob *f;
    Job *job;

    f = fake_new(10, "commit-6", "t", "b", 0);
    job = &f->job;
    f->fail_at = 2;
    f->fail_errno = EIO;
    f->policy = ON_ERROR_IGNORE;
    g_assert_true(job_start(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_COMPLETED);
    g_assert_cmpint(f->skipped, ==, 1);
    job_free(job);
}

static void test_job_cancel_rate_limited(void)
{
    FakeJob *f;
    Job *job;

    /* One byte a second: without a wake-up the cancel would wait. */
    f = fake_new(1000, "commit-7", "t", "b", 1);
    job = &f->job;
    g_assert_true(job_start(job, NULL));
    while (g_atomic_int_get(&f->done) < 1) {
        g_usleep(1000);
    }
    g_assert_true(job_cancel(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_CANCELLED);
    g_assert_cmpint(f->done, <, 10);
    job_free(job);
}

static void test_job_interrupt(void)
{
    FakeJob *f;
    Job *job;

    f = fake_new(1000, "commit-8", "t", "b", 1);
    job = &f->job;
    g_assert_true(job_start(job, NULL));
    job_interrupt(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_CANCELLED);
    g_assert_true(job_is_interrupted(job));
    job_free(job);
}

/* PAUSED only once the step in flight ended, never while it writes. */
static void test_job_paused_when_idle(void)
{
    FakeJob *f;
    Job *job;
    int done;

    f = fake_new(1000000, "commit-9", "t", "b", 0);
    job = &f->job;
    g_mutex_lock(&f->gate_lock);
    g_assert_true(job_start(job, NULL));
    while (!g_atomic_int_get(&f->in_flight)) {
        g_thread_yield();
    }
    g_assert_true(job_pause(job, NULL));
    /* The step is held mid-way: the pause cannot be taken yet. */
    g_assert_false(job_wait_paused(job, 1000));
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_RUNNING);
    g_mutex_unlock(&f->gate_lock);
    g_assert_true(job_wait_paused(job, 20 * G_USEC_PER_SEC));
    g_assert_cmpint(g_atomic_int_get(&f->in_flight), ==, 0);
    done = g_atomic_int_get(&f->done);
    /* Paused means no step starts: the count stays while paused. */
    for (int i = 0; i < 100; i++) {
        g_thread_yield();
    }
    g_assert_cmpint(g_atomic_int_get(&f->done), ==, done);
    g_assert_true(job_resume(job, NULL));
    g_assert_true(job_cancel(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_CANCELLED);
    job_free(job);
}

/* Every driver callback, abort included, runs in the job's thread. */
static void test_job_abort_in_job_thread(void)
{
    FakeJob *f = fake_new(10, "commit-10", "t", "b", 0);
    Job *job = &f->job;

    f->fail_at = 2;
    f->fail_errno = EIO;
    f->policy = ON_ERROR_REPORT;
    g_assert_true(job_start(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_FAILED);
    g_assert_cmpint(f->aborted, ==, 1);
    g_assert_true(f->abort_thread != NULL);
    g_assert_true(f->abort_thread != g_thread_self());
    job_free(job);
}

/* A job cancelled before it started ends CANCELLED through the table,
 * with no callback, and can be freed. */
static void test_job_cancel_created(void)
{
    FakeJob *f = fake_new(10, "commit-11", "t", "b", 0);
    Job *job = &f->job;
    g_autoptr(GError) err = NULL;

    g_assert_true(job_cancel(job, NULL));
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_CANCELLED);
    g_assert_false(job_start(job, &err));
    g_assert_cmpstr(err->message, ==, "job in state cancelled cannot start");
    g_assert_cmpint(f->aborted + f->cleaned + f->prepared, ==, 0);
    job_free(job);
}

/* on-error=stop: PAUSED with the error at the pause point, not before. */
static void test_job_error_stop_holds(void)
{
    FakeJob *f = fake_new(10, "commit-12", "t", "b", 0);
    Job *job = &f->job;

    f->fail_at = 1;
    f->fail_errno = ENOSPC;
    f->policy = ON_ERROR_STOP;
    g_assert_true(job_start(job, NULL));
    g_assert_cmpint(wait_status(job, JOB_STATUS_PAUSED), ==,
                    JOB_STATUS_PAUSED);
    g_assert_cmpint(g_atomic_int_get(&f->in_flight), ==, 0);
    g_assert_true(job_cancel(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_CANCELLED);
    g_assert_cmpint(f->done, ==, 1);
    job_free(job);
}

/* An illegal transition is a programming error: the process stops. */
static void test_job_illegal_transition_aborts(void)
{
    if (g_test_subprocess()) {
        FakeJob *f = fake_new(1, "commit-13", "t", "b", 0);

        /* READY from CREATED is not in the table. */
        f->job.status = JOB_STATUS_CREATED;
        job_transition_to_ready(&f->job);   /* refused: not RUNNING */
        g_assert_cmpint(f->job.status, ==, JOB_STATUS_CREATED);
        f->job.status = JOB_STATUS_COMPLETED;
        job_resume(&f->job, NULL);          /* a verb: refused */
        /* A pause point in a terminal state would move to PAUSED. */
        f->job.pause_requested = true;
        job_pause_point(&f->job);
        return;
    }
    g_test_trap_subprocess(NULL, 0, 0);
    g_test_trap_assert_failed();
    g_test_trap_assert_stderr("*illegal transition completed -> paused*");
}

/* ---- the copy engine, with a fake step ------------------------------------ */

#define ENGINE_SIZE (16ULL * 1024 * 1024)
#define ENGINE_STEP (64 * 1024)

typedef struct {
    Job job;
    GMutex gate;          /* the test holds it to keep steps in flight */
    int in_flight;        /* steps running now (atomic) */
    int fail_once_at;     /* step index that fails once; -1 none */
    OnErrorPolicy policy;
    guint8 seen[ENGINE_SIZE / ENGINE_STEP];  /* times each unit was copied */
} EngineJob;

static int engine_step(void *opaque, uint64_t off, uint64_t end, void *buf,
                       uint64_t *advance, uint64_t *written)
{
    EngineJob *e = opaque;
    int unit = (int)(off / ENGINE_STEP);
    int ret = 0;

    g_atomic_int_inc(&e->in_flight);
    g_mutex_lock(&e->gate);
    g_mutex_unlock(&e->gate);
    *advance = MIN((uint64_t)ENGINE_STEP, end - off);
    *written = 0;
    if (unit == g_atomic_int_get(&e->fail_once_at) &&
        g_atomic_int_compare_and_exchange(&e->fail_once_at, unit, -1)) {
        ret = -ENOSPC;
    } else {
        e->seen[unit]++;      /* one worker owns each window */
        *written = *advance;
    }
    g_atomic_int_add(&e->in_flight, -1);
    return ret;
}

static int engine_run(Job *job)
{
    EngineJob *e = container_of(job, EngineJob, job);
    CopyParams p = {
        .job = job, .step = engine_step, .opaque = e, .start = 0,
        .end = ENGINE_SIZE, .policy = e->policy, .what = "fake copy",
        .what_into = "",
    };
    CopyResult r;
    int ret = copy_run(&p, &r);

    g_assert_cmpuint(r.prefix, ==, ret == 0 ? ENGINE_SIZE : r.prefix);
    return ret;
}

static void engine_free(Job *job)
{
    g_mutex_clear(&container_of(job, EngineJob, job)->gate);
}

static const JobDriver engine_driver = {
    .type = "commit",
    .instance_size = sizeof(EngineJob),
    .run = engine_run,
    .free = engine_free,
};

static EngineJob *engine_new(const char *id)
{
    EngineJob *e = container_of(job_new(&engine_driver, id, "t", "b", 0),
                                EngineJob, job);

    g_mutex_init(&e->gate);
    e->fail_once_at = -1;
    return e;
}

static void engine_assert_each_once(EngineJob *e)
{
    for (guint i = 0; i < G_N_ELEMENTS(e->seen); i++) {
        g_assert_cmpint(e->seen[i], ==, 1);
    }
}

/* COPY_WORKERS steps in flight at once; every range copied exactly once. */
static void test_copy_parallel(void)
{
    EngineJob *e = engine_new("commit-20");

    g_mutex_lock(&e->gate);
    g_assert_true(job_start(&e->job, NULL));
    while (g_atomic_int_get(&e->in_flight) < COPY_WORKERS) {
        g_thread_yield();
    }
    g_mutex_unlock(&e->gate);
    job_wait_finished(&e->job);
    g_assert_cmpint(job_get_status(&e->job), ==, JOB_STATUS_COMPLETED);
    engine_assert_each_once(e);
    job_free(&e->job);
}

/* PAUSED only once no worker has a step in flight. */
static void test_copy_pause_drains(void)
{
    EngineJob *e = engine_new("commit-21");
    int copied;

    g_mutex_lock(&e->gate);
    g_assert_true(job_start(&e->job, NULL));
    while (g_atomic_int_get(&e->in_flight) < COPY_WORKERS) {
        g_thread_yield();
    }
    g_assert_true(job_pause(&e->job, NULL));
    g_assert_false(job_wait_paused(&e->job, 1000));
    g_assert_cmpint(job_get_status(&e->job), ==, JOB_STATUS_RUNNING);
    g_mutex_unlock(&e->gate);
    g_assert_true(job_wait_paused(&e->job, 20 * G_USEC_PER_SEC));
    g_assert_cmpint(g_atomic_int_get(&e->in_flight), ==, 0);
    copied = 0;
    for (guint i = 0; i < G_N_ELEMENTS(e->seen); i++) {
        copied += e->seen[i];
    }
    g_assert_cmpint(copied, <, (int)G_N_ELEMENTS(e->seen));
    g_assert_true(job_resume(&e->job, NULL));
    job_wait_finished(&e->job);
    g_assert_cmpint(job_get_status(&e->job), ==, JOB_STATUS_COMPLETED);
    engine_assert_each_once(e);
    job_free(&e->job);
}

/* on-error=stop in one worker: the job pauses once all are idle, shows
 * the error, and resume retries the range. */
static void test_copy_error_stop(void)
{
    EngineJob *e = engine_new("commit-22");
    g_autofree char *info = NULL;
    g_autofree char *error = NULL;

    e->policy = ON_ERROR_STOP;
    e->fail_once_at = 40;
    g_assert_true(job_start(&e->job, NULL));
    g_assert_cmpint(wait_status(&e->job, JOB_STATUS_PAUSED), ==,
                    JOB_STATUS_PAUSED);
    g_assert_cmpint(g_atomic_int_get(&e->in_flight), ==, 0);
    info = job_info_json(&e->job);
    error = json_get_member(info, "error");
    g_assert_nonnull(strstr(error, "fake copy at offset 2621440"));
    g_assert_true(job_resume(&e->job, NULL));
    job_wait_finished(&e->job);
    g_assert_cmpint(job_get_status(&e->job), ==, JOB_STATUS_COMPLETED);
    engine_assert_each_once(e);
    job_free(&e->job);
}

/* on-error=report: the job fails with the step's error. */
static void test_copy_error_report(void)
{
    EngineJob *e = engine_new("commit-23");

    e->policy = ON_ERROR_REPORT;
    e->fail_once_at = 3;
    g_assert_true(job_start(&e->job, NULL));
    job_wait_finished(&e->job);
    g_assert_cmpint(job_get_status(&e->job), ==, JOB_STATUS_FAILED);
    g_assert_cmpint(e->job.err, ==, ENOSPC);
    job_free(&e->job);
}

static void test_ratelimit(void)
{
    RateLimit rl;
    int64_t now = 1000000000;
    uint64_t sent = 0;

    ratelimit_init(&rl, 0);
    g_assert_cmpint(ratelimit_delay(&rl, 1 << 30, now), ==, 0);

    /* 1 MiB/s, 256 KiB requests, 10 simulated seconds: about 10 MiB. */
    ratelimit_init(&rl, 1 << 20);
    for (int64_t t = now; t < now + 10 * 1000000000LL;) {
        int64_t d = ratelimit_delay(&rl, 256 << 10, t);

        if (d == 0) {
            sent += 256 << 10;
        } else {
            g_assert_cmpint(d, >, 0);
            t += d;
        }
    }
    g_assert_cmpuint(sent, >=, 9 << 20);
    g_assert_cmpuint(sent, <=, 12 << 20);

    /* A request bigger than the bucket still passes, then waits. */
    ratelimit_init(&rl, 1000);
    g_assert_cmpint(ratelimit_delay(&rl, 5000, now), ==, 0);
    g_assert_cmpint(ratelimit_delay(&rl, 1, now), >=, 4 * 1000000000LL);
    ratelimit_set_speed(&rl, 0);
    g_assert_cmpint(ratelimit_delay(&rl, 1, now), ==, 0);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/options/parse-size", test_parse_size);
    g_test_add_func("/options/commit", test_commit_words);
    g_test_add_func("/options/commit-bad", test_commit_words_bad);
    g_test_add_func("/options/stream", test_stream_words);
    g_test_add_func("/job/tables", test_tables);
    g_test_add_func("/job/completes", test_job_completes);
    g_test_add_func("/job/illegal-verbs", test_job_illegal_verbs);
    g_test_add_func("/job/pause-holds", test_job_pause_holds);
    g_test_add_func("/job/ready-pivot", test_job_ready_pivot);
    g_test_add_func("/job/ready-cancel", test_job_ready_cancel);
    g_test_add_func("/job/error-report", test_job_error_report);
    g_test_add_func("/job/error-stop", test_job_error_stop);
    g_test_add_func("/job/error-ignore", test_job_error_ignore);
    g_test_add_func("/job/cancel-rate-limited", test_job_cancel_rate_limited);
    g_test_add_func("/job/interrupt", test_job_interrupt);
    g_test_add_func("/job/paused-when-idle", test_job_paused_when_idle);
    g_test_add_func("/job/abort-in-job-thread", test_job_abort_in_job_thread);
    g_test_add_func("/job/cancel-created", test_job_cancel_created);
    g_test_add_func("/job/error-stop-holds", test_job_error_stop_holds);
    g_test_add_func("/job/illegal-transition-aborts",
                    test_job_illegal_transition_aborts);
    g_test_add_func("/copy/parallel", test_copy_parallel);
    g_test_add_func("/copy/pause-drains", test_copy_pause_drains);
    g_test_add_func("/copy/error-stop", test_copy_error_stop);
    g_test_add_func("/copy/error-report", test_copy_error_report);
    g_test_add_func("/ratelimit", test_ratelimit);
    return g_test_run();
}
