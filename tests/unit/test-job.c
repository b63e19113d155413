/*
 * test-job.c: the job core with fake drivers (as QEMU's
 * tests/unit/test-blockjob.c), the rate limit, and the command words.
 */
#include <errno.h>
#include <string.h>

#include "job.h"
#include "json.h"
#include "merge.h"

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
    int steps;            /* chunks to "copy" */
    int done;
    bool needs_complete;  /* waits in READY like active commit */
    int fail_at;          /* step that fails (-1 never) */
    int fail_errno;
    OnErrorPolicy policy;
    int skipped;
    int prepared, aborted, cleaned;
    GMutex gate_lock;     /* the test holds it to stop the job mid-way */
} FakeJob;

static int fake_run(Job *job)
{
    FakeJob *f = job->opaque;

    while (f->done < f->steps) {
        if (job_pause_point(job)) {
            return -ECANCELED;
        }
        g_mutex_lock(&f->gate_lock);
        g_mutex_unlock(&f->gate_lock);
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
    ((FakeJob *)job->opaque)->prepared++;
    return 0;
}

static void fake_abort(Job *job)
{
    ((FakeJob *)job->opaque)->aborted++;
}

static void fake_clean(Job *job)
{
    ((FakeJob *)job->opaque)->cleaned++;
}

static const JobDriver fake_driver = {
    .type = "commit",
    .run = fake_run,
    .prepare = fake_prepare,
    .abort = fake_abort,
    .clean = fake_clean,
};

static void fake_init(FakeJob *f, int steps)
{
    memset(f, 0, sizeof(*f));
    f->steps = steps;
    f->fail_at = -1;
    g_mutex_init(&f->gate_lock);
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
    FakeJob f;
    Job *job;
    g_autofree char *info = NULL;
    g_autofree char *state = NULL;
    uint64_t off = 0;

    fake_init(&f, 100);
    job = job_new(&fake_driver, "commit-1", "top.qcow2", "base.img", 0, &f);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_CREATED);
    g_assert_true(job_start(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_COMPLETED);
    g_assert_cmpint(f.done, ==, 100);
    g_assert_cmpint(f.prepared, ==, 1);
    g_assert_cmpint(f.aborted, ==, 0);
    g_assert_cmpint(f.cleaned, ==, 1);
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
    FakeJob f;
    Job *job;
    g_autoptr(GError) err = NULL;

    fake_init(&f, 10);
    job = job_new(&fake_driver, "commit-2", "t", "b", 0, &f);
    g_assert_false(job_complete(job, &err));
    g_assert_error(err, CHAINFS_ERROR, EBUSY);
    g_assert_cmpstr(err->message, ==, "job in state created cannot pivot");
    g_clear_error(&err);
    g_assert_false(job_resume(job, &err));
    g_assert_error(err, CHAINFS_ERROR, EBUSY);
    g_clear_error(&err);

    /* Hold the job mid-way to try verbs while it runs. */
    g_mutex_lock(&f.gate_lock);
    g_assert_true(job_start(job, NULL));
    g_assert_false(job_start(job, &err));
    g_assert_cmpstr(err->message, ==, "job in state running cannot start");
    g_clear_error(&err);
    g_assert_false(job_complete(job, &err));
    g_assert_cmpstr(err->message, ==, "job in state running cannot pivot");
    g_clear_error(&err);
    g_assert_true(job_pause(job, NULL));
    g_assert_false(job_pause(job, &err));
    g_assert_cmpstr(err->message, ==, "job in state paused cannot pause");
    g_clear_error(&err);
    g_assert_true(job_set_speed(job, 1000, NULL));
    g_assert_true(job_resume(job, NULL));
    g_assert_true(job_set_speed(job, 0, NULL));
    g_mutex_unlock(&f.gate_lock);
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_COMPLETED);
    g_assert_false(job_cancel(job, &err));
    g_assert_cmpstr(err->message, ==, "job in state completed cannot cancel");
    g_clear_error(&err);
    job_free(job);
}

static void test_job_pause_holds(void)
{
    FakeJob f;
    Job *job;
    int done;

    fake_init(&f, 1000000);
    job = job_new(&fake_driver, "commit-3", "t", "b", 0, &f);
    g_mutex_lock(&f.gate_lock);
    g_assert_true(job_start(job, NULL));
    g_assert_true(job_pause(job, NULL));
    done = g_atomic_int_get(&f.done);
    g_mutex_unlock(&f.gate_lock);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_PAUSED);
    g_assert_true(job_cancel(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_CANCELLED);
    g_assert_cmpint(f.aborted, ==, 1);
    g_assert_cmpint(f.prepared, ==, 0);
    g_assert_cmpint(f.cleaned, ==, 1);
    /* Only the step in flight when it paused completed. */
    g_assert_cmpint(f.done, <=, done + 1);
    job_free(job);
}

