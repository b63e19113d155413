/*
 * commit.c: intermediate commit (top below the active layer) and the
 * offline commit of chainctl, after QEMU's block/commit.c and libvirt's
 * virDomainBlockCommit.
 *
 * Every run of chain_status_above(top, base) is copied into base: DATA is
 * read as top sees the chain and written into base, ZERO becomes zeroes in
 * base, unallocated is left alone (base already shows it).  The layers
 * from top down to base are never written by guests (they write the
 * active layer), so a copy needs no range lock, and a resumed copy may
 * trust whatever a checkpoint says is in base.
 *
 * Each step holds the topology read lock across its I/O: the layers stay
 * put while a run is copied, and guest requests (readers too) go on.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <string.h>
#include <sys/statvfs.h>

#include "json.h"
#include "merge-int.h"

/* ---- planning ------------------------------------------------------------ */

bool commit_plan(Chain *chain, const CommitOptions *opts, bool offline,
                 CommitPlan *plan, GError **error)
{
    guint depth = chain_depth(chain);
    int top_idx = 0, base_idx;

    memset(plan, 0, sizeof(*plan));
    if (opts->shallow && opts->base) {
        chainfs_set_error(error, EINVAL,
                          "shallow and base= cannot be used together");
        return false;
    }
    if (opts->top) {
        top_idx = chain_find_layer(chain, opts->top);
        if (top_idx < 0) {
            chainfs_set_error(error, ENOENT, "no layer %s in chain %s",
                              opts->top, chain->name);
            return false;
        }
    }
    if (opts->base) {
        base_idx = chain_find_layer(chain, opts->base);
        if (base_idx < 0) {
            chainfs_set_error(error, ENOENT, "no layer %s in chain %s",
                              opts->base, chain->name);
            return false;
        }
    } else if (opts->shallow) {
        base_idx = top_idx + 1;
    } else {
        base_idx = (int)depth - 1;
    }
    if (base_idx >= (int)depth || (!opts->base && top_idx == (int)depth - 1)) {
        chainfs_set_error(error, EINVAL, "%s has no backing file to commit "
                          "into", chain_layer(chain, top_idx)->name);
        return false;
    }
    if (base_idx == top_idx) {
        chainfs_set_error(error, EINVAL,
                          "top and base are the same layer (%s)",
                          chain_layer(chain, top_idx)->name);
        return false;
    }
    if (base_idx < top_idx) {
        chainfs_set_error(error, EINVAL, "base %s is above top %s",
                          chain_layer(chain, base_idx)->name,
                          chain_layer(chain, top_idx)->name);
        return false;
    }
    if (!offline && top_idx == 0 && !opts->active) {
        chainfs_set_error(error, EINVAL,
                          "top %s is the active layer of %s: add the word "
                          "active for an active commit",
                          chain_layer(chain, 0)->name, chain->name);
        return false;
    }
    if (!offline && top_idx > 0 && opts->active) {
        chainfs_set_error(error, EINVAL,
                          "active commit asked but top %s is not the active "
                          "layer of %s", chain_layer(chain, top_idx)->name,
                          chain->name);
        return false;
    }
    plan->top_idx = (guint)top_idx;
    plan->base_idx = (guint)base_idx;
    plan->top = chain_layer(chain, (guint)top_idx);
    plan->base = chain_layer(chain, (guint)base_idx);
    plan->above = top_idx > 0 ? chain_layer(chain, (guint)top_idx - 1) : NULL;
    plan->size = plan->top->virtual_size;
    return true;
}

char **commit_layer_names(Chain *chain, guint first, guint last)
{
    GPtrArray *names = g_ptr_array_new();

    for (guint i = first; i <= last && i < chain_depth(chain); i++) {
        g_ptr_array_add(names, g_strdup(chain_layer(chain, i)->name));
    }
    g_ptr_array_add(names, NULL);
    return (char **)g_ptr_array_free(names, FALSE);
}

/*
 * Bytes base must newly allocate: data runs above base over ranges that
 * base does not hold as data yet, plus room for the metadata that maps
 * them.  Topology lock held.
 */
