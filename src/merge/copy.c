/*
 * copy.c: the copy engine every job uses (after QEMU's block/block-copy.c,
 * written anew): a range is cut into windows, COPY_WORKERS threads each
 * take the next window and walk it step by step with the job's step
 * function, so that reads of one layer and writes of another overlap.
 *
 * What the engine promises its drivers:
 *
 * - Progress is a prefix.  The windows a worker holds are its in-flight
 *   set; every byte below the lowest in-flight window start (or below the
 *   next window to hand out, when none is held) was handled.  A worker
 *   that stops mid-window (cancel, failure) keeps its window in flight, so
 *   the prefix never claims it.  A commit's checkpoint records that prefix
 *   after a flush of base, whatever order the windows end in.
 *
 * - Pause is honest.  A worker that sees a pause asked stops between two
 *   steps (no I/O of its own in flight) and says so (parked); the calling
 *   thread, the job's, reaches job_pause_point -- and the job enters
 *   PAUSED -- only once every live worker is parked.
 *
 * - One error policy: a failed step goes to job_handle_error (QEMU's
 *   block_job_error_action): stop parks the worker and retries after the
 *   pause, ignore skips or retries later (CopyParams.skip_advances), report
 *   stops every worker.
 *
 * - Zero ranges are written as zero clusters, never as data; unallocated
 *   ranges are left alone (copy_status_run).  Range locks against guest
 *   writes are the step's business: only the driver knows whether guests
 *   write the image it copies into.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <string.h>

#include "merge-int.h"

/* Wait before retrying a range whose error on-error=ignore let pass. */
#define COPY_RETRY_US (G_USEC_PER_SEC / 2)

/* ---- one run ------------------------------------------------------------ */

/*
 * COPY OFFLOAD PLUGS IN HERE.  Copy len bytes of data at off, as layer
 * from_idx of chain sees them, into dst at the same offset.  Today: read
 * through the chain into buf (at most MERGE_CHUNK), write dst.  A later
 * copy_file_range / FICLONERANGE path goes here: it needs the host offsets
 * of the source run (the owning layer's cluster) and of dst's allocation,
 * and must fall back to this read/write when the filesystem refuses.
 */
static int copy_data(Chain *chain, guint from_idx, ChainImage *dst,
                     uint64_t off, uint64_t len, void *buf)
{
    int ret = chain_pread_from(chain, from_idx, off, buf, len);

    if (ret == 0) {
        ret = dst->drv->pwrite(dst, off, buf, len);
    }
    return ret;
}

int copy_status_run(Chain *chain, guint from_idx, ChainImage *dst, int st,
                    uint64_t off, uint64_t len, void *buf, uint64_t *written)
{
    int ret;

    *written = 0;
    switch (st) {
    case BLOCK_DATA:
    case BLOCK_COMPRESSED:
        g_assert(len <= MERGE_CHUNK);
        ret = copy_data(chain, from_idx, dst, off, len, buf);
        if (ret == 0) {
            *written = len;
        }
        return ret;
    case BLOCK_ZERO:
        /* Zeros above must hide what lies below: zero clusters, which
         * take no room for data. */
        return dst->drv->pwrite_zeroes(dst, off, len, true);
    default:
        /* Unallocated: what is below shows through already. */
        return 0;
    }
}

int copy_above(Chain *chain, guint top_idx, guint base_idx, ChainImage *dst,
               uint64_t off, uint64_t end, void *buf, uint64_t *advance,
               uint64_t *written)
{
    uint64_t pnum = 0;
    int owner;
    int st = chain_status_above(chain, top_idx, base_idx, off, end - off,
                                &pnum, &owner);

    *written = 0;
    *advance = MIN((uint64_t)MERGE_CHUNK, end - off);
    if (st < 0) {
        return st;
    }
    if (st == BLOCK_DATA || st == BLOCK_COMPRESSED) {
        pnum = MIN(pnum, (uint64_t)MERGE_CHUNK);
    }
    *advance = pnum;
    return copy_status_run(chain, top_idx, dst, st, off, pnum, buf, written);
}

