/*
 * merge.c: the merge context (merge.h): chains, one job slot per chain,
 * the verbs on a chain's job, starting jobs, resuming interrupted ones,
 * and small helpers the job drivers share.
 *
 * Locks, outermost first: MergeSlot.lock (the chain's job pointer), then
 * Job.lock (the job's state), then a chain's topology lock.  A verb holds
 * the slot lock only while it talks to the job; it never waits for I/O.
 * Starting a job and a live snapshot hold it throughout (they wait for
 * image creation and flushes), so that neither runs into the other.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include "merge-int.h"

/* ---- crash points (a test hook, see merge-int.h) ------------------------ */
#ifdef CHAINFS_CRASH_POINTS

/* Set once by merge_crash_init(), before any job thread exists; read-only
 * afterwards.  NULL: no crash point armed (the normal case). */
static char *crash_at;
static gint crash_countdown;

void merge_crash_init(void)
{
    static gsize once;
    static const char *const known[] = { MERGE_CRASH_POINTS, NULL };

    if (!g_once_init_enter(&once)) {
        return;
    }
    const char *env = g_getenv("CHAINFS_CRASH_AT");

    if (env && env[0]) {
        g_autofree char *name = g_strdup(env);
        char *colon = strchr(name, ':');
        guint64 n = 1;

        if (colon) {
            *colon = '\0';
            if (!g_ascii_string_to_unsigned(colon + 1, 10, 1, G_MAXINT, &n,
                                            NULL)) {
                g_warning("CHAINFS_CRASH_AT=%s: N in NAME:N must be a "
                          "positive integer; no crash point armed", env);
                name[0] = '\0';
            }
        }
        if (name[0] && !g_strv_contains(known, name)) {
            g_warning("CHAINFS_CRASH_AT=%s: no crash point %s; no crash "
                      "point armed", env, name);
        } else if (name[0]) {
            g_message("test hook: SIGKILL at crash point %s, time %"
                      G_GUINT64_FORMAT, name, n);
            crash_countdown = (gint)n;
            crash_at = g_steal_pointer(&name);
        }
    }
    g_once_init_leave(&once, 1);
}

void merge_crash_point(const char *name)
{
    if (G_LIKELY(crash_at == NULL) || strcmp(name, crash_at) != 0) {
        return;
    }
    if (g_atomic_int_dec_and_test(&crash_countdown)) {
        g_message("crash point %s reached: SIGKILL", name);
        raise(SIGKILL);
    }
}
#endif /* CHAINFS_CRASH_POINTS */

/* ---- the context -------------------------------------------------------- */

MergeContext *merge_context_new(ImageSet *set)
{
    MergeContext *ctx = g_new0(MergeContext, 1);

    merge_crash_init();

    ctx->set = set;
    g_mutex_init(&ctx->lock);
    ctx->chains = g_ptr_array_new();
    ctx->next_id = 1;
    return ctx;
}

void merge_context_add_chain(MergeContext *ctx, Chain *chain)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&ctx->lock);
    MergeSlot *slot;

    if (chain->job) {
        return;
    }
    slot = g_new0(MergeSlot, 1);
    g_mutex_init(&slot->lock);
    slot->ctx = ctx;
    chain->job = slot;
    g_ptr_array_add(ctx->chains, chain);
}

/*
 * Stops every job at a checkpoint (marked interrupted, so that the next
 * mount resumes it), frees the slots; the chains stay open.
 */
void merge_context_free(MergeContext *ctx)
{
    if (!ctx) {
        return;
    }
    for (guint i = 0; i < ctx->chains->len; i++) {
        Chain *chain = g_ptr_array_index(ctx->chains, i);
        MergeSlot *slot = chain->job;

        if (!slot) {
            continue;
        }
        g_mutex_lock(&slot->lock);
        if (slot->job) {
            job_interrupt(slot->job);
            job_free(slot->job);
            slot->job = NULL;
        }
        g_mutex_unlock(&slot->lock);
        g_mutex_clear(&slot->lock);
        g_free(slot);
        chain->job = NULL;
    }
    g_ptr_array_free(ctx->chains, TRUE);
    g_mutex_clear(&ctx->lock);
    g_free(ctx);
}

char *merge_context_next_id(MergeContext *ctx, const char *type)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&ctx->lock);

    return g_strdup_printf("%s-%" G_GUINT64_FORMAT, type, ctx->next_id++);
}

/* The slot of chain (made on first use for chains nobody added). */
static MergeSlot *merge_slot(MergeContext *ctx, Chain *chain)
{
    if (!chain->job && ctx) {
        merge_context_add_chain(ctx, chain);
    }
    return chain->job;
}

