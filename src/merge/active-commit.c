/*
 * active-commit.c: commit of the active layer into base while guests
 * write (after QEMU's block/mirror.c in its commit mode), ending in READY,
 * then pivot (base becomes the active layer) or cancel.
 *
 * WHY IT IS CORRECT, in the order things happen:
 *
 * 1. Under the topology write lock (no guest request in flight) the job
 *    marks dirty every granule allocated above base and installs the
 *    chain's write hook.  From then on every guest write, after it landed
 *    in the active layer and before it is acknowledged, marks its range
 *    dirty.  The export still reads the old chain: base is below and only
 *    shows where nothing above it is allocated, and the job writes base
 *    only where something above IS allocated, so guests never see the
 *    copy.
 *
 * 2. Background copy (tracking mode): for a dirty run, the job clears the
 *    bits FIRST, then reads the chain as the active layer sees it and
 *    writes base.  A guest write that lands before the read is read; one
 *    that lands after it marks the run dirty again (its mark comes after
 *    its write, which comes after our clear), so the run is copied again.
 *    Nothing is lost; base may hold stale bytes only where a bit is set.
 *
 * 3. When copying stops gaining (the dirty set does not shrink from one
 *    pass to the next, or it is small), the job switches, under the
 *    topology write lock, to synchronous mirroring: the chain serialises
 *    (serialize_count), every guest write takes a range lock and its hook
 *    writes the same bytes into base before the write is acknowledged.  The
 *    background copy of a dirty run takes the range lock too, so a copy
 *    and a guest write of one range never interleave.  The dirty set can
 *    now only shrink (a failed mirror write marks dirty instead of
 *    failing the guest), so it empties whatever the guest's speed: READY.
 *
 * 4. In READY base equals the export wherever no bit is set.  Pivot takes
 *    the topology write lock (drains), copies what is still dirty, flushes
 *    base, records in the state file that the export is served from base
 *    and that the old layers are dropped (one atomic rename), and only
 *    then changes the layer list.  A crash before the rename serves the
 *    old chain (complete); after it, base (complete and flushed).
 *
 * 5. Cancel removes the hook under the write lock: the old active layer
 *    stays, base stays in sync as far as it got, and goes back read-only.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <string.h>

#include "merge-int.h"

/* Losing passes before mirroring synchronously. */
#define ACTIVE_STALE_PASSES 1
/* A dirty set this small is finished faster by mirroring. */
#define ACTIVE_MIRROR_THRESHOLD (4ULL * 1024 * 1024)
/* How often a READY job looks for ranges a failed mirror left dirty. */
#define ACTIVE_READY_POLL_US (100 * 1000)

typedef struct {
    MergeContext *ctx;
    Chain *chain;
    CommitOptions opts;
    char *words;
    ChainImage *top;      /* the active layer when the job started */
    ChainImage *base;
    char **layers;        /* [0, base) : dropped at pivot */
    GPtrArray *reopened;
    uint64_t size;
    uint64_t granule;

    GMutex dirty_lock;    /* guards the fields below */
    guint64 *dirty;       /* one bit per granule */
    uint64_t nbits;
    uint64_t ndirty;
    bool mirror;          /* synchronous mirroring (step 3) */

    /* Job thread only (and clean, same thread): */
    bool hooked;          /* write hook installed */
    bool serializing;     /* serialize_count raised */
    bool pivoted;
} ActiveJob;

static ActiveJob *active_job(Job *job)
{
    return job->opaque;
}

/* ---- dirty bitmap (dirty_lock held) ------------------------------------ */

static void dirty_set(ActiveJob *s, uint64_t off, uint64_t bytes)
{
    uint64_t first = off / s->granule;
    uint64_t last = (off + bytes - 1) / s->granule;

    for (uint64_t b = first; b <= last && b < s->nbits; b++) {
        guint64 m = 1ULL << (b % 64);

        if (!(s->dirty[b / 64] & m)) {
            s->dirty[b / 64] |= m;
            s->ndirty++;
        }
    }
}

static void dirty_clear_bits(ActiveJob *s, uint64_t first, uint64_t count)
{
    for (uint64_t b = first; b < first + count && b < s->nbits; b++) {
        guint64 m = 1ULL << (b % 64);

        if (s->dirty[b / 64] & m) {
            s->dirty[b / 64] &= ~m;
            s->ndirty--;
        }
    }
}

