/*
 * ratelimit.c: a token bucket for job bandwidth (see job.h).
 *
 * Tokens are bytes.  The bucket refills at `speed` bytes per second up to
 * a tenth of a second's worth, so a job that was paused or idle cannot
 * burst far above its speed.  A request is allowed whenever the bucket is
 * not in debt and then charged in full (possibly into debt), so requests
 * larger than the bucket still pass, and the debt makes the next one wait:
 * the long-run rate is `speed` whatever the request size.
 */
#include "job.h"

#define RATELIMIT_BURST_DIVISOR 10

void ratelimit_init(RateLimit *rl, uint64_t speed)
{
    rl->speed = speed;
    rl->tokens = 0;
    rl->last_ns = -1;
}

void ratelimit_set_speed(RateLimit *rl, uint64_t speed)
{
    rl->speed = speed;
    /* A new speed starts from an empty bucket with no old debt: a job
     * slowed down to a crawl must not be held back by the fast past. */
    rl->tokens = 0;
    rl->last_ns = -1;
}

int64_t ratelimit_delay(RateLimit *rl, uint64_t bytes, int64_t now_ns)
{
    double burst;

    if (rl->speed == 0) {
        return 0;
    }
    burst = (double)rl->speed / RATELIMIT_BURST_DIVISOR;
    if (rl->last_ns >= 0 && now_ns > rl->last_ns) {
        rl->tokens += (double)(now_ns - rl->last_ns) * (double)rl->speed / 1e9;
        if (rl->tokens > burst) {
            rl->tokens = burst;
        }
    }
    rl->last_ns = now_ns;
    if (rl->tokens >= 0) {
        rl->tokens -= (double)bytes;
        return 0;
    }
    return (int64_t)(-rl->tokens * 1e9 / (double)rl->speed) + 1;
}