int copy_above_range(Chain *chain, guint top_idx, guint base_idx,
                     ChainImage *dst, uint64_t off, uint64_t len, void *buf,
                     uint64_t *written)
{
    uint64_t end = off + len;

    *written = 0;
    while (off < end) {
        uint64_t advance, w;
        int ret = copy_above(chain, top_idx, base_idx, dst, off, end, buf,
                             &advance, &w);

        if (ret < 0) {
            return ret;
        }
        *written += w;
        off += advance;
    }
    return 0;
}

/* ---- the workers -------------------------------------------------------- */

typedef struct {
    const CopyParams *p;
    uint64_t window;

    GMutex lock;          /* guards the fields below */
    GCond cond;           /* signalled when a worker parks, ends or fails */
    uint64_t next;        /* start of the next window to hand out */
    uint64_t inflight[COPY_WORKERS]; /* window start; UINT64_MAX: none */
    int running;          /* workers still running */
    int parked;           /* of them, stopped for a pause */
    bool stop;            /* a worker failed or saw cancel */
    bool inline_worker;   /* no thread: the job thread copies itself */
    int ret;              /* the first failure */
    int skipped_err;
    RateLimit limit;      /* offline: the speed the workers keep together */
} CopyEngine;

static void copy_fail(CopyEngine *c, int ret)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&c->lock);

    if (!c->stop) {
        c->stop = true;
        c->ret = ret;
        g_cond_broadcast(&c->cond);
    }
}

/* c->lock held. */
static uint64_t copy_prefix_locked(CopyEngine *c)
{
    uint64_t prefix = c->next;

    for (int i = 0; i < COPY_WORKERS; i++) {
        prefix = MIN(prefix, c->inflight[i]);
    }
    return prefix;
}

/* Between two steps: when a pause is asked, park until it is over.  TRUE
 * when the worker must stop at the end of its window (cancelled, or
 * another worker failed). */
static bool copy_park_point(CopyEngine *c)
{
    Job *job = c->p->job;
    bool cancelled;

    if (job && job_is_cancelled(job)) {
        copy_fail(c, -ECANCELED);
        return true;
    }
    if (!job || !job_pause_requested(job)) {
        g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&c->lock);

        return c->stop;
    }
    if (c->inline_worker) {
        /* The job thread itself, between two steps: its pause point. */
        if (job_pause_point(job)) {
            copy_fail(c, -ECANCELED);
        }
        g_mutex_lock(&c->lock);
        cancelled = c->stop;
        g_mutex_unlock(&c->lock);
        return cancelled;
    }
    g_mutex_lock(&c->lock);
    c->parked++;
    g_cond_broadcast(&c->cond);
    g_mutex_unlock(&c->lock);
    cancelled = job_wait_unpaused(job);
    if (cancelled) {
        copy_fail(c, -ECANCELED);
    }
    g_mutex_lock(&c->lock);
    c->parked--;
    cancelled = c->stop;
    g_mutex_unlock(&c->lock);
    return cancelled;
}

/* Offline, the workers keep to c->limit together, as a job's rate limit
 * would; a stop ends the wait. */
static void copy_offline_limit(CopyEngine *c, uint64_t bytes)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&c->lock);

    while (!c->stop) {
        int64_t delay_ns = ratelimit_delay(&c->limit, bytes,
                                           g_get_monotonic_time() * 1000);

        if (delay_ns <= 0) {
            return;
        }
        g_cond_wait_until(&c->cond, &c->lock,
                          g_get_monotonic_time() + delay_ns / 1000 + 1);
    }
}

/* A failed step under the policy.  0 to go on at *off (moved past the
 * range when skipped), else what the worker must stop with. */
