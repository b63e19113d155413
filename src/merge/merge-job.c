/*
 * merge-job.c: the job base every merge job shares (MergeJob, see
 * merge-int.h): the one constructor for commit, active commit and stream,
 * its undo for a job that never started, the job's checkpoint, and what a
 * stopped job leaves for the next mount.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <string.h>

#include "json.h"
#include "merge-int.h"

/* ---- events ----------------------------------------------------------- */

/* Set once at daemon start, before any job exists: read without a lock. */
static MergeEventHook merge_event_hook;
static void *merge_event_opaque;

void merge_emit_event(const char *export_name, const char *event,
                      const char *fields)
{
    if (merge_event_hook) {
        merge_event_hook(export_name, event, fields ? fields : "",
                         merge_event_opaque);
    }
}

/* The event a state change stands for, or NULL for the internal steps
 * (PENDING, ABORTING) that design.md shows as running. */
static const char *merge_job_event_name(JobStatus from, JobStatus to)
{
    switch (to) {
    case JOB_STATUS_RUNNING:
        return from == JOB_STATUS_CREATED ? "job-created" : "job-resumed";
    case JOB_STATUS_READY:
        return from == JOB_STATUS_STANDBY ? "job-resumed" : "job-ready";
    case JOB_STATUS_PAUSED:
    case JOB_STATUS_STANDBY:
        return "job-paused";
    case JOB_STATUS_COMPLETED:
        return "job-completed";
    case JOB_STATUS_FAILED:
        return "job-failed";
    case JOB_STATUS_CANCELLED:
        return "job-cancelled";
    default:
        return NULL;
    }
}

/* The job core's hook (job.h): called with job->lock held, so the fields
 * are read as they are at the change.  Every job of the daemon is a
 * MergeJob (merge_job_create is the one constructor). */
static void merge_job_transition(Job *job, JobStatus from, JobStatus to)
{
    const char *event = merge_job_event_name(from, to);
    MergeJob *mj = merge_job(job);
    g_autoptr(GString) fields = NULL;

    if (!event || !merge_event_hook) {
        return;
    }
    fields = g_string_new(NULL);
    json_append_member_string(fields, "job", job->driver->type);
    json_append_member_string(fields, "id", job->id);
    json_append_member_string(fields, "top", job->top);
    json_append_member_string(fields, "base", job->base);
    json_append_member_uint(fields, "offset", job->offset);
    json_append_member_uint(fields, "len", job->len);
    if (job->error) {
        json_append_member_string(fields, "error", job->error);
    }
    merge_emit_event(mj->chain->name, event, fields->str);
}

void merge_set_event_hook(MergeEventHook hook, void *opaque)
{
    merge_event_opaque = opaque;
    merge_event_hook = hook;
    job_set_transition_hook(hook ? merge_job_transition : NULL);
}

/* What the constructor resolved, before there is a job to hold it. */
typedef struct {
    MergePlan plan;
    char **layers;
    GPtrArray *reopened;
} MergeSetup;

static void merge_setup_clear(MergeSetup *m)
{
    g_strfreev(m->layers);
    m->layers = NULL;
    if (m->reopened) {
        g_ptr_array_free(m->reopened, TRUE);
        m->reopened = NULL;
    }
}

/* Plan and check under the read lock: they read metadata, guests go on. */
static bool merge_setup_check(const MergeJobKind *kind, Chain *chain,
                              const void *opts, MergeSetup *m, GError **error)
{
    bool ok;

    chain_topo_rdlock(chain);
    ok = kind->plan(chain, opts, &m->plan, error);
    if (ok) {
        m->layers = commit_layer_names(chain,
                                       m->plan.top_idx + (kind->keeps_top ?
                                                          1 : 0),
                                       m->plan.base_idx - 1);
        ok = kind->check(chain, opts, &m->plan, m->layers, error);
    }
    chain_topo_unlock(chain);
    return ok;
}

/* Plan again under the write lock (nothing in flight) and reopen: the
 * layers cannot have moved between the two. */
static bool merge_setup_reopen(const MergeJobKind *kind, Chain *chain,
                               const void *opts, MergeSetup *m,
                               GError **error)
{
    MergePlan again;
    bool ok;

    chain_topo_wrlock(chain);
    ok = kind->plan(chain, opts, &again, error);
    if (ok && (again.top != m->plan.top || again.base != m->plan.base)) {
        chainfs_set_error(error, EBUSY, "the layers of %s changed; try again",
                          chain->name);
        ok = false;
    }
    if (ok && kind->reopen) {
        ok = kind->reopen(chain, &again, m->reopened, error);
    }
    chain_topo_unlock(chain);
    if (ok) {
        m->plan = again;
    }
    return ok;
}