/* First set bit at or after from; nbits when none. */
static uint64_t dirty_next(ActiveJob *s, uint64_t from)
{
    for (uint64_t b = from; b < s->nbits;) {
        guint64 w = s->dirty[b / 64] >> (b % 64);

        if (w) {
            return b + (uint64_t)__builtin_ctzll(w);
        }
        b = (b / 64 + 1) * 64;
    }
    return s->nbits;
}

/* Length in bits of the run of set bits at first, at most max. */
static uint64_t dirty_run(ActiveJob *s, uint64_t first, uint64_t max)
{
    uint64_t n = 0;

    while (first + n < s->nbits && n < max &&
           (s->dirty[(first + n) / 64] & (1ULL << ((first + n) % 64)))) {
        n++;
    }
    return n;
}

/* ---- the write hook (guest threads) -------------------------------------- */

/*
 * Called by chain-io after a guest write landed in the active layer, with
 * the topology read lock held (and the range lock while serialising).
 * Never fails the guest write: a failed mirror write leaves the range
 * dirty for the job to copy again.
 */
static int active_write_hook(void *opaque, uint64_t offset, uint64_t bytes,
                             const void *buf)
{
    ActiveJob *s = opaque;
    bool mirror;

    g_mutex_lock(&s->dirty_lock);
    mirror = s->mirror;
    g_mutex_unlock(&s->dirty_lock);
    if (mirror && offset < s->base->virtual_size) {
        uint64_t n = MIN(bytes, s->base->virtual_size - offset);
        int ret = buf ? s->base->drv->pwrite(s->base, offset, buf, n)
                      : s->base->drv->pwrite_zeroes(s->base, offset, n, true);

        if (ret == 0 && n == bytes) {
            merge_crash_point("active-mirror");
            return 0;
        }
    }
    g_mutex_lock(&s->dirty_lock);
    dirty_set(s, offset, bytes);
    g_mutex_unlock(&s->dirty_lock);
    return 0;
}

/* ---- copying ------------------------------------------------------------- */

/*
 * Copy [off, off+len) from the active layer's view into base, run by run.
 * Topology lock held (read or write); the range lock held when the chain
 * serialises.  *written: data bytes written.
 */
static int active_copy_range(ActiveJob *s, uint64_t off, uint64_t len,
                             void *buf, uint64_t *written)
{
    Chain *chain = s->chain;
    int base_idx = merge_layer_index(chain, s->base);
    uint64_t end = off + len;

    *written = 0;
    if (chain_layer(chain, 0) != s->top || base_idx < 1) {
        return -ESTALE;
    }
    while (off < end) {
        uint64_t pnum;
        int owner, ret;
        int st = chain_status_above(chain, 0, (guint)base_idx, off, end - off,
                                    &pnum, &owner);

        if (st < 0) {
            return st;
        }
        if (st == BLOCK_DATA || st == BLOCK_COMPRESSED) {
            ret = chain_pread_from(chain, 0, off, buf, pnum);
            if (ret == 0) {
                ret = s->base->drv->pwrite(s->base, off, buf, pnum);
            }
            if (ret < 0) {
                return ret;
            }
            *written += pnum;
        } else if (st == BLOCK_ZERO) {
            ret = s->base->drv->pwrite_zeroes(s->base, off, pnum, true);
            if (ret < 0) {
                return ret;
            }
        }
        off += pnum;
    }
    return 0;
}

/*
 * Copy the dirty run starting at bit *cursor or later.  Returns 0 and sets
 * *cursor past the run (nbits when no dirty bit is left after it), or a
 * negative errno (the run is dirty again).
 */
static int active_copy_next(ActiveJob *s, uint64_t *cursor, void *buf,
                            uint64_t *written)
{
    Chain *chain = s->chain;
    ChainRangeLock *lk;
    uint64_t first, count, off, len;
    int ret;

    *written = 0;
    chain_topo_rdlock(chain);
    g_mutex_lock(&s->dirty_lock);
    first = dirty_next(s, *cursor);
    g_mutex_unlock(&s->dirty_lock);
    if (first >= s->nbits) {
        *cursor = s->nbits;
        chain_topo_unlock(chain);
        return 0;
    }
    off = first * s->granule;
    len = MIN((uint64_t)MERGE_CHUNK, s->size - off);
    lk = chain_range_lock(chain, off, len);
    g_mutex_lock(&s->dirty_lock);
    count = dirty_run(s, first, MAX(len / s->granule, 1));
    if (count == 0) {
        /* Only this thread clears bits, so the run is still there; stay
         * safe anyway. */
        count = 1;
    }
    /* Clear first, then read: see step 2 above. */
    dirty_clear_bits(s, first, count);
    g_mutex_unlock(&s->dirty_lock);
    /* Within the range already locked. */
    len = MIN(count * s->granule, s->size - off);
    ret = active_copy_range(s, off, len, buf, written);
    if (ret < 0) {
        g_mutex_lock(&s->dirty_lock);
        dirty_set(s, off, len);
        g_mutex_unlock(&s->dirty_lock);
    }
    chain_range_unlock(chain, lk);
    chain_topo_unlock(chain);
    if (ret == 0) {
        merge_crash_point("active-copy");
    }
    *cursor = first + count;
    return ret;
}

