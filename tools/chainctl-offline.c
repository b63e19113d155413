/*
 * chainctl-offline.c: chainctl on image files, no daemon involved.
 *
 * The image's directory is the image directory: the chain is resolved by
 * src/chain exactly as the daemon would resolve it (a backing reference
 * that leaves the directory is refused), and jobs run through src/merge in
 * this process.  The images are locked as QEMU locks them, so an image in
 * use by chainfs or QEMU is refused rather than written behind their back.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chainctl.h"
#include "chain-info.h"
#include "chain.h"
#include "json.h"
#include "merge.h"

/*
 * One opened chain and what it needs, freed in reverse order (the merge
 * context stops its jobs first, then the chain drops its images, then the
 * set closes them).
 */
typedef struct {
    ImageSet *set;
    Chain *chain;
    MergeContext *merge;  /* NULL until a job needs one */
} CtlOffline;

static void ctl_offline_close(CtlOffline *o)
{
    g_clear_pointer(&o->merge, merge_context_free);
    g_clear_pointer(&o->chain, chain_free);
    g_clear_pointer(&o->set, image_set_free);
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(CtlOffline, ctl_offline_close)

/*
 * Open the chain whose active layer is the image at path, its active
 * layer read-write when writable.  On failure prints the reason and
 * returns FALSE with o closed.
 */
static bool ctl_offline_open(CtlOffline *o, const char *path, bool writable,
                             bool with_merge)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *real = realpath(path, NULL);
    g_autofree char *dir = NULL;
    g_autofree char *file = NULL;

    if (!real) {
        ctl_fail("%s: %s", path, g_strerror(errno));
        return false;
    }
    dir = g_path_get_dirname(real);
    file = g_path_get_basename(real);
    o->set = image_set_new(dir, &err);
    if (!o->set) {
        ctl_fail("%s", err->message);
        return false;
    }
    o->chain = chain_open(o->set, file, NULL, writable, &err);
    if (!o->chain) {
        ctl_offline_close(o);
        ctl_fail("%s", err->message);
        return false;
    }
    if (with_merge) {
        o->merge = merge_context_new(o->set);
        merge_context_add_chain(o->merge, o->chain);
    }
    return true;
}

/* A layer name from the command line: a file name in the image
 * directory; a path to it works too. */
static char *ctl_layer_name(const char *arg)
{
    return arg ? g_path_get_basename(arg) : NULL;
}

/* ---- info ---------------------------------------------------------- */

int ctl_offline_info(const char *path, bool json)
{
    g_auto(CtlOffline) o = { 0 };
    g_autofree char *chain_json = NULL;

    if (!ctl_offline_open(&o, path, false, false)) {
        return CTL_EXIT_FAIL;
    }
    /* The very object the daemon serves as user.chainfs.chain. */
    chain_json = chain_info_json(o.chain);
    if (json) {
        printf("%s\n", chain_json);
        return CTL_EXIT_OK;
    }
    return ctl_print_chain(chain_json, path);
}

/* ---- commit -------------------------------------------------------- */

/* Fill opts from the command line. */
static void ctl_commit_options(const CtlCommitArgs *a, Chain *chain,
                               CommitOptions *opts)
{
    memset(opts, 0, sizeof(*opts));
    opts->top = ctl_layer_name(a->top);
    opts->base = ctl_layer_name(a->base);
    opts->shallow = a->shallow;
    /*
     * Offline no guest writes the active layer, so committing it is the
     * plain commit "qemu-img commit IMAGE" does: --active is implied.
     */
    opts->active = a->active || !opts->top ||
                   chain_find_layer(chain, opts->top) == 0;
    opts->delete_dropped = a->delete_dropped;
    opts->keep_relative = a->keep_relative;
    opts->force = a->force;
    opts->bandwidth = a->run.has_bandwidth ? a->run.bandwidth : 0;
    opts->on_error = ON_ERROR_REPORT;
}

/*
 * --dry-run: src/merge's estimate, described by the same builder as the
 * daemon's dry-run reply, and printed by the same function as online.
 */
static int ctl_offline_commit_dry_run(Chain *chain, const CommitOptions *opts,
                                      const char *path)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *room = NULL;
    CommitEstimate est;

    if (!merge_commit_estimate(chain, opts, &est, &err)) {
        return ctl_fail("%s", err->message);
    }
    room = commit_estimate_json(&est);
    commit_estimate_clear(&est);
    return ctl_print_commit_room(room, path);
}

/* Progress of an offline commit; a Ctrl-C stops the copy (see
 * merge_commit_offline: nothing is rewritten then, and the images are
 * flushed). */
static bool ctl_offline_commit_progress(void *opaque, uint64_t done,
                                        uint64_t total)
{
    CtlProgress *progress = opaque;

    if (progress) {
        ctl_progress_update(progress, done, total);
    }
    /* After the update: a Ctrl-C while it waited on a slow terminal
     * counts too. */
    return !ctl_interrupted;
}