static int commit_estimate_locked(Chain *chain, const CommitPlan *plan,
                                  uint64_t start, uint64_t *need)
{
    ChainImage *base = plan->base;
    uint64_t total = 0;

    for (uint64_t off = start; off < plan->size;) {
        uint64_t pnum;
        int owner;
        int ret = chain_status_above(chain, plan->top_idx, plan->base_idx, off,
                                     plan->size - off, &pnum, &owner);

        if (ret < 0) {
            return ret;
        }
        if (ret == BLOCK_DATA) {
            /* What base already holds as data is overwritten in place. */
            for (uint64_t o = off; o < off + pnum;) {
                uint64_t n;
                int st;

                if (o >= base->virtual_size) {
                    total += off + pnum - o;
                    break;
                }
                st = base->drv->block_status(base, o,
                                             MIN(off + pnum,
                                                 base->virtual_size) - o, &n);
                if (st < 0) {
                    return st;
                }
                if (st != BLOCK_DATA) {
                    total += n;
                }
                o += n;
            }
        }
        off += pnum;
    }
    /* L2 entries and refcounts: 16 bytes a cluster, rounded up. */
    total += total / MAX(base->cluster_size / 16, 1) + (total ? 65536 : 0);
    *need = total;
    return 0;
}

/* The estimate of plan, and the room on base's filesystem (where base
 * lives as resolved: its path may be a symlink elsewhere).  Topology lock
 * held. */
static bool commit_estimate_plan(Chain *chain, const CommitPlan *plan,
                                 uint64_t *need, uint64_t *avail,
                                 GError **error)
{
    struct statvfs sv;
    int ret = commit_estimate_locked(chain, plan, 0, need);

    if (ret < 0) {
        chainfs_set_error(error, -ret, "cannot estimate the commit: %s",
                          g_strerror(-ret));
        return false;
    }
    if (statvfs(plan->base->dir, &sv) < 0) {
        int err = errno;

        chainfs_set_error(error, err, "cannot stat the filesystem of %s: %s",
                          plan->base->name, g_strerror(err));
        return false;
    }
    *avail = (uint64_t)sv.f_bavail * sv.f_frsize;
    return true;
}

bool commit_check_space(Chain *chain, const CommitPlan *plan,
                        GError **error)
{
    uint64_t need = 0, avail = 0;

    if (!commit_estimate_plan(chain, plan, &need, &avail, error)) {
        return false;
    }
    if (need > avail) {
        chainfs_set_error(error, ENOSPC,
                          "the commit needs %" G_GUINT64_FORMAT " bytes on the "
                          "filesystem of %s, only %" G_GUINT64_FORMAT
                          " are free", need, plan->base->name, avail);
        return false;
    }
    return true;
}

bool merge_commit_estimate(Chain *chain, const CommitOptions *opts,
                           CommitEstimate *out, GError **error)
{
    CommitPlan plan;
    bool ok;

    memset(out, 0, sizeof(*out));
    chain_topo_rdlock(chain);
    ok = commit_plan(chain, opts, true, &plan, error) &&
         commit_estimate_plan(chain, &plan, &out->needed_bytes,
                              &out->available_bytes, error);
    if (ok) {
        out->top = g_strdup(plan.top->name);
        out->base = g_strdup(plan.base->name);
    }
    chain_topo_unlock(chain);
    return ok;
}

char *commit_estimate_json(const CommitEstimate *e)
{
    GString *out = g_string_new("{");

    json_append_member_string(out, "top", e->top);
    json_append_member_string(out, "base", e->base);
    json_append_member_uint(out, "needed_bytes", e->needed_bytes);
    json_append_member_uint(out, "available_bytes", e->available_bytes);
    g_string_append_c(out, '}');
    return g_string_free(out, FALSE);
}

void commit_estimate_clear(CommitEstimate *e)
{
    g_clear_pointer(&e->top, g_free);
    g_clear_pointer(&e->base, g_free);
}

/* ---- copying --------------------------------------------------------------- */

/*
 * Copy the run starting at off (at most one chunk of data) from top's view
 * into base.  On entry no lock held; top and base are layers of chain.
 * On success *advance is the length handled (> 0) and *written the data
 * bytes written.  Negative errno on failure.
 */