/* Switch to synchronous mirroring (step 3).  Drains guest writes. */
static void active_start_mirror(ActiveJob *s)
{
    chain_topo_wrlock(s->chain);
    merge_serialize_begin(s->chain, &s->serializing);
    g_mutex_lock(&s->dirty_lock);
    s->mirror = true;
    g_mutex_unlock(&s->dirty_lock);
    chain_topo_unlock(s->chain);
    merge_crash_point("active-mirror-start");
}

static uint64_t active_ndirty(ActiveJob *s)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&s->dirty_lock);

    return s->ndirty;
}

/* One pass over the dirty set.  0, -ECANCELED or a failure to return. */
static int active_pass(Job *job, void *buf)
{
    ActiveJob *s = active_job(job);
    uint64_t cursor = 0, at_start = active_ndirty(s);
    bool mirror;

    g_mutex_lock(&s->dirty_lock);
    mirror = s->mirror;
    g_mutex_unlock(&s->dirty_lock);

    while (cursor < s->nbits) {
        uint64_t written, before = cursor;
        int ret;

        if (job_pause_point(job)) {
            return -ECANCELED;
        }
        ret = active_copy_next(s, &cursor, buf, &written);
        if (ret < 0) {
            g_autofree char *what = g_strdup_printf(
                "active commit of %s at offset %" G_GUINT64_FORMAT " into %s",
                s->top->name, before * s->granule, s->base->name);
            int r;

            switch (job_handle_error(job, s->opts.on_error, -ret, what, &r)) {
            case JOB_ERROR_RETRY:
                cursor = before;
                continue;
            case JOB_ERROR_SKIP:
                /* Stays dirty: a later pass tries it again, unless base
                 * is latched (image.h): every pass would fail. */
                if (chain_image_io_latched(s->base)) {
                    return r;
                }
                continue;
            case JOB_ERROR_FAIL:
            default:
                return r;
            }
        }
        {
            uint64_t nd = active_ndirty(s);

            job_set_progress(job, s->size - MIN(nd * s->granule, s->size),
                             s->size);
            /* The guest dirties faster than we copy: stop losing now
             * rather than at the end of the pass (and before a wait for
             * the rate limit, during which it would dirty more). */
            if (!mirror && nd > at_start) {
                active_start_mirror(s);
                mirror = true;
            }
        }
        if (written) {
            job_add_copied(job, written);
            if (job_rate_limit(job, written)) {
                return -ECANCELED;
            }
        }
    }
    return 0;
}

