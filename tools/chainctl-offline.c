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
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>

#include "chainctl.h"
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

/* The format of img's backing file: as recorded, else the next layer's. */
static const char *ctl_backing_format(Chain *chain, guint i)
{
    ChainImage *img = chain_layer(chain, i);

    if (img->backing_fmt) {
        return img->backing_fmt;
    }
    if (i + 1 < chain_depth(chain)) {
        return chain_layer(chain, i + 1)->drv->format_name;
    }
    return NULL;
}

int ctl_offline_info(const char *path, bool json)
{
    g_auto(CtlOffline) o = { 0 };
    Chain *chain;

    if (!ctl_offline_open(&o, path, false, false)) {
        return CTL_EXIT_FAIL;
    }
    chain = o.chain;
    if (json) {
        /* design.md's chain object; cluster_size and backing_format are
         * extra members. */
        g_autoptr(GString) out = g_string_new("{");

        json_append_member_string(out, "name", chain->name);
        json_append_key(out, "layers");
        g_string_append_c(out, '[');
        for (guint i = 0; i < chain_depth(chain); i++) {
            ChainImage *img = chain_layer(chain, i);
            uint64_t alloc = img->drv->allocated_bytes ?
                             img->drv->allocated_bytes(img) : 0;

            if (i > 0) {
                g_string_append_c(out, ',');
            }
            g_string_append_c(out, '{');
            json_append_member_string(out, "file", img->name);
            json_append_member_string(out, "format", img->drv->format_name);
            json_append_member_uint(out, "virtual_size", img->virtual_size);
            json_append_member_uint(out, "allocated", alloc);
            json_append_member_string(out, "backing", img->backing_ref);
            json_append_member_uint(out, "cluster_size", img->cluster_size);
            json_append_member_string(out, "backing_format",
                                      img->backing_ref ?
                                      ctl_backing_format(chain, i) : NULL);
            g_string_append_c(out, '}');
        }
        g_string_append(out, "]}");
        printf("%s\n", out->str);
        return CTL_EXIT_OK;
    }
    for (guint i = 0; i < chain_depth(chain); i++) {
        ChainImage *img = chain_layer(chain, i);
        uint64_t alloc = img->drv->allocated_bytes ?
                         img->drv->allocated_bytes(img) : 0;
        g_autofree char *vsize_h = ctl_human_size(img->virtual_size);
        g_autofree char *alloc_h = ctl_human_size(alloc);
        const char *bfmt = ctl_backing_format(chain, i);

        if (i > 0) {
            printf("\n");
        }
        printf("image: %s\n", img->name);
        printf("file format: %s\n", img->drv->format_name);
        printf("virtual size: %s (%" PRIu64 " bytes)\n", vsize_h,
               img->virtual_size);
        printf("allocated: %s (%" PRIu64 " bytes)\n", alloc_h, alloc);
        if (strcmp(img->drv->format_name, "raw") != 0) {
            printf("cluster_size: %" PRIu32 "\n", img->cluster_size);
        }
        if (img->backing_ref) {
            printf("backing file: %s\n", img->backing_ref);
            if (bfmt) {
                printf("backing file format: %s\n", bfmt);
            }
        }
    }
    return CTL_EXIT_OK;
}

/* ---- commit -------------------------------------------------------- */

static void ctl_offline_progress(void *opaque, uint64_t done, uint64_t total)
{
    ctl_progress_update(opaque, done, total);
}

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
    opts->bandwidth = a->has_bandwidth ? a->bandwidth : 0;
    opts->on_error = ON_ERROR_REPORT;
}

/* The names top and base stand for, for messages (NULL when unknown). */
static void ctl_commit_names(Chain *chain, const CommitOptions *opts,
                             const char **top, const char **base)
{
    int t = opts->top ? chain_find_layer(chain, opts->top) : 0;
    int b;

    *top = NULL;
    *base = NULL;
    if (t < 0) {
        return;
    }
    *top = chain_layer(chain, (guint)t)->name;
    b = opts->base ? chain_find_layer(chain, opts->base) :
        opts->shallow ? t + 1 : (int)chain_depth(chain) - 1;
    if (b > t && b < (int)chain_depth(chain)) {
        *base = chain_layer(chain, (guint)b)->name;
    }
}

int ctl_offline_commit(const char *path, const CtlCommitArgs *a)
{
    g_auto(CtlOffline) o = { 0 };
    g_autoptr(GError) err = NULL;
    CommitOptions opts;
    CtlProgress progress;
    const char *top_name, *base_name;
    uint64_t need = 0;
    bool ok;

    /* A dry run writes nothing: open everything read-only. */
    if (!ctl_offline_open(&o, path, !a->dry_run, !a->dry_run)) {
        return CTL_EXIT_FAIL;
    }
    ctl_commit_options(a, o.chain, &opts);
    ctl_commit_names(o.chain, &opts, &top_name, &base_name);

    if (a->dry_run) {
        ok = merge_commit_estimate(o.chain, &opts, &need, &err);
        if (ok) {
            g_autofree char *need_h = ctl_human_size(need);

            printf("top: %s\nbase: %s\nneeds: %" PRIu64 " bytes (%s)\n",
                   top_name ? top_name : "?", base_name ? base_name : "?",
                   need, need_h);
            if (base_name) {
                /* Where base lives, as resolved (it may be a symlink). */
                int b = chain_find_layer(o.chain, base_name);
                struct statvfs vfs;

                if (b >= 0 &&
                    statvfs(chain_layer(o.chain, (guint)b)->dir, &vfs) == 0) {
                    uint64_t avail = (uint64_t)vfs.f_bavail * vfs.f_frsize;
                    g_autofree char *avail_h = ctl_human_size(avail);

                    printf("available: %" PRIu64 " bytes (%s)\n", avail,
                           avail_h);
                }
            }
        }
        commit_options_clear(&opts);
        return ok ? CTL_EXIT_OK : ctl_fail("%s", err->message);
    }

    if (a->verbose) {
        ctl_progress_init(&progress, "Block Commit");
    }
    ok = merge_commit_offline(o.merge, o.chain, &opts, false, &need,
                              a->verbose ? ctl_offline_progress : NULL,
                              a->verbose ? &progress : NULL, &err);
    if (a->verbose) {
        if (ok) {
            ctl_progress_update(&progress, 1, 1);
        }
        ctl_progress_done(&progress);
    }
    commit_options_clear(&opts);
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
    opts.bandwidth = a->has_bandwidth ? a->bandwidth : 0;
    opts.on_error = ON_ERROR_REPORT;
    ctl_catch_sigint();
    if (!merge_start_stream(o.merge, o.chain, &opts, &err)) {
        stream_options_clear(&opts);
        return ctl_fail("%s", err->message);
    }
    stream_options_clear(&opts);
    if (a->timeout > 0) {
        deadline = g_get_monotonic_time() + (gint64)(a->timeout * 1e6);
    }
    if (a->verbose) {
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
        if (a->verbose) {
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
    if (a->verbose) {
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
                            a->timeout);
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