static int commit_copy_step(Chain *chain, ChainImage *top, ChainImage *base,
                            uint64_t off, uint64_t end, void *buf,
                            uint64_t *advance, uint64_t *written)
{
    int top_idx, base_idx, owner, ret;
    uint64_t pnum = 0;

    *written = 0;
    *advance = MIN((uint64_t)MERGE_CHUNK, end - off);
    chain_topo_rdlock(chain);
    top_idx = merge_layer_index(chain, top);
    base_idx = merge_layer_index(chain, base);
    if (top_idx < 0 || base_idx <= top_idx) {
        ret = -ESTALE;
        goto out;
    }
    ret = chain_status_above(chain, (guint)top_idx, (guint)base_idx, off,
                             end - off, &pnum, &owner);
    if (ret < 0) {
        goto out;
    }
    switch (ret) {
    case BLOCK_DATA:
    case BLOCK_COMPRESSED:
        pnum = MIN(pnum, (uint64_t)MERGE_CHUNK);
        *advance = pnum;
        ret = chain_pread_from(chain, (guint)top_idx, off, buf, pnum);
        if (ret == 0) {
            ret = base->drv->pwrite(base, off, buf, pnum);
        }
        if (ret == 0) {
            *written = pnum;
        }
        break;
    case BLOCK_ZERO:
        *advance = pnum;
        ret = base->drv->pwrite_zeroes(base, off, pnum, true);
        break;
    default:
        *advance = pnum;
        ret = 0;
        break;
    }
out:
    chain_topo_unlock(chain);
    return ret;
}

/* ---- several requests in flight ----------------------------------------- */

/*
 * The copy runs on COMMIT_WORKERS threads, each taking the next window of
 * COMMIT_WINDOW bytes and copying it, so that reads of top and writes of
 * base overlap.  The windows below `prefix` are all done:
 * that is the offset a checkpoint may record (after a flush of base),
 * whatever order the windows finish in.
 */
#define COMMIT_WORKERS 3
#define COMMIT_WINDOW ((uint64_t)MERGE_CHUNK)
/* How often the copying thread reports progress and starts write-back. */
#define COMMIT_TICK_US (100 * 1000)
/* Wait before retrying a range whose error on-error=ignore let pass. */
#define COMMIT_RETRY_US (G_USEC_PER_SEC / 2)

typedef struct {
    Chain *chain;         /* fixed */
    ChainImage *top;
    ChainImage *base;
    Job *job;             /* NULL offline */
    OnErrorPolicy policy;
    uint64_t start;
    uint64_t size;

    GMutex lock;          /* guards the fields below */
    GCond cond;           /* signalled when a window or a worker ends */
    uint64_t next;        /* start of the next window to hand out */
    guint8 *done;         /* per window from start */
    uint64_t prefix;      /* every byte below it is copied */
    int running;          /* workers still running */
    bool stop;            /* a worker failed or saw cancel */
    int ret;              /* the first failure */
    RateLimit limit;      /* offline (no job to limit the copy): the
                             speed the workers keep to together; speed 0
                             (zeroed) when none */
} CommitCopy;

static void commit_copy_fail(CommitCopy *c, int ret)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&c->lock);

    if (!c->stop) {
        c->stop = true;
        c->ret = ret;
        g_cond_broadcast(&c->cond);
    }
}

/* Offline, the workers keep to c->limit together, as a job's
 * rate limit would; a stop (commit_copy_fail) ends the wait. */
static void commit_copy_offline_limit(CommitCopy *c, uint64_t bytes)
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

/* Copy [off, end) of one window.  0 or what the job must return. */
static int commit_copy_window(CommitCopy *c, uint64_t off, uint64_t end,
                              void *buf)
{
    /* A window once started is finished, even when the job is cancelled
     * meanwhile, so that the windows done stay a prefix. */
    while (off < end) {
        uint64_t advance, written;
        int ret;

        ret = commit_copy_step(c->chain, c->top, c->base, off, end, buf,
                               &advance, &written);
        if (ret < 0) {
            g_autofree char *what = g_strdup_printf(
                "commit of %s at offset %" G_GUINT64_FORMAT " into %s",
                c->top->name, off, c->base->name);
            int r = ret;

            if (!c->job) {
                return ret;
            }
            switch (job_handle_error(c->job, c->policy, -ret, what, &r)) {
            case JOB_ERROR_RETRY:
                continue;
            case JOB_ERROR_SKIP:
                /* As QEMU's commit: an ignored error is retried later,
                 * never skipped, since top leaves the chain at the end
                 * and whatever base lacks then is lost.  The other
                 * workers go on meanwhile.  A latched base (image.h)
                 * fails every retry until a restart: fail now. */
                if (chain_image_io_latched(c->base)) {
                    return r;
                }
                if (job_sleep(c->job, COMMIT_RETRY_US)) {
                    return -ECANCELED;
                }
                continue;
            case JOB_ERROR_FAIL:
            default:
                return r;
            }
        }
        off += advance;
        if (c->job && written) {
            job_add_copied(c->job, written);
            /* Cancelled: the window still ends (see above). */
            job_rate_limit(c->job, written);
        } else if (written && c->limit.speed) {
            commit_copy_offline_limit(c, written);
        }
    }
    return 0;
}

