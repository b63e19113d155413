/*
 * job-rate.h: how fast a job goes, recently (design.md "Counters": a
 * job's "rate"; chainctl's "Rate:" and "Time left:").
 *
 * The job notes its progress (offset) and the bytes it wrote (copied) on
 * every change; a sample is kept at most every JOB_RATE_SPACING_US.  An
 * estimate compares the values now with the sample taken about
 * JOB_RATE_WINDOW_US ago: a rate over the last few seconds, which follows
 * a speed change within that window and falls to 0 when the job stalls.
 * A gap of more than the window between two notes (a pause: the copy
 * engine notes every tick while it runs) starts the samples again, so that
 * the time paused does not count as slow copying; so does progress going
 * back (an active commit that found more dirty data).
 *
 * Not thread-safe: guarded by its owner (Job.lock).
 */
#ifndef CHAINFS_JOB_RATE_H
#define CHAINFS_JOB_RATE_H

#include <stdbool.h>
#include <stdint.h>

#define JOB_RATE_WINDOW_US (5 * 1000 * 1000)
#define JOB_RATE_SPACING_US (250 * 1000)
/* Less than this much time seen: no estimate yet. */
#define JOB_RATE_MIN_US (500 * 1000)
/* Samples at least JOB_RATE_SPACING_US apart cover more than the window. */
#define JOB_RATE_SAMPLES 32

typedef struct {
    int64_t t_us;      /* monotonic time of the note */
    uint64_t offset;   /* progress then */
    uint64_t copied;   /* bytes written then */
} JobRateSample;

typedef struct {
    JobRateSample s[JOB_RATE_SAMPLES];
    unsigned newest;   /* index of the newest sample */
    unsigned count;    /* samples held, 0..JOB_RATE_SAMPLES */
} JobRate;

void job_rate_reset(JobRate *r);
/* The job's progress and bytes written at now_us. */
void job_rate_note(JobRate *r, int64_t now_us, uint64_t offset,
                   uint64_t copied);
/*
 * Bytes written per second (*copy_rate) and progress per second
 * (*progress_rate) over the recent window, the job's values at now_us
 * being offset and copied.  FALSE (both 0) when too little time was seen.
 */
bool job_rate_estimate(const JobRate *r, int64_t now_us, uint64_t offset,
                       uint64_t copied, double *copy_rate,
                       double *progress_rate);

#endif
