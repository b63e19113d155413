/*
 * merge-int.h: what the files of src/merge share and nobody else uses:
 * the merge context, the per-chain job slot, checkpoints, the job base
 * (MergeJob) with its one constructor, the copy engine (copy.c), and the
 * job drivers' entry points.
 */
#ifndef CHAINFS_MERGE_INT_H
#define CHAINFS_MERGE_INT_H

#include "chain-io.h"
#include "directory.h"
#include "job.h"
#include "merge.h"

struct MergeContext {
    ImageSet *set;        /* not owned */
    GMutex lock;          /* guards chains, next_id */
    GPtrArray *chains;    /* Chain *, not owned; each has a MergeSlot */
    uint64_t next_id;
};

/*
 * Chain.job points to one of these, made by merge_context_add_chain and
 * freed by merge_context_free.  `lock` guards `job` (the current or last
 * job) and serialises the verbs on it, so that a job is never freed while
 * a verb or an info request looks at it.
 */
typedef struct MergeSlot {
    GMutex lock;
    Job *job;             /* protected by lock; owned */
    MergeContext *ctx;    /* fixed */
} MergeSlot;

/* options.c */
const char *on_error_policy_name(OnErrorPolicy p);
char *commit_options_format(const CommitOptions *opts);
char *stream_options_format(const StreamOptions *opts);

/* checkpoint.c: the [job EXPORT] group of the state file. */
typedef struct {
    char *type;           /* "commit", "active-commit", "stream" */
    char *top;            /* layer names */
    char *base;
    char *options;        /* words that parse back into the options */
    char **layers;        /* names of the layers the job drops */
    uint64_t offset;      /* first byte not yet durable in base */
    bool cancelled;       /* by the user: resume only when reissued */
} Checkpoint;

bool checkpoint_save(const char *dir, const char *export_name,
                     const Checkpoint *cp, GError **error);
/* FALSE when the state file holds none for export_name. */
bool checkpoint_load(const char *dir, const char *export_name,
                     Checkpoint *cp);
bool checkpoint_clear(const char *dir, const char *export_name,
                      GError **error);
void checkpoint_clear_fields(Checkpoint *cp);
/* Record names as dropped (and forget export_name's checkpoint when
 * export_name is not NULL), in one atomic state update.  When
 * active_file is not NULL, export_name is served from it from now on. */
bool checkpoint_record_dropped(const char *dir, const char *export_name,
                               char **names, const char *active_file,
                               GError **error);

/* merge.c helpers */
/* Index of img in chain (-1 when not a layer).  Topology lock held. */
int merge_layer_index(Chain *chain, ChainImage *img);
/* The backing reference holder should store for target. */
char *merge_backing_ref(ChainImage *holder, ChainImage *target,
                        bool keep_relative);
/* Other users of the layers names (NULL-terminated) outside chain:
 * EBUSY naming them (and, when forceable, the word force that overrides
 * it).  Topology lock held. */
bool merge_check_users(Chain *chain, char **names, const char *what,
                       bool forceable, GError **error);
/* Reopen img read-write unless it is; on success adds it to reopened. */
bool merge_reopen_rw(ChainImage *img, GPtrArray *reopened, GError **error);
/* Back to read-only every image of reopened still in chain (topology
 * write lock held). */
void merge_reopen_ro(Chain *chain, GPtrArray *reopened);
/* Unlink the files names of dir (delete). */
void merge_unlink_dropped(const char *dir, char **names);
/* Serialise guest writes against a job's copy, or stop to, once per job:
 * *serializing says whether this job raised chain->serialize_count.
 * Topology write lock held (it drains the requests in flight). */
void merge_serialize_begin(Chain *chain, bool *serializing);
void merge_serialize_end(Chain *chain, bool *serializing);
/* Save chain's checkpoint cp in the state file; a failure is logged as
 * well as returned (error may be NULL when the caller goes on anyway). */
bool merge_save_checkpoint(Chain *chain, const Checkpoint *cp,
                           GError **error);
/* An id for a new job. */
char *merge_context_next_id(MergeContext *ctx, const char *type);

/* The layers a job works on, resolved under the topology lock. */
typedef struct {
    ChainImage *top;
    ChainImage *base;     /* NULL: a stream with no base (bottom) */
    ChainImage *above;    /* the layer above top; NULL when top is active */
    guint top_idx;
    guint base_idx;       /* chain depth when base is NULL */
    uint64_t size;        /* bytes to look at: top's view of the disk */
} MergePlan;

/* ---- the job base ------------------------------------------------------ */

typedef struct MergeJobKind MergeJobKind;

