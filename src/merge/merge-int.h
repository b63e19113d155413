/*
 * merge-int.h: what the files of src/merge share and nobody else uses:
 * the merge context, the per-chain job slot, checkpoints, and the job
 * drivers' entry points.
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
 * EBUSY naming them.  Topology lock held. */
bool merge_check_users(Chain *chain, char **names, const char *what,
                       GError **error);
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
/* A stopped job's checkpoint is cleared, so that it does not resume,
 * unless a shutdown interrupted the job: then the next mount resumes it. */
void merge_forget_unless_interrupted(Job *job, Chain *chain);
/* An id for a new job. */
char *merge_context_next_id(MergeContext *ctx, const char *type);

/* commit.c: resolved layers of a commit; topology lock held to make it. */
typedef struct {
    ChainImage *top;
    ChainImage *base;
    ChainImage *above;    /* the layer above top; NULL when top is active */
    guint top_idx;
    guint base_idx;
    uint64_t size;        /* bytes to look at: top's view of the disk */
} CommitPlan;

bool commit_plan(Chain *chain, const CommitOptions *opts, bool offline,
                 CommitPlan *plan, GError **error);
/* NULL-terminated names of layers [first, last]. */
char **commit_layer_names(Chain *chain, guint first, guint last);
/* ENOSPC when base's filesystem lacks the room the commit needs.
 * Topology lock held. */
bool commit_check_space(Chain *chain, const CommitPlan *plan,
                        GError **error);
/*
 * Job constructors: check the command, reopen what the job writes, and
 * return a job in CREATED (NULL with *error set, nothing changed).  Called
 * with the chain's slot lock held and no job running on the chain.  A job
 * that then fails to start is undone with driver->clean and job_free.
 */
Job *commit_job_create(MergeContext *ctx, Chain *chain,
                       const CommitOptions *opts, GError **error);
/* active-commit.c */
Job *active_commit_job_create(MergeContext *ctx, Chain *chain,
                              const CommitOptions *opts, GError **error);
/* stream.c */
Job *stream_job_create(MergeContext *ctx, Chain *chain,
                       const StreamOptions *opts, GError **error);

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
 * Crash points, a TEST HOOK (merge.c): with CHAINFS_CRASH_AT=NAME or
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
void merge_crash_point(const char *name);

/* Run fn under chain's job slot lock, refusing EBUSY "cannot WHAT: a job
 * is already ..." while a job is live: no job can start until fn returns.
 * fn may take the topology lock. */
bool merge_run_idle(MergeContext *ctx, Chain *chain, const char *what,
                    bool (*fn)(Chain *chain, void *opaque, GError **error),
                    void *opaque, GError **error);

/* Size of one copy request. */
#define MERGE_CHUNK (1024 * 1024)
/* A checkpoint at least every this many bytes or microseconds. */
#define MERGE_CHECKPOINT_BYTES (64ULL * 1024 * 1024)
#define MERGE_CHECKPOINT_US (1000 * 1000)

#endif