int ctl_offline_commit(const char *path, const CtlCommitArgs *a)
{
    g_auto(CtlOffline) o = { 0 };
    g_autoptr(GError) err = NULL;
    CommitOptions opts;
    CtlProgress progress;
    bool ok;

    /* A dry run writes nothing: open everything read-only. */
    if (!ctl_offline_open(&o, path, !a->dry_run, !a->dry_run)) {
        return CTL_EXIT_FAIL;
    }
    ctl_commit_options(a, o.chain, &opts);
    if (a->dry_run) {
        int r = ctl_offline_commit_dry_run(o.chain, &opts, path);

        commit_options_clear(&opts);
        return r;
    }

    /* Ctrl-C from here on stops the copy; the flag is set before the copy
     * starts too, and acted on at its first tick. */
    ctl_catch_sigint(true);
    if (a->run.verbose) {
        ctl_progress_init(&progress, "Block Commit");
    }
    ok = merge_commit_offline(o.merge, o.chain, &opts,
                              ctl_offline_commit_progress,
                              a->run.verbose ? &progress : NULL, &err);
    if (a->run.verbose) {
        if (ok) {
            ctl_progress_update(&progress, 1, 1);
        }
        ctl_progress_done(&progress);
    }
    commit_options_clear(&opts);
    if (!ok && g_error_matches(err, CHAINFS_ERROR, ECANCELED)) {
        return ctl_fail("interrupted: %s", err->message);
    }
    if (!ok) {
        return ctl_fail("%s", err->message);
    }
    printf("Commit complete\n");
    return CTL_EXIT_OK;
}

/* ---- stream -------------------------------------------------------- */

/*
 * Offline stream: src/merge has no one-pass stream call, so run the job
 * on its thread and follow it here, as the daemon would.
 */
int ctl_offline_stream(const char *path, const CtlStreamArgs *a)
{
    g_auto(CtlOffline) o = { 0 };
    g_autoptr(GError) err = NULL;
    StreamOptions opts = { 0 };
    CtlProgress progress;
    g_autofree char *state = NULL;
    g_autofree char *error = NULL;
    gint64 deadline = 0;
    bool cancelled = false;
    bool timed_out = false;

    if (!ctl_offline_open(&o, path, true, true)) {
        return CTL_EXIT_FAIL;
    }
    opts.base = ctl_layer_name(a->base);
    opts.bandwidth = a->run.has_bandwidth ? a->run.bandwidth : 0;
    opts.on_error = ON_ERROR_REPORT;
    ctl_catch_sigint(false);
    if (!merge_start_stream(o.merge, o.chain, &opts, &err)) {
        stream_options_clear(&opts);
        return ctl_fail("%s", err->message);
    }
    stream_options_clear(&opts);
    if (a->run.timeout > 0) {
        deadline = g_get_monotonic_time() + (gint64)(a->run.timeout * 1e6);
    }
    if (a->run.verbose) {
        ctl_progress_init(&progress, "Block Pull");
    }
    for (;;) {
        g_autofree char *info = merge_job_info_json(o.chain);
        uint64_t done = 0, total = 0;

        g_free(state);
        state = json_get_member(info, "state");
        if (g_strcmp0(state, "completed") == 0 ||
            g_strcmp0(state, "failed") == 0 ||
            g_strcmp0(state, "cancelled") == 0) {
            g_free(error);
            error = json_get_member(info, "error");
            break;
        }
        if (a->run.verbose) {
            json_get_uint(info, "offset", &done);
            json_get_uint(info, "len", &total);
            ctl_progress_update(&progress, done, total);
        }
        if (!cancelled && (ctl_interrupted ||
                           (deadline && g_get_monotonic_time() >= deadline))) {
            g_autoptr(GError) cerr = NULL;

            timed_out = !ctl_interrupted;
            cancelled = true;
            merge_job_cancel(o.chain, &cerr);
        }
        ctl_nap(50);
    }
    if (a->run.verbose) {
        if (g_strcmp0(state, "completed") == 0) {
            ctl_progress_update(&progress, 1, 1);
        }
        ctl_progress_done(&progress);
    }
    if (g_strcmp0(state, "completed") == 0) {
        printf("Pull complete\n");
        return CTL_EXIT_OK;
    }
    if (cancelled) {
        if (timed_out) {
            return ctl_fail("timed out after %g s: stream cancelled",
                            a->run.timeout);
        }
        return ctl_fail("interrupted: stream cancelled");
    }
    return ctl_fail("stream failed: %s",
                    error && strcmp(error, "null") != 0 ? error : state);
}

/* ---- snapshot ------------------------------------------------------ */

int ctl_offline_snapshot(const char *path, const char *file)
{
    g_auto(CtlOffline) o = { 0 };
    g_autoptr(GError) err = NULL;

    if (!ctl_offline_open(&o, path, true, true)) {
        return CTL_EXIT_FAIL;
    }
    if (!merge_snapshot(o.merge, o.chain, file, &err)) {
        return ctl_fail("%s", err->message);
    }
    printf("Snapshot %s created: now the active layer of %s\n", file,
           o.chain->name);
    return CTL_EXIT_OK;
}

/* ---- resize -------------------------------------------------------- */

int ctl_offline_resize(const char *path, const CtlResizeArgs *a)
{
    g_auto(CtlOffline) o = { 0 };
    g_autoptr(GError) err = NULL;
    uint64_t cur, target;
    int r;

    if (!ctl_offline_open(&o, path, true, true)) {
        return CTL_EXIT_FAIL;
    }
    cur = chain_layer(o.chain, 0)->virtual_size;
    r = ctl_resize_target(a, cur, path, &target);
    if (r != CTL_EXIT_OK) {
        return r;
    }
    /* The same grow as a mounted chain's (merge_resize); closing the
     * chain flushes it. */
    if (!merge_resize(o.merge, o.chain, target, NULL, &err)) {
        return ctl_fail("%s", err->message);
    }
    printf("Resized %s from %" G_GUINT64_FORMAT " to %" G_GUINT64_FORMAT
           " bytes\n", chain_layer(o.chain, 0)->name, cur, target);
    return CTL_EXIT_OK;
}