static int copy_step_failed(CopyEngine *c, int ret, uint64_t *off,
                            uint64_t advance)
{
    const CopyParams *p = c->p;
    g_autofree char *what = NULL;
    int r = ret;

    if (!p->job) {
        return ret;
    }
    what = g_strdup_printf("%s at offset %" G_GUINT64_FORMAT "%s", p->what,
                           *off, p->what_into);
    switch (job_handle_error(p->job, p->policy, -ret, what, &r)) {
    case JOB_ERROR_RETRY:
        /* The pause is asked: the park point holds us until resume. */
        return 0;
    case JOB_ERROR_SKIP:
        if (p->dst && chain_image_io_latched(p->dst)) {
            return r;
        }
        if (p->skip_advances) {
            g_mutex_lock(&c->lock);
            c->skipped_err = -ret;
            g_mutex_unlock(&c->lock);
            *off += advance;
            return 0;
        }
        /* Retried later, never skipped; the other workers go on. */
        return job_sleep(p->job, COPY_RETRY_US) ? -ECANCELED : 0;
    case JOB_ERROR_FAIL:
    default:
        return r;
    }
}

/*
 * Walk [off, end) of one window.  0, or the failure the worker must stop
 * with; *reached: every byte of the window below it was handled.  A window
 * once started is finished even when the job is cancelled meanwhile (the
 * waits for a pause or the rate limit end at once then), so that a cancel
 * keeps what the workers were copying: windows are short.
 */
static int copy_window(CopyEngine *c, uint64_t off, uint64_t end, void *buf,
                       uint64_t *reached)
{
    const CopyParams *p = c->p;

    while (off < end) {
        uint64_t advance = 0, written = 0;
        int ret;

        copy_park_point(c);
        ret = p->step(p->opaque, off, end, buf, &advance, &written);
        if (ret < 0) {
            ret = copy_step_failed(c, ret, &off, MAX(advance, 1));
            if (ret < 0) {
                return ret;
            }
            continue;
        }
        g_assert(advance > 0 && advance <= end - off);
        off += advance;
        *reached = off;
        if (written && p->job) {
            job_add_copied(p->job, written);
            job_rate_limit(p->job, written);
        } else if (written && c->limit.speed) {
            copy_offline_limit(c, written);
        }
    }
    return 0;
}

/* The next window for worker slot, or FALSE when none is left. */
static bool copy_take_window(CopyEngine *c, int slot, uint64_t *off,
                             uint64_t *end)
{
    const CopyParams *p = c->p;
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&c->lock);
    uint64_t start = c->next;

    c->inflight[slot] = UINT64_MAX;
    if (c->stop) {
        return false;
    }
    if (p->seek && start < p->end) {
        /* Windows stay aligned, so that a worker owns whole granules. */
        uint64_t s = p->seek(p->opaque, start);

        start = MAX(start, s - (s - p->start) % c->window);
    }
    if (start >= p->end) {
        c->next = p->end;
        return false;
    }
    *off = start;
    *end = MIN(start - (start - p->start) % c->window + c->window, p->end);
    c->next = *end;
    c->inflight[slot] = start;
    return true;
}

typedef struct {
    CopyEngine *c;
    int slot;
} CopyWorker;

static gpointer copy_worker(gpointer opaque)
{
    CopyWorker *w = opaque;
    CopyEngine *c = w->c;
    g_autofree void *buf = g_malloc(MERGE_CHUNK);
    uint64_t off, end;

    while (!copy_park_point(c) && copy_take_window(c, w->slot, &off, &end)) {
        uint64_t reached = off;
        int ret = copy_window(c, off, end, buf, &reached);

        /* Done, the window leaves the in-flight set; failed, what it did
         * not reach stays in flight: the prefix stops there. */
        g_mutex_lock(&c->lock);
        c->inflight[w->slot] = ret < 0 ? reached : UINT64_MAX;
        g_mutex_unlock(&c->lock);
        if (ret < 0) {
            copy_fail(c, ret);
            break;
        }
    }
    g_mutex_lock(&c->lock);
    c->running--;
    g_cond_broadcast(&c->cond);
    g_mutex_unlock(&c->lock);
    return NULL;
}