/*
 * What every merge job has (after QEMU's BlockJob): embedded first in each
 * driver's state (CommitJob, ActiveCommitJob, StreamJob), Job first in it,
 * so that container_of() leads from the Job the core hands back.  Filled
 * by merge_job_create(); fixed afterwards, but for top (commit clears it
 * once top may be closed).
 */
typedef struct MergeJob {
    Job job;
    const MergeJobKind *kind;
    MergeContext *ctx;
    Chain *chain;
    ChainImage *top;
    ChainImage *base;     /* NULL: stream with no base */
    char **layers;        /* names of the layers the job drops */
    GPtrArray *reopened;  /* images this job made writable */
    uint64_t size;
    char *words;          /* the options as words, for checkpoints */
    OnErrorPolicy on_error;
    bool delete_dropped;
    bool keep_relative;
    /* Progress a stopped job keeps (kind->resumable): below it base holds
     * every byte; the job thread's only. */
    uint64_t offset;
} MergeJob;

static inline MergeJob *merge_job(Job *job)
{
    return container_of(job, MergeJob, job);
}

/*
 * One kind of job: how merge_job_create resolves, checks and reopens its
 * layers, then the driver.  Options are the kind's own (CommitOptions or
 * StreamOptions).
 */
struct MergeJobKind {
    const JobDriver *driver;
    /* The top layer is kept (stream) rather than dropped (commit). */
    bool keeps_top;
    /* A stopped job records its offset for a reissue (commit) instead of
     * forgetting its checkpoint. */
    bool resumable;
    /* Resolve the layers.  Topology lock held (read, then write). */
    bool (*plan)(Chain *chain, const void *opts, MergePlan *plan,
                 GError **error);
    /* Checks that read metadata: users, room.  Topology read lock. */
    bool (*check)(Chain *chain, const void *opts, const MergePlan *plan,
                  char **layers, GError **error);
    /* Reopen read-write what the job writes, all or nothing (NULL:
     * nothing to reopen).  Topology write lock held. */
    bool (*reopen)(Chain *chain, const MergePlan *plan, GPtrArray *reopened,
                   GError **error);
    /* The options as words naming the planned layers; flags into mj. */
    char *(*words)(MergeJob *mj, const void *opts);
    /* The driver's own part of a new job (NULL: none); before the first
     * checkpoint is saved. */
    void (*init)(MergeJob *mj);
};

/*
 * The one constructor: plan and check under the read lock (guests go on),
 * plan again under the write lock (refusing EBUSY when the layers moved)
 * and reopen, then job_new, the kind's init, and the first checkpoint,
 * saved before the command is acknowledged so that a crash from then on
 * resumes the job at the next mount.  Called with the chain's slot lock
 * held and no job running on it.  NULL with *error set: nothing changed.
 */
Job *merge_job_create(const MergeJobKind *kind, MergeContext *ctx,
                      Chain *chain, const void *opts, uint64_t speed,
                      GError **error);
/* Undo merge_job_create for a job that never started (job_start failed):
 * no driver callback runs; the checkpoint goes as a cancel would leave it
 * and the reopened images go back read-only.  Then job_free. */
void merge_job_discard(MergeJob *mj);
/* Free what MergeJob holds (the drivers' free calls it). */
void merge_job_free_common(MergeJob *mj);
/* The job's checkpoint at offset. */
bool merge_job_checkpoint(MergeJob *mj, uint64_t offset, bool cancelled,
                          GError **error);
/* For abort: a resumable kind flushes base and records mj->offset (as
 * cancelled unless a shutdown interrupted the job, which the next mount
 * resumes); the others forget their checkpoint unless interrupted. */
void merge_job_stopped(MergeJob *mj);
/* Record err (negative errno) as the job's error with what, and return it
 * (for `return merge_job_fail(...)`). */
int merge_job_fail(MergeJob *mj, int err, const char *fmt, ...)
    G_GNUC_PRINTF(3, 4);
/* Are mj's top and base still layers of its chain, top above base?  Then
 * *top_idx and *base_idx.  Topology lock held. */
bool merge_job_layers(MergeJob *mj, guint *top_idx, guint *base_idx);

/* The kinds (commit.c, active-commit.c, stream.c). */
extern const MergeJobKind commit_job_kind;
extern const MergeJobKind active_commit_job_kind;
extern const MergeJobKind stream_job_kind;

/* commit.c: shared by commit and active commit. */
bool commit_plan(Chain *chain, const CommitOptions *opts, bool offline,
                 MergePlan *plan, GError **error);
