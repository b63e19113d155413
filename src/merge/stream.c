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
 * later waits for the copy and then overwrites it.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <string.h>

#include "merge-int.h"

typedef struct {
    MergeContext *ctx;
    Chain *chain;
    StreamOptions opts;
    char *words;
    ChainImage *top;      /* the active layer */
    ChainImage *base;     /* kept as backing file; NULL: none */
    char *base_name;
    char **layers;        /* streamed, then dropped */
    uint64_t size;
    bool serializing;     /* serialize_count raised by this job */
    bool finished;
    int skipped_err;      /* errno of the last range on-error=ignore let pass */
} StreamJob;

static StreamJob *stream_job(Job *job)
{
    return job->opaque;
}

/* Index of base in chain, depth when there is none; -1 if gone. */
static int stream_base_index(StreamJob *s)
{
    if (!s->base) {
        return (int)chain_depth(s->chain);
    }
    return merge_layer_index(s->chain, s->base);
}

/*
 * Stream the run at off (at most one chunk).  No lock held on entry.
 * *advance: bytes handled; *written: bytes copied into the active layer.
 */
static int stream_step(StreamJob *s, uint64_t off, void *buf,
                       uint64_t *advance, uint64_t *written)
{
    Chain *chain = s->chain;
    ChainImage *top = s->top;
    ChainRangeLock *lk = NULL;
    uint64_t n = MIN((uint64_t)MERGE_CHUNK, s->size - off), pnum;
    int base_idx, st, owner, ret = 0;

    *written = 0;
    *advance = n;
    chain_topo_rdlock(chain);
    base_idx = stream_base_index(s);
    if (chain_layer(chain, 0) != top || base_idx < 1) {
        ret = -ESTALE;
        goto out;
    }
    st = top->drv->block_status(top, off, n, &pnum);
    if (st < 0) {
        ret = st;
        goto out;
    }
    *advance = pnum;
    if (st != BLOCK_UNALLOCATED || base_idx == 1) {
        goto out;
    }
    n = pnum;
    lk = chain_range_lock(chain, off, n);
    /* A guest write may have come first: look again under the lock. */
    st = top->drv->block_status(top, off, n, &pnum);
    if (st < 0) {
        ret = st;
        goto out;
    }
    *advance = pnum;
    if (st != BLOCK_UNALLOCATED) {
        goto out;
    }
    n = pnum;
    st = chain_status_above(chain, 1, (guint)base_idx, off, n, &pnum, &owner);
    if (st < 0) {
        ret = st;
        goto out;
    }
    *advance = pnum;
    if (st == BLOCK_DATA || st == BLOCK_COMPRESSED) {
        ret = chain_pread_from(chain, 1, off, buf, pnum);
        if (ret == 0) {
            ret = top->drv->pwrite(top, off, buf, pnum);
        }
        if (ret == 0) {
            *written = pnum;
            merge_crash_point("stream-copy");
        }
    } else if (st == BLOCK_ZERO) {
        /* Zeros above base must hide what base holds. */
        ret = top->drv->pwrite_zeroes(top, off, pnum, true);
    }
out:
    if (lk) {
        chain_range_unlock(chain, lk);
    }
    chain_topo_unlock(chain);
    return ret;
}

static void stream_checkpoint(StreamJob *s)
{
    Checkpoint cp = {
        .type = (char *)"stream", .top = s->top->name,
        .base = s->base_name, .options = s->words, .layers = s->layers,
    };

    merge_save_checkpoint(s->chain, &cp, NULL);
}

static int stream_run(Job *job)
{
    StreamJob *s = stream_job(job);
    g_autofree void *buf = g_malloc(MERGE_CHUNK);
    uint64_t off = 0;

    chain_topo_wrlock(s->chain);
    merge_serialize_begin(s->chain, &s->serializing);
    chain_topo_unlock(s->chain);

    job_set_progress(job, 0, s->size);
    while (off < s->size) {
        uint64_t advance, written;
        int ret;

        if (job_pause_point(job)) {
            return -ECANCELED;
        }
        ret = stream_step(s, off, buf, &advance, &written);
        if (ret < 0) {
            g_autofree char *what = g_strdup_printf(
                "stream into %s at offset %" G_GUINT64_FORMAT,
                s->top->name, off);
            int r;

            switch (job_handle_error(job, s->opts.on_error, -ret, what, &r)) {
            case JOB_ERROR_RETRY:
                continue;
            case JOB_ERROR_SKIP:
                /* As QEMU's stream: go on, but end failed so that the
                 * layers holding the skipped range stay in the chain. */
                s->skipped_err = -ret;
                off += advance;
                continue;
            case JOB_ERROR_FAIL:
            default:
                return r;
            }
        }
        off += advance;
        job_set_progress(job, off, s->size);
        if (written) {
            job_add_copied(job, written);
            if (job_rate_limit(job, written)) {
                return -ECANCELED;
            }
        }
    }
    if (s->skipped_err) {
        job_set_error(job, s->skipped_err, "stream into %s skipped ranges "
                      "after errors (on-error=ignore), so the chain keeps "
                      "its layers: %s", s->top->name,
                      g_strerror(s->skipped_err));
        return -s->skipped_err;
    }
    return 0;
}

