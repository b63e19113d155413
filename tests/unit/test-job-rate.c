/*
 * test-job-rate.c: the recent-rate estimator of jobs (src/merge/job-rate.c)
 * on made-up clocks, so that every expectation is exact.
 */
#include <glib.h>

#include "job-rate.h"

#define MS 1000
#define SEC (1000 * 1000)

/* A steady 1 MB/s of writes and 2 MB/s of progress, noted every 100 ms. */
static void note_steady(JobRate *r, int64_t from, int64_t until)
{
    for (int64_t t = from; t <= until; t += 100 * MS) {
        job_rate_note(r, t, (uint64_t)(t / SEC * 2000000 + (t % SEC) * 2),
                      (uint64_t)(t / SEC * 1000000 + (t % SEC)));
    }
}

static void test_no_estimate_at_start(void)
{
    JobRate r;
    double copy, progress;

    job_rate_reset(&r);
    g_assert_false(job_rate_estimate(&r, 0, 0, 0, &copy, &progress));
    job_rate_note(&r, 0, 0, 0);
    /* Less than JOB_RATE_MIN_US seen: no figure to trust. */
    g_assert_false(job_rate_estimate(&r, 100 * MS, 4096, 4096, &copy,
                                     &progress));
    g_assert_cmpfloat(copy, ==, 0);
    g_assert_cmpfloat(progress, ==, 0);
}

/* The first estimate comes JOB_RATE_MIN_US after the first note, however
 * much was copied before (the copy workers' first writes, paid for after
 * they are made, can be megabytes in a few milliseconds), and it is
 * measured from that note with the values of now, not from the last note
 * kept: notes closer than JOB_RATE_SPACING_US are not kept. */
static void test_first_estimate_at_min_time(void)
{
    JobRate r;
    double copy, progress;

    job_rate_reset(&r);
    job_rate_note(&r, 0, 0, 0);
    job_rate_note(&r, 10 * MS, 1048576, 3145728);
    g_assert_false(job_rate_estimate(&r, JOB_RATE_MIN_US - 1, 1048576,
                                     3145728, &copy, &progress));
    g_assert_cmpfloat(copy, ==, 0);
    g_assert_true(job_rate_estimate(&r, JOB_RATE_MIN_US, 2097152, 4194304,
                                    &copy, &progress));
    g_assert_cmpfloat_with_epsilon(copy, 4194304 / 0.5, 1.0);
    g_assert_cmpfloat_with_epsilon(progress, 2097152 / 0.5, 1.0);
}

static void test_steady_rate(void)
{
    JobRate r;
    double copy, progress;

    job_rate_reset(&r);
    note_steady(&r, 0, 20 * SEC);
    g_assert_true(job_rate_estimate(&r, 20 * SEC, 40000000, 20000000, &copy,
                                    &progress));
    g_assert_cmpfloat_with_epsilon(copy, 1e6, 1.0);
    g_assert_cmpfloat_with_epsilon(progress, 2e6, 1.0);
}

/* The window follows a change of pace: 20 s at 1 MB/s, then 10 s idle
 * but for notes: the estimate is 0, not the long-run average. */
static void test_recent_window(void)
{
    JobRate r;
    double copy, progress;

    job_rate_reset(&r);
    note_steady(&r, 0, 20 * SEC);
    for (int64_t t = 20 * SEC; t <= 30 * SEC; t += 100 * MS) {
        job_rate_note(&r, t, 40000000, 20000000);
    }
    g_assert_true(job_rate_estimate(&r, 30 * SEC, 40000000, 20000000, &copy,
                                    &progress));
    g_assert_cmpfloat(copy, ==, 0);
    g_assert_cmpfloat(progress, ==, 0);
}

/* A gap longer than the window (a pause) starts over: the time paused is
 * not slow copying. */
static void test_gap_starts_over(void)
{
    JobRate r;
    double copy, progress;

    job_rate_reset(&r);
    note_steady(&r, 0, 10 * SEC);
    job_rate_note(&r, 60 * SEC, 20000000, 10000000);
    job_rate_note(&r, 61 * SEC, 22000000, 11000000);
    g_assert_true(job_rate_estimate(&r, 61 * SEC, 22000000, 11000000, &copy,
                                    &progress));
    g_assert_cmpfloat_with_epsilon(copy, 1e6, 1.0);
    g_assert_cmpfloat_with_epsilon(progress, 2e6, 1.0);
}

/* Progress that goes back (an active commit found more dirty data) starts
 * over too, never a negative rate. */
static void test_progress_back(void)
{
    JobRate r;
    double copy, progress;

    job_rate_reset(&r);
    note_steady(&r, 0, 10 * SEC);
    job_rate_note(&r, 10 * SEC + 100 * MS, 1000, 10100000);
    g_assert_false(job_rate_estimate(&r, 10 * SEC + 200 * MS, 1000, 10100000,
                                     &copy, &progress));
    g_assert_true(job_rate_estimate(&r, 11 * SEC + 100 * MS, 1001000,
                                    10600000, &copy, &progress));
    g_assert_cmpfloat_with_epsilon(progress, 1e6, 1.0);
    g_assert_cmpfloat_with_epsilon(copy, 5e5, 1.0);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/job-rate/no-estimate-at-start", test_no_estimate_at_start);
    g_test_add_func("/job-rate/first-estimate-at-min-time",
                    test_first_estimate_at_min_time);
    g_test_add_func("/job-rate/steady", test_steady_rate);
    g_test_add_func("/job-rate/recent-window", test_recent_window);
    g_test_add_func("/job-rate/gap-starts-over", test_gap_starts_over);
    g_test_add_func("/job-rate/progress-back", test_progress_back);
    return g_test_run();
}
