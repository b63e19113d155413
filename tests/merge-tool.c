/*
 * merge-tool.c: drive the merge engine on an image directory without the
 * daemon, for tests/test_merge_*.py.
 *
 *   merge-tool DIR TOPFILE commit|stream|resume WORDS [options]
 *
 * Opens the chain whose active layer is TOPFILE read-write, starts the job
 * (resume: merge_resume_interrupted), and while it runs, optionally writes
 * seeded random data through the chain and reads it back against an
 * in-memory model of the disk.  Prints one JSON line per job state change
 * and progress step on stdout.  At the end reads the whole disk back
 * against the model.
 *
 * Options:
 *   --writer SEED     a writer/reader thread with this seed
 *   --pivot           pivot when the job is ready
 *   --cancel-at-ready cancel when the job is ready
 *   --writes-before-pivot N  guest writes to wait for in ready first
 *   --expect STATE    exit 1 unless the job ends in STATE
 *   --cancel-after N  cancel once N bytes were copied
 *
 * Exit: 0 fine, 1 job ended otherwise than expected, 2 usage or setup,
 * 3 the disk read back differs from the model.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chain-io.h"
#include "json.h"
#include "merge.h"

typedef struct {
    Chain *chain;
    uint8_t *model;
    uint64_t size;
    guint32 seed;
    gint stop;
    gint writes;      /* completed guest writes */
    gint failures;    /* read-back mismatches or I/O errors */
    GMutex model_lock;
} Writer;

static gpointer writer_main(gpointer opaque)
{
    Writer *w = opaque;
    GRand *rng = g_rand_new_with_seed(w->seed);
    uint8_t *buf = g_malloc(256 * 1024);
    uint8_t *rbuf = g_malloc(256 * 1024);

    while (!g_atomic_int_get(&w->stop)) {
        uint64_t len = (uint64_t)g_rand_int_range(rng, 1, 257) * 1024;
        uint64_t off = (uint64_t)g_rand_double_range(rng, 0,
                                                     (double)(w->size - len));
        bool zero = g_rand_int_range(rng, 0, 10) == 0;
        int ret;

        off &= ~511ULL;
        if (zero) {
            ret = chain_pwrite_zeroes(w->chain, off, len);
            memset(buf, 0, len);
        } else {
            for (uint64_t i = 0; i < len; i += 4) {
                guint32 r = g_rand_int(rng);
                memcpy(buf + i, &r, MIN(4, len - i));
            }
            ret = chain_pwrite(w->chain, off, buf, len);
        }
        if (ret < 0) {
            fprintf(stderr, "write at %" G_GUINT64_FORMAT " failed: %s\n",
                    off, g_strerror(-ret));
            g_atomic_int_inc(&w->failures);
            break;
        }
        g_mutex_lock(&w->model_lock);
        memcpy(w->model + off, buf, len);
        g_mutex_unlock(&w->model_lock);
        g_atomic_int_inc(&w->writes);

        /* Read back a random range: the export must show the model. */
        off = (uint64_t)g_rand_double_range(rng, 0, (double)(w->size - len));
        ret = chain_pread(w->chain, off, rbuf, len);
        if (ret < 0 || memcmp(rbuf, w->model + off, len) != 0) {
            fprintf(stderr, "read-back at %" G_GUINT64_FORMAT " (%"
                    G_GUINT64_FORMAT ") differs (%d)\n", off, len, ret);
            g_atomic_int_inc(&w->failures);
            break;
        }
    }
    g_free(buf);
    g_free(rbuf);
    g_rand_free(rng);
    return NULL;
}

static int check_disk(Chain *chain, const uint8_t *model, uint64_t size)
{
    uint8_t *buf = g_malloc(1 << 20);
    int bad = 0;

    for (uint64_t off = 0; off < size; off += 1 << 20) {
        uint64_t n = MIN((uint64_t)1 << 20, size - off);

        if (chain_pread(chain, off, buf, n) < 0 ||
            memcmp(buf, model + off, n) != 0) {
            fprintf(stderr, "disk differs from the model in [%"
                    G_GUINT64_FORMAT ", +%" G_GUINT64_FORMAT ")\n", off, n);
            bad = 1;
            break;
        }
    }
    g_free(buf);
    return bad;
}