static int stream_prepare(Job *job)
{
    StreamJob *s = stream_job(job);
    Chain *chain = s->chain;
    const char *dir = image_set_dir(chain->set);
    g_autoptr(GError) err = NULL;
    g_autofree char *ref = NULL;
    int base_idx, ret;

    ret = s->top->drv->flush(s->top);
    if (ret < 0) {
        job_set_error(job, -ret, "cannot flush %s: %s", s->top->name,
                      g_strerror(-ret));
        return ret;
    }
    merge_crash_point("stream-flushed");
    /* The guest goes on writing top: not into the copy's large folios. */
    chain_image_drop_cache(s->top);
    chain_topo_wrlock(chain);
    base_idx = stream_base_index(s);
    if (chain_layer(chain, 0) != s->top || base_idx < 1) {
        chain_topo_unlock(chain);
        job_set_error(job, ESTALE, "the layers of %s changed during the "
                      "stream", chain->name);
        return -ESTALE;
    }
    ref = s->base ? merge_backing_ref(s->top, s->base, true) : NULL;
    if (!s->top->drv->set_backing(s->top, ref,
                                  s->base ? s->base->drv->format_name : NULL,
                                  &err)) {
        chain_topo_unlock(chain);
        job_set_error(job, chainfs_error_errno(err),
                      "cannot change the backing file of %s: %s",
                      s->top->name, err->message);
        return -chainfs_error_errno(err);
    }
    merge_crash_point("stream-rewritten");
    if (base_idx > 1) {
        chain_drop_layers(chain, 1, (guint)base_idx - 1);
    }
    merge_serialize_end(chain, &s->serializing);
    if (!checkpoint_record_dropped(dir, chain->name, s->layers, NULL, &err)) {
        g_message("%s: cannot record the dropped layers: %s", chain->name,
                  err->message);
    } else {
        merge_crash_point("stream-recorded");
    }
    chain_topo_unlock(chain);
    s->finished = true;
    g_message("%s: streamed %u layer%s into %s", chain->name,
              g_strv_length(s->layers),
              g_strv_length(s->layers) == 1 ? "" : "s", s->top->name);
    return 0;
}

static void stream_abort(Job *job)
{
    /* What was streamed stays valid in the active layer. */
    merge_forget_unless_interrupted(job, stream_job(job)->chain);
}

static void stream_clean(Job *job)
{
    StreamJob *s = stream_job(job);

    if (s->serializing) {
        chain_topo_wrlock(s->chain);
        merge_serialize_end(s->chain, &s->serializing);
        chain_topo_unlock(s->chain);
    }
}

static void stream_free(Job *job)
{
    StreamJob *s = stream_job(job);

    stream_options_clear(&s->opts);
    g_free(s->words);
    g_free(s->base_name);
    g_strfreev(s->layers);
    g_free(s);
}

static const JobDriver stream_job_driver = {
    .type = "stream",
    .run = stream_run,
    .prepare = stream_prepare,
    .abort = stream_abort,
    .clean = stream_clean,
    .free = stream_free,
};

Job *stream_job_create(MergeContext *ctx, Chain *chain,
                       const StreamOptions *opts, GError **error)
{
    g_autofree char *id = NULL;
    StreamJob *s = g_new0(StreamJob, 1);
    int base_idx;
    bool ok = true;

    s->ctx = ctx;
    s->chain = chain;
    s->opts = *opts;
    s->opts.base = g_strdup(opts->base);
    s->words = stream_options_format(opts);

    chain_topo_rdlock(chain);
    s->top = chain_layer(chain, 0);
    s->size = s->top->virtual_size;
    if (opts->base) {
        base_idx = chain_find_layer(chain, opts->base);
        if (base_idx < 0) {
            chainfs_set_error(error, ENOENT, "no layer %s in chain %s",
                              opts->base, chain->name);
            ok = false;
        } else if (base_idx == 0) {
            chainfs_set_error(error, EINVAL,
                              "base %s is the active layer of %s: nothing "
                              "to stream", opts->base, chain->name);
            ok = false;
        } else {
            s->base = chain_layer(chain, (guint)base_idx);
            s->base_name = g_strdup(s->base->name);
        }
    } else {
        base_idx = (int)chain_depth(chain);
    }
    if (ok) {
        s->layers = commit_layer_names(chain, 1, (guint)base_idx - 1);
        ok = merge_check_users(chain, s->layers, "streamed layer", error);
    }
    if (ok && (!s->top->writable || !s->top->drv->pwrite)) {
        chainfs_set_error(error, EROFS, "%s is not writable",
                          s->top->name);
        ok = false;
    }
    chain_topo_unlock(chain);
    if (!ok) {
        stream_free(&(Job){ .opaque = s });
        return NULL;
    }
    /* Before the command is acknowledged: a crash from now on resumes the
     * stream at the next mount. */
    stream_checkpoint(s);
    id = merge_context_next_id(ctx, "stream");
    return job_new(&stream_job_driver, id, s->top->name, s->base_name,
                   opts->bandwidth, s);
}