static gpointer commit_copy_worker(gpointer opaque)
{
    CommitCopy *c = opaque;
    g_autofree void *buf = g_malloc(MERGE_CHUNK);

    for (;;) {
        uint64_t off, idx;
        int ret;

        if (c->job && job_pause_point(c->job)) {
            commit_copy_fail(c, -ECANCELED);
            break;
        }
        g_mutex_lock(&c->lock);
        if (c->stop || c->next >= c->size) {
            g_mutex_unlock(&c->lock);
            break;
        }
        off = c->next;
        c->next = MIN(off + COMMIT_WINDOW, c->size);
        g_mutex_unlock(&c->lock);

        ret = commit_copy_window(c, off, MIN(off + COMMIT_WINDOW, c->size),
                                 buf);
        if (ret < 0) {
            commit_copy_fail(c, ret);
            break;
        }
        g_mutex_lock(&c->lock);
        idx = (off - c->start) / COMMIT_WINDOW;
        c->done[idx] = 1;
        while (c->prefix < c->size &&
               c->done[(c->prefix - c->start) / COMMIT_WINDOW]) {
            c->prefix = MIN(c->prefix + COMMIT_WINDOW, c->size);
        }
        g_cond_broadcast(&c->cond);
        g_mutex_unlock(&c->lock);
    }
    g_mutex_lock(&c->lock);
    c->running--;
    g_cond_broadcast(&c->cond);
    g_mutex_unlock(&c->lock);
    return NULL;
}

/*
 * Copy [start, size) on the workers.  tick(opaque, prefix) is called in
 * the calling thread about every 100 ms and at the end with the copied
 * prefix; a negative return stops the copy with that error.  Returns 0,
 * -ECANCELED or the first failure; *prefix_out: the copied prefix.
 */
static int commit_copy_all(CommitCopy *c,
                           int (*tick)(void *opaque, uint64_t prefix),
                           void *opaque, uint64_t *prefix_out)
{
    GThread *workers[COMMIT_WORKERS];
    uint64_t nwin = (c->size - c->start + COMMIT_WINDOW - 1) / COMMIT_WINDOW;
    int nworkers = 0, ret;
    uint64_t prefix;
    gint64 next_tick;

    g_mutex_init(&c->lock);
    g_cond_init(&c->cond);
    c->next = c->start;
    c->prefix = c->start;
    c->done = g_new0(guint8, nwin + 1);
    c->running = 0;
    for (int i = 0; i < COMMIT_WORKERS && (uint64_t)i < MAX(nwin, 1); i++) {
        g_mutex_lock(&c->lock);
        c->running++;
        g_mutex_unlock(&c->lock);
        workers[nworkers] = g_thread_try_new("commit-copy",
                                             commit_copy_worker, c, NULL);
        if (!workers[nworkers]) {
            g_mutex_lock(&c->lock);
            c->running--;
            g_mutex_unlock(&c->lock);
            break;
        }
        nworkers++;
    }
    if (nworkers == 0) {
        /* No thread to spare: copy in this one. */
        g_mutex_lock(&c->lock);
        c->running++;
        g_mutex_unlock(&c->lock);
        commit_copy_worker(c);
    }

    next_tick = g_get_monotonic_time() + COMMIT_TICK_US;
    g_mutex_lock(&c->lock);
    while (c->running > 0) {
        /* Woken at each window's end: only the last worker's matters
         * before the next tick is due. */
        g_cond_wait_until(&c->cond, &c->lock, next_tick);
        if (c->running > 0 && g_get_monotonic_time() < next_tick) {
            continue;
        }
        next_tick = g_get_monotonic_time() + COMMIT_TICK_US;
        prefix = c->prefix;
        g_mutex_unlock(&c->lock);
        /* Unlimited, keep the disk writing while the workers copy: the
         * checkpoints' and the final flush of base then wait for little.
         * A speed limit leaves the disk to the guest instead, writing at
         * the checkpoints only. */
        if (c->job ? !job_is_rate_limited(c->job) : !c->limit.speed) {
            chain_image_start_writeback(c->base);
        }
        ret = tick ? tick(opaque, prefix) : 0;
        if (ret < 0) {
            commit_copy_fail(c, ret);
        }
        g_mutex_lock(&c->lock);
    }
    prefix = c->prefix;
    ret = c->stop ? c->ret : 0;
    g_mutex_unlock(&c->lock);
    for (int i = 0; i < nworkers; i++) {
        g_thread_join(workers[i]);
    }
    if (ret == 0 && tick) {
        ret = tick(opaque, prefix);
    }
    g_free(c->done);
    g_mutex_clear(&c->lock);
    g_cond_clear(&c->cond);
    *prefix_out = prefix;
    return ret;
}