bool commit_kind_plan(Chain *chain, const void *opts, MergePlan *plan,
                      GError **error);
bool commit_kind_check(Chain *chain, const void *opts, const MergePlan *plan,
                       char **layers, GError **error);
bool commit_kind_reopen(Chain *chain, const MergePlan *plan,
                        GPtrArray *reopened, GError **error);
char *commit_kind_words(MergeJob *mj, const void *opts);
/* NULL-terminated names of layers [first, last]. */
char **commit_layer_names(Chain *chain, guint first, guint last);
/* ENOSPC when base's filesystem lacks the room the commit needs.
 * Topology lock held. */
bool commit_check_space(Chain *chain, const MergePlan *plan,
                        GError **error);

/*
 * The end of a commit, crash-safe order: base is flushed; under the
 * topology write lock the image above top (if any) and top (when layers
 * lie between it and base) get base as backing file, the layers between
 * leave the chain, the state file records them dropped and forgets the
 * checkpoint.  *dropped gets their names (NULL-terminated).  Images of
 * reopened that leave the chain are removed from it.  FALSE only when
 * nothing changed; once layers left the chain a failure to write the
 * record is logged and the commit still counts as done.
 */
bool commit_finish(Chain *chain, ChainImage *top, ChainImage *base,
                   bool keep_relative, GPtrArray *reopened, char ***dropped,
                   GError **error);

/*
 * Make base ready to take the place of the layers from top down to it
 * (commit.c), with the topology write lock held: base grows to size when
 * smaller (the driver zeroes the new range where base's own backing chain
 * holds data: qcow2_grow), and past top's end, which the layers above top
 * read as zeros and would then read from base, base is zeroed where it
 * shows data (up to the smallest size above top; to base's end when
 * active, as base becomes the active layer at the pivot), then flushed.
 * Why before the copy and why again on a resume: the comment at the
 * definition.  FALSE with the message when it cannot.
 */
bool commit_prepare_base_locked(Chain *chain, ChainImage *top,
                                ChainImage *base, uint64_t size, bool active,
                                GError **error);

/*
 * Crash points, a TEST HOOK (merge.c), compiled in only with meson's
 * -Dcrash_points=true (CHAINFS_CRASH_POINTS; scripts/build.sh sets it for
 * the test builds; a packaged or default build has none, and a call
 * compiles to nothing): with CHAINFS_CRASH_AT=NAME or
 * NAME:N in the environment, the process raise(SIGKILL)s itself the N-th
 * time (default the first) any thread reaches merge_crash_point(NAME), so
 * that a test can crash a job at an exact step of its crash-safe order and
 * check what the next mount makes of it (tests/test_merge_crash_guest.py).
 * NAME must be one of MERGE_CRASH_POINTS; the variable is read once, by
 * the first merge_context_new().  Unset, a crash point costs one load and
 * a branch.  The points:
 *
 *   job-started             a job's thread runs; the command is not
 *                           acknowledged yet
 *   commit-checkpoint       a checkpoint: base flushed, offset saved
 *   commit-base-flushed     commit_finish: base flushed, nothing rewritten
 *   commit-above-rewritten  the image above top backs onto base
 *   commit-top-rewritten    top backs onto base too (layers between)
 *   commit-dropped          the layers left the chain, not yet recorded
 *   commit-recorded         the state file records them dropped
 *   active-copy             a dirty run copied into base
 *   active-mirror-start     guest writes now mirrored synchronously
 *   active-mirror           a guest write mirrored, not yet acknowledged
 *   active-ready            the job entered READY
 *   active-pivot-flushed    pivot: base flushed, right before the record
 *   active-pivot-recorded   pivot: right after the record, the old layers
 *                           still in the chain
 *   active-dropped          pivot: the old layers left the chain
 *   stream-copy             a run copied into the active layer
 *   stream-flushed          the active layer flushed, backing untouched
 *   stream-rewritten        the new backing reference, not yet recorded
 *   stream-recorded         the streamed layers recorded as dropped
 *   snapshot-created        the overlay file exists, the chain unchanged
 *   snapshot-flushed        the old active layer flushed and read-only
 *   snapshot-recorded       the state file serves the overlay; the chain
 *                           in memory not yet switched
 */
#define MERGE_CRASH_POINTS \
    "job-started", "commit-checkpoint", "commit-base-flushed", \
    "commit-above-rewritten", "commit-top-rewritten", "commit-dropped", \
    "commit-recorded", "active-copy", "active-mirror-start", \
    "active-mirror", "active-ready", "active-pivot-flushed", \
    "active-pivot-recorded", "active-dropped", "stream-copy", \
    "stream-flushed", "stream-rewritten", "stream-recorded", \
    "snapshot-created", "snapshot-flushed", "snapshot-recorded"