static int active_run(Job *job)
{
    ActiveJob *s = active_job(job);
    Chain *chain = s->chain;
    g_autofree void *buf = g_malloc(MERGE_CHUNK);
    g_autoptr(GError) err = NULL;
    uint64_t prev;
    int stale = 0, base_idx;

    /* Base first grows to the export's size (topology write lock). */
    chain_topo_wrlock(chain);
    if (s->base->virtual_size < s->size &&
        !s->base->drv->grow(s->base, s->size, &err)) {
        chain_topo_unlock(chain);
        job_set_error(job, chainfs_error_errno(err), "cannot grow %s: %s",
                      s->base->name, err->message);
        return -chainfs_error_errno(err);
    }
    /* Step 1: what to copy, and the hook, with no write in flight. */
    base_idx = merge_layer_index(chain, s->base);
    for (uint64_t off = 0; base_idx > 0 && off < s->size;) {
        uint64_t pnum;
        int owner;
        int st = chain_status_above(chain, 0, (guint)base_idx, off,
                                    s->size - off, &pnum, &owner);

        if (st < 0) {
            chain_topo_unlock(chain);
            job_set_error(job, -st, "cannot read the allocation of %s: %s",
                          s->top->name, g_strerror(-st));
            return st;
        }
        if (st != BLOCK_UNALLOCATED) {
            dirty_set(s, off, pnum);
        }
        off += pnum;
    }
    chain->write_hook = active_write_hook;
    chain->write_hook_opaque = s;
    s->hooked = true;
    chain_topo_unlock(chain);
    job_set_progress(job, 0, s->size);

    /* Steps 2 and 3. */
    for (;;) {
        uint64_t nd;
        bool mirror;
        int ret;

        prev = active_ndirty(s);
        ret = active_pass(job, buf);

        if (ret < 0) {
            return ret;
        }
        nd = active_ndirty(s);
        g_mutex_lock(&s->dirty_lock);
        mirror = s->mirror;
        g_mutex_unlock(&s->dirty_lock);
        if (mirror && nd == 0) {
            break;
        }
        if (!mirror) {
            /* A pass that did not halve the dirty set is losing. */
            stale = nd * 2 > prev ? stale + 1 : 0;
            if (nd == 0 || stale >= ACTIVE_STALE_PASSES ||
                nd * s->granule <= ACTIVE_MIRROR_THRESHOLD) {
                active_start_mirror(s);
            }
        }
    }
    job_set_progress(job, s->size, s->size);
    /* From here on the guest writes both images (base alone after the
     * pivot): leave them without the copy's large folios.  base is
     * flushed first so that its copied pages are clean and can go. */
    if (s->base->drv->flush(s->base) == 0) {
        chain_image_drop_cache(s->base);
    }
    chain_image_drop_cache(s->top);
    job_transition_to_ready(job);
    g_message("%s: active commit of %s into %s is ready", chain->name,
              s->top->name, s->base->name);
    merge_crash_point("active-ready");

    /* Step 4 waits for pivot; meanwhile copy what a failed mirror left. */
    for (;;) {
        int ret = job_wait_complete(job, ACTIVE_READY_POLL_US);

        if (ret != -ETIMEDOUT) {
            return ret;
        }
        if (active_ndirty(s) > 0) {
            ret = active_pass(job, buf);
            if (ret < 0) {
                return ret;
            }
        }
    }
}

/* Guest writes stop reaching base and stop serialising.  Topology write
 * lock held. */
static void active_unhook(ActiveJob *s)
{
    if (s->hooked) {
        s->chain->write_hook = NULL;
        s->chain->write_hook_opaque = NULL;
        s->hooked = false;
    }
    merge_serialize_end(s->chain, &s->serializing);
}

/* Pivot (step 4). */
static int active_prepare(Job *job)
{
    ActiveJob *s = active_job(job);
    Chain *chain = s->chain;
    const char *dir = image_set_dir(chain->set);
    g_autofree void *buf = g_malloc(MERGE_CHUNK);
    g_autoptr(GError) err = NULL;
    int base_idx, ret;

    chain_topo_wrlock(chain);
    /* Drained: finish what is still dirty, no range lock needed. */
    for (;;) {
        uint64_t first, count, written, off;

        g_mutex_lock(&s->dirty_lock);
        first = dirty_next(s, 0);
        count = first < s->nbits ?
                dirty_run(s, first, MERGE_CHUNK / s->granule + 1) : 0;
        dirty_clear_bits(s, first, count);
        g_mutex_unlock(&s->dirty_lock);
        if (count == 0) {
            break;
        }
        off = first * s->granule;
        ret = active_copy_range(s, off, MIN(count * s->granule,
                                            s->size - off), buf, &written);
        if (ret < 0) {
            g_mutex_lock(&s->dirty_lock);
            dirty_set(s, off, count * s->granule);
            g_mutex_unlock(&s->dirty_lock);
            chain_topo_unlock(chain);
            job_set_error(job, -ret, "pivot of %s: cannot copy offset %"
                          G_GUINT64_FORMAT " into %s: %s", chain->name, off,
                          s->base->name, g_strerror(-ret));
            return ret;
        }
    }
    ret = s->base->drv->flush(s->base);
    if (ret < 0) {
        chain_topo_unlock(chain);
        job_set_error(job, -ret, "pivot of %s: cannot flush %s: %s",
                      chain->name, s->base->name, g_strerror(-ret));
        return ret;
    }
    base_idx = merge_layer_index(chain, s->base);
    if (base_idx < 1 || chain_layer(chain, 0) != s->top) {
        chain_topo_unlock(chain);
        job_set_error(job, ESTALE, "the layers of %s changed during the "
                      "commit", chain->name);
        return -ESTALE;
    }
    merge_crash_point("active-pivot-flushed");
    /* The one atomic step: from here on the export is served from base. */
    if (!checkpoint_record_dropped(dir, chain->name, s->layers,
                                   s->base->name, &err)) {
        chain_topo_unlock(chain);
        job_set_error(job, chainfs_error_errno(err), "pivot of %s: %s",
                      chain->name, err->message);
        return -chainfs_error_errno(err);
    }
    merge_crash_point("active-pivot-recorded");
    active_unhook(s);
    for (int i = 0; i < base_idx; i++) {
        g_ptr_array_remove(s->reopened, chain_layer(chain, (guint)i));
    }
    chain_drop_layers(chain, 0, (guint)base_idx - 1);
    s->pivoted = true;
    chain_topo_unlock(chain);
    merge_crash_point("active-dropped");
    g_message("%s: pivoted to %s", chain->name, s->base->name);
    if (s->opts.delete_dropped) {
        merge_unlink_dropped(dir, s->layers);
    }
    return 0;
}