/* EBUSY while a job is live on chain.  slot->lock held. */
static bool slot_check_idle(MergeSlot *slot, Chain *chain, GError **error)
{
    if (slot->job) {
        JobStatus s = job_get_status(slot->job);

        if (!job_status_is_terminal(s)) {
            chainfs_set_error(error, EBUSY,
                              "a job is already %s on %s (%s)",
                              job_status_public(s), chain->name,
                              slot->job->id);
            return false;
        }
    }
    return true;
}

/*
 * Create a job of kind under the slot lock, refusing EBUSY while another
 * one is live, and start it.  On failure nothing changed.
 */
static bool merge_start_job(MergeContext *ctx, Chain *chain,
                            const MergeJobKind *kind, const void *opts,
                            uint64_t speed, GError **error)
{
    MergeSlot *slot = merge_slot(ctx, chain);
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&slot->lock);
    Job *job;

    if (!slot_check_idle(slot, chain, error)) {
        return false;
    }
    job = merge_job_create(kind, ctx, chain, opts, speed, error);
    if (!job) {
        return false;
    }
    if (!job_start(job, error)) {
        /* No thread ran any driver callback: undo the constructor here. */
        merge_job_discard(merge_job(job));
        return false;
    }
    /* The last job stays visible until now. */
    if (slot->job) {
        job_free(slot->job);
    }
    slot->job = job;
    merge_crash_point("job-started");
    return true;
}

/* Refuse EBUSY when a job is live on chain (checked again at start). */
static bool merge_check_idle(MergeContext *ctx, Chain *chain, GError **error)
{
    MergeSlot *slot = merge_slot(ctx, chain);
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&slot->lock);

    return slot_check_idle(slot, chain, error);
}

bool merge_run_idle(MergeContext *ctx, Chain *chain, const char *what,
                    bool (*fn)(Chain *chain, void *opaque, GError **error),
                    void *opaque, GError **error)
{
    MergeSlot *slot = merge_slot(ctx, chain);
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&slot->lock);

    if (!slot_check_idle(slot, chain, error)) {
        g_prefix_error(error, "cannot %s: ", what);
        return false;
    }
    return fn(chain, opaque, error);
}

/* ---- verbs ------------------------------------------------------------ */

typedef bool (*MergeVerbFn)(Job *job, void *arg, GError **error);

static bool merge_job_verb(Chain *chain, MergeVerbFn fn, void *arg,
                           GError **error)
{
    MergeSlot *slot = chain->job;
    g_autoptr(GMutexLocker) locker = NULL;

    if (!slot) {
        chainfs_set_error(error, EINVAL, "no job on %s", chain->name);
        return false;
    }
    locker = g_mutex_locker_new(&slot->lock);
    if (!slot->job) {
        chainfs_set_error(error, EINVAL, "no job on %s", chain->name);
        return false;
    }
    return fn(slot->job, arg, error);
}

static bool merge_verb_pivot(Job *job, void *arg, GError **error)
{
    return job_complete(job, error);
}

static bool merge_verb_cancel(Job *job, void *arg, GError **error)
{
    return job_cancel(job, error);
}

/* How long a pause verb waits for the steps in flight (each one chunk). */
#define MERGE_PAUSE_WAIT_US (30 * G_USEC_PER_SEC)

/* The job is paused when the verb returns (unless its steps in flight
 * outlast MERGE_PAUSE_WAIT_US: then it pauses soon after). */
static bool merge_verb_pause(Job *job, void *arg, GError **error)
{
    if (!job_pause(job, error)) {
        return false;
    }
    job_wait_paused(job, MERGE_PAUSE_WAIT_US);
    return true;
}

static bool merge_verb_resume(Job *job, void *arg, GError **error)
{
    return job_resume(job, error);
}

static bool merge_verb_speed(Job *job, void *arg, GError **error)
{
    return job_set_speed(job, *(uint64_t *)arg, error);
}

bool merge_job_pivot(Chain *chain, GError **error)
{
    return merge_job_verb(chain, merge_verb_pivot, NULL, error);
}

bool merge_job_cancel(Chain *chain, GError **error)
{
    return merge_job_verb(chain, merge_verb_cancel, NULL, error);
}

bool merge_job_pause(Chain *chain, GError **error)
{
    return merge_job_verb(chain, merge_verb_pause, NULL, error);
}

bool merge_job_resume(Chain *chain, GError **error)
{
    return merge_job_verb(chain, merge_verb_resume, NULL, error);
}

bool merge_job_set_speed(Chain *chain, uint64_t bytes_per_second,
                         GError **error)
{
    return merge_job_verb(chain, merge_verb_speed, &bytes_per_second, error);
}