Job *merge_job_create(const MergeJobKind *kind, MergeContext *ctx,
                      Chain *chain, const void *opts, uint64_t speed,
                      GError **error)
{
    MergeSetup m = { .reopened = g_ptr_array_new() };
    g_autofree char *id = NULL;
    MergeJob *mj;

    if (!merge_setup_check(kind, chain, opts, &m, error) ||
        !merge_setup_reopen(kind, chain, opts, &m, error)) {
        merge_setup_clear(&m);
        return NULL;
    }
    id = merge_context_next_id(ctx, kind->driver->type);
    mj = merge_job(job_new(kind->driver, id, m.plan.top->name,
                           m.plan.base ? m.plan.base->name : NULL, speed));
    mj->kind = kind;
    mj->ctx = ctx;
    mj->chain = chain;
    mj->top = m.plan.top;
    mj->base = m.plan.base;
    mj->size = m.plan.size;
    mj->layers = g_steal_pointer(&m.layers);
    mj->reopened = g_steal_pointer(&m.reopened);
    mj->words = kind->words(mj, opts);
    if (kind->init) {
        kind->init(mj);
    }
    /* Before the command is acknowledged: a crash from now on resumes the
     * job at the next mount.  A resumable job's offset is durable in base
     * already; a job that cannot write its checkpoint fails at its first
     * one. */
    merge_job_checkpoint(mj, mj->offset, false, NULL);
    return &mj->job;
}

void merge_job_free_common(MergeJob *mj)
{
    g_free(mj->words);
    g_strfreev(mj->layers);
    if (mj->reopened) {
        g_ptr_array_free(mj->reopened, TRUE);
    }
}

bool merge_job_checkpoint(MergeJob *mj, uint64_t offset, bool cancelled,
                          GError **error)
{
    Checkpoint cp = {
        .type = (char *)mj->kind->driver->type,
        .top = mj->job.top, .base = mj->job.base, .options = mj->words,
        .layers = mj->layers, .offset = offset, .cancelled = cancelled,
    };

    return merge_save_checkpoint(mj->chain, &cp, error);
}

/* A resumable job: flush base, then record offset, so that a checkpoint
 * never claims more than what is durable. */
static int merge_job_keep_progress(MergeJob *mj, bool cancelled)
{
    g_autoptr(GError) err = NULL;
    int ret = mj->base->drv->flush(mj->base);

    if (ret < 0) {
        return ret;
    }
    if (!merge_job_checkpoint(mj, mj->offset, cancelled, &err)) {
        return -chainfs_error_errno(err);
    }
    return 0;
}

/* Not resumable: forget the checkpoint, unless a shutdown interrupted the
 * job (then the next mount resumes it). */
static void merge_job_forget(MergeJob *mj, bool interrupted)
{
    g_autoptr(GError) err = NULL;

    if (!interrupted &&
        !checkpoint_clear(image_set_dir(mj->chain->set), mj->chain->name,
                          &err)) {
        g_message("%s: %s", mj->chain->name, err->message);
    }
}

void merge_job_stopped(MergeJob *mj)
{
    bool interrupted = job_is_interrupted(&mj->job);

    if (!mj->kind->resumable) {
        merge_job_forget(mj, interrupted);
        return;
    }
    /* Keep the progress for a reissued commit (or the next mount, when a
     * shutdown interrupted it). */
    {
        int ret = merge_job_keep_progress(mj, !interrupted);

        if (ret < 0) {
            g_message("%s: no checkpoint for the stopped %s: %s",
                      mj->chain->name, mj->kind->driver->type,
                      g_strerror(-ret));
        }
    }
}

void merge_job_discard(MergeJob *mj)
{
    /* The user is told it failed: it ends as a job cancelled before it
     * copied anything, not resumed at the next mount; a commit keeps the
     * offset it would have resumed from. */
    merge_job_stopped(mj);
    chain_topo_wrlock(mj->chain);
    merge_reopen_ro(mj->chain, mj->reopened);
    chain_topo_unlock(mj->chain);
    job_free(&mj->job);
}

int merge_job_fail(MergeJob *mj, int err, const char *fmt, ...)
{
    g_autofree char *msg = NULL;
    va_list ap;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    job_set_error(&mj->job, -err, "%s", msg);
    return err;
}

bool merge_job_layers(MergeJob *mj, guint *top_idx, guint *base_idx)
{
    int t = merge_layer_index(mj->chain, mj->top);
    int b = mj->base ? merge_layer_index(mj->chain, mj->base)
                     : (int)chain_depth(mj->chain);

    if (t < 0 || b <= t) {
        return false;
    }
    *top_idx = (guint)t;
    *base_idx = (guint)b;
    return true;
}
