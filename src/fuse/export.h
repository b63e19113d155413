/*
 * export.h: the daemon's view of what it serves.
 *
 * A Daemon is the context of one chainfs process: the image set of
 * IMAGE_DIR, the merge context that runs jobs on its chains, and the
 * exports.  An Export is one chain served as one flat file at the mount
 * root.  The list of exports is fixed once the daemon mounts (a live
 * snapshot or a pivot changes a chain's layers, never its export), so
 * lookups walk it without a lock.
 *
 * Inode numbers are fixed too: 1 the root, 2 the control file, and
 * EXPORT_INO_BASE + i for exports[i].  The kernel's lookup counts need no
 * bookkeeping because nothing is ever freed while mounted.
 */
#ifndef CHAINFS_EXPORT_H
#define CHAINFS_EXPORT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>

#include "chain.h"
#include "export-stats.h"
#include "merge.h"

#define CHAINFS_ROOT_INO 1
#define CHAINFS_CONTROL_INO 2
#define CHAINFS_EXPORT_INO_BASE 16
#define CHAINFS_CONTROL_NAME ".control"

typedef struct Export {
    char *name;          /* export name (file name under the mount point) */
    Chain *chain;        /* owned; layers change under its topology lock */
    uint64_t ino;        /* fixed */
    ExportStats stats;   /* atomics, no lock: the I/O handlers count here */

    /* Guards every field below. */
    GMutex lock;
    char *last_error;    /* message of the last refused command, or NULL */
    struct timespec mtime; /* last content change (write, zeroing) */
    struct timespec ctime; /* last content or attribute change */
    struct timespec atime;
    mode_t mode;         /* permission bits only; chmod changes them */
    uid_t uid;
    gid_t gid;
} Export;

typedef struct Daemon {
    ImageSet *set;           /* owned */
    MergeContext *merge;     /* owned; freed before the chains */
    GPtrArray *exports;      /* Export *, owned, sorted by name; fixed */
    struct timespec start_time; /* times of the root and control file */
    uid_t uid;               /* owner of every file */
    gid_t gid;
} Daemon;

/*
 * Discover the chains of image_dir and open each (its active layer
 * read-write when writable).  A chain that
 * cannot be opened (broken, locked by another process, unsupported) is
 * left out with one warning naming the file and the reason.  Fails only
 * when the directory itself cannot be used.
 */
Daemon *daemon_new(const char *image_dir, bool writable, GError **error);
/*
 * Resume the jobs a crash cut off (merge_resume_interrupted on every
 * chain).  Called once the daemon runs in its final process: jobs run on
 * threads of their own, which a fork for the background would lose.
 */
void daemon_resume_jobs(Daemon *d);
/*
 * Stop every job at a checkpoint, flush and close every image.  Returns
 * FALSE (after logging each failure) when some flush failed.
 */
bool daemon_free(Daemon *d);

Export *daemon_export_by_name(Daemon *d, const char *name);
Export *daemon_export_by_ino(Daemon *d, uint64_t ino);

/* Fill st for an export (size, allocated blocks, times, mode). */
void export_stat(Daemon *d, Export *e, struct stat *st);
/* Whether the export takes writes (its active layer is writable and has
 * no read-only reason); writes of a read-only export fail with EROFS. */
bool export_writable(Export *e);
/* The active layer's file name, newly allocated. */
char *export_active_file(Export *e);
/* A write or zeroing changed the content: bump mtime and ctime. */
void export_touch_content(Export *e);
/* Remember (and log) a refused command's message for last_error. */
void export_set_last_error(Export *e, const char *verb, const GError *err);
/* Newly allocated copy of last_error ("" when none). */
char *export_last_error(Export *e);

/* ---- control.c: the control surface -------------------------------- */

/*
 * Run a command on an export: verb is the attribute name without the
 * "user.chainfs." prefix ("commit", "stream", "snapshot", "job.pivot",
 * "job.cancel", "job.pause", "job.resume", "job.speed"), value its words.
 * A refused command sets *error (CHAINFS_ERROR, code = errno), records the
 * message in the export's last_error and logs one line.  A commit with the
 * word dry-run starts nothing: it only checks its words and layers (the
 * control file's reply also carries the estimate, see control.c).
 */
bool ctl_run_command(Daemon *d, Export *e, const char *verb,
                     const char *value, GError **error);
/* Whether verb (as above) names a writable attribute. */
bool ctl_is_command(const char *verb);

/*
 * Read a control attribute ("chain", "job", "last_error", "stats"): newly
 * allocated value, or NULL when name is none of them.
 */
char *ctl_read_attribute(Daemon *d, Export *e, const char *attr);

/* The readable attributes, as listxattr lists them (NUL separated). */
extern const char ctl_xattr_list[];
extern const size_t ctl_xattr_list_len;

/*
 * The control file.  One CtlHandle per open; its reply buffer is what a
 * read returns: the reply to the last command written on this handle, or,
 * before any command, the status of every export and job (taken at the
 * first read).  Guarded by its own mutex: FUSE may run a read and a write
 * of one handle at once.
 */
typedef struct CtlHandle {
    GMutex lock;
    GString *reply;   /* NULL until a command or the first read */
} CtlHandle;

CtlHandle *ctl_handle_new(void);
void ctl_handle_free(CtlHandle *h);
/*
 * A control-file line split into its parts: line is the command stripped
 * of blanks at both ends, parts its blank-separated words (parts[0] the
 * verb, parts[1] the export name), command the attribute the verb stands
 * for ("pivot": "job.pivot") and words the rest of line after the name.
 * ctl_parse_line() refuses (EINVAL) a line without a name or with an
 * unknown verb; the export is not looked up.  Clear it in every case.
 */
typedef struct CtlLine {
    char *line;
    GStrv parts;
    const char *command;
    const char *words;
} CtlLine;

bool ctl_parse_line(const char *buf, size_t len, CtlLine *cl, GError **error);
void ctl_line_clear(CtlLine *cl);
G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(CtlLine, ctl_line_clear)

/*
 * One command line "VERB NAME WORDS" written to the control file.  Returns
 * 0 on success, a negative errno when refused (the reply holds the
 * message either way).
 */
int ctl_handle_write(Daemon *d, CtlHandle *h, const char *buf, size_t len);
/* Copy up to size bytes of the reply from offset into a new buffer. */
GBytes *ctl_handle_read(Daemon *d, CtlHandle *h, uint64_t offset,
                        size_t size);
/* JSON of every export and its job. */
char *ctl_status_json(Daemon *d);

/* ---- fuse-ops.c ----------------------------------------------------- */

struct fuse_lowlevel_ops;
extern const struct fuse_lowlevel_ops chainfs_ll_ops;

#endif
