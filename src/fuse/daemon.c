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

#include "export.h"

/* Largest request we serve in one piece (reads: the max_read option). */
#define CHAINFS_MAX_READ_OPT "-omax_read=1048576"

/* Worker threads of the request loop when -o max_threads gives none. */
#define CHAINFS_MAX_THREADS 10

typedef struct {
    char *image_dir;  /* the first non-option argument */
} DaemonArgs;

/*
 * fuse_parse_cmdline() takes one non-option argument, the mount point:
 * take IMAGE_DIR (the first) out before it runs.
 */
static int daemon_opt_proc(void *data, const char *arg, int key,
                           struct fuse_args *outargs)
{
    DaemonArgs *da = data;

    if (key == FUSE_OPT_KEY_NONOPT && !da->image_dir) {
        da->image_dir = g_strdup(arg);
        return 0;
    }
    return 1;
}

static void daemon_usage(const char *prog)
{
    printf("usage: %s [options] IMAGE_DIR MOUNTPOINT\n\n"
           "Serves every backing chain of IMAGE_DIR as one flat file under\n"
           "MOUNTPOINT.\n\n", prog);
    fuse_cmdline_help();
    fuse_lowlevel_help();
}

int main(int argc, char *argv[])
{
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    struct fuse_cmdline_opts opts;
    struct fuse_loop_config *loop_cfg = NULL;
    struct fuse_session *se = NULL;
    g_autoptr(GError) err = NULL;
    DaemonArgs da = { 0 };
    Daemon *d = NULL;
    int status = 1;
    int ret;

    memset(&opts, 0, sizeof(opts));
    if (fuse_opt_parse(&args, &da, NULL, daemon_opt_proc) != 0 ||
        fuse_parse_cmdline(&args, &opts) != 0) {
        fprintf(stderr, "usage: %s [options] IMAGE_DIR MOUNTPOINT\n", argv[0]);
        status = 2;
        goto out_args;
    }
    if (opts.show_help) {
        daemon_usage(argv[0]);
        status = 0;
        goto out_args;
    }
    if (opts.show_version) {
        printf("chainfs version %s\n", CHAINFS_VERSION);
        /* libfuse's part comes from fusermount3, a child writing to the
         * same stdout: ours first. */
        fflush(stdout);
        fuse_lowlevel_version();
        status = 0;
        goto out_args;
    }
    if (!da.image_dir || !opts.mountpoint) {
        fprintf(stderr, "usage: %s [options] IMAGE_DIR MOUNTPOINT\n", argv[0]);
        status = 2;
        goto out_args;
    }
    if (opts.debug) {
#if GLIB_CHECK_VERSION(2, 72, 0)
        g_log_set_debug_enabled(TRUE);
#else
        g_setenv("G_MESSAGES_DEBUG", "all", TRUE);
#endif
    }

    d = daemon_new(da.image_dir, &err);
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
    if (fuse_daemonize(opts.foreground) != 0) {
        goto out_unmount;
    }
    daemon_resume_jobs(d);
    g_message("mounted %s on %s: %u export%s", da.image_dir, opts.mountpoint,
              d->exports->len, d->exports->len == 1 ? "" : "s");

    if (opts.singlethread) {
        ret = fuse_session_loop(se);
    } else {
        loop_cfg = fuse_loop_cfg_create();
        fuse_loop_cfg_set_clone_fd(loop_cfg, opts.clone_fd);
        /* Unset, max_idle_threads reads UINT_MAX, which libfuse refuses
         * with a message: leave its default then. */
        if (opts.max_idle_threads != UINT_MAX) {
            fuse_loop_cfg_set_idle_threads(loop_cfg, opts.max_idle_threads);
        }
        fuse_loop_cfg_set_max_threads(loop_cfg, opts.max_threads > 0 ?
                                      opts.max_threads : CHAINFS_MAX_THREADS);
        ret = fuse_session_loop_mt(se, loop_cfg);
        fuse_loop_cfg_destroy(loop_cfg);
    }
    /* The loop returns the number of the signal that stopped it: a
     * requested shutdown, not a failure. */
    if (ret == 0 || ret == SIGTERM || ret == SIGINT || ret == SIGHUP) {
        status = 0;
    } else {
        g_printerr("chainfs: request loop failed: %s\n",
                   g_strerror(ret < 0 ? -ret : ret));
    }

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
    free(opts.mountpoint);
    fuse_opt_free_args(&args);
    return status;
}