int main(int argc, char **argv)
{
    g_autoptr(GError) err = NULL;
    gint64 seed = -1;
    gboolean pivot = FALSE, cancel_at_ready = FALSE;
    gint64 writes_before_pivot = 0, cancel_after = -1;
    g_autofree char *expect = NULL;
    GOptionEntry entries[] = {
        { "writer", 0, 0, G_OPTION_ARG_INT64, &seed, "writer seed", "SEED" },
        { "pivot", 0, 0, G_OPTION_ARG_NONE, &pivot, "pivot when ready", NULL },
        { "cancel-at-ready", 0, 0, G_OPTION_ARG_NONE, &cancel_at_ready,
          "cancel when ready", NULL },
        { "writes-before-pivot", 0, 0, G_OPTION_ARG_INT64,
          &writes_before_pivot, "writes in ready first", "N" },
        { "cancel-after", 0, 0, G_OPTION_ARG_INT64, &cancel_after,
          "cancel after N copied bytes", "N" },
        { "expect", 0, 0, G_OPTION_ARG_STRING, &expect, "final state", "S" },
        { NULL },
    };
    g_autoptr(GOptionContext) octx = g_option_context_new(
        "DIR TOPFILE commit|stream|resume WORDS");
    ImageSet *set;
    Chain *chain;
    MergeContext *ctx;
    Writer w = { 0 };
    GThread *wt = NULL;
    g_autofree char *last_state = NULL;
    uint64_t last_copied = UINT64_MAX;
    bool ok;
    int rc = 0;

    g_option_context_add_main_entries(octx, entries, NULL);
    if (!g_option_context_parse(octx, &argc, &argv, &err) || argc < 4) {
        fprintf(stderr, "usage: merge-tool DIR TOPFILE VERB [WORDS]\n");
        return 2;
    }
    set = image_set_new(argv[1], &err);
    if (!set) {
        fprintf(stderr, "%s\n", err->message);
        return 2;
    }
    chain = chain_open(set, argv[2], NULL, true, &err);
    if (!chain) {
        fprintf(stderr, "%s\n", err->message);
        image_set_free(set);
        return 2;
    }
    ctx = merge_context_new(set);
    merge_context_add_chain(ctx, chain);

    w.chain = chain;
    w.size = chain_size(chain);
    w.model = g_malloc(w.size);
    g_mutex_init(&w.model_lock);
    if (chain_pread(chain, 0, w.model, w.size) < 0) {
        fprintf(stderr, "cannot read the disk\n");
        return 2;
    }

    if (strcmp(argv[3], "commit") == 0) {
        CommitOptions o = { 0 };

        ok = commit_options_parse(argc > 4 ? argv[4] : "", &o, &err) &&
             merge_start_commit(ctx, chain, &o, &err);
        commit_options_clear(&o);
    } else if (strcmp(argv[3], "stream") == 0) {
        StreamOptions o = { 0 };

        ok = stream_options_parse(argc > 4 ? argv[4] : "", &o, &err) &&
             merge_start_stream(ctx, chain, &o, &err);
        stream_options_clear(&o);
    } else {
        ok = merge_resume_interrupted(ctx, chain, &err);
    }
    if (!ok) {
        printf("{\"event\":\"refused\",\"errno\":%d,\"message\":",
               chainfs_error_errno(err));
        {
            GString *s = g_string_new(NULL);
            json_append_string(s, err->message);
            printf("%s}\n", s->str);
            g_string_free(s, TRUE);
        }
        fflush(stdout);
        rc = expect && strcmp(expect, "refused") == 0 ? 0 : 1;
        goto out;
    }
    if (seed >= 0) {
        w.seed = (guint32)seed;
        wt = g_thread_new("writer", writer_main, &w);
    }

    for (;;) {
        g_autofree char *info = merge_job_info_json(chain);
        g_autofree char *state = json_get_member(info, "state");
        uint64_t copied = 0;

        json_get_uint(info, "copied", &copied);
        if (!state) {
            /* "{}": resume found nothing to do. */
            printf("{\"event\":\"nojob\"}\n");
            fflush(stdout);
            break;
        }
        if (g_strcmp0(state, last_state) != 0 || copied != last_copied) {
            printf("%s\n", info);
            fflush(stdout);
            g_free(last_state);
            last_state = g_strdup(state);
            last_copied = copied;
        }
        if (cancel_after >= 0 && copied >= (uint64_t)cancel_after &&
            strcmp(state, "running") == 0) {
            g_autoptr(GError) e = NULL;

            if (!merge_job_cancel(chain, &e)) {
                fprintf(stderr, "cancel: %s\n", e->message);
            }
            cancel_after = -1;
        }
        if (strcmp(state, "ready") == 0 &&
            (!wt || g_atomic_int_get(&w.writes) >= writes_before_pivot)) {
            g_autoptr(GError) e = NULL;

            if (pivot && !merge_job_pivot(chain, &e)) {
                fprintf(stderr, "pivot: %s\n", e->message);
                rc = 1;
            }
            if (cancel_at_ready && !merge_job_cancel(chain, &e)) {
                fprintf(stderr, "cancel: %s\n", e->message);
                rc = 1;
            }
            pivot = cancel_at_ready = FALSE;
        }
        if (strcmp(state, "completed") == 0 ||
            strcmp(state, "failed") == 0 ||
            strcmp(state, "cancelled") == 0) {
            break;
        }
        g_usleep(5000);
    }
    if (wt) {
        g_atomic_int_set(&w.stop, 1);
        g_thread_join(wt);
        printf("{\"event\":\"writer\",\"writes\":%d,\"failures\":%d}\n",
               g_atomic_int_get(&w.writes), g_atomic_int_get(&w.failures));
        if (g_atomic_int_get(&w.failures)) {
            rc = 3;
        }
    }
    if (expect && g_strcmp0(expect, last_state) != 0 && last_state) {
        fprintf(stderr, "job ended %s, expected %s\n", last_state, expect);
        rc = rc ? rc : 1;
    }
    if (check_disk(chain, w.model, w.size)) {
        rc = 3;
    }
out:
    if (chain_flush(chain) < 0) {
        fprintf(stderr, "flush failed\n");
        rc = rc ? rc : 2;
    }
    merge_context_free(ctx);
    chain_free(chain);
    image_set_free(set);
    g_free(w.model);
    fflush(stdout);
    return rc;
}
