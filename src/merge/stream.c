/*
 * stream.c: stream (after QEMU's block/stream.c): copy into the ACTIVE
 * layer what it reads from the layers below it, down to base (exclusive),
 * wherever the active layer has nothing allocated; then the active layer
 * gets base as its backing file (or none) and the streamed layers leave
 * the chain.
 *
 * Guests write the same layer the job copies into.  A copy must never
 * overwrite a guest write with older data, so while the job runs the
 * chain serialises (Chain.serialize_count): guest writes and each copy take
 * chain_range_lock on their range, and the copy checks again, under its
 * range lock, that the active layer still has nothing there.  A guest write
 * that came first is then seen as allocated and skipped; one that comes
 * later waits for the copy and then overwrites it.  The copy runs on the
 * copy engine's workers (copy.c), each step under its own range lock.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <string.h>

#include "merge-int.h"

typedef struct {
    MergeJob common;
    bool serializing;     /* serialize_count raised by this job */
} StreamJob;

static StreamJob *stream_job(Job *job)
{
    return container_of(merge_job(job), StreamJob, common);
}

/* Is top still the active layer?  *base_idx: base's index (the depth when
 * there is none).  Topology lock held. */
static bool stream_layers(MergeJob *mj, guint *base_idx)
{
    guint top_idx;

    return merge_job_layers(mj, &top_idx, base_idx) && top_idx == 0 &&
           *base_idx >= 1;
}

/*
 * The part of the engine's step under the range lock of [off, off + n):
 * look again whether a guest write came first, then copy what the layers
 * below top (down to base) hold.  Topology lock held.
 */
static int stream_copy_locked(MergeJob *mj, guint base_idx, uint64_t off,
                              uint64_t n, void *buf, uint64_t *advance,
                              uint64_t *written)
{
    ChainImage *top = mj->top;
    uint64_t pnum;
    int owner, st, ret;

    st = top->drv->block_status(top, off, n, &pnum);
    if (st < 0) {
        return st;
    }
    *advance = pnum;
    if (st != BLOCK_UNALLOCATED) {
        return 0;
    }
    st = chain_status_above(mj->chain, 1, base_idx, off, pnum, &pnum, &owner);
    if (st < 0) {
        return st;
    }
    if (st == BLOCK_DATA || st == BLOCK_COMPRESSED) {
        pnum = MIN(pnum, (uint64_t)MERGE_CHUNK);
    }
    *advance = pnum;
    ret = copy_status_run(mj->chain, 1, top, st, off, pnum, buf, written);
    if (ret == 0 && *written) {
        merge_crash_point("stream-copy");
    }
    return ret;
}

/* The engine's step: the run at off, where the active layer has nothing. */
static int stream_step(void *opaque, uint64_t off, uint64_t end, void *buf,
                       uint64_t *advance, uint64_t *written)
{
    MergeJob *mj = &((StreamJob *)opaque)->common;
    Chain *chain = mj->chain;
    uint64_t n = MIN((uint64_t)MERGE_CHUNK, end - off), pnum;
    ChainRangeLock *lk;
    guint base_idx;
    int st, ret = 0;

    *written = 0;
    *advance = n;
    chain_topo_rdlock(chain);
    if (!stream_layers(mj, &base_idx)) {
        chain_topo_unlock(chain);
        return -ESTALE;
    }
    st = mj->top->drv->block_status(mj->top, off, n, &pnum);
    if (st >= 0) {
        *advance = pnum;
    }
    if (st == BLOCK_UNALLOCATED && base_idx > 1) {
        lk = chain_range_lock(chain, off, pnum);
        ret = stream_copy_locked(mj, base_idx, off, pnum, buf, advance,
                                 written);
        chain_range_unlock(chain, lk);
    } else if (st < 0) {
        ret = st;
    }
    chain_topo_unlock(chain);
    return ret;
}

static int stream_tick(void *opaque, uint64_t prefix)
{
    MergeJob *mj = &((StreamJob *)opaque)->common;

    job_set_progress(&mj->job, prefix, mj->size);
    return 0;
}

static int stream_run(Job *job)
{
    StreamJob *s = stream_job(job);
    MergeJob *mj = &s->common;
    g_autofree char *what = g_strdup_printf("stream into %s", mj->top->name);
    CopyParams p = {
        .job = job, .step = stream_step, .tick = stream_tick, .opaque = s,
        .start = 0, .end = mj->size, .policy = mj->on_error,
        .what = what, .what_into = "", .dst = mj->top,
        /* As QEMU's stream: go on, but end failed (below) so that the
         * layers holding the skipped range stay in the chain. */
        .skip_advances = true,
    };
    CopyResult r = { 0 };
    int ret;

    chain_topo_wrlock(mj->chain);
    merge_serialize_begin(mj->chain, &s->serializing);
    chain_topo_unlock(mj->chain);

    job_set_progress(job, 0, mj->size);
    ret = copy_run(&p, &r);
    if (ret == 0 && r.skipped_err) {
        return merge_job_fail(mj, -r.skipped_err, "stream into %s skipped "
                              "ranges after errors (on-error=ignore), so the "
                              "chain keeps its layers: %s", mj->top->name,
                              g_strerror(r.skipped_err));
    }
    return ret;
}

