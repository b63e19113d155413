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
 * put while a run is copied, and guest requests (readers too) go on.  The
 * copy itself is the engine's (copy.c), online and offline alike.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <string.h>
#include <sys/statvfs.h>

#include "json.h"
#include "merge-int.h"

/* ---- planning ------------------------------------------------------------ */

bool commit_plan(Chain *chain, const CommitOptions *opts, bool offline,
                 MergePlan *plan, GError **error)
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
static int commit_estimate_locked(Chain *chain, const MergePlan *plan,
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
static bool commit_estimate_plan(Chain *chain, const MergePlan *plan,
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

bool commit_check_space(Chain *chain, const MergePlan *plan,
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
    MergePlan plan;
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


/*
 * Where the layers that will see base in top's place stop looking past
 * top's end: the smallest size of the layers above top, or base's own end
 * when base becomes the active layer (active commit).  Topology lock held.
 */
static uint64_t commit_exposed_end(Chain *chain, int top_idx, bool active,
                                   ChainImage *base)
{
    uint64_t end = base->virtual_size;

    if (top_idx == 0 && !active) {
        /* Offline commit of the top: it stays above base and its end
         * hides base's. */
        return 0;
    }
    for (int i = 0; i < top_idx; i++) {
        end = MIN(end, chain_layer(chain, (guint)i)->virtual_size);
    }
    return end;
}

/*
 * The zeros past top's end go into base and are flushed here, before the
 * copy starts, and so before any backing reference names base in top's
 * place (commit_finish flushes base once more and only then rewrites;
 * the pivot likewise).  Until that rewrite the layers above top read
 * zeros past top's end without consulting base, so a crash, cancel or
 * failure at any point leaves every export reading as before.  The range
 * zeroed, [top's end, ...), is disjoint from the range the copy fills
 * ([0, top's end)), so a resumed commit, which comes here again, writes
 * only zeros over zeros and never undoes copied data.  Guests cannot
 * write there either: the export ends at the active layer's size, and a
 * resize is refused while a job runs.
 */
bool commit_prepare_base_locked(Chain *chain, ChainImage *top,
                                ChainImage *base, uint64_t size, bool active,
                                GError **error)
{
    int top_idx = merge_layer_index(chain, top);
    uint64_t top_end = top->virtual_size;
    uint64_t exposed_end;
    int ret;

    if (top_idx < 0 || merge_layer_index(chain, base) <= top_idx) {
        chainfs_set_error(error, ESTALE, "the layers of %s changed",
                          chain->name);
        return false;
    }
    if (base->virtual_size < size) {
        if (!base->drv->grow(base, size, error)) {
            g_prefix_error(error, "cannot grow %s: ", base->name);
            return false;
        }
        /* Built for base's old size; the partial cluster at its old end
         * may have moved into base. */
        chain_map_invalidate(chain);
    }
    exposed_end = commit_exposed_end(chain, top_idx, active, base);
    if (exposed_end <= top_end) {
        return true;
    }
    ret = chain_image_zero_exposed(base, top_end, exposed_end);
    if (ret == 0) {
        ret = base->drv->flush(base);
    }
    if (ret < 0) {
        chainfs_set_error(error, -ret, "cannot zero %s past the end of %s "
                          "(%" G_GUINT64_FORMAT " to %" G_GUINT64_FORMAT
                          " bytes): %s", base->name, top->name, top_end,
                          exposed_end, g_strerror(-ret));
        return false;
    }
    return true;
}

/* commit_prepare_base_locked under the topology write lock, which drains
 * guest I/O: taken only when base must grow or be zeroed (asked first
 * under the read lock), so that most commits never stall the guest. */
static bool commit_prepare_base(Chain *chain, ChainImage *top,
                                ChainImage *base, uint64_t size,
                                GError **error)
{
    bool ok;
    int top_idx;

    chain_topo_rdlock(chain);
    top_idx = merge_layer_index(chain, top);
    ok = top_idx >= 0 && base->virtual_size >= size &&
         commit_exposed_end(chain, top_idx, false, base) <= top->virtual_size;
    chain_topo_unlock(chain);
    if (ok) {
        return true;
    }
    chain_topo_wrlock(chain);
    ok = commit_prepare_base_locked(chain, top, base, size, false, error);
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
    MergeJob common;
    uint64_t start;       /* resumed from */
    bool finished;        /* commit_finish done */
    uint64_t last_ckpt;   /* job thread: the last checkpoint's offset */
    int64_t last_time;    /* and its time */
} CommitJob;

static CommitJob *commit_job(Job *job)
{
    return container_of(merge_job(job), CommitJob, common);
}

/* Flush base and record offset: a checkpoint never claims more than what
 * is durable.  0 or negative errno. */
static int commit_checkpoint(CommitJob *s, uint64_t offset)
{
    MergeJob *mj = &s->common;
    g_autoptr(GError) err = NULL;
    int ret = mj->base->drv->flush(mj->base);

    if (ret < 0) {
        return ret;
    }
    if (!merge_job_checkpoint(mj, offset, false, &err)) {
        return -chainfs_error_errno(err);
    }
    merge_crash_point("commit-checkpoint");
    return 0;
}

/* The engine's step: the run at off as top sees the chain, into base.  The
 * layers from top down to base are never written by guests (they write
 * the active layer), so no range lock.  The topology read lock keeps the
 * layers put across the step's I/O; guest requests go on. */
static int commit_step(void *opaque, uint64_t off, uint64_t end, void *buf,
                       uint64_t *advance, uint64_t *written)
{
    MergeJob *mj = &((CommitJob *)opaque)->common;
    guint top_idx, base_idx;
    int ret;

    *advance = end - off;
    *written = 0;
    chain_topo_rdlock(mj->chain);
    ret = merge_job_layers(mj, &top_idx, &base_idx) ?
          copy_above(mj->chain, top_idx, base_idx, mj->base, off, end, buf,
                     advance, written) : -ESTALE;
    chain_topo_unlock(mj->chain);
    return ret;
}

/* Progress, and a checkpoint every MERGE_CHECKPOINT_BYTES / _US. */
static int commit_tick(void *opaque, uint64_t prefix)
{
    CommitJob *s = opaque;
    MergeJob *mj = &s->common;
    int ret;

    mj->offset = prefix;
    job_set_progress(&mj->job, prefix, mj->size);
    if (prefix > s->last_ckpt &&
        (prefix - s->last_ckpt >= MERGE_CHECKPOINT_BYTES ||
         g_get_monotonic_time() - s->last_time >= MERGE_CHECKPOINT_US)) {
        ret = commit_checkpoint(s, prefix);
        if (ret < 0) {
            int r;

            if (job_handle_error(&mj->job, mj->on_error, -ret, "checkpoint",
                                 &r) == JOB_ERROR_FAIL) {
                return r;
            }
        }
        s->last_ckpt = prefix;
        s->last_time = g_get_monotonic_time();
    }
    return 0;
}

static int commit_run(Job *job)
{
    CommitJob *s = commit_job(job);
    MergeJob *mj = &s->common;
    g_autoptr(GError) err = NULL;
    g_autofree char *what = g_strdup_printf("commit of %s", mj->top->name);
    g_autofree char *into = g_strdup_printf(" into %s", mj->base->name);
    CopyParams p = {
        .job = job, .step = commit_step, .tick = commit_tick, .opaque = s,
        .start = s->start, .end = mj->size, .policy = mj->on_error,
        .what = what, .what_into = into, .writeback = mj->base,
        .dst = mj->base,
    };
    CopyResult r = { .prefix = s->start };
    int ret;

    if (!commit_prepare_base(mj->chain, mj->top, mj->base, mj->size, &err)) {
        return merge_job_fail(mj, -chainfs_error_errno(err), "%s",
                              err->message);
    }
    job_set_progress(job, s->start, mj->size);
    ret = commit_checkpoint(s, s->start);
    if (ret < 0) {
        return merge_job_fail(mj, ret, "cannot write a checkpoint: %s",
                              g_strerror(-ret));
    }
    s->last_ckpt = s->start;
    s->last_time = g_get_monotonic_time();
    ret = copy_run(&p, &r);
    mj->offset = r.prefix;
    return ret;
}

static int commit_prepare(Job *job)
{
    CommitJob *s = commit_job(job);
    MergeJob *mj = &s->common;
    g_autoptr(GError) err = NULL;
    g_auto(GStrv) dropped = NULL;

    if (!commit_finish(mj->chain, mj->top, mj->base, mj->keep_relative,
                       mj->reopened, &dropped, &err)) {
        return merge_job_fail(mj, -chainfs_error_errno(err), "%s",
                              err->message);
    }
    s->finished = true;
    g_message("%s: committed %s into %s", mj->chain->name, job->top,
              job->base);
    /* top may be closed now; the names stay in the job. */
    mj->top = NULL;
    if (mj->delete_dropped) {
        merge_unlink_dropped(image_set_dir(mj->chain->set), dropped);
    }
    return 0;
}

static void commit_abort(Job *job)
{
    CommitJob *s = commit_job(job);

    if (!s->finished && s->common.top) {
        merge_job_stopped(&s->common);
    }
}

static void commit_clean(Job *job)
{
    MergeJob *mj = merge_job(job);

    chain_topo_wrlock(mj->chain);
    merge_reopen_ro(mj->chain, mj->reopened);
    chain_topo_unlock(mj->chain);
}

static void commit_free(Job *job)
{
    merge_job_free_common(merge_job(job));
}

static const JobDriver commit_job_driver = {
    .type = "commit",
    .instance_size = sizeof(CommitJob),
    .run = commit_run,
    .prepare = commit_prepare,
    .abort = commit_abort,
    .clean = commit_clean,
    .free = commit_free,
};

/* ---- the constructor's steps, shared with active commit ----------------- */

bool commit_kind_plan(Chain *chain, const void *opts, MergePlan *plan,
                      GError **error)
{
    return commit_plan(chain, opts, false, plan, error);
}

/*
 * Checks shared with the offline commit: users of base and the dropped
 * layers, room on base's filesystem.  Topology read lock held.
 */
bool commit_kind_check(Chain *chain, const void *opts, const MergePlan *plan,
                       char **layers, GError **error)
{
    const CommitOptions *o = opts;

    if (!o->force) {
        const char *base_name[] = { plan->base->name, NULL };

        if (!merge_check_users(chain, (char **)base_name, "base", true,
                               error) ||
            !merge_check_users(chain, layers, "layer", true, error)) {
            return false;
        }
    }
    return commit_check_space(chain, plan, error);
}

/*
 * Reopen read-write base, the image above top and top when their backing
 * reference is rewritten (an active top is writable already).  All or
 * nothing.  Topology write lock held.
 */
bool commit_kind_reopen(Chain *chain, const MergePlan *plan,
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

/* Words naming the layers: a resume must not pick other defaults. */
char *commit_kind_words(MergeJob *mj, const void *opts)
{
    CommitOptions named = *(const CommitOptions *)opts;

    named.top = mj->top->name;
    named.base = mj->base->name;
    named.shallow = false;
    mj->on_error = named.on_error;
    mj->delete_dropped = named.delete_dropped;
    mj->keep_relative = named.keep_relative;
    return commit_options_format(&named);
}

/* Resume from the checkpoint of the same commit, if the state file has
 * one: everything below its offset is durable in base. */
static void commit_init(MergeJob *mj)
{
    CommitJob *s = container_of(mj, CommitJob, common);
    Checkpoint cp;

    if (checkpoint_load(image_set_dir(mj->chain->set), mj->chain->name,
                        &cp)) {
        if (strcmp(cp.type, "commit") == 0 &&
            g_strcmp0(cp.top, mj->top->name) == 0 &&
            g_strcmp0(cp.base, mj->base->name) == 0 &&
            cp.offset <= mj->size) {
            s->start = cp.offset;
            g_message("%s: the commit of %s into %s resumes at offset %"
                      G_GUINT64_FORMAT, mj->chain->name, cp.top, cp.base,
                      cp.offset);
        }
        checkpoint_clear_fields(&cp);
    }
    mj->offset = s->start;
}

const MergeJobKind commit_job_kind = {
    .driver = &commit_job_driver,
    .resumable = true,
    .plan = commit_kind_plan,
    .check = commit_kind_check,
    .reopen = commit_kind_reopen,
    .words = commit_kind_words,
    .init = commit_init,
};

/* ---- offline ------------------------------------------------------------------- */

typedef struct {
    Chain *chain;
    ChainImage *top;
    ChainImage *base;
    bool (*progress)(void *opaque, uint64_t done, uint64_t total);
    void *opaque;
    uint64_t total;
} OfflineCommit;

/* The step of the offline copy: no job, the same run copy. */
static int offline_step(void *opaque, uint64_t off, uint64_t end, void *buf,
                        uint64_t *advance, uint64_t *written)
{
    OfflineCommit *o = opaque;
    int top_idx, base_idx, ret = -ESTALE;

    *advance = end - off;
    *written = 0;
    chain_topo_rdlock(o->chain);
    top_idx = merge_layer_index(o->chain, o->top);
    base_idx = merge_layer_index(o->chain, o->base);
    if (top_idx >= 0 && base_idx > top_idx) {
        ret = copy_above(o->chain, (guint)top_idx, (guint)base_idx, o->base,
                         off, end, buf, advance, written);
    }
    chain_topo_unlock(o->chain);
    return ret;
}

static int offline_tick(void *opaque, uint64_t prefix)
{
    OfflineCommit *o = opaque;

    if (o->progress && !o->progress(o->opaque, prefix, o->total)) {
        return -ECANCELED;
    }
    return 0;
}

/* Copy what plan commits.  FALSE with the message the user reads. */
static bool offline_copy(Chain *chain, const CommitOptions *opts,
                         const MergePlan *plan,
                         bool (*progress)(void *opaque, uint64_t done,
                                          uint64_t total),
                         void *opaque, GError **error)
{
    OfflineCommit o = {
        .chain = chain, .top = plan->top, .base = plan->base,
        .progress = progress, .opaque = opaque, .total = plan->size,
    };
    CopyParams p = {
        .step = offline_step, .tick = offline_tick, .opaque = &o,
        .start = 0, .end = plan->size, .what = "commit", .what_into = "",
        .writeback = plan->base, .offline_speed = opts->bandwidth,
    };
    CopyResult r = { 0 };
    int ret = copy_run(&p, &r);

    if (ret == -ECANCELED) {
        chainfs_set_error(error, ECANCELED,
                          "commit of %s into %s stopped at offset %"
                          G_GUINT64_FORMAT " of %" G_GUINT64_FORMAT
                          " bytes; no backing file was changed, %s "
                          "holds part of the data", plan->top->name,
                          plan->base->name, r.prefix, plan->size,
                          plan->base->name);
        return false;
    }
    if (ret < 0) {
        chainfs_set_error(error, -ret,
                          "commit of %s into %s failed near offset %"
                          G_GUINT64_FORMAT ": %s", plan->top->name,
                          plan->base->name, r.prefix, g_strerror(-ret));
        return false;
    }
    return true;
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
    MergePlan plan;
    bool ok;

    chain_topo_rdlock(chain);
    ok = commit_plan(chain, opts, true, &plan, error);
    if (ok) {
        guint first = plan.top_idx > 0 ? plan.top_idx : plan.top_idx + 1;

        layers = commit_layer_names(chain, first, plan.base_idx - 1);
        ok = commit_kind_check(chain, opts, &plan, layers, error);
    }
    chain_topo_unlock(chain);
    if (!ok) {
        return false;
    }

    chain_topo_wrlock(chain);
    ok = commit_kind_reopen(chain, &plan, reopened, error);
    chain_topo_unlock(chain);
    if (!ok) {
        return false;
    }
    ok = commit_prepare_base(chain, plan.top, plan.base, plan.size, error) &&
         offline_copy(chain, opts, &plan, progress, opaque, error) &&
         commit_finish(chain, plan.top, plan.base, opts->keep_relative,
                       reopened, &dropped, error);
    if (ok && opts->delete_dropped) {
        merge_unlink_dropped(dir, dropped);
    }
    chain_topo_wrlock(chain);
    merge_reopen_ro(chain, reopened);
    chain_topo_unlock(chain);
    return ok;
}