/* Base smaller than top's view: grow it first (topology write lock). */
static bool commit_grow_base(Chain *chain, ChainImage *base, uint64_t size,
                             GError **error)
{
    bool ok = true;

    if (base->virtual_size >= size) {
        return true;
    }
    chain_topo_wrlock(chain);
    if (base->virtual_size < size) {
        ok = base->drv->grow(base, size, error);
        if (!ok) {
            g_prefix_error(error, "cannot grow %s: ", base->name);
        }
    }
    chain_topo_unlock(chain);
    return ok;
}

/* ---- completion ------------------------------------------------------------- */

bool commit_finish(Chain *chain, ChainImage *top, ChainImage *base,
                   bool keep_relative, GPtrArray *reopened, char ***dropped,
                   GError **error)
{
    const char *dir = image_set_dir(chain->set);
    const char *fmt = base->drv->format_name;
    g_auto(GStrv) names = NULL;
    int top_idx, base_idx, first;
    int ret;

    *dropped = NULL;
    ret = base->drv->flush(base);
    if (ret < 0) {
        chainfs_set_error(error, -ret, "cannot flush %s: %s", base->name,
                          g_strerror(-ret));
        return false;
    }
    merge_crash_point("commit-base-flushed");

    chain_topo_wrlock(chain);
    top_idx = merge_layer_index(chain, top);
    base_idx = merge_layer_index(chain, base);
    if (top_idx < 0 || base_idx <= top_idx) {
        chainfs_set_error(error, ESTALE, "the layers of %s changed during "
                          "the commit", chain->name);
        goto fail;
    }
    /* Durable base first (above), then the references, each durable on
     * return of set_backing: a crash leaves a valid chain either way. */
    if (top_idx > 0) {
        ChainImage *above = chain_layer(chain, (guint)top_idx - 1);
        g_autofree char *ref = merge_backing_ref(above, base, keep_relative);

        if (!above->drv->set_backing(above, ref, fmt, error)) {
            g_prefix_error(error, "cannot make %s the backing file of %s: ",
                           base->name, above->name);
            goto fail;
        }
        merge_crash_point("commit-above-rewritten");
        first = top_idx;
    } else {
        first = top_idx + 1;
    }
    if (top_idx + 1 < base_idx) {
        g_autofree char *ref = merge_backing_ref(top, base, keep_relative);
        g_autoptr(GError) err = NULL;

        if (!top->drv->set_backing(top, ref, fmt, &err)) {
            if (top_idx == 0) {
                g_propagate_prefixed_error(error, g_steal_pointer(&err),
                                           "cannot make %s the backing file "
                                           "of %s: ", base->name, top->name);
                goto fail;
            }
            /* top leaves the chain anyway; it just stays as it was. */
            g_message("%s: %s keeps its old backing file: %s", chain->name,
                      top->name, err->message);
        } else {
            merge_crash_point("commit-top-rewritten");
        }
    }
    names = commit_layer_names(chain, (guint)first, (guint)base_idx - 1);
    if (first <= base_idx - 1) {
        for (int i = first; i <= base_idx - 1; i++) {
            g_ptr_array_remove(reopened, chain_layer(chain, (guint)i));
        }
        chain_drop_layers(chain, (guint)first, (guint)base_idx - 1);
    }
    chain_topo_unlock(chain);
    merge_crash_point("commit-dropped");
    /* The commit is done: the chain on disk and in memory is right, and the
     * dropped layers are closed.  Only the record is late; the checkpoint
     * still in the state file lets the next mount write it (see
     * merge_resume_interrupted). */
    {
        g_autoptr(GError) err = NULL;

        if (!checkpoint_record_dropped(dir, chain->name, names, NULL, &err)) {
            g_message("%s: cannot record the dropped layers: %s",
                      chain->name, err->message);
        } else {
            merge_crash_point("commit-recorded");
        }
    }
    *dropped = g_steal_pointer(&names);
    return true;

fail:
    chain_topo_unlock(chain);
    return false;
}