static int stream_prepare(Job *job)
{
    StreamJob *s = stream_job(job);
    MergeJob *mj = &s->common;
    Chain *chain = mj->chain;
    const char *dir = image_set_dir(chain->set);
    g_autoptr(GError) err = NULL;
    g_autofree char *ref = NULL;
    guint base_idx;
    int ret;

    ret = mj->top->drv->flush(mj->top);
    if (ret < 0) {
        return merge_job_fail(mj, ret, "cannot flush %s: %s", mj->top->name,
                              g_strerror(-ret));
    }
    merge_crash_point("stream-flushed");
    /* The guest goes on writing top: not into the copy's large folios. */
    chain_image_drop_cache(mj->top);
    chain_topo_wrlock(chain);
    if (!stream_layers(mj, &base_idx)) {
        chain_topo_unlock(chain);
        return merge_job_fail(mj, -ESTALE, "the layers of %s changed during "
                              "the stream", chain->name);
    }
    ref = mj->base ? merge_backing_ref(mj->top, mj->base, true) : NULL;
    if (!mj->top->drv->set_backing(mj->top, ref,
                                   mj->base ? mj->base->drv->format_name
                                            : NULL, &err)) {
        chain_topo_unlock(chain);
        return merge_job_fail(mj, -chainfs_error_errno(err),
                              "cannot change the backing file of %s: %s",
                              mj->top->name, err->message);
    }
    merge_crash_point("stream-rewritten");
    if (base_idx > 1) {
        chain_drop_layers(chain, 1, base_idx - 1);
    }
    merge_serialize_end(chain, &s->serializing);
    if (!checkpoint_record_dropped(dir, chain->name, mj->layers, NULL,
                                   &err)) {
        g_message("%s: cannot record the dropped layers: %s", chain->name,
                  err->message);
    } else {
        merge_crash_point("stream-recorded");
    }
    chain_topo_unlock(chain);
    g_message("%s: streamed %u layer%s into %s", chain->name,
              g_strv_length(mj->layers),
              g_strv_length(mj->layers) == 1 ? "" : "s", mj->top->name);
    return 0;
}

static void stream_abort(Job *job)
{
    /* What was streamed stays valid in the active layer. */
    merge_job_stopped(merge_job(job));
}

static void stream_clean(Job *job)
{
    StreamJob *s = stream_job(job);

    if (s->serializing) {
        chain_topo_wrlock(s->common.chain);
        merge_serialize_end(s->common.chain, &s->serializing);
        chain_topo_unlock(s->common.chain);
    }
}

static void stream_free(Job *job)
{
    merge_job_free_common(merge_job(job));
}

static const JobDriver stream_job_driver = {
    .type = "stream",
    .instance_size = sizeof(StreamJob),
    .run = stream_run,
    .prepare = stream_prepare,
    .abort = stream_abort,
    .clean = stream_clean,
    .free = stream_free,
};

/* top: the active layer; base: the named one, or none (the depth). */
static bool stream_plan(Chain *chain, const void *opts, MergePlan *plan,
                        GError **error)
{
    const StreamOptions *o = opts;
    int base_idx = (int)chain_depth(chain);

    memset(plan, 0, sizeof(*plan));
    if (o->base) {
        base_idx = chain_find_layer(chain, o->base);
        if (base_idx < 0) {
            chainfs_set_error(error, ENOENT, "no layer %s in chain %s",
                              o->base, chain->name);
            return false;
        }
        if (base_idx == 0) {
            chainfs_set_error(error, EINVAL, "base %s is the active layer of "
                              "%s: nothing to stream", o->base, chain->name);
            return false;
        }
        plan->base = chain_layer(chain, (guint)base_idx);
    }
    plan->top = chain_layer(chain, 0);
    plan->top_idx = 0;
    plan->base_idx = (guint)base_idx;
    plan->size = plan->top->virtual_size;
    return true;
}

/* The streamed layers are dropped: nobody else may use them (no force). */
static bool stream_check(Chain *chain, const void *opts,
                         const MergePlan *plan, char **layers, GError **error)
{
    if (!merge_check_users(chain, layers, "streamed layer", false, error)) {
        return false;
    }
    if (!plan->top->writable || !plan->top->drv->pwrite) {
        chainfs_set_error(error, EROFS, "%s is not writable",
                          plan->top->name);
        return false;
    }
    return true;
}

static char *stream_words(MergeJob *mj, const void *opts)
{
    const StreamOptions *o = opts;

    mj->on_error = o->on_error;
    return stream_options_format(o);
}

const MergeJobKind stream_job_kind = {
    .driver = &stream_job_driver,
    .keeps_top = true,
    .plan = stream_plan,
    .check = stream_check,
    .words = stream_words,
};
