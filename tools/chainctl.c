/*
 * chainctl.c: main() of chainctl, the command-line client of chainfs.
 *
 *     chainctl info       MOUNTPOINT/NAME | IMAGE  [--json]
 *     chainctl commit     MOUNTPOINT/NAME | IMAGE  [options]
 *     chainctl job        MOUNTPOINT/NAME [--info | --abort | --pivot | --pause
 *                         | --resume | --speed N] [--wait]
 *     chainctl snapshot   MOUNTPOINT/NAME | IMAGE  FILE
 *     chainctl stream     MOUNTPOINT/NAME | IMAGE  [--base F] [--bandwidth N]
 *                         [--wait] [--verbose]
 *     chainctl map        MOUNTPOINT/NAME | IMAGE  [--width N] [--json]
 *     chainctl resize     MOUNTPOINT/NAME | IMAGE  [+]SIZE [--shrink]
 *
 * This file parses the command line (one GOptionContext per subcommand),
 * tells an export from an image file, and hands over to chainctl-online.c
 * or chainctl-offline.c.  Exit status: 0 success, 1 failure with one line
 * on stderr, 2 wrong usage (the usage goes to stderr).
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "chainctl.h"
#include "json.h"

/* ---- helpers shared by both modes ---------------------------------- */

volatile sig_atomic_t ctl_interrupted;

int ctl_fail(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    g_autofree char *msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    /* One line, whatever the message holds: scripts read stderr by line. */
    g_strdelimit(g_strstrip(msg), "\r\n", ' ');
    fflush(stdout);
    fprintf(stderr, "chainctl: %s\n", msg);
    return CTL_EXIT_FAIL;
}

static void ctl_on_sigint(int sig)
{
    (void)sig;
    ctl_interrupted = 1;
}

void ctl_catch_sigint(bool restart_syscalls)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = ctl_on_sigint;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = restart_syscalls ? SA_RESTART : 0;
    sigaction(SIGINT, &sa, NULL);
}

void ctl_nap(unsigned ms)
{
    struct timespec ts = {
        .tv_sec = ms / 1000,
        .tv_nsec = (long)(ms % 1000) * 1000000L,
    };

    nanosleep(&ts, NULL);
}

char *ctl_human_size(uint64_t bytes)
{
    static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB",
                                         "PiB", "EiB" };
    double v = (double)bytes;
    unsigned u = 0;

    while (v >= 1024.0 && u + 1 < G_N_ELEMENTS(units)) {
        v /= 1024.0;
        u++;
    }
    /* Three significant digits, as qemu-img info prints sizes. */
    return g_strdup_printf("%0.3g %s", v, units[u]);
}

void ctl_progress_init(CtlProgress *p, const char *label)
{
    p->label = label;
    p->tty = isatty(STDOUT_FILENO);
    p->last_percent = -1;
}

void ctl_progress_update(CtlProgress *p, uint64_t done, uint64_t total)
{
    int percent;

    if (total == 0) {
        percent = 0;
    } else {
        /* Never show 100 % before the job says it is done. */
        percent = (int)MIN((double)done * 100.0 / (double)total, 100.0);
    }
    if (percent == p->last_percent) {
        return;
    }
    p->last_percent = percent;
    if (p->tty) {
        printf("\r%s: [%3d %%]", p->label, percent);
    } else {
        printf("%s: [%3d %%]\n", p->label, percent);
    }
    fflush(stdout);
}

void ctl_progress_done(CtlProgress *p)
{
    if (p->tty && p->last_percent >= 0) {
        printf("\n");
        fflush(stdout);
    }
    p->last_percent = -1;
}

/* Skip one JSON value at p; returns the position after it, NULL if broken. */
static const char *ctl_json_skip_value(const char *p)
{
    int depth = 0;

    do {
        while (g_ascii_isspace(*p)) {
            p++;
        }
        if (*p == '"') {
            for (p++; *p && *p != '"'; p++) {
                if (*p == '\\' && !*++p) {
                    return NULL;
                }
            }
            if (*p != '"') {
                return NULL;
            }
            p++;
        } else if (*p == '{' || *p == '[') {
            depth++;
            p++;
        } else if (*p == '}' || *p == ']') {
            if (depth == 0) {
                return NULL;
            }
            depth--;
            p++;
        } else if (*p == ',' || *p == ':') {
            if (depth == 0) {
                return NULL;
            }
            p++;
        } else {
            const char *start = p;

            while (*p && !strchr(",:{}[]\" \t\r\n", *p)) {
                p++;
            }
            if (p == start) {
                return NULL;
            }
        }
    } while (depth > 0);
    return p;
}

GPtrArray *ctl_json_array_items(const char *text)
{
    g_autoptr(GPtrArray) items = g_ptr_array_new_with_free_func(g_free);
    const char *p = text;

    while (g_ascii_isspace(*p)) {
        p++;
    }
    if (*p++ != '[') {
        return NULL;
    }
    while (g_ascii_isspace(*p)) {
        p++;
    }
    if (*p == ']') {
        return g_steal_pointer(&items);
    }
    for (;;) {
        while (g_ascii_isspace(*p)) {
            p++;
        }
        const char *start = p;
        const char *end = ctl_json_skip_value(p);

        if (!end) {
            return NULL;
        }
        g_ptr_array_add(items, g_strndup(start, (gsize)(end - start)));
        p = end;
        while (g_ascii_isspace(*p)) {
            p++;
        }
        if (*p == ',') {
            p++;
            continue;
        }
        if (*p == ']') {
            return g_steal_pointer(&items);
        }
        return NULL;
    }
}