/* ---- the job ------------------------------------------------------------------ */

typedef struct {
    MergeContext *ctx;
    Chain *chain;
    CommitOptions opts;   /* own copy */
    char *words;          /* opts as words, for checkpoints */
    ChainImage *top;
    ChainImage *base;
    char **layers;        /* what the commit drops */
    GPtrArray *reopened;  /* images this job made writable */
    uint64_t start;       /* resumed from */
    uint64_t size;
    uint64_t offset;      /* below it everything was copied (job thread) */
    bool finished;        /* commit_finish done */
} CommitJob;

static CommitJob *commit_job(Job *job)
{
    return job->opaque;
}

/* Record offset (durable in base) in the state file.  Logs a failure. */
static bool commit_save(CommitJob *s, uint64_t offset, bool cancelled,
                        GError **error)
{
    Checkpoint cp = {
        .type = (char *)"commit", .top = s->top->name, .base = s->base->name,
        .options = s->words, .layers = s->layers, .offset = offset,
        .cancelled = cancelled,
    };

    return merge_save_checkpoint(s->chain, &cp, error);
}

/* Flush base and record offset: a checkpoint never claims more than what
 * is durable.  0 or negative errno. */
static int commit_checkpoint(Job *job, uint64_t offset, bool cancelled)
{
    CommitJob *s = commit_job(job);
    g_autoptr(GError) err = NULL;
    int ret = s->base->drv->flush(s->base);

    if (ret < 0) {
        return ret;
    }
    if (!commit_save(s, offset, cancelled, &err)) {
        return -chainfs_error_errno(err);
    }
    merge_crash_point("commit-checkpoint");
    return 0;
}

typedef struct {
    Job *job;
    uint64_t last_ckpt;
    int64_t last_time;
} CommitTick;

/* Progress, and a checkpoint every MERGE_CHECKPOINT_BYTES / _US. */
static int commit_tick(void *opaque, uint64_t prefix)
{
    CommitTick *t = opaque;
    CommitJob *s = commit_job(t->job);
    int ret;

    s->offset = prefix;
    job_set_progress(t->job, prefix, s->size);
    if (prefix > t->last_ckpt &&
        (prefix - t->last_ckpt >= MERGE_CHECKPOINT_BYTES ||
         g_get_monotonic_time() - t->last_time >= MERGE_CHECKPOINT_US)) {
        ret = commit_checkpoint(t->job, prefix, false);
        if (ret < 0) {
            int r;

            if (job_handle_error(t->job, s->opts.on_error, -ret,
                                 "checkpoint", &r) == JOB_ERROR_FAIL) {
                return r;
            }
        }
        t->last_ckpt = prefix;
        t->last_time = g_get_monotonic_time();
    }
    return 0;
}

static int commit_run(Job *job)
{
    CommitJob *s = commit_job(job);
    g_autoptr(GError) err = NULL;
    CommitCopy c = {
        .chain = s->chain, .top = s->top, .base = s->base, .job = job,
        .policy = s->opts.on_error, .start = s->start, .size = s->size,
    };
    CommitTick t = { .job = job };
    uint64_t prefix = s->start;
    int ret;

    if (!commit_grow_base(s->chain, s->base, s->size, &err)) {
        job_set_error(job, chainfs_error_errno(err), "%s", err->message);
        return -chainfs_error_errno(err);
    }
    job_set_progress(job, s->start, s->size);
    ret = commit_checkpoint(job, s->start, false);
    if (ret < 0) {
        job_set_error(job, -ret, "cannot write a checkpoint: %s",
                      g_strerror(-ret));
        return ret;
    }
    t.last_ckpt = s->start;
    t.last_time = g_get_monotonic_time();
    ret = commit_copy_all(&c, commit_tick, &t, &prefix);
    s->offset = prefix;
    return ret;
}

static int commit_prepare(Job *job)
{
    CommitJob *s = commit_job(job);
    g_autoptr(GError) err = NULL;
    g_auto(GStrv) dropped = NULL;

    if (!commit_finish(s->chain, s->top, s->base, s->opts.keep_relative,
                       s->reopened, &dropped, &err)) {
        job_set_error(job, chainfs_error_errno(err), "%s", err->message);
        return -chainfs_error_errno(err);
    }
    s->finished = true;
    g_message("%s: committed %s into %s", s->chain->name, job->top,
              job->base);
    /* top may be closed now; the names stay in the job. */
    s->top = NULL;
    if (s->opts.delete_dropped) {
        merge_unlink_dropped(image_set_dir(s->chain->set), dropped);
    }
    return 0;
}

