/*
 * daemon.c: main() of chainfs.
 *
 *     chainfs [FUSE options] IMAGE_DIR MOUNTPOINT
 *
 * Opens every chain of IMAGE_DIR (export.c), mounts, serves requests on
 * libfuse's multi-threaded loop until SIGTERM, SIGINT, SIGHUP or an
 * unmount, then stops the jobs at a checkpoint, flushes and closes every
 * image, and exits 0.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <fuse_lowlevel.h>

#include "chain-log.h"
#include "export.h"
#include "service-notify.h"

/* Largest request we serve in one piece (reads: the max_read option). */
#define CHAINFS_MAX_READ_OPT "-omax_read=1048576"

/* Worker threads of the request loop when -o max_threads gives none. */
#define CHAINFS_MAX_THREADS 10

typedef struct {
    char *image_dir;  /* the first non-option argument */
    char *log;        /* --log= / -o log=: auto, stderr, journal */
    bool read_only;   /* -o ro (the last of ro and rw wins) */
} DaemonArgs;

enum {
    DAEMON_KEY_RO,
    DAEMON_KEY_RW,
    DAEMON_KEY_LOG,
    DAEMON_KEY_IGNORE,
};

/*
 * Options that mount(8) and fstab hand to a filesystem helper but that
 * mean nothing to a FUSE mount (libfuse refuses them as unknown).  mount
 * keeps some for itself (nofail, _netdev, x-*), but a hand-written
 * `chainfs -o` or an older mount may still pass them.  Atime flavours:
 * chainfs keeps the export's times itself (times change only with the
 * content).
 */