char *ctl_json_member(const char *obj, const char *key)
{
    char *v = json_get_member(obj, key);

    if (g_strcmp0(v, "null") == 0) {
        g_clear_pointer(&v, g_free);
    }
    return v;
}

int ctl_print_chain(const char *chain_json, const char *source)
{
    g_autofree char *layers_text = json_get_member(chain_json, "layers");
    g_autoptr(GPtrArray) layers = layers_text ?
                                  ctl_json_array_items(layers_text) : NULL;

    if (!layers) {
        return ctl_fail("malformed chain JSON from %s", source);
    }
    /* Only when it says so: a daemon older than "writable" omits it. */
    g_autofree char *writable = json_get_member(chain_json, "writable");
    if (writable && strcmp(g_strstrip(writable), "false") == 0) {
        g_autofree char *reason = ctl_json_member(chain_json, "reason");
        printf("read-only: %s\n\n", reason ? reason : "yes");
    }
    for (guint i = 0; i < layers->len; i++) {
        const char *l = g_ptr_array_index(layers, i);
        g_autofree char *file = ctl_json_member(l, "file");
        g_autofree char *format = ctl_json_member(l, "format");
        g_autofree char *backing = ctl_json_member(l, "backing");
        g_autofree char *backing_fmt = ctl_json_member(l, "backing_format");
        g_autofree char *vsize_h = NULL, *alloc_h = NULL;
        uint64_t vsize = 0, alloc = 0, cluster = 0;

        json_get_uint(l, "virtual_size", &vsize);
        json_get_uint(l, "allocated", &alloc);
        vsize_h = ctl_human_size(vsize);
        alloc_h = ctl_human_size(alloc);
        if (i > 0) {
            printf("\n");
        }
        printf("image: %s\n", file ? file : "?");
        printf("file format: %s\n", format ? format : "?");
        printf("virtual size: %s (%" PRIu64 " bytes)\n", vsize_h, vsize);
        printf("allocated: %s (%" PRIu64 " bytes)\n", alloc_h, alloc);
        /* null for raw, which has no clusters */
        if (json_get_uint(l, "cluster_size", &cluster)) {
            printf("cluster_size: %" PRIu64 "\n", cluster);
        }
        if (backing) {
            printf("backing file: %s\n", backing);
            /* A daemon older than backing_format: the next layer's. */
            if (!backing_fmt && i + 1 < layers->len) {
                backing_fmt = ctl_json_member(g_ptr_array_index(layers, i + 1),
                                              "format");
            }
            if (backing_fmt) {
                printf("backing file format: %s\n", backing_fmt);
            }
        }
    }
    return CTL_EXIT_OK;
}

int ctl_print_commit_room(const char *room_json, const char *source)
{
    g_autofree char *top = ctl_json_member(room_json, "top");
    g_autofree char *base = ctl_json_member(room_json, "base");
    g_autofree char *needed_h = NULL, *available_h = NULL;
    uint64_t needed, available;

    if (!top || !base || !json_get_uint(room_json, "needed_bytes", &needed) ||
        !json_get_uint(room_json, "available_bytes", &available)) {
        return ctl_fail("malformed commit estimate from %s", source);
    }
    needed_h = ctl_human_size(needed);
    available_h = ctl_human_size(available);
    printf("top: %s\nbase: %s\n", top, base);
    printf("needs: %" PRIu64 " bytes (%s)\n", needed, needed_h);
    printf("available: %" PRIu64 " bytes (%s)\n", available, available_h);
    return CTL_EXIT_OK;
}

/* ---- command line ---------------------------------------------------- */

static const struct {
    const char *name;
    const char *args;
    const char *summary;
} ctl_commands[] = {
    { "info", "MOUNTPOINT/NAME | IMAGE",
      "Show the backing chain, its layers and the current job." },
    { "commit", "MOUNTPOINT/NAME | IMAGE",
      "Merge layers of the chain down into a base layer." },
    { "job", "MOUNTPOINT/NAME",
      "Show or act on the current job of a mounted chain." },
    { "snapshot", "MOUNTPOINT/NAME | IMAGE FILE",
      "Add FILE as a new qcow2 overlay and make it the active layer." },
    { "stream", "MOUNTPOINT/NAME | IMAGE",
      "Pull data from the backing layers up into the active layer." },
    { "map", "MOUNTPOINT/NAME | IMAGE",
      "Draw where each layer holds data and what a commit of it copies." },
    { "events", "[MOUNTPOINT[/NAME]]",
      "Print job, snapshot and other events of a mount as they come." },
    { "resize", "MOUNTPOINT/NAME | IMAGE SIZE",
      "Grow the disk; the new range reads as zeros." },
};

