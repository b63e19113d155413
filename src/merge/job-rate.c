/*
 * job-rate.c: how fast a job goes, recently (job-rate.h).
 */
#include <string.h>

#include "job-rate.h"

void job_rate_reset(JobRate *r)
{
    memset(r, 0, sizeof(*r));
}

void job_rate_note(JobRate *r, int64_t now_us, uint64_t offset,
                   uint64_t copied)
{
    const JobRateSample *last = &r->s[r->newest];

    if (r->count > 0 &&
        (now_us - last->t_us > JOB_RATE_WINDOW_US || offset < last->offset ||
         copied < last->copied)) {
        job_rate_reset(r);
    }
    if (r->count > 0 && now_us - last->t_us < JOB_RATE_SPACING_US) {
        return;
    }
    if (r->count > 0) {
        r->newest = (r->newest + 1) % JOB_RATE_SAMPLES;
    }
    if (r->count < JOB_RATE_SAMPLES) {
        r->count++;
    }
    r->s[r->newest] = (JobRateSample){ now_us, offset, copied };
}

bool job_rate_estimate(const JobRate *r, int64_t now_us, uint64_t offset,
                       uint64_t copied, double *copy_rate,
                       double *progress_rate)
{
    const JobRateSample *ref = NULL;
    double secs;

    *copy_rate = 0;
    *progress_rate = 0;
    /* The newest sample at least a window old; else the oldest held. */
    for (unsigned i = 0; i < r->count; i++) {
        const JobRateSample *s =
            &r->s[(r->newest + JOB_RATE_SAMPLES - i) % JOB_RATE_SAMPLES];

        ref = s;
        if (now_us - s->t_us >= JOB_RATE_WINDOW_US) {
            break;
        }
    }
    if (!ref || now_us - ref->t_us < JOB_RATE_MIN_US) {
        return false;
    }
    secs = (double)(now_us - ref->t_us) / 1e6;
    if (copied > ref->copied) {
        *copy_rate = (double)(copied - ref->copied) / secs;
    }
    if (offset > ref->offset) {
        *progress_rate = (double)(offset - ref->offset) / secs;
    }
    return true;
}