/* ---- the calling thread ------------------------------------------------- */

/*
 * Every live worker is parked and a pause is asked: take it here, in the
 * job thread, the one place the job enters PAUSED.  c->lock held on entry
 * and on return.
 */
static void copy_take_pause(CopyEngine *c)
{
    bool cancelled;

    g_mutex_unlock(&c->lock);
    cancelled = job_pause_point(c->p->job);
    g_mutex_lock(&c->lock);
    if (cancelled && !c->stop) {
        c->stop = true;
        c->ret = -ECANCELED;
    }
}

/* One tick: write-back and the driver's tick.  c->lock held. */
static void copy_tick(CopyEngine *c)
{
    const CopyParams *p = c->p;
    uint64_t prefix = copy_prefix_locked(c);
    int ret;

    g_mutex_unlock(&c->lock);
    /* Unlimited, keep the disk writing while the workers copy: the
     * checkpoints' and the final flush then wait for little.  A speed limit
     * leaves the disk to the guest instead, writing at the checkpoints. */
    if (p->writeback &&
        (p->job ? !job_is_rate_limited(p->job) : !c->limit.speed)) {
        chain_image_start_writeback(p->writeback);
    }
    ret = p->tick ? p->tick(p->opaque, prefix) : 0;
    if (ret < 0) {
        copy_fail(c, ret);
    }
    g_mutex_lock(&c->lock);
}

/* Wait for the workers, ticking and taking pauses.  c->lock held. */
static void copy_supervise(CopyEngine *c)
{
    const CopyParams *p = c->p;
    gint64 next_tick = g_get_monotonic_time() + COPY_TICK_US;

    while (c->running > 0) {
        g_cond_wait_until(&c->cond, &c->lock, next_tick);
        if (p->job && c->parked == c->running && c->running > 0 &&
            job_pause_requested(p->job)) {
            copy_take_pause(c);
            continue;
        }
        if (c->running > 0 && g_get_monotonic_time() < next_tick) {
            continue;
        }
        next_tick = g_get_monotonic_time() + COPY_TICK_US;
        copy_tick(c);
    }
}

int copy_run(const CopyParams *p, CopyResult *result)
{
    CopyEngine c = { .p = p, .window = p->window ? p->window : MERGE_CHUNK };
    CopyWorker workers[COPY_WORKERS];
    GThread *threads[COPY_WORKERS];
    int nthreads = 0, ret;

    g_mutex_init(&c.lock);
    g_cond_init(&c.cond);
    c.next = p->start;
    ratelimit_init(&c.limit, p->job ? 0 : p->offline_speed);
    for (int i = 0; i < COPY_WORKERS; i++) {
        c.inflight[i] = UINT64_MAX;
        workers[i] = (CopyWorker){ .c = &c, .slot = i };
    }
    g_mutex_lock(&c.lock);
    for (int i = 0; i < COPY_WORKERS; i++) {
        threads[nthreads] = g_thread_try_new("copy", copy_worker,
                                             &workers[i], NULL);
        if (!threads[nthreads]) {
            break;
        }
        c.running++;
        nthreads++;
    }
    if (nthreads == 0) {
        /* No thread to spare: copy in this one (the park point is then
         * the job's pause point; no tick but the last). */
        c.running++;
        c.inline_worker = true;
        g_mutex_unlock(&c.lock);
        copy_worker(&workers[0]);
        g_mutex_lock(&c.lock);
    }
    copy_supervise(&c);
    result->prefix = copy_prefix_locked(&c);
    result->skipped_err = c.skipped_err;
    ret = c.stop ? c.ret : 0;
    g_mutex_unlock(&c.lock);
    for (int i = 0; i < nthreads; i++) {
        g_thread_join(threads[i]);
    }
    if (ret == 0 && p->tick) {
        ret = p->tick(p->opaque, result->prefix);
    }
    g_mutex_clear(&c.lock);
    g_cond_clear(&c.cond);
    return ret;
}