#ifdef CHAINFS_CRASH_POINTS
void merge_crash_point(const char *name);
void merge_crash_init(void);
#else
static inline void merge_crash_point(const char *name)
{
    (void)name;
}
static inline void merge_crash_init(void)
{
}
#endif

/* Run fn under chain's job slot lock, refusing EBUSY "cannot WHAT: a job
 * is already ..." while a job is live: no job can start until fn returns.
 * fn may take the topology lock. */
bool merge_run_idle(MergeContext *ctx, Chain *chain, const char *what,
                    bool (*fn)(Chain *chain, void *opaque, GError **error),
                    void *opaque, GError **error);

/* ---- the copy engine (copy.c) ------------------------------------------ */

/*
 * One step of a job's copy: handle the range at off (below end, inside
 * one window), on a worker thread with no lock held.  Sets *advance (> 0,
 * at most end - off) to the bytes handled and *written to the data bytes
 * written; returns 0 or a negative errno (then *advance says how far to
 * skip, should the policy skip).
 */
typedef int (*CopyStepFn)(void *opaque, uint64_t off, uint64_t end, void *buf,
                          uint64_t *advance, uint64_t *written);

typedef struct {
    Job *job;             /* NULL offline: no pause, policy report */
    CopyStepFn step;
    void *opaque;         /* for step, seek and tick */
    /* The first offset at or after off worth a window (NULL: every one). */
    uint64_t (*seek)(void *opaque, uint64_t off);
    /* In the calling thread about every COPY_TICK_US and once at the end
     * (unless failed) with the copied prefix; a negative return stops the
     * copy with it. */
    int (*tick)(void *opaque, uint64_t prefix);
    uint64_t start, end;  /* the range to copy */
    uint64_t window;      /* bytes a worker takes at a time; 0: MERGE_CHUNK */
    OnErrorPolicy policy;
    /* on-error=ignore: TRUE, go past the range (and the run counts it in
     * skipped_err); FALSE, retry it later (a commit must not drop a layer
     * whose data base lacks). */
    bool skip_advances;
    const char *what;     /* "commit of T": errors say WHAT at offset N */
    const char *what_into;/* " into B" or "" */
    ChainImage *writeback;/* start its write-back at each tick (unlimited) */
    /* The image the copy writes.  Once its I/O error is latched (image.h)
     * every retry fails until a restart: on-error=ignore then fails. */
    ChainImage *dst;
    uint64_t offline_speed; /* bytes per second without a job; 0 none */
} CopyParams;

typedef struct {
    uint64_t prefix;      /* every byte of [start, prefix) was handled */
    int skipped_err;      /* errno of the last range skipped, 0 none */
} CopyResult;

/*
 * Copy [start, end) with COPY_WORKERS requests in flight, each worker
 * taking the next window.  A pause asked of the job stops every worker
 * between two steps and only then enters PAUSED in the calling (job)
 * thread.  Returns 0, -ECANCELED or the first failure.
 */
int copy_run(const CopyParams *p, CopyResult *result);

/*
 * Copy the run at off (below end) as chain layer top_idx sees the layers
 * above base_idx, into dst: DATA (at most MERGE_CHUNK) read and written as
 * data, ZERO written as zero clusters (never as data), unallocated left
 * alone.  Topology lock held; the range lock too when guests write dst.
 */
int copy_above(Chain *chain, guint top_idx, guint base_idx, ChainImage *dst,
               uint64_t off, uint64_t end, void *buf, uint64_t *advance,
               uint64_t *written);
/* copy_above over all of [off, off + len). */
int copy_above_range(Chain *chain, guint top_idx, guint base_idx,
                     ChainImage *dst, uint64_t off, uint64_t len, void *buf,
                     uint64_t *written);
/* Copy one run of known status st (from chain_status_above) read from
 * layer from_idx's view into dst. */
int copy_status_run(Chain *chain, guint from_idx, ChainImage *dst, int st,
                    uint64_t off, uint64_t len, void *buf, uint64_t *written);

/* Requests in flight of one copy. */
#define COPY_WORKERS 3
/* How often copy_run ticks. */
#define COPY_TICK_US (100 * 1000)

/* Size of one copy request. */
#define MERGE_CHUNK (1024 * 1024)
/* A checkpoint at least every this many bytes or microseconds. */
#define MERGE_CHECKPOINT_BYTES (64ULL * 1024 * 1024)
#define MERGE_CHECKPOINT_US (1000 * 1000)

#endif