static const struct fuse_opt daemon_opts[] = {
    FUSE_OPT_KEY("ro", DAEMON_KEY_RO),
    FUSE_OPT_KEY("rw", DAEMON_KEY_RW),
    FUSE_OPT_KEY("--log=", DAEMON_KEY_LOG),
    FUSE_OPT_KEY("log=", DAEMON_KEY_LOG),
    FUSE_OPT_KEY("nofail", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("_netdev", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("auto", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("noauto", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("defaults", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("user", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("nouser", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("users", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("owner", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("group", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("relatime", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("norelatime", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("strictatime", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("nostrictatime", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("lazytime", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("nolazytime", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("diratime", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("nodiratime", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("iversion", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("noiversion", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("silent", DAEMON_KEY_IGNORE),
    FUSE_OPT_KEY("loud", DAEMON_KEY_IGNORE),
    FUSE_OPT_END
};

/*
 * fuse_parse_cmdline() takes one non-option argument, the mount point:
 * take IMAGE_DIR (the first) out before it runs.  ro stays in the
 * arguments as well (libfuse makes the kernel mount read-only); rw is
 * libfuse's default.
 */
static int daemon_opt_proc(void *data, const char *arg, int key,
                           struct fuse_args *outargs)
{
    DaemonArgs *da = data;

    switch (key) {
    case FUSE_OPT_KEY_NONOPT:
        if (!da->image_dir) {
            da->image_dir = g_strdup(arg);
            return 0;
        }
        return 1;
    case DAEMON_KEY_RO:
        da->read_only = true;
        return 1;
    case DAEMON_KEY_RW:
        da->read_only = false;
        return 0;
    case DAEMON_KEY_LOG:
        g_free(da->log);
        da->log = g_strdup(strchr(arg, '=') + 1);
        return 0;
    case DAEMON_KEY_IGNORE:
        return 0;
    case FUSE_OPT_KEY_OPT:
        /* x-systemd.*, x-gvfs-* and the like are for other programs;
         * comment= is fstab's; an empty option comes from -o "" (a
         * unit's empty OPTIONS=). */
        if (arg[0] == '\0' || g_str_has_prefix(arg, "x-") ||
            g_str_has_prefix(arg, "comment=")) {
            return 0;
        }
        return 1;
    default:
        return 1;
    }
}

static void daemon_usage(const char *prog)
{
    printf("usage: %s [options] IMAGE_DIR MOUNTPOINT\n\n"
           "Serves every backing chain of IMAGE_DIR as one flat file under\n"
           "MOUNTPOINT.\n\n"
           "    -o ro                  serve read-only (images opened read-only)\n"
           "    --log=auto|stderr|journal, -o log=...\n"
           "                           where messages go (default auto: the\n"
           "                           journal under systemd or once in the\n"
           "                           background, stderr otherwise)\n\n",
           prog);
    fuse_cmdline_help();
    fuse_lowlevel_help();
}

/*
 * Parse the command line into da and opts.  Returns -1 to go on, or the
 * exit status (0 after --help or --version, 2 on wrong usage).
 */
static int daemon_parse_args(struct fuse_args *args, DaemonArgs *da,
                             struct fuse_cmdline_opts *opts,
                             ChainfsLogTarget *log_target)
{
    const char *prog = args->argv[0];
    g_autoptr(GError) err = NULL;

    if (fuse_opt_parse(args, da, daemon_opts, daemon_opt_proc) != 0 ||
        fuse_parse_cmdline(args, opts) != 0) {
        fprintf(stderr, "usage: %s [options] IMAGE_DIR MOUNTPOINT\n", prog);
        return 2;
    }
    if (opts->show_help) {
        daemon_usage(prog);
        return 0;
    }
    if (opts->show_version) {
        printf("chainfs version %s\n", CHAINFS_VERSION);
        /* libfuse's part comes from fusermount3, a child writing to the
         * same stdout: ours first. */
        fflush(stdout);
        fuse_lowlevel_version();
        return 0;
    }
    if (!da->image_dir || !opts->mountpoint) {
        fprintf(stderr, "usage: %s [options] IMAGE_DIR MOUNTPOINT\n", prog);
        return 2;
    }
    *log_target = CHAINFS_LOG_AUTO;
    if (da->log && !chainfs_log_parse_target(da->log, log_target, &err)) {
        fprintf(stderr, "chainfs: %s\n", err->message);
        return 2;
    }
    return -1;
}

/*
 * Serve requests until an unmount or a signal.  Returns the exit status:
 * 0 for a requested shutdown.
 */
static int daemon_serve(struct fuse_session *se,
                        const struct fuse_cmdline_opts *opts)
{
    struct fuse_loop_config *loop_cfg;
    int ret;

    if (opts->singlethread) {
        ret = fuse_session_loop(se);
    } else {
        loop_cfg = fuse_loop_cfg_create();
        fuse_loop_cfg_set_clone_fd(loop_cfg, opts->clone_fd);
        /* Unset, max_idle_threads reads UINT_MAX, which libfuse refuses
         * with a message: leave its default then. */
        if (opts->max_idle_threads != UINT_MAX) {
            fuse_loop_cfg_set_idle_threads(loop_cfg, opts->max_idle_threads);
        }
        fuse_loop_cfg_set_max_threads(loop_cfg, opts->max_threads > 0 ?
                                      opts->max_threads : CHAINFS_MAX_THREADS);
        ret = fuse_session_loop_mt(se, loop_cfg);
        fuse_loop_cfg_destroy(loop_cfg);
    }
    /* The loop returns the number of the signal that stopped it: a
     * requested shutdown, not a failure. */
    if (ret == 0 || ret == SIGTERM || ret == SIGINT || ret == SIGHUP) {
        return 0;
    }
    chainfs_log(G_LOG_LEVEL_WARNING, NULL, NULL, "request loop failed: %s",
                g_strerror(ret < 0 ? -ret : ret));
    return 1;
}

int main(int argc, char *argv[])
{
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    struct fuse_cmdline_opts opts;
    struct fuse_session *se = NULL;
    ChainfsLogTarget log_target = CHAINFS_LOG_AUTO;
    g_autoptr(GError) err = NULL;
    DaemonArgs da = { 0 };
    Daemon *d = NULL;
    int status;

    memset(&opts, 0, sizeof(opts));
    status = daemon_parse_args(&args, &da, &opts, &log_target);
    if (status >= 0) {
        goto out_args;
    }
    status = 1;
    if (opts.debug) {
#if GLIB_CHECK_VERSION(2, 72, 0)
        g_log_set_debug_enabled(TRUE);
#else
        g_setenv("G_MESSAGES_DEBUG", "all", TRUE);
#endif
    }
    chainfs_log_setup(log_target, !opts.foreground);

    d = daemon_new(da.image_dir, !da.read_only, &err);
    if (!d) {
        g_printerr("chainfs: %s\n", err->message);
        goto out_args;
    }

    /* Permission checks by the kernel: commands need write permission on
     * the export, status needs read permission (design.md). */
    if (fuse_opt_add_arg(&args, "-odefault_permissions") != 0 ||
        fuse_opt_add_arg(&args, CHAINFS_MAX_READ_OPT) != 0 ||
        fuse_opt_add_arg(&args, "-ofsname=chainfs") != 0) {
        g_printerr("chainfs: out of memory\n");
        goto out_daemon;
    }
    se = fuse_session_new(&args, &chainfs_ll_ops, sizeof(chainfs_ll_ops), d);
    if (!se) {
        goto out_daemon;
    }
    if (fuse_set_signal_handlers(se) != 0) {
        goto out_session;
    }
    if (fuse_session_mount(se, opts.mountpoint) != 0) {
        goto out_signals;
    }
    /* mount(8) returns when this parent exits, after the mount is made:
     * requests wait in the kernel until the loop below runs. */
    if (fuse_daemonize(opts.foreground) != 0) {
        goto out_unmount;
    }
    chainfs_log_daemonized();
    /* A read-only mount writes nothing: an interrupted job waits for a
     * read-write one. */
    if (!da.read_only) {
        daemon_resume_jobs(d);
    }
    g_message("mounted %s on %s%s: %u export%s", da.image_dir,
              opts.mountpoint, da.read_only ? " read-only" : "",
              d->exports->len, d->exports->len == 1 ? "" : "s");
    if (!service_notify("READY=1\nSTATUS=serving")) {
        g_warning("cannot notify systemd: %s", g_strerror(errno));
    }

    status = daemon_serve(se, &opts);
    service_notify("STOPPING=1");
    /* While the session can still reply: a reader blocked on .events gets
     * end of file instead of a request that is never answered. */
    event_bus_shutdown(d->events);

out_unmount:
    fuse_session_unmount(se);
out_signals:
    fuse_remove_signal_handlers(se);
out_session:
    fuse_session_destroy(se);
out_daemon:
    if (!daemon_free(d)) {
        status = 1;
    }
    if (status == 0) {
        g_message("stopped; every image flushed and closed");
    }
out_args:
    g_free(da.image_dir);
    g_free(da.log);
    free(opts.mountpoint);
    fuse_opt_free_args(&args);
    return status;
}
