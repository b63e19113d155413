/*
 * merge.h: what the daemon (src/fuse) and chainctl (tools/) call to run
 * jobs on chains: commit, active commit, stream, live snapshot, and the
 * verbs on a running job.  The job state machine itself is job.h.
 *
 * Every function here is a control path: it takes GError ** last and
 * reports refusals in the CHAINFS_ERROR domain with the errno of
 * design.md (EINVAL bad words, ENOENT no such layer, EBUSY a job already
 * runs or the base is shared, EACCES/EROFS cannot write, ENOSPC, EIO).
 * A refused command changes nothing.
 */
#ifndef CHAINFS_MERGE_H
#define CHAINFS_MERGE_H

#include "chain.h"

typedef struct Job Job;

typedef enum {
    ON_ERROR_REPORT = 0, /* fail the job */
    ON_ERROR_STOP,       /* pause with the error until resume */
    ON_ERROR_IGNORE,     /* skip the range and go on */
} OnErrorPolicy;

typedef struct {
    char *top;            /* layer file name; NULL: the active layer */
    char *base;           /* layer file name; NULL: bottom (or see shallow) */
    bool shallow;         /* base = immediate backing file of top */
    bool active;          /* required when top is the active layer */
    bool delete_dropped;  /* unlink dropped files once completed */
    bool keep_relative;   /* relative backing references */
    bool force;           /* allow a shared base / dropped layer */
    uint64_t bandwidth;   /* bytes per second, 0 unlimited */
    OnErrorPolicy on_error;
} CommitOptions;

typedef struct {
    char *base;           /* NULL: stream everything, no backing after */
    uint64_t bandwidth;
    OnErrorPolicy on_error;
} StreamOptions;

/*
 * Parse design.md's command words ("top=F base=F shallow active delete
 * keep-relative bandwidth=N on-error=report|stop|ignore force"; sizes with
 * K, M, G suffixes, powers of 1024).  Unknown or malformed word: EINVAL
 * with a message naming it.
 */
bool commit_options_parse(const char *words, CommitOptions *opts,
                          GError **error);
bool stream_options_parse(const char *words, StreamOptions *opts,
                          GError **error);
void commit_options_clear(CommitOptions *opts);
void stream_options_clear(StreamOptions *opts);
/* "50M" -> 52428800.  FALSE on garbage. */
bool parse_size(const char *text, uint64_t *out);

/*
 * The merge context of one image directory: the chains served from it
 * (to find other users of a base and to keep one job per chain), the
 * state file, and the jobs.  The daemon makes one; chainctl's offline mode
 * makes one for the chain it works on.
 */
typedef struct MergeContext MergeContext;
MergeContext *merge_context_new(ImageSet *set);
void merge_context_free(MergeContext *ctx); /* stops jobs at a checkpoint */
/* The chains the context knows (not owned); jobs check sharing against
 * every image of the directory, served or not. */
void merge_context_add_chain(MergeContext *ctx, Chain *chain);

/*
 * Start a job on chain in a new thread and return at once (the job is
 * running).  One job per chain at a time (EBUSY).  The job's result stays
 * readable through merge_job_info_json() until the next job.
 */
bool merge_start_commit(MergeContext *ctx, Chain *chain,
                        const CommitOptions *opts, GError **error);
bool merge_start_stream(MergeContext *ctx, Chain *chain,
                        const StreamOptions *opts, GError **error);

/*
 * Offline commit (chainctl on image files): the same copy in one pass,
 * driven from the calling thread, at most opts->bandwidth bytes per
 * second when not 0.  progress(opaque, done, total), when
 * not NULL, is called there about every 100 ms; returning FALSE stops the
 * copy once the requests in flight end: the commit then fails with
 * ECANCELED before any backing reference is rewritten (base keeps part of
 * the data, hidden by the layers above, which still hold it).
 */
bool merge_commit_offline(MergeContext *ctx, Chain *chain,
                          const CommitOptions *opts,
                          bool (*progress)(void *opaque, uint64_t done,
                                           uint64_t total),
                          void *opaque, GError **error);

/* What a commit would need: its layers as resolved, the bytes base's
 * filesystem must newly hold (what the up-front ENOSPC check compares)
 * and what that filesystem has free. */
typedef struct {
    char *top;
    char *base;
    uint64_t needed_bytes;
    uint64_t available_bytes;
} CommitEstimate;

bool merge_commit_estimate(Chain *chain, const CommitOptions *opts,
                           CommitEstimate *out, GError **error);
/* {"top", "base", "needed_bytes", "available_bytes"}; newly allocated. */
char *commit_estimate_json(const CommitEstimate *e);
void commit_estimate_clear(CommitEstimate *e);

/*
 * Live snapshot: create FILE (a qcow2 v3 overlay with a relative backing
 * reference to the active layer and its format), drain, flush, make it the
 * active layer.  Atomic: on any failure nothing changes.
 */
bool merge_snapshot(MergeContext *ctx, Chain *chain, const char *file,
                    GError **error);

/*
 * Grow the chain's disk to size bytes (a multiple of 512, else EINVAL):
 * its active layer grows, the new range reads as zeros whatever the lower
 * layers hold, durable on return.  A smaller size: EPERM; a
 * live job on the chain: EBUSY; an active layer that cannot be written:
 * EROFS.  The same size succeeds and changes nothing.  *old_size (when
 * not NULL) gets the size before.  Order and crash safety: resize.c.
 */
bool merge_resize(MergeContext *ctx, Chain *chain, uint64_t size,
                  uint64_t *old_size, GError **error);

/* Verbs on the chain's current job.  No job: EINVAL "no job on NAME".
 * A verb the job's state refuses: EBUSY with "job in state S cannot V". */
bool merge_job_pivot(Chain *chain, GError **error);
bool merge_job_cancel(Chain *chain, GError **error);
bool merge_job_pause(Chain *chain, GError **error);
bool merge_job_resume(Chain *chain, GError **error);
bool merge_job_set_speed(Chain *chain, uint64_t bytes_per_second,
                         GError **error);

/*
 * JSON of the chain's current or last job (design.md's user.chainfs.job):
 * {"id","type","state","top","base","offset","len","speed","error"}; "{}"
 * before any job.  Newly allocated.
 */
char *merge_job_info_json(Chain *chain);

/*
 * At mount: resume every commit of this directory that a crash cut off
 * (checkpoints in the state file).  Called once per chain after the
 * daemon opened it.
 */
bool merge_resume_interrupted(MergeContext *ctx, Chain *chain,
                              GError **error);

/*
 * Events (design.md "Events"): what libmerge reports to whoever listens,
 * without knowing who (the daemon's event bus, src/fuse/events.c).  One
 * process-wide hook, set once before any job starts (NULL: none).  It is
 * called in the thread that made the change, possibly with a job's lock
 * held, so it must not block nor call back into libmerge.  export is the
 * chain's export name, event one of "job-created", "job-ready",
 * "job-paused", "job-resumed", "job-completed", "job-failed",
 * "job-cancelled", "snapshot", "pivot"; fields the event's own JSON
 * members without braces ("\"job\":\"commit\",\"offset\":0"), or "".
 */
typedef void (*MergeEventHook)(const char *export_name, const char *event,
                               const char *fields, void *opaque);
void merge_set_event_hook(MergeEventHook hook, void *opaque);
/* Report an event through the hook (for libmerge's own files). */
void merge_emit_event(const char *export_name, const char *event,
                      const char *fields);

#endif
