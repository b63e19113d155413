/*
 * chainctl-events.c: `chainctl events [MOUNTPOINT[/NAME]] [--json]`.
 *
 * Reads MOUNTPOINT/.events (design.md "Events") and prints each event as
 * it comes: one readable line by default, the daemon's JSON line with
 * --json.  Given an export, only its events are printed, with the
 * daemon-wide ones (export null: overflow, an io-error of an image that no
 * export uses) that may concern it.
 * Runs until interrupted, or until the daemon stops (end of file: exit 0).
 * Each line is flushed at once, so that a pipe sees it when it happens.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "chainctl.h"
#include "json.h"

#define CTL_EVENTS_READ 65536

/* The members a readable line shows after time, export and event, in
 * this order, when the event has them. */
static const char *const ctl_event_fields[] = {
    "job", "id", "file", "top", "base", "offset", "len", "dropped", "error",
    NULL,
};

/* "2026-12-07 23:40:01.123 vm1 job-completed job=commit id=commit-1 ..." */
static void ctl_print_event_human(const char *line)
{
    g_autofree char *time_s = json_get_member(line, "time");
    g_autofree char *export_name = json_get_member(line, "export");
    g_autofree char *event = json_get_member(line, "event");
    GString *out = g_string_new(NULL);
    double t = time_s ? g_ascii_strtod(time_s, NULL) : 0;
    time_t secs = (time_t)t;
    struct tm tm;
    char when[32] = "?";

    if (localtime_r(&secs, &tm)) {
        strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", &tm);
    }
    g_string_append_printf(out, "%s.%03d %s %s", when,
                           (int)((t - (double)secs) * 1000),
                           export_name && strcmp(export_name, "null") != 0 ?
                           export_name : "-",
                           event ? event : "?");
    for (guint i = 0; ctl_event_fields[i]; i++) {
        g_autofree char *v = json_get_member(line, ctl_event_fields[i]);

        if (v && strcmp(v, "null") != 0) {
            g_string_append_printf(out, " %s=%s", ctl_event_fields[i], v);
        }
    }
    printf("%s\n", out->str);
    g_string_free(out, TRUE);
}

/* Whether the event (one JSON line) is for name; NULL: every event. */
static bool ctl_event_matches(const char *line, const char *name)
{
    g_autofree char *export_name = NULL;

    if (!name) {
        return true;
    }
    export_name = json_get_member(line, "export");
    /* Daemon-wide events (null) may concern any export. */
    return !export_name || strcmp(export_name, "null") == 0 ||
           strcmp(export_name, name) == 0;
}

/* Split target into the mount point and the export name (NULL for all). */
static bool ctl_events_target(const char *target, char **mountpoint,
                              char **name)
{
    struct stat st;

    if (stat(target, &st) < 0) {
        ctl_fail("%s: %s", target, g_strerror(errno));
        return false;
    }
    if (S_ISDIR(st.st_mode)) {
        *mountpoint = g_strdup(target);
        *name = NULL;
    } else {
        *mountpoint = g_path_get_dirname(target);
        *name = g_path_get_basename(target);
    }
    return true;
}

int ctl_events(const char *target, bool json)
{
    g_autofree char *mountpoint = NULL;
    g_autofree char *name = NULL;
    g_autofree char *path = NULL;
    g_autofree char *buf = g_malloc(CTL_EVENTS_READ);
    g_autoptr(GString) pending = g_string_new(NULL);
    int fd;

    if (!ctl_events_target(target ? target : ".", &mountpoint, &name)) {
        return CTL_EXIT_FAIL;
    }
    path = g_build_filename(mountpoint, ".events", NULL);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;

        return ctl_fail("%s: %s%s", path, g_strerror(err),
                        err == ENOENT ? " (not a chainfs mount point?)" : "");
    }
    for (;;) {
        ssize_t n = read(fd, buf, CTL_EVENTS_READ);
        char *nl;

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            int err = errno;

            close(fd);
            return ctl_fail("reading %s: %s", path, g_strerror(err));
        }
        if (n == 0) {
            /* The daemon stopped: every event it had was printed. */
            close(fd);
            return CTL_EXIT_OK;
        }
        g_string_append_len(pending, buf, n);
        /* A line longer than one read comes in pieces: print it whole. */
        while ((nl = memchr(pending->str, '\n', pending->len))) {
            *nl = '\0';
            if (ctl_event_matches(pending->str, name)) {
                if (json) {
                    printf("%s\n", pending->str);
                } else {
                    ctl_print_event_human(pending->str);
                }
                fflush(stdout);
            }
            g_string_erase(pending, 0, nl - pending->str + 1);
        }
    }
}