static void commit_abort(Job *job)
{
    CommitJob *s = commit_job(job);
    int ret;

    if (s->finished || !s->top) {
        return;
    }
    /* Keep the progress for a reissued commit (or the next mount, when a
     * shutdown interrupted it). */
    ret = commit_checkpoint(job, s->offset, !job_is_interrupted(job));
    if (ret < 0) {
        g_message("%s: no checkpoint for the stopped commit: %s",
                  s->chain->name, g_strerror(-ret));
    }
}

static void commit_clean(Job *job)
{
    CommitJob *s = commit_job(job);

    chain_topo_wrlock(s->chain);
    merge_reopen_ro(s->chain, s->reopened);
    chain_topo_unlock(s->chain);
}

static void commit_free(Job *job)
{
    CommitJob *s = commit_job(job);

    commit_options_clear(&s->opts);
    g_free(s->words);
    g_strfreev(s->layers);
    g_ptr_array_free(s->reopened, TRUE);
    g_free(s);
}

static const JobDriver commit_job_driver = {
    .type = "commit",
    .run = commit_run,
    .prepare = commit_prepare,
    .abort = commit_abort,
    .clean = commit_clean,
    .free = commit_free,
};

static void commit_options_copy(CommitOptions *dst, const CommitOptions *src)
{
    *dst = *src;
    dst->top = g_strdup(src->top);
    dst->base = g_strdup(src->base);
}

/*
 * Checks shared with the offline commit: users of base and the dropped
 * layers, room on base's filesystem.  Topology read lock held.
 */
static bool commit_check(Chain *chain, const CommitOptions *opts,
                         const CommitPlan *plan, char **layers,
                         GError **error)
{
    if (!opts->force) {
        const char *base_name[] = { plan->base->name, NULL };

        if (!merge_check_users(chain, (char **)base_name, "base", error) ||
            !merge_check_users(chain, layers, "layer", error)) {
            return false;
        }
    }
    return commit_check_space(chain, plan, error);
}

/*
 * Reopen read-write base, the image above top and top when their backing
 * reference is rewritten.  All or nothing.  Topology write lock held.
 */
static bool commit_reopen(Chain *chain, const CommitPlan *plan,
                          GPtrArray *reopened, GError **error)
{
    if (!merge_reopen_rw(plan->base, reopened, error) ||
        (plan->above && !merge_reopen_rw(plan->above, reopened, error)) ||
        (plan->top_idx + 1 < plan->base_idx &&
         !merge_reopen_rw(plan->top, reopened, error))) {
        merge_reopen_ro(chain, reopened);
        return false;
    }
    return true;
}

Job *commit_job_create(MergeContext *ctx, Chain *chain,
                       const CommitOptions *opts, GError **error)
{
    const char *dir = image_set_dir(chain->set);
    g_autofree char *id = NULL;
    CommitPlan plan;
    CommitJob *s;
    Checkpoint cp;
    bool ok;

    s = g_new0(CommitJob, 1);
    s->ctx = ctx;
    s->chain = chain;
    s->reopened = g_ptr_array_new();
    commit_options_copy(&s->opts, opts);

    /* The checks read metadata: under the read lock, guests go on. */
    chain_topo_rdlock(chain);
    ok = commit_plan(chain, opts, false, &plan, error);
    if (ok) {
        s->layers = commit_layer_names(chain, plan.top_idx,
                                       plan.base_idx - 1);
        ok = commit_check(chain, opts, &plan, s->layers, error);
    }
    chain_topo_unlock(chain);
    if (ok) {
        CommitPlan again;

        chain_topo_wrlock(chain);
        ok = commit_plan(chain, opts, false, &again, error);
        if (ok && (again.top != plan.top || again.base != plan.base)) {
            chainfs_set_error(error, EBUSY, "the layers of %s changed; try "
                              "again", chain->name);
            ok = false;
        }
        ok = ok && commit_reopen(chain, &again, s->reopened, error);
        chain_topo_unlock(chain);
        plan = again;
    }
    if (!ok) {
        commit_free(&(Job){ .opaque = s });
        return NULL;
    }
    s->top = plan.top;
    s->base = plan.base;
    s->size = plan.size;
    /* Name the layers: a resume must not pick other defaults. */
    g_free(s->opts.top);
    s->opts.top = g_strdup(plan.top->name);
    g_free(s->opts.base);
    s->opts.base = g_strdup(plan.base->name);
    s->opts.shallow = false;
    s->words = commit_options_format(&s->opts);

    if (checkpoint_load(dir, chain->name, &cp)) {
        if (strcmp(cp.type, "commit") == 0 &&
            g_strcmp0(cp.top, plan.top->name) == 0 &&
            g_strcmp0(cp.base, plan.base->name) == 0 &&
            cp.offset <= s->size) {
            s->start = cp.offset;
            g_message("%s: the commit of %s into %s resumes at offset %"
                      G_GUINT64_FORMAT, chain->name, cp.top, cp.base,
                      cp.offset);
        }
        checkpoint_clear_fields(&cp);
    }
    s->offset = s->start;
    /* Before the command is acknowledged: a crash from now on resumes the
     * commit at the next mount (start is durable in base already).  The
     * job's first checkpoint fails it if the state file cannot be
     * written. */
    {
        g_autoptr(GError) err = NULL;

        commit_save(s, s->start, false, &err);
    }

    id = merge_context_next_id(ctx, "commit");
    return job_new(&commit_job_driver, id, plan.top->name, plan.base->name,
                   opts->bandwidth, s);
}