static void test_job_ready_pivot(void)
{
    FakeJob f;
    Job *job;
    g_autoptr(GError) err = NULL;

    fake_init(&f, 10);
    f.needs_complete = true;
    job = job_new(&fake_driver, "active-1", "t", "b", 0, &f);
    g_assert_true(job_start(job, NULL));
    g_assert_cmpint(wait_status(job, JOB_STATUS_READY), ==, JOB_STATUS_READY);
    g_assert_true(job_pause(job, NULL));
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_STANDBY);
    g_assert_false(job_complete(job, &err));
    g_assert_cmpstr(err->message, ==, "job in state standby cannot pivot");
    g_clear_error(&err);
    g_assert_true(job_resume(job, NULL));
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_READY);
    g_assert_true(job_complete(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_COMPLETED);
    g_assert_cmpint(f.prepared, ==, 1);
    job_free(job);
}

static void test_job_ready_cancel(void)
{
    FakeJob f;
    Job *job;

    fake_init(&f, 10);
    f.needs_complete = true;
    job = job_new(&fake_driver, "active-2", "t", "b", 0, &f);
    g_assert_true(job_start(job, NULL));
    g_assert_cmpint(wait_status(job, JOB_STATUS_READY), ==, JOB_STATUS_READY);
    g_assert_true(job_cancel(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_CANCELLED);
    g_assert_cmpint(f.prepared, ==, 0);
    g_assert_cmpint(f.aborted, ==, 1);
    job_free(job);
}

static void test_job_error_report(void)
{
    FakeJob f;
    Job *job;
    g_autofree char *info = NULL;
    g_autofree char *error = NULL;

    fake_init(&f, 10);
    f.fail_at = 4;
    f.fail_errno = ENOSPC;
    f.policy = ON_ERROR_REPORT;
    job = job_new(&fake_driver, "commit-4", "t", "b", 0, &f);
    g_assert_true(job_start(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_FAILED);
    g_assert_cmpint(f.done, ==, 4);
    g_assert_cmpint(f.aborted, ==, 1);
    info = job_info_json(job);
    error = json_get_member(info, "error");
    g_assert_nonnull(error);
    g_assert_nonnull(strstr(error, g_strerror(ENOSPC)));
    job_free(job);
}

static void test_job_error_stop(void)
{
    FakeJob f;
    Job *job;
    g_autofree char *info = NULL;
    g_autofree char *error = NULL;

    fake_init(&f, 10);
    f.fail_at = 3;
    f.fail_errno = ENOSPC;
    f.policy = ON_ERROR_STOP;
    job = job_new(&fake_driver, "commit-5", "t", "b", 0, &f);
    g_assert_true(job_start(job, NULL));
    g_assert_cmpint(wait_status(job, JOB_STATUS_PAUSED), ==,
                    JOB_STATUS_PAUSED);
    info = job_info_json(job);
    error = json_get_member(info, "error");
    g_assert_nonnull(strstr(error, g_strerror(ENOSPC)));
    g_assert_cmpint(f.done, ==, 3);
    g_assert_true(job_resume(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_COMPLETED);
    g_assert_cmpint(f.done, ==, 10);
    g_assert_cmpint(f.skipped, ==, 0);
    g_clear_pointer(&info, g_free);
    info = job_info_json(job);
    g_assert_nonnull(strstr(info, "\"error\":null"));
    job_free(job);
}

static void test_job_error_ignore(void)
{
    FakeJob f;
    Job *job;

    fake_init(&f, 10);
    f.fail_at = 2;
    f.fail_errno = EIO;
    f.policy = ON_ERROR_IGNORE;
    job = job_new(&fake_driver, "commit-6", "t", "b", 0, &f);
    g_assert_true(job_start(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_COMPLETED);
    g_assert_cmpint(f.skipped, ==, 1);
    job_free(job);
}

static void test_job_cancel_rate_limited(void)
{
    FakeJob f;
    Job *job;

    /* One byte a second: without a wake-up the cancel would wait. */
    fake_init(&f, 1000);
    job = job_new(&fake_driver, "commit-7", "t", "b", 1, &f);
    g_assert_true(job_start(job, NULL));
    while (g_atomic_int_get(&f.done) < 1) {
        g_usleep(1000);
    }
    g_assert_true(job_cancel(job, NULL));
    job_wait_finished(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_CANCELLED);
    g_assert_cmpint(f.done, <, 10);
    job_free(job);
}

static void test_job_interrupt(void)
{
    FakeJob f;
    Job *job;

    fake_init(&f, 1000);
    job = job_new(&fake_driver, "commit-8", "t", "b", 1, &f);
    g_assert_true(job_start(job, NULL));
    job_interrupt(job);
    g_assert_cmpint(job_get_status(job), ==, JOB_STATUS_CANCELLED);
    g_assert_true(job_is_interrupted(job));
    job_free(job);
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
    g_test_add_func("/ratelimit", test_ratelimit);
    return g_test_run();
}