char *merge_job_info_json(Chain *chain)
{
    MergeSlot *slot = chain->job;
    g_autoptr(GMutexLocker) locker = NULL;

    if (!slot) {
        return g_strdup("{}");
    }
    locker = g_mutex_locker_new(&slot->lock);
    if (!slot->job) {
        return g_strdup("{}");
    }
    return job_info_json(slot->job);
}

/* ---- starting jobs ------------------------------------------------------ */

bool merge_start_commit(MergeContext *ctx, Chain *chain,
                        const CommitOptions *opts, GError **error)
{
    MergePlan plan;
    bool ok;

    if (!merge_check_idle(ctx, chain, error)) {
        return false;
    }
    chain_topo_rdlock(chain);
    ok = commit_plan(chain, opts, false, &plan, error);
    chain_topo_unlock(chain);
    if (!ok) {
        return false;
    }
    /* The constructors plan again under the slot lock. */
    return merge_start_job(ctx, chain,
                           plan.top_idx == 0 ? &active_commit_job_kind :
                           &commit_job_kind,
                           opts, opts->bandwidth, error);
}

bool merge_start_stream(MergeContext *ctx, Chain *chain,
                        const StreamOptions *opts, GError **error)
{
    return merge_start_job(ctx, chain, &stream_job_kind, opts,
                           opts->bandwidth, error);
}

/* TRUE when no layer of chain is named in names. */
static bool merge_none_in_chain(Chain *chain, char **names)
{
    bool none = true;

    chain_topo_rdlock(chain);
    for (guint i = 0; names[i] && none; i++) {
        none = chain_find_layer(chain, names[i]) < 0;
    }
    chain_topo_unlock(chain);
    return none;
}

bool merge_resume_interrupted(MergeContext *ctx, Chain *chain,
                              GError **error)
{
    const char *dir = image_set_dir(chain->set);
    Checkpoint cp;
    bool ok = true;

    if (!checkpoint_load(dir, chain->name, &cp)) {
        return true;
    }
    if (cp.cancelled) {
        /* Kept for a reissued commit; nothing resumes by itself. */
        checkpoint_clear_fields(&cp);
        return true;
    }
    if (strcmp(cp.type, "stream") == 0 && cp.layers && cp.layers[0] &&
        merge_none_in_chain(chain, cp.layers)) {
        /* The crash came after the active layer got its new backing file
         * but before the streamed layers were recorded: finish that. */
        ok = checkpoint_record_dropped(dir, chain->name, cp.layers, NULL,
                                       error);
        g_message("%s: recorded the layers of an interrupted stream as "
                  "dropped", chain->name);
    } else if (strcmp(cp.type, "stream") == 0) {
        StreamOptions so = { 0 };

        ok = stream_options_parse(cp.options, &so, error) &&
             merge_start_stream(ctx, chain, &so, error);
        stream_options_clear(&so);
    } else {
        CommitOptions co = { 0 };
        int top_idx, base_idx;

        chain_topo_rdlock(chain);
        top_idx = chain_find_layer(chain, cp.top);
        base_idx = chain_find_layer(chain, cp.base);
        chain_topo_unlock(chain);
        if (top_idx < 0 && base_idx >= 0 && cp.layers) {
            /*
             * The crash came after the backing references were rewritten
             * but before the dropped layers were recorded: finish that.
             */
            ok = checkpoint_record_dropped(dir, chain->name, cp.layers, NULL,
                                           error);
            g_message("%s: recorded the layers of an interrupted commit as "
                      "dropped", chain->name);
        } else if (top_idx < 0 || base_idx < 0) {
            g_message("%s: forgetting the checkpoint of a %s of %s into %s: "
                      "the layers are gone", chain->name, cp.type, cp.top,
                      cp.base);
            ok = checkpoint_clear(dir, chain->name, error);
        } else {
            ok = commit_options_parse(cp.options, &co, error);
            if (ok) {
                /* Name the layers: the defaults may mean others now. */
                g_free(co.top);
                co.top = g_strdup(cp.top);
                g_free(co.base);
                co.base = g_strdup(cp.base);
                co.shallow = false;
                ok = merge_start_commit(ctx, chain, &co, error);
                if (ok) {
                    g_message("%s: resumed the interrupted %s of %s into %s",
                              chain->name, cp.type, cp.top, cp.base);
                }
            }
            commit_options_clear(&co);
        }
    }
    checkpoint_clear_fields(&cp);
    return ok;
}

/* ---- helpers for the drivers -------------------------------------------- */

int merge_layer_index(Chain *chain, ChainImage *img)
{
    for (guint i = 0; i < chain_depth(chain); i++) {
        if (chain_layer(chain, i) == img) {
            return (int)i;
        }
    }
    return -1;
}