/* ---- offline ------------------------------------------------------------------- */

typedef struct {
    bool (*progress)(void *opaque, uint64_t done, uint64_t total);
    void *opaque;
    uint64_t total;
} OfflineTick;

static int offline_tick(void *opaque, uint64_t prefix)
{
    OfflineTick *t = opaque;

    if (t->progress && !t->progress(t->opaque, prefix, t->total)) {
        return -ECANCELED;
    }
    return 0;
}

bool merge_commit_offline(MergeContext *ctx, Chain *chain,
                          const CommitOptions *opts,
                          bool (*progress)(void *opaque, uint64_t done,
                                           uint64_t total),
                          void *opaque, GError **error)
{
    const char *dir = image_set_dir(chain->set);
    g_autoptr(GPtrArray) reopened = g_ptr_array_new();
    g_auto(GStrv) layers = NULL;
    g_auto(GStrv) dropped = NULL;
    CommitPlan plan;
    bool ok;

    chain_topo_rdlock(chain);
    ok = commit_plan(chain, opts, true, &plan, error);
    if (ok) {
        guint first = plan.top_idx > 0 ? plan.top_idx : plan.top_idx + 1;

        layers = commit_layer_names(chain, first, plan.base_idx - 1);
        ok = commit_check(chain, opts, &plan, layers, error);
    }
    chain_topo_unlock(chain);
    if (!ok) {
        return false;
    }

    chain_topo_wrlock(chain);
    ok = commit_reopen(chain, &plan, reopened, error);
    chain_topo_unlock(chain);
    if (!ok) {
        return false;
    }
    ok = commit_grow_base(chain, plan.base, plan.size, error);
    if (!ok) {
        goto out;
    }

    {
        CommitCopy c = {
            .chain = chain, .top = plan.top, .base = plan.base,
            .start = 0, .size = plan.size,
        };
        OfflineTick t = { .progress = progress, .opaque = opaque,
                          .total = plan.size };

        uint64_t prefix;
        int ret;

        ratelimit_init(&c.limit, opts->bandwidth);
        ret = commit_copy_all(&c, offline_tick, &t, &prefix);

        if (ret == -ECANCELED) {
            chainfs_set_error(error, ECANCELED,
                              "commit of %s into %s stopped at offset %"
                              G_GUINT64_FORMAT " of %" G_GUINT64_FORMAT
                              " bytes; no backing file was changed, %s "
                              "holds part of the data", plan.top->name,
                              plan.base->name, prefix, plan.size,
                              plan.base->name);
            ok = false;
            goto out;
        }
        if (ret < 0) {
            chainfs_set_error(error, -ret,
                              "commit of %s into %s failed near offset %"
                              G_GUINT64_FORMAT ": %s", plan.top->name,
                              plan.base->name, prefix, g_strerror(-ret));
            ok = false;
            goto out;
        }
    }
    ok = commit_finish(chain, plan.top, plan.base, opts->keep_relative,
                       reopened, &dropped, error);
    if (ok && opts->delete_dropped) {
        merge_unlink_dropped(dir, dropped);
    }
out:
    chain_topo_wrlock(chain);
    merge_reopen_ro(chain, reopened);
    chain_topo_unlock(chain);
    return ok;
}