static void ctl_print_usage(FILE *out)
{
    fprintf(out, "Usage: chainctl COMMAND ARGS... [OPTION...]\n\n"
                 "Commands:\n");
    for (size_t i = 0; i < G_N_ELEMENTS(ctl_commands); i++) {
        fprintf(out, "  %-9s %s\n            %s\n", ctl_commands[i].name,
                ctl_commands[i].args, ctl_commands[i].summary);
    }
    fprintf(out,
            "\nGiven an exported file (MOUNTPOINT/NAME) chainctl drives the "
            "chainfs daemon;\ngiven an image file it works offline on the "
            "files.\n"
            "Run \"chainctl COMMAND --help\" for the options of a command.\n"
            "Exit status: 0 success, 1 failure, 2 wrong usage.\n");
}

/* A usage error: message and the command's usage on stderr. */
static int ctl_usage_error(GOptionContext *ctx, const char *fmt, ...)
    G_GNUC_PRINTF(2, 3);

static int ctl_usage_error(GOptionContext *ctx, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    g_autofree char *msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    fprintf(stderr, "chainctl: %s\n", msg);
    if (ctx) {
        g_autofree char *help = g_option_context_get_help(ctx, TRUE, NULL);
        fprintf(stderr, "%s", help);
    } else {
        ctl_print_usage(stderr);
    }
    return CTL_EXIT_USAGE;
}

/*
 * Make the option context of one subcommand.  GLib's own --help handling
 * calls exit(), so help is an ordinary flag here, handled by the caller.
 */
static GOptionContext *ctl_context_new(const char *command, const char *args,
                                       const char *summary,
                                       const char *description,
                                       GOptionEntry *entries)
{
    g_autofree char *prgname = g_strdup_printf("chainctl %s", command);
    GOptionContext *ctx = g_option_context_new(args);

    g_set_prgname(prgname);
    g_option_context_set_help_enabled(ctx, FALSE);
    g_option_context_set_summary(ctx, summary);
    if (description) {
        g_option_context_set_description(ctx, description);
    }
    g_option_context_add_main_entries(ctx, entries, NULL);
    return ctx;
}

/*
 * Parse the options; returns -1 to go on, else an exit status (help
 * printed: 0; bad options: 2).
 */
static int ctl_context_parse(GOptionContext *ctx, int *argc, char ***argv,
                             const gboolean *help)
{
    g_autoptr(GError) err = NULL;

    if (!g_option_context_parse(ctx, argc, argv, &err)) {
        return ctl_usage_error(ctx, "%s", err->message);
    }
    if (*help) {
        g_autofree char *text = g_option_context_get_help(ctx, TRUE, NULL);
        printf("%s", text);
        return CTL_EXIT_OK;
    }
    return -1;
}

/*
 * A rate as virsh takes it: a plain number is MiB/s (bytes/s with
 * in_bytes); a K, M or G suffix means bytes with that multiplier
 * (powers of 1024).
 */
static bool ctl_parse_rate(const char *text, bool in_bytes, uint64_t *out)
{
    char *end = NULL;
    uint64_t v, mult;

    if (!text || !g_ascii_isdigit(text[0])) {
        return false;
    }
    errno = 0;
    v = g_ascii_strtoull(text, &end, 10);
    if (errno) {
        return false;
    }
    switch (g_ascii_toupper(*end)) {
    case '\0':
        mult = in_bytes ? 1 : 1024 * 1024;
        break;
    case 'B':
        mult = 1;
        end++;
        break;
    case 'K':
        mult = 1024;
        end++;
        break;
    case 'M':
        mult = 1024 * 1024;
        end++;
        break;
    case 'G':
        mult = 1024 * 1024 * 1024;
        end++;
        break;
    default:
        return false;
    }
    /* Allow "50M", "50MiB", "50MB". */
    if (mult > 1 && g_ascii_strcasecmp(end, "iB") != 0 &&
        g_ascii_strcasecmp(end, "B") != 0 && *end != '\0') {
        return false;
    }
    if (mult == 1 && *end != '\0') {
        return false;
    }
    if (v > UINT64_MAX / mult) {
        return false;
    }
    *out = v * mult;
    return true;
}

static bool ctl_parse_timeout(const char *text, double *out)
{
    char *end = NULL;
    double v;

    if (!text) {
        return false;
    }
    v = g_ascii_strtod(text, &end);
    if (end == text || *end != '\0' || !(v > 0) || !isfinite(v)) {
        return false;
    }
    *out = v;
    return true;
}

/* A rate option (--bandwidth, --speed); FALSE after the usage error. */
static bool ctl_rate_option(GOptionContext *ctx, const char *option,
                            const char *text, bool in_bytes, uint64_t *out)
{
    if (ctl_parse_rate(text, in_bytes, out)) {
        return true;
    }
    ctl_usage_error(ctx, "bad --%s \"%s\": a number of MiB/s, or bytes with "
                    "a K, M or G suffix", option, text);
    return false;
}

/* --timeout; FALSE after the usage error. */
static bool ctl_timeout_option(GOptionContext *ctx, const char *text,
                               double *out)
{
    if (ctl_parse_timeout(text, out)) {
        return true;
    }
    ctl_usage_error(ctx, "bad --timeout \"%s\": seconds, more than 0", text);
    return false;
}