char *merge_backing_ref(ChainImage *holder, ChainImage *target,
                        bool keep_relative)
{
    g_auto(GStrv) from = NULL;
    g_auto(GStrv) to = NULL;
    GString *rel;
    guint common = 0, nfrom, nto;

    if (!keep_relative) {
        return g_strdup(target->path);
    }
    if (strcmp(holder->dir, target->dir) == 0) {
        return g_path_get_basename(target->path);
    }
    /* Relative to the holding image's directory, as QEMU resolves it. */
    from = g_strsplit(holder->dir, "/", -1);
    to = g_strsplit(target->path, "/", -1);
    nfrom = g_strv_length(from);
    nto = g_strv_length(to);
    while (common < nfrom && common + 1 < nto &&
           strcmp(from[common], to[common]) == 0) {
        common++;
    }
    rel = g_string_new(NULL);
    for (guint i = common; i < nfrom; i++) {
        if (from[i][0] != '\0') {
            g_string_append(rel, "../");
        }
    }
    for (guint i = common; i < nto; i++) {
        g_string_append(rel, to[i]);
        if (i + 1 < nto) {
            g_string_append_c(rel, '/');
        }
    }
    return g_string_free(rel, FALSE);
}

bool merge_check_users(Chain *chain, char **names, const char *what,
                       bool forceable, GError **error)
{
    const char *dir = image_set_dir(chain->set);
    g_autoptr(GPtrArray) except = g_ptr_array_new_with_free_func(g_free);

    for (guint i = 0; i < chain_depth(chain); i++) {
        g_ptr_array_add(except, g_strdup(chain_layer(chain, i)->name));
    }
    for (guint i = 0; names && names[i]; i++) {
        g_autoptr(GError) err = NULL;
        g_autoptr(GPtrArray) users = dir_users_of(dir, names[i], except,
                                                  &err);

        if (!users) {
            g_propagate_error(error, g_steal_pointer(&err));
            return false;
        }
        if (users->len > 0) {
            chainfs_set_error(error, EBUSY, "%s %s is also used by %s%s",
                              what, names[i],
                              (const char *)g_ptr_array_index(users, 0),
                              forceable ? "; add force to commit anyway" :
                              "");
            return false;
        }
    }
    return true;
}

bool merge_reopen_rw(ChainImage *img, GPtrArray *reopened, GError **error)
{
    g_autoptr(GError) err = NULL;

    if (img->writable) {
        return true;
    }
    if (!chain_image_reopen(img, true, &err)) {
        int code = chainfs_error_errno(err);

        /* design.md promises EACCES or EROFS for an image that cannot be
         * written (an immutable file says EPERM); a lock held by another
         * process stays EBUSY. */
        if (code != EROFS && code != EBUSY) {
            code = EACCES;
        }
        chainfs_set_error(error, code, "%s", err->message);
        return false;
    }
    g_ptr_array_add(reopened, img);
    return true;
}

void merge_reopen_ro(Chain *chain, GPtrArray *reopened)
{
    for (guint i = 0; i < reopened->len; i++) {
        ChainImage *img = g_ptr_array_index(reopened, i);
        g_autoptr(GError) err = NULL;

        /* An active layer stays writable: guests write it. */
        if (merge_layer_index(chain, img) <= 0) {
            continue;
        }
        if (img->drv->flush(img) < 0 ||
            !chain_image_reopen(img, false, &err)) {
            g_message("%s: %s stays read-write: %s", chain->name, img->name,
                      err ? err->message : "flush failed");
        }
    }
    g_ptr_array_set_size(reopened, 0);
}

void merge_unlink_dropped(const char *dir, char **names)
{
    for (guint i = 0; names && names[i]; i++) {
        g_autofree char *path = g_build_filename(dir, names[i], NULL);

        if (unlink(path) < 0 && errno != ENOENT) {
            g_message("cannot delete %s: %s", path, g_strerror(errno));
        }
    }
}

void merge_serialize_begin(Chain *chain, bool *serializing)
{
    if (!*serializing) {
        chain->serialize_count++;
        *serializing = true;
    }
}

void merge_serialize_end(Chain *chain, bool *serializing)
{
    if (*serializing) {
        chain->serialize_count--;
        *serializing = false;
    }
}

bool merge_save_checkpoint(Chain *chain, const Checkpoint *cp,
                           GError **error)
{
    g_autoptr(GError) err = NULL;

    if (!checkpoint_save(image_set_dir(chain->set), chain->name, cp, &err)) {
        g_message("%s: cannot save the checkpoint: %s", chain->name,
                  err->message);
        g_propagate_error(error, g_steal_pointer(&err));
        return false;
    }
    return true;
}
