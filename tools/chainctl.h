/*
 * chainctl.h: what the parts of chainctl share.
 *
 * chainctl.c parses the command line into the argument structs below and
 * decides, from the target path itself, whether it names a chainfs export
 * (online: everything goes through the user.chainfs.* extended
 * attributes, chainctl-online.c) or an image file (offline: src/chain and
 * src/merge work on the files directly, chainctl-offline.c).
 *
 * Every ctl_online_* and ctl_offline_* function returns the process exit
 * status: CTL_EXIT_OK, or CTL_EXIT_FAIL after printing exactly one line
 * on stderr (ctl_fail()).  Usage errors (CTL_EXIT_USAGE) are found in
 * chainctl.c before either is called, except for the few checks that need
 * to know the kind of target, which say so where they are.
 */
#ifndef CHAINCTL_H
#define CHAINCTL_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <glib.h>

enum {
    CTL_EXIT_OK = 0,
    CTL_EXIT_FAIL = 1,
    CTL_EXIT_USAGE = 2,
};

/*
 * How a job that chainctl starts runs, from the options commit and stream
 * both take: its speed limit, and whether and how chainctl waits for it.
 */
typedef struct {
    bool has_bandwidth;
    uint64_t bandwidth;    /* bytes per second, already converted */
    bool wait;             /* also implied by verbose, timeout, pivot... */
    bool verbose;
    double timeout;        /* seconds, 0: none */
    bool async;
} CtlRunArgs;

/* chainctl commit: every option of the synopsis (design.md). */
typedef struct {
    char *top;             /* layer file name, NULL: active layer */
    char *base;            /* layer file name, NULL: bottom */
    bool shallow;
    bool active;
    bool delete_dropped;
    bool keep_relative;
    bool force;
    bool dry_run;
    bool pivot;
    bool keep_overlay;
    CtlRunArgs run;
} CtlCommitArgs;

/* chainctl stream. */
typedef struct {
    char *base;
    CtlRunArgs run;
} CtlStreamArgs;

/* chainctl job: exactly one verb (INFO when none was given). */
typedef enum {
    CTL_JOB_INFO = 0,
    CTL_JOB_ABORT,
    CTL_JOB_PIVOT,
    CTL_JOB_PAUSE,
    CTL_JOB_RESUME,
    CTL_JOB_SPEED,
} CtlJobVerb;

typedef struct {
    CtlJobVerb verb;
    uint64_t speed;        /* bytes per second, for CTL_JOB_SPEED */
    bool wait;
    bool verbose;
    bool json;
    double timeout;
} CtlJobArgs;

/* chainctl resize: SIZE as given ("+N" / "-N": relative), in bytes. */
typedef struct {
    uint64_t size;
    int sign;              /* 0 absolute, +1 grow by size, -1 shrink by it */
    bool shrink;           /* --shrink given */
} CtlResizeArgs;

/* ---- chainctl.c: helpers shared by both modes ---------------------- */

/*
 * The size chainctl resize asks for, given the disk's current size (cur)
 * and name: CTL_EXIT_OK with *target set, or CTL_EXIT_FAIL after the
 * message: a smaller size without --shrink (as qemu-img), and with it
 * (chainfs does not shrink), a relative size out of range.
 */
int ctl_resize_target(const CtlResizeArgs *a, uint64_t cur, const char *name,
                      uint64_t *target);


/* Print "chainctl: MESSAGE" as one line on stderr (newlines in the
 * message become spaces); returns CTL_EXIT_FAIL. */