/* The options commit and stream share (CtlRunArgs), as GOption sets them. */
typedef struct {
    char *bandwidth;
    gboolean bytes;
    gboolean wait;
    gboolean verbose;
    char *timeout;
    gboolean async;
} CtlRunOptions;

static void ctl_run_options_clear(CtlRunOptions *o)
{
    g_clear_pointer(&o->bandwidth, g_free);
    g_clear_pointer(&o->timeout, g_free);
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(CtlRunOptions, ctl_run_options_clear)

/*
 * Convert the shared options once the command has checked how they
 * combine; --verbose and --timeout imply --wait.  FALSE after the usage
 * error.
 */
static bool ctl_run_options_convert(GOptionContext *ctx,
                                    const CtlRunOptions *o, CtlRunArgs *out)
{
    if (o->bandwidth) {
        if (!ctl_rate_option(ctx, "bandwidth", o->bandwidth, o->bytes,
                             &out->bandwidth)) {
            return false;
        }
        out->has_bandwidth = true;
    }
    if (o->timeout && !ctl_timeout_option(ctx, o->timeout, &out->timeout)) {
        return false;
    }
    out->wait = o->wait || o->verbose || o->timeout != NULL;
    out->verbose = o->verbose;
    out->async = o->async;
    return true;
}

/*
 * Look at the target: 1 an export, 0 an image file; on failure print the
 * reason and return -1.
 */
static int ctl_classify(const char *path)
{
    int r = ctl_target_is_export(path);

    if (r < 0) {
        ctl_fail("%s: %s", path, g_strerror(-r));
        return -1;
    }
    return r;
}

/* ---- info ---------------------------------------------------------- */

static int ctl_cmd_info(int argc, char **argv)
{
    gboolean help = FALSE, json = FALSE;
    GOptionEntry entries[] = {
        { "json", 0, 0, G_OPTION_ARG_NONE, &json,
          "Print the chain (and the job, online) as JSON", NULL },
        { "help", 'h', 0, G_OPTION_ARG_NONE, &help, "Show this help", NULL },
        { NULL },
    };
    g_autoptr(GOptionContext) ctx = ctl_context_new(
        "info", "MOUNTPOINT/NAME | IMAGE",
        "Show the backing chain as \"qemu-img info --backing-chain\" does, "
        "with the bytes each layer allocates,\nand the current job of a "
        "mounted chain.", NULL, entries);
    int r = ctl_context_parse(ctx, &argc, &argv, &help);

    if (r >= 0) {
        return r;
    }
    if (argc != 2) {
        return ctl_usage_error(ctx, "info takes one MOUNTPOINT/NAME or IMAGE");
    }
    r = ctl_classify(argv[1]);
    if (r < 0) {
        return CTL_EXIT_FAIL;
    }
    return r ? ctl_online_info(argv[1], json) : ctl_offline_info(argv[1], json);
}

/* ---- commit -------------------------------------------------------- */

static int ctl_cmd_commit(int argc, char **argv)
{
    gboolean help = FALSE, shallow = FALSE, active = FALSE, del = FALSE;
    gboolean keep_relative = FALSE, dry_run = FALSE, pivot = FALSE;
    gboolean keep_overlay = FALSE, force = FALSE;
    g_autofree char *top = NULL, *base = NULL;
    g_auto(CtlRunOptions) run = { 0 };
    GOptionEntry entries[] = {
        { "top", 0, 0, G_OPTION_ARG_STRING, &top,
          "Top layer to commit (default: the active layer)", "F" },
        { "base", 0, 0, G_OPTION_ARG_STRING, &base,
          "Layer to commit into (default: the bottom of the chain)", "F" },
        { "shallow", 0, 0, G_OPTION_ARG_NONE, &shallow,
          "Commit into the immediate backing file of top", NULL },
        { "active", 0, 0, G_OPTION_ARG_NONE, &active,
          "Allow committing the active layer (active commit)", NULL },
        { "delete", 0, 0, G_OPTION_ARG_NONE, &del,
          "Delete the files dropped from the chain once done", NULL },
        { "keep-relative", 0, 0, G_OPTION_ARG_NONE, &keep_relative,
          "Write the new backing reference as a relative path", NULL },
        { "force", 0, 0, G_OPTION_ARG_NONE, &force,
          "Commit into a base (or drop layers) that other chains use", NULL },
        { "bandwidth", 0, 0, G_OPTION_ARG_STRING, &run.bandwidth,
          "Speed limit in MiB/s (K, M, G suffixes: bytes)", "N" },
        { "bytes", 0, 0, G_OPTION_ARG_NONE, &run.bytes,
          "--bandwidth is in bytes per second", NULL },
        { "dry-run", 0, 0, G_OPTION_ARG_NONE, &dry_run,
          "Print the space the commit needs and change nothing", NULL },
        { "wait", 0, 0, G_OPTION_ARG_NONE, &run.wait,
          "Wait until the commit ends (active commit: until ready)", NULL },
        { "verbose", 0, 0, G_OPTION_ARG_NONE, &run.verbose,
          "Show progress (implies --wait)", NULL },
        { "timeout", 0, 0, G_OPTION_ARG_STRING, &run.timeout,
          "Cancel the job after S seconds and fail (implies --wait)", "S" },
        { "pivot", 0, 0, G_OPTION_ARG_NONE, &pivot,
          "Active commit: once ready, make base the active layer", NULL },
        { "keep-overlay", 0, 0, G_OPTION_ARG_NONE, &keep_overlay,
          "Active commit: once ready, end the job keeping the overlay",
          NULL },
        { "async", 0, 0, G_OPTION_ARG_NONE, &run.async,
          "Return as soon as the job has started", NULL },
        { "help", 'h', 0, G_OPTION_ARG_NONE, &help, "Show this help", NULL },
        { NULL },
    };
    g_autoptr(GOptionContext) ctx = ctl_context_new(
        "commit", "MOUNTPOINT/NAME | IMAGE",
        "Merge the layers from top down to base into base (libvirt's "
        "blockcommit).\nOn an exported file the daemon runs the job while "
        "the disk stays in use;\non an image file the commit runs here, "
        "in one pass, like \"qemu-img commit\".",
        "F names a layer by its file name in the image directory.\n"
        "Without --wait (or an option implying it) an online commit returns "
        "once the job runs.", entries);
    CtlCommitArgs a = { 0 };
    int r = ctl_context_parse(ctx, &argc, &argv, &help);

    if (r >= 0) {
        return r;
    }
    if (argc != 2) {
        return ctl_usage_error(ctx, "commit takes one MOUNTPOINT/NAME or IMAGE");
    }
    if (pivot && keep_overlay) {
        return ctl_usage_error(ctx, "--pivot and --keep-overlay exclude each other");
    }
    if ((pivot || keep_overlay) && !active) {
        return ctl_usage_error(ctx, "--%s needs --active",
                               pivot ? "pivot" : "keep-overlay");
    }
    if (run.bytes && !run.bandwidth) {
        return ctl_usage_error(ctx, "--bytes needs --bandwidth");
    }
    if (run.async && (run.wait || run.verbose || run.timeout || pivot ||
                      keep_overlay)) {
        return ctl_usage_error(ctx, "--async returns at once: it excludes "
                               "--wait, --verbose, --timeout, --pivot and "
                               "--keep-overlay");
    }
    if (dry_run && (run.wait || run.verbose || run.timeout || pivot ||
                    keep_overlay || run.async || del)) {
        return ctl_usage_error(ctx, "--dry-run starts nothing: it excludes "
                               "--wait, --verbose, --timeout, --pivot, "
                               "--keep-overlay, --async and --delete");
    }
    if (!ctl_run_options_convert(ctx, &run, &a.run)) {
        return CTL_EXIT_USAGE;
    }
    a.run.wait = a.run.wait || pivot || keep_overlay;
    a.top = top;
    a.base = base;
    a.shallow = shallow;
    a.active = active;
    a.delete_dropped = del;
    a.keep_relative = keep_relative;
    a.force = force;
    a.dry_run = dry_run;
    a.pivot = pivot;
    a.keep_overlay = keep_overlay;

    r = ctl_classify(argv[1]);
    if (r < 0) {
        return CTL_EXIT_FAIL;
    }
    if (r) {
        return ctl_online_commit(argv[1], &a);
    }
    if (pivot || keep_overlay || run.async || run.timeout) {
        return ctl_usage_error(ctx, "--%s needs a mounted export; %s is an "
                               "image file, committed offline in one pass",
                               pivot ? "pivot" : keep_overlay ? "keep-overlay" :
                               run.async ? "async" : "timeout", argv[1]);
    }
    return ctl_offline_commit(argv[1], &a);
}

/* ---- stream -------------------------------------------------------- */

static int ctl_cmd_stream(int argc, char **argv)
{
    gboolean help = FALSE;
    g_autofree char *base = NULL;
    g_auto(CtlRunOptions) run = { 0 };
    GOptionEntry entries[] = {
        { "base", 0, 0, G_OPTION_ARG_STRING, &base,
          "Keep F (and below) as backing; pull only the layers above it",
          "F" },
        { "bandwidth", 0, 0, G_OPTION_ARG_STRING, &run.bandwidth,
          "Speed limit in MiB/s (K, M, G suffixes: bytes)", "N" },
        { "bytes", 0, 0, G_OPTION_ARG_NONE, &run.bytes,
          "--bandwidth is in bytes per second", NULL },
        { "wait", 0, 0, G_OPTION_ARG_NONE, &run.wait,
          "Wait until the stream ends", NULL },
        { "verbose", 0, 0, G_OPTION_ARG_NONE, &run.verbose,
          "Show progress (implies --wait)", NULL },
        { "timeout", 0, 0, G_OPTION_ARG_STRING, &run.timeout,
          "Cancel the job after S seconds and fail (implies --wait)", "S" },
        { "async", 0, 0, G_OPTION_ARG_NONE, &run.async,
          "Return as soon as the job has started", NULL },
        { "help", 'h', 0, G_OPTION_ARG_NONE, &help, "Show this help", NULL },
        { NULL },
    };
    g_autoptr(GOptionContext) ctx = ctl_context_new(
        "stream", "MOUNTPOINT/NAME | IMAGE",
        "Copy into the active layer what it reads from its backing layers "
        "(libvirt's blockpull),\nthen drop those layers from the chain: "
        "without --base the active layer ends with no backing file.",
        NULL, entries);
    CtlStreamArgs a = { 0 };
    int r = ctl_context_parse(ctx, &argc, &argv, &help);

    if (r >= 0) {
        return r;
    }
    if (argc != 2) {
        return ctl_usage_error(ctx, "stream takes one MOUNTPOINT/NAME or IMAGE");
    }
    if (run.bytes && !run.bandwidth) {
        return ctl_usage_error(ctx, "--bytes needs --bandwidth");
    }
    if (run.async && (run.wait || run.verbose || run.timeout)) {
        return ctl_usage_error(ctx, "--async returns at once: it excludes "
                               "--wait, --verbose and --timeout");
    }
    if (!ctl_run_options_convert(ctx, &run, &a.run)) {
        return CTL_EXIT_USAGE;
    }
    a.base = base;

    r = ctl_classify(argv[1]);
    if (r < 0) {
        return CTL_EXIT_FAIL;
    }
    if (r) {
        return ctl_online_stream(argv[1], &a);
    }
    if (run.async) {
        return ctl_usage_error(ctx, "--async needs a mounted export; %s is an "
                               "image file", argv[1]);
    }
    return ctl_offline_stream(argv[1], &a);
}

/* ---- job ----------------------------------------------------------- */

static int ctl_cmd_job(int argc, char **argv)
{
    gboolean help = FALSE, info = FALSE, abort_ = FALSE, pivot = FALSE;
    gboolean pause = FALSE, resume = FALSE, bytes = FALSE, wait = FALSE;
    gboolean verbose = FALSE, json = FALSE;
    g_autofree char *speed = NULL, *timeout = NULL;
    GOptionEntry entries[] = {
        { "info", 0, 0, G_OPTION_ARG_NONE, &info,
          "Show the current or last job (the default)", NULL },
        { "abort", 0, 0, G_OPTION_ARG_NONE, &abort_,
          "Cancel the job (an active commit in ready keeps its overlay)",
          NULL },
        { "pivot", 0, 0, G_OPTION_ARG_NONE, &pivot,
          "Active commit in ready: make base the active layer", NULL },
        { "pause", 0, 0, G_OPTION_ARG_NONE, &pause, "Pause the job", NULL },
        { "resume", 0, 0, G_OPTION_ARG_NONE, &resume, "Resume the job", NULL },
        { "speed", 0, 0, G_OPTION_ARG_STRING, &speed,
          "Set the speed limit: MiB/s (K, M, G suffixes: bytes), 0 none",
          "N" },
        { "bytes", 0, 0, G_OPTION_ARG_NONE, &bytes,
          "--speed is in bytes per second", NULL },
        { "wait", 0, 0, G_OPTION_ARG_NONE, &wait,
          "Then wait until the job settles (see the manual)", NULL },
        { "verbose", 0, 0, G_OPTION_ARG_NONE, &verbose,
          "Show progress while waiting (implies --wait)", NULL },
        { "timeout", 0, 0, G_OPTION_ARG_STRING, &timeout,
          "Give up waiting after S seconds (exit 1)", "S" },
        { "json", 0, 0, G_OPTION_ARG_NONE, &json,
          "--info: print the job as JSON", NULL },
        { "help", 'h', 0, G_OPTION_ARG_NONE, &help, "Show this help", NULL },
        { NULL },
    };
    g_autoptr(GOptionContext) ctx = ctl_context_new(
        "job", "MOUNTPOINT/NAME",
        "Show or act on the current job of a mounted chain (virsh "
        "blockjob).", NULL, entries);
    CtlJobArgs a = { 0 };
    int nverbs;
    int r = ctl_context_parse(ctx, &argc, &argv, &help);

    if (r >= 0) {
        return r;
    }
    if (argc != 2) {
        return ctl_usage_error(ctx, "job takes one MOUNTPOINT/NAME");
    }
    nverbs = !!info + !!abort_ + !!pivot + !!pause + !!resume + !!speed;
    if (nverbs > 1) {
        return ctl_usage_error(ctx, "give at most one of --info, --abort, "
                               "--pivot, --pause, --resume, --speed");
    }
    if (bytes && !speed) {
        return ctl_usage_error(ctx, "--bytes needs --speed");
    }
    if (json && nverbs == 1 && !info) {
        return ctl_usage_error(ctx, "--json goes with --info");
    }
    if (speed && !ctl_rate_option(ctx, "speed", speed, bytes, &a.speed)) {
        return CTL_EXIT_USAGE;
    }
    if (timeout && !ctl_timeout_option(ctx, timeout, &a.timeout)) {
        return CTL_EXIT_USAGE;
    }
    a.verb = abort_ ? CTL_JOB_ABORT : pivot ? CTL_JOB_PIVOT :
             pause ? CTL_JOB_PAUSE : resume ? CTL_JOB_RESUME :
             speed ? CTL_JOB_SPEED : CTL_JOB_INFO;
    a.verbose = verbose;
    a.wait = wait || verbose || timeout;
    a.json = json;

    r = ctl_classify(argv[1]);
    if (r < 0) {
        return CTL_EXIT_FAIL;
    }
    if (!r) {
        return ctl_fail("%s is not a chainfs export: jobs run only on "
                        "mounted chains (offline commit and stream run to "
                        "the end in chainctl itself)", argv[1]);
    }
    return ctl_online_job(argv[1], &a);
}

/* ---- snapshot ------------------------------------------------------ */

static int ctl_cmd_snapshot(int argc, char **argv)
{
    gboolean help = FALSE;
    GOptionEntry entries[] = {
        { "help", 'h', 0, G_OPTION_ARG_NONE, &help, "Show this help", NULL },
        { NULL },
    };
    g_autoptr(GOptionContext) ctx = ctl_context_new(
        "snapshot", "MOUNTPOINT/NAME | IMAGE FILE",
        "Create FILE in the image directory as a qcow2 overlay of the "
        "active layer and make it\nthe active layer (a live external "
        "snapshot when the chain is mounted).\nThe export keeps its name.",
        NULL, entries);
    int r = ctl_context_parse(ctx, &argc, &argv, &help);

    if (r >= 0) {
        return r;
    }
    if (argc != 3) {
        return ctl_usage_error(ctx, "snapshot takes MOUNTPOINT/NAME (or IMAGE) "
                               "and FILE");
    }
    if (argv[2][0] == '\0') {
        return ctl_usage_error(ctx, "FILE must not be empty");
    }
    r = ctl_classify(argv[1]);
    if (r < 0) {
        return CTL_EXIT_FAIL;
    }
    return r ? ctl_online_snapshot(argv[1], argv[2])
             : ctl_offline_snapshot(argv[1], argv[2]);
}

/* ---- map ----------------------------------------------------------- */

static int ctl_cmd_map(int argc, char **argv)
{
    gboolean help = FALSE, json = FALSE;
    g_autofree char *width = NULL;
    GOptionEntry entries[] = {
        { "width", 0, 0, G_OPTION_ARG_STRING, &width,
          "Width of each line in columns (default: the terminal's, or 80)",
          "N" },
        { "json", 0, 0, G_OPTION_ARG_NONE, &json,
          "Print each layer's extents and the totals as JSON", NULL },
        { "help", 'h', 0, G_OPTION_ARG_NONE, &help, "Show this help", NULL },
        { NULL },
    };
    g_autoptr(GOptionContext) ctx = ctl_context_new(
        "map", "MOUNTPOINT/NAME | IMAGE",
        "Draw, one line per layer (active first), where across the disk the "
        "layer itself holds data\n(like \"qemu-img map\" of each layer), the "
        "bytes it holds (HOLDS) and what a commit of it\ninto its backing "
        "file would copy (COMMIT: its data; its zero ranges become zero "
        "clusters).",
        "Density: blank for none of a column's range, three shades, a full "
        "block for all of it\n(ASCII \" .:#\" outside a UTF-8 locale).\n"
        "Colour on a terminal unless TERM is dumb or NO_COLOR is set.\n"
        "Online the layer files are read force-shared, as on disk: writes "
        "the daemon has not flushed may not show.", entries);
    CtlMapArgs a = { 0 };
    int r = ctl_context_parse(ctx, &argc, &argv, &help);

    if (r >= 0) {
        return r;
    }
    if (argc != 2) {
        return ctl_usage_error(ctx, "map takes one MOUNTPOINT/NAME or IMAGE");
    }
    if (width) {
        char *end = NULL;
        guint64 v;

        errno = 0;
        v = g_ascii_strtoull(width, &end, 10);
        if (!g_ascii_isdigit(width[0]) || errno || *end || v == 0 ||
            v > 10000) {
            return ctl_usage_error(ctx, "bad --width \"%s\": a number of "
                                   "columns, 1 to 10000", width);
        }
        a.width = (unsigned)v;
    }
    if (json && width) {
        return ctl_usage_error(ctx, "--width draws the picture; --json "
                               "prints no picture");
    }
    a.json = json;
    r = ctl_classify(argv[1]);
    if (r < 0) {
        return CTL_EXIT_FAIL;
    }
    return ctl_map(argv[1], r == 1, &a);
}

/* ---- resize -------------------------------------------------------- */

int ctl_resize_target(const CtlResizeArgs *a, uint64_t cur, const char *name,
                      uint64_t *target)
{
    uint64_t t = a->size;

    if (a->sign > 0) {
        if (cur > UINT64_MAX - a->size) {
            return ctl_fail("%s: +%" PRIu64 " bytes is too large", name,
                            a->size);
        }
        t = cur + a->size;
    } else if (a->sign < 0) {
        if (a->size >= cur) {
            return ctl_fail("%s: cannot shrink by %" PRIu64 " bytes: the "
                            "disk has %" PRIu64, name, a->size, cur);
        }
        t = cur - a->size;
    }
    if (t < cur && !a->shrink) {
        return ctl_fail("%s: %" PRIu64 " bytes is smaller than the disk (%"
                        PRIu64 " bytes); use --shrink to shrink it", name,
                        t, cur);
    }
    if (t < cur) {
        return ctl_fail("%s: shrinking is not supported by chainfs (the disk "
                        "has %" PRIu64 " bytes); qemu-img resize --shrink "
                        "does it offline", name, cur);
    }
    *target = t;
    return CTL_EXIT_OK;
}

static int ctl_cmd_resize(int argc, char **argv)
{
    gboolean help = FALSE, shrink = FALSE;
    GOptionEntry entries[] = {
        { "shrink", 0, 0, G_OPTION_ARG_NONE, &shrink,
          "Allow a smaller size (as qemu-img; chainfs refuses the shrink "
          "itself)", NULL },
        { "help", 'h', 0, G_OPTION_ARG_NONE, &help, "Show this help", NULL },
        { NULL },
    };
    g_autoptr(GOptionContext) ctx = ctl_context_new(
        "resize", "MOUNTPOINT/NAME | IMAGE [+]SIZE",
        "Grow the disk to SIZE bytes (K, M, G suffixes; +SIZE grows by SIZE),"
        " as qemu-img resize\nand virsh blockresize do: the active layer "
        "grows, and the new range reads as zeros\nwhatever the lower layers "
        "hold.  A mounted chain grows while its guest runs\n(refused while "
        "a job runs on it).",
        NULL, entries);
    CtlResizeArgs a = { 0 };
    const char *text;
    int r = ctl_context_parse(ctx, &argc, &argv, &help);

    if (r >= 0) {
        return r;
    }
    /* "resize IMAGE -- -1G" (a SIZE that starts with '-' needs the "--",
     * which GOption leaves in argv). */
    if (argc == 4 && strcmp(argv[2], "--") == 0) {
        argv[2] = argv[3];
        argc = 3;
    }
    if (argc != 3) {
        return ctl_usage_error(ctx, "resize takes MOUNTPOINT/NAME (or IMAGE) "
                               "and SIZE");
    }
    text = argv[2];
    if (text[0] == '+' || text[0] == '-') {
        a.sign = text[0] == '+' ? 1 : -1;
        text++;
    }
    if (!ctl_parse_rate(text, true, &a.size) ||
        (a.sign == 0 && a.size == 0)) {
        return ctl_usage_error(ctx, "bad SIZE \"%s\": bytes, with a K, M or "
                               "G suffix", argv[2]);
    }
    a.shrink = shrink;
    r = ctl_classify(argv[1]);
    if (r < 0) {
        return CTL_EXIT_FAIL;
    }
    return r ? ctl_online_resize(argv[1], &a) : ctl_offline_resize(argv[1], &a);
}

/* ---- events -------------------------------------------------------- */

static int ctl_cmd_events(int argc, char **argv)
{
    gboolean help = FALSE, json = FALSE;
    GOptionEntry entries[] = {
        { "json", 0, 0, G_OPTION_ARG_NONE, &json,
          "Print each event as the daemon's JSON line", NULL },
        { "help", 'h', 0, G_OPTION_ARG_NONE, &help, "Show this help", NULL },
        { NULL },
    };
    g_autoptr(GOptionContext) ctx = ctl_context_new(
        "events", "[MOUNTPOINT[/NAME]]",
        "Print the events of a mount (MOUNTPOINT/.events) as they come, "
        "only those of NAME when given,\nuntil interrupted.", NULL, entries);
    int r = ctl_context_parse(ctx, &argc, &argv, &help);

    if (r >= 0) {
        return r;
    }
    if (argc > 2) {
        return ctl_usage_error(ctx, "events takes at most one "
                               "MOUNTPOINT[/NAME]");
    }
    return ctl_events(argc == 2 ? argv[1] : NULL, json);
}

int main(int argc, char **argv)
{
    const char *cmd;

    if (argc < 2) {
        fprintf(stderr, "chainctl: missing command\n");
        ctl_print_usage(stderr);
        return CTL_EXIT_USAGE;
    }
    cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 ||
        strcmp(cmd, "help") == 0) {
        ctl_print_usage(stdout);
        return CTL_EXIT_OK;
    }
    if (strcmp(cmd, "--version") == 0) {
        printf("chainctl %s\n", CHAINFS_VERSION);
        return CTL_EXIT_OK;
    }
    /* The subcommand parses argv[1..]: its own name stands as argv[0]. */
    if (strcmp(cmd, "info") == 0) {
        return ctl_cmd_info(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "commit") == 0) {
        return ctl_cmd_commit(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "job") == 0) {
        return ctl_cmd_job(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "snapshot") == 0) {
        return ctl_cmd_snapshot(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "stream") == 0) {
        return ctl_cmd_stream(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "map") == 0) {
        return ctl_cmd_map(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "resize") == 0) {
        return ctl_cmd_resize(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "events") == 0) {
        return ctl_cmd_events(argc - 1, argv + 1);
    }
    return ctl_usage_error(NULL, "unknown command \"%s\"", cmd);
}