static void active_abort(Job *job)
{
    merge_forget_unless_interrupted(job, active_job(job)->chain);
}

/* Step 5, and the end of every active commit. */
static void active_clean(Job *job)
{
    ActiveJob *s = active_job(job);
    Chain *chain = s->chain;

    chain_topo_wrlock(chain);
    active_unhook(s);
    merge_reopen_ro(chain, s->reopened);
    chain_topo_unlock(chain);
}

static void active_free(Job *job)
{
    ActiveJob *s = active_job(job);

    commit_options_clear(&s->opts);
    g_free(s->words);
    g_strfreev(s->layers);
    g_ptr_array_free(s->reopened, TRUE);
    g_free(s->dirty);
    g_mutex_clear(&s->dirty_lock);
    g_free(s);
}

static const JobDriver active_job_driver = {
    .type = "active-commit",
    .run = active_run,
    .prepare = active_prepare,
    .abort = active_abort,
    .clean = active_clean,
    .free = active_free,
};

Job *active_commit_job_create(MergeContext *ctx, Chain *chain,
                              const CommitOptions *opts, GError **error)
{
    g_autofree char *id = NULL;
    ActiveJob *s = g_new0(ActiveJob, 1);
    CommitPlan plan;
    Checkpoint cp = { 0 };
    bool ok;

    s->ctx = ctx;
    s->chain = chain;
    s->reopened = g_ptr_array_new();
    g_mutex_init(&s->dirty_lock);
    s->opts = *opts;
    s->opts.top = g_strdup(opts->top);
    s->opts.base = g_strdup(opts->base);

    /* The checks read metadata: under the read lock, guests go on. */
    chain_topo_rdlock(chain);
    ok = commit_plan(chain, opts, false, &plan, error);
    if (ok) {
        const char *base_name[] = { plan.base->name, NULL };

        s->layers = commit_layer_names(chain, 0, plan.base_idx - 1);
        if (!opts->force) {
            ok = merge_check_users(chain, (char **)base_name, "base", error) &&
                 merge_check_users(chain, s->layers, "layer", error);
        }
        ok = ok && commit_check_space(chain, &plan, error);
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
        ok = ok && merge_reopen_rw(again.base, s->reopened, error);
        chain_topo_unlock(chain);
    }
    if (!ok) {
        active_free(&(Job){ .opaque = s });
        return NULL;
    }
    s->top = plan.top;
    s->base = plan.base;
    s->size = plan.size;
    s->granule = MAX((uint64_t)plan.base->cluster_size, 65536);
    s->nbits = (s->size + s->granule - 1) / s->granule;
    s->dirty = g_new0(guint64, s->nbits / 64 + 1);
    g_free(s->opts.top);
    s->opts.top = g_strdup(plan.top->name);
    g_free(s->opts.base);
    s->opts.base = g_strdup(plan.base->name);
    s->opts.shallow = false;
    s->words = commit_options_format(&s->opts);

    /* For the next mount, should the daemon die: starts over (base holds
     * nothing the export shows until pivot, so that is always safe). */
    cp.type = (char *)"active-commit";
    cp.top = plan.top->name;
    cp.base = plan.base->name;
    cp.options = s->words;
    cp.layers = s->layers;
    merge_save_checkpoint(chain, &cp, NULL);
    id = merge_context_next_id(ctx, "active-commit");
    return job_new(&active_job_driver, id, plan.top->name, plan.base->name,
                   opts->bandwidth, s);
}