int ctl_fail(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

/* Set by the SIGINT handler while a command waits for a job or copies. */
extern volatile sig_atomic_t ctl_interrupted;
/*
 * Catch SIGINT.  Waits for a job want it without SA_RESTART, so that a
 * blocking call returns early; an offline commit wants it with
 * SA_RESTART, so that the copy's own system calls (on any thread) never
 * see EINTR.  Naps end early either way (nanosleep is never restarted).
 */
void ctl_catch_sigint(bool restart_syscalls);

/* Sleep up to ms milliseconds; returns early on a signal. */
void ctl_nap(unsigned ms);

/* "1.5 MiB" style text of a byte count.  Newly allocated. */
char *ctl_human_size(uint64_t bytes);

/* Split the text of a JSON array ("[...]") into the texts of its
 * elements.  NULL when text is not a well-formed array. */
GPtrArray *ctl_json_array_items(const char *text);
/* Member of a JSON object (a string unescaped); "null" and absence give
 * NULL.  Newly allocated. */
char *ctl_json_member(const char *obj, const char *key);

/*
 * Progress display after virsh: on a terminal one line rewritten in place
 * ("\rBlock Commit: [ 42 %]"), otherwise a plain line each time the
 * percentage changes.  ctl_progress_done() ends the line on a terminal.
 */
typedef struct {
    const char *label;     /* "Block Commit", "Block Pull" */
    bool tty;
    int last_percent;      /* -1 before the first update */
} CtlProgress;

void ctl_progress_init(CtlProgress *p, const char *label);
void ctl_progress_update(CtlProgress *p, uint64_t done, uint64_t total);
void ctl_progress_done(CtlProgress *p);

/*
 * Print a chain object (chain_info_json(), the user.chainfs.chain
 * attribute) as "qemu-img info --backing-chain" does: one block per layer,
 * active first.  Online and offline info print through this one function,
 * so they show the same lines.  CTL_EXIT_FAIL (message printed, naming
 * source) when the JSON is malformed.
 */
int ctl_print_chain(const char *chain_json, const char *source);

/*
 * Print a commit estimate (commit_estimate_json(), the "estimate"
 * of the control file's dry-run reply): "top:", "base:", "needs:",
 * "available:" lines.  CTL_EXIT_FAIL (message printed) when malformed.
 */
int ctl_print_commit_room(const char *room_json, const char *source);

/* ---- chainctl-online.c: a mounted export --------------------------- */

/*
 * Read user.chainfs.<attr> of path (chainctl-online.c).  On success a newly
 * allocated, NUL-terminated value; on failure NULL with errno set.
 */
char *ctl_xattr_get(const char *path, const char *attr);

/*
 * Whether path is a chainfs export: 1 yes, 0 no (an ordinary file),
 * -errno when path cannot be looked at (missing, no permission).
 */
int ctl_target_is_export(const char *path);

int ctl_online_info(const char *path, bool json);
int ctl_online_commit(const char *path, const CtlCommitArgs *a);
int ctl_online_stream(const char *path, const CtlStreamArgs *a);
int ctl_online_job(const char *path, const CtlJobArgs *a);
int ctl_online_snapshot(const char *path, const char *file);
int ctl_online_resize(const char *path, const CtlResizeArgs *a);

/* ---- chainctl-events.c: MOUNTPOINT/.events ------------------------ */

/* Print the events of a mount (target: MOUNTPOINT, MOUNTPOINT/NAME for one
 * export, NULL for the current directory) until interrupted or the daemon
 * stops. */
int ctl_events(const char *target, bool json);
/* chainctl map: the picture's width and the output form. */
typedef struct {
    unsigned width;        /* whole line, 0: the terminal's or 80 */
    bool json;
} CtlMapArgs;

/* ---- chainctl-map.c: where each layer holds data, both modes ------- */

/* online names MOUNTPOINT/NAME (the daemon's user.chainfs.chain says
 * where the layer files are), else path is an image file. */
int ctl_map(const char *path, bool online, const CtlMapArgs *a);

/* ---- chainctl-offline.c: image files ------------------------------- */

int ctl_offline_info(const char *path, bool json);
int ctl_offline_commit(const char *path, const CtlCommitArgs *a);
int ctl_offline_stream(const char *path, const CtlStreamArgs *a);
int ctl_offline_snapshot(const char *path, const char *file);
int ctl_offline_resize(const char *path, const CtlResizeArgs *a);

#endif
