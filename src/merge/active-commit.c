/*
 * active-commit.c: commit of the active layer into base while guests
 * write (after QEMU's block/mirror.c in its commit mode), ending in READY,
 * then pivot (base becomes the active layer) or cancel.
 *
 * WHY IT IS CORRECT, in the order things happen:
 *
 * 1. Under the topology write lock (no guest request in flight, held only
 *    for this) the job installs the chain's write hook.  From then on
 *    every guest write, after it landed in the active layer and before it
 *    is acknowledged, marks its range dirty.  Then, under the READ lock
 *    while guests go on, the job scans the allocation above base and marks
 *    dirty every granule allocated there.  A write that ended before the
 *    hook went in is in the active layer's metadata before the scan reads
 *    it (the write lock drained it); one that races the scan is marked by
 *    the hook whatever the scan sees; marking twice changes nothing.  So
 *    once the scan ends, every granule that differs from base is dirty,
 *    and no copy starts before that.  The export still reads the old
 *    chain: base is below and only shows where nothing above it is
 *    allocated, and the job writes base only where something above IS
 *    allocated, so guests never see the copy.
 *
 * 2. Background copy (tracking mode), on the copy engine's workers, each
 *    owning the granules of its window: for a dirty run, the job clears
 *    the bits FIRST, then reads the chain as the active layer sees it and
 *    writes base.  A guest write that lands before the read is read; one
 *    that lands after it marks the run dirty again (its mark comes after
 *    its write, which comes after our clear), so the run is copied again.
 *    Nothing is lost; base may hold stale bytes only where a bit is set.
 *
 * 3. When copying stops gaining (the dirty set does not shrink from one
 *    pass to the next, or it is small), the job switches, under the
 *    topology write lock, to synchronous mirroring: the chain serialises
 *    (serialize_count), every guest write takes a range lock and its hook
 *    writes the same bytes into base before the write is acknowledged.  The
 *    background copy of a dirty run takes the range lock too, so a copy
 *    and a guest write of one range never interleave.  The dirty set can
 *    now only shrink (a failed mirror write marks dirty instead of
 *    failing the guest), so it empties whatever the guest's speed: READY.
 *
 * 4. In READY base equals the export wherever no bit is set.  Pivot takes
 *    the topology write lock (drains), copies what is still dirty, flushes
 *    base, records in the state file that the export is served from base
 *    and that the old layers are dropped (one atomic rename), and only
 *    then changes the layer list.  A crash before the rename serves the
 *    old chain (complete); after it, base (complete and flushed).
 *
 * 5. Cancel removes the hook under the write lock: the old active layer
 *    stays, base stays in sync as far as it got, and goes back read-only.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <string.h>

#include "json.h"
#include "merge-int.h"

/* Losing passes before mirroring synchronously. */
#define ACTIVE_STALE_PASSES 1
/* A dirty set this small is finished faster by mirroring. */
#define ACTIVE_MIRROR_THRESHOLD (4ULL * 1024 * 1024)
/* How often a READY job looks for ranges a failed mirror left dirty. */
#define ACTIVE_READY_POLL_US (100 * 1000)
/* The allocation scan takes the read lock this many bytes at a time, so
 * that a pause or cancel is heard between. */
#define ACTIVE_SCAN_BYTES (1ULL << 30)

typedef struct {
    MergeJob common;
    uint64_t granule;

    GMutex dirty_lock;    /* guards the fields below */
    guint64 *dirty;       /* one bit per granule */
    uint64_t nbits;
    uint64_t ndirty;
    bool mirror;          /* synchronous mirroring (step 3) */

    /* Job thread only (and clean, same thread): */
    bool hooked;          /* write hook installed */
    bool serializing;     /* serialize_count raised */
    uint64_t pass_start;  /* ndirty when the current pass began */
} ActiveCommitJob;

static ActiveCommitJob *active_job(Job *job)
{
    return container_of(merge_job(job), ActiveCommitJob, common);
}

/* ---- dirty bitmap (dirty_lock held) ------------------------------------ */

static void dirty_set(ActiveCommitJob *s, uint64_t off, uint64_t bytes)
{
    uint64_t first = off / s->granule;
    uint64_t last = (off + bytes - 1) / s->granule;

    for (uint64_t b = first; b <= last && b < s->nbits; b++) {
        guint64 m = 1ULL << (b % 64);

        if (!(s->dirty[b / 64] & m)) {
            s->dirty[b / 64] |= m;
            s->ndirty++;
        }
    }
}

static void dirty_clear_bits(ActiveCommitJob *s, uint64_t first,
                             uint64_t count)
{
    for (uint64_t b = first; b < first + count && b < s->nbits; b++) {
        guint64 m = 1ULL << (b % 64);

        if (s->dirty[b / 64] & m) {
            s->dirty[b / 64] &= ~m;
            s->ndirty--;
        }
    }
}

/* First set bit at or after from; nbits when none. */
static uint64_t dirty_next(ActiveCommitJob *s, uint64_t from)
{
    for (uint64_t b = from; b < s->nbits;) {
        guint64 w = s->dirty[b / 64] >> (b % 64);

        if (w) {
            return b + (uint64_t)__builtin_ctzll(w);
        }
        b = (b / 64 + 1) * 64;
    }
    return s->nbits;
}

/* Length in bits of the run of set bits at first, at most max. */
static uint64_t dirty_run(ActiveCommitJob *s, uint64_t first, uint64_t max)
{
    uint64_t n = 0;

    while (first + n < s->nbits && n < max &&
           (s->dirty[(first + n) / 64] & (1ULL << ((first + n) % 64)))) {
        n++;
    }
    return n;
}

static uint64_t active_ndirty(ActiveCommitJob *s)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&s->dirty_lock);

    return s->ndirty;
}

static bool active_mirroring(ActiveCommitJob *s)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&s->dirty_lock);

    return s->mirror;
}

/* ---- the write hook (guest threads) -------------------------------------- */

/*
 * Called by chain-io after a guest write landed in the active layer, with
 * the topology read lock held (and the range lock while serialising).
 * Never fails the guest write: a failed mirror write leaves the range
 * dirty for the job to copy again.
 */
static int active_write_hook(void *opaque, uint64_t offset, uint64_t bytes,
                             const void *buf)
{
    ActiveCommitJob *s = opaque;
    ChainImage *base = s->common.base;

    if (active_mirroring(s) && offset < base->virtual_size) {
        uint64_t n = MIN(bytes, base->virtual_size - offset);
        int ret = buf ? base->drv->pwrite(base, offset, buf, n)
                      : base->drv->pwrite_zeroes(base, offset, n, true);

        if (ret == 0 && n == bytes) {
            merge_crash_point("active-mirror");
            return 0;
        }
    }
    g_mutex_lock(&s->dirty_lock);
    dirty_set(s, offset, bytes);
    g_mutex_unlock(&s->dirty_lock);
    return 0;
}

/* ---- copying ------------------------------------------------------------- */

/* Is top still the active layer, above base?  *base_idx then.  Topology
 * lock held. */
static bool active_layers(ActiveCommitJob *s, guint *base_idx)
{
    guint top_idx;

    return merge_job_layers(&s->common, &top_idx, base_idx) && top_idx == 0;
}

/*
 * The engine's step: the first dirty run at or after off inside the
 * window (off, end), copied from the active layer's view into base under
 * its range lock.  The worker owns the window's granules: no other thread
 * clears their bits.
 */
static int active_step(void *opaque, uint64_t off, uint64_t end, void *buf,
                       uint64_t *advance, uint64_t *written)
{
    ActiveCommitJob *s = opaque;
    Chain *chain = s->common.chain;
    uint64_t end_bit = (end + s->granule - 1) / s->granule;
    uint64_t first, count, roff, len;
    ChainRangeLock *lk;
    guint base_idx;
    int ret;

    *advance = end - off;
    *written = 0;
    chain_topo_rdlock(chain);
    if (!active_layers(s, &base_idx)) {
        chain_topo_unlock(chain);
        return -ESTALE;
    }
    g_mutex_lock(&s->dirty_lock);
    first = dirty_next(s, off / s->granule);
    g_mutex_unlock(&s->dirty_lock);
    if (first >= end_bit) {
        chain_topo_unlock(chain);
        return 0;
    }
    roff = first * s->granule;
    len = MIN(MAX((uint64_t)MERGE_CHUNK, s->granule), end - roff);
    lk = chain_range_lock(chain, roff, len);
    g_mutex_lock(&s->dirty_lock);
    count = MAX(dirty_run(s, first, (len + s->granule - 1) / s->granule), 1);
    /* Clear first, then read: see step 2 above. */
    dirty_clear_bits(s, first, count);
    g_mutex_unlock(&s->dirty_lock);
    /* Within the range already locked. */
    len = MIN(count * s->granule, end - roff);
    ret = copy_above_range(chain, 0, base_idx, s->common.base, roff, len, buf,
                           written);
    if (ret < 0) {
        g_mutex_lock(&s->dirty_lock);
        dirty_set(s, roff, len);
        g_mutex_unlock(&s->dirty_lock);
    }
    chain_range_unlock(chain, lk);
    chain_topo_unlock(chain);
    if (ret == 0) {
        merge_crash_point("active-copy");
    }
    *advance = roff + len - off;
    return ret;
}

/* The engine skips the windows with no dirty bit. */
static uint64_t active_seek(void *opaque, uint64_t off)
{
    ActiveCommitJob *s = opaque;
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&s->dirty_lock);
    uint64_t b = dirty_next(s, off / s->granule);

    return b >= s->nbits ? s->common.size : MAX(b * s->granule, off);
}

/* Switch to synchronous mirroring (step 3).  Drains guest writes. */
static void active_start_mirror(ActiveCommitJob *s)
{
    Chain *chain = s->common.chain;

    chain_topo_wrlock(chain);
    merge_serialize_begin(chain, &s->serializing);
    g_mutex_lock(&s->dirty_lock);
    s->mirror = true;
    g_mutex_unlock(&s->dirty_lock);
    chain_topo_unlock(chain);
    merge_crash_point("active-mirror-start");
}

/* Progress; and when the guest dirties faster than we copy, stop losing
 * now rather than at the end of the pass. */
static int active_tick(void *opaque, uint64_t prefix)
{
    ActiveCommitJob *s = opaque;
    uint64_t nd = active_ndirty(s);

    job_set_progress(&s->common.job,
                     s->common.size - MIN(nd * s->granule, s->common.size),
                     s->common.size);
    if (!active_mirroring(s) && nd > s->pass_start) {
        active_start_mirror(s);
    }
    return 0;
}

/* One pass over the dirty set.  0, -ECANCELED or a failure to return. */
static int active_pass(ActiveCommitJob *s)
{
    MergeJob *mj = &s->common;
    g_autofree char *what = g_strdup_printf("active commit of %s",
                                            mj->top->name);
    g_autofree char *into = g_strdup_printf(" into %s", mj->base->name);
    CopyParams p = {
        .job = &mj->job, .step = active_step, .seek = active_seek,
        .tick = active_tick, .opaque = s, .start = 0, .end = mj->size,
        .window = MAX((uint64_t)MERGE_CHUNK, s->granule),
        .policy = mj->on_error, .what = what, .what_into = into,
        .dst = mj->base,
        /* An error let pass stays dirty: a later pass tries it again. */
        .skip_advances = true,
    };
    CopyResult r;

    s->pass_start = active_ndirty(s);
    return copy_run(&p, &r);
}

/* ---- the job ------------------------------------------------------------- */

/* Step 1, first half: base grows to the export's size, is zeroed where it
 * would show data past top's end after the pivot
 * (commit_prepare_base_locked), and the hook goes in, under a short write
 * lock. */
static int active_install_hook(ActiveCommitJob *s)
{
    MergeJob *mj = &s->common;
    Chain *chain = mj->chain;
    g_autoptr(GError) err = NULL;

    chain_topo_wrlock(chain);
    if (!commit_prepare_base_locked(chain, mj->top, mj->base, mj->size, true,
                                    &err)) {
        chain_topo_unlock(chain);
        return merge_job_fail(mj, -chainfs_error_errno(err), "%s",
                              err->message);
    }
    chain->write_hook = active_write_hook;
    chain->write_hook_opaque = s;
    s->hooked = true;
    chain_topo_unlock(chain);
    return 0;
}

/* Step 1, second half: mark what is allocated above base, under the read
 * lock a slice at a time while guests go on (why that is enough: step 1
 * at the top of the file). */
static int active_scan(ActiveCommitJob *s)
{
    MergeJob *mj = &s->common;
    Chain *chain = mj->chain;

    for (uint64_t off = 0; off < mj->size;) {
        uint64_t slice_end = MIN(off + ACTIVE_SCAN_BYTES, mj->size);
        guint base_idx;
        int st = 0;

        if (job_pause_point(&mj->job)) {
            return -ECANCELED;
        }
        chain_topo_rdlock(chain);
        if (!active_layers(s, &base_idx)) {
            st = -ESTALE;
        }
        while (st >= 0 && off < slice_end) {
            uint64_t pnum;
            int owner;

            st = chain_status_above(chain, 0, base_idx, off, slice_end - off,
                                    &pnum, &owner);
            if (st >= 0 && st != BLOCK_UNALLOCATED) {
                g_mutex_lock(&s->dirty_lock);
                dirty_set(s, off, pnum);
                g_mutex_unlock(&s->dirty_lock);
            }
            off += st >= 0 ? pnum : 0;
        }
        chain_topo_unlock(chain);
        if (st < 0) {
            return merge_job_fail(mj, st, "cannot read the allocation of "
                                  "%s: %s", mj->top->name, g_strerror(-st));
        }
    }
    return 0;
}

/* Steps 2 and 3: copy passes until mirroring has emptied the dirty set. */
static int active_converge(ActiveCommitJob *s)
{
    int stale = 0;

    for (;;) {
        uint64_t prev = active_ndirty(s), nd;
        int ret = active_pass(s);

        if (ret < 0) {
            return ret;
        }
        nd = active_ndirty(s);
        if (active_mirroring(s)) {
            if (nd == 0) {
                return 0;
            }
            continue;
        }
        /* A pass that did not halve the dirty set is losing. */
        stale = nd * 2 > prev ? stale + 1 : 0;
        if (nd == 0 || stale >= ACTIVE_STALE_PASSES ||
            nd * s->granule <= ACTIVE_MIRROR_THRESHOLD) {
            active_start_mirror(s);
        }
    }
}

static int active_run(Job *job)
{
    ActiveCommitJob *s = active_job(job);
    MergeJob *mj = &s->common;
    int ret = active_install_hook(s);

    if (ret == 0) {
        job_set_progress(job, 0, mj->size);
        ret = active_scan(s);
    }
    if (ret == 0) {
        ret = active_converge(s);
    }
    if (ret < 0) {
        return ret;
    }
    job_set_progress(job, mj->size, mj->size);
    /* From here on the guest writes both images (base alone after the
     * pivot): leave them without the copy's large folios.  base is
     * flushed first so that its copied pages are clean and can go. */
    if (mj->base->drv->flush(mj->base) == 0) {
        chain_image_drop_cache(mj->base);
    }
    chain_image_drop_cache(mj->top);
    job_transition_to_ready(job);
    g_message("%s: active commit of %s into %s is ready", mj->chain->name,
              mj->top->name, mj->base->name);
    merge_crash_point("active-ready");

    /* Step 4 waits for pivot; meanwhile copy what a failed mirror left. */
    for (;;) {
        ret = job_wait_complete(job, ACTIVE_READY_POLL_US);
        if (ret != -ETIMEDOUT) {
            return ret;
        }
        if (active_ndirty(s) > 0) {
            ret = active_pass(s);
            if (ret < 0) {
                return ret;
            }
        }
    }
}

/* Guest writes stop reaching base and stop serialising.  Topology write
 * lock held. */
static void active_unhook(ActiveCommitJob *s)
{
    Chain *chain = s->common.chain;

    if (s->hooked) {
        chain->write_hook = NULL;
        chain->write_hook_opaque = NULL;
        s->hooked = false;
    }
    merge_serialize_end(chain, &s->serializing);
}

/* Pivot, first part: drained (write lock held), copy what is still dirty,
 * no range lock needed, and flush base.  0 or negative errno. */
static int active_pivot_copy(ActiveCommitJob *s, guint base_idx)
{
    MergeJob *mj = &s->common;
    g_autofree void *buf = g_malloc(MERGE_CHUNK);

    for (;;) {
        uint64_t first, count, written, off;
        int ret;

        g_mutex_lock(&s->dirty_lock);
        first = dirty_next(s, 0);
        count = first < s->nbits ?
                dirty_run(s, first, MERGE_CHUNK / s->granule + 1) : 0;
        dirty_clear_bits(s, first, count);
        g_mutex_unlock(&s->dirty_lock);
        if (count == 0) {
            break;
        }
        off = first * s->granule;
        ret = copy_above_range(mj->chain, 0, base_idx, mj->base, off,
                               MIN(count * s->granule, mj->size - off), buf,
                               &written);
        if (ret < 0) {
            g_mutex_lock(&s->dirty_lock);
            dirty_set(s, off, count * s->granule);
            g_mutex_unlock(&s->dirty_lock);
            return merge_job_fail(mj, ret, "pivot of %s: cannot copy offset %"
                                  G_GUINT64_FORMAT " into %s: %s",
                                  mj->chain->name, off, mj->base->name,
                                  g_strerror(-ret));
        }
    }
    {
        int ret = mj->base->drv->flush(mj->base);

        if (ret < 0) {
            return merge_job_fail(mj, ret, "pivot of %s: cannot flush %s: %s",
                                  mj->chain->name, mj->base->name,
                                  g_strerror(-ret));
        }
    }
    return 0;
}

/* Pivot (step 4). */
static int active_prepare(Job *job)
{
    ActiveCommitJob *s = active_job(job);
    MergeJob *mj = &s->common;
    Chain *chain = mj->chain;
    const char *dir = image_set_dir(chain->set);
    g_autoptr(GError) err = NULL;
    guint base_idx = 0;
    int ret;

    chain_topo_wrlock(chain);
    ret = active_layers(s, &base_idx) ? active_pivot_copy(s, base_idx)
          : merge_job_fail(mj, -ESTALE, "the layers of %s changed during the "
                           "commit", chain->name);
    if (ret < 0) {
        chain_topo_unlock(chain);
        return ret;
    }
    merge_crash_point("active-pivot-flushed");
    /* The disk keeps its owner and mode (libvirt's chown of the export):
     * base takes the active layer's before it becomes it.  A failure
     * leaves base's own, which the export then shows; not a reason to
     * keep the guest on a layer the user asked to drop. */
    if (!chain_image_copy_owner(chain_layer(chain, 0), mj->base, &err)) {
        g_warning("%s: pivot keeps %s's own owner and mode: %s", chain->name,
                  mj->base->name, err->message);
        g_clear_error(&err);
    }
    /* The one atomic step: from here on the export is served from base. */
    if (!checkpoint_record_dropped(dir, chain->name, mj->layers,
                                   mj->base->name, &err)) {
        chain_topo_unlock(chain);
        return merge_job_fail(mj, -chainfs_error_errno(err),
                              "pivot of %s: %s", chain->name, err->message);
    }
    merge_crash_point("active-pivot-recorded");
    active_unhook(s);
    for (guint i = 0; i < base_idx; i++) {
        g_ptr_array_remove(mj->reopened, chain_layer(chain, i));
    }
    chain_drop_layers(chain, 0, base_idx - 1);
    chain_topo_unlock(chain);
    merge_crash_point("active-dropped");
    g_message("%s: pivoted to %s", chain->name, mj->base->name);
    {
        g_autoptr(GString) fields = g_string_new(NULL);

        json_append_member_string(fields, "file", mj->base->name);
        json_append_member_string(fields, "id", job->id);
        merge_emit_event(chain->name, "pivot", fields->str);
    }
    if (mj->delete_dropped) {
        merge_unlink_dropped(dir, mj->layers);
    }
    return 0;
}

static void active_abort(Job *job)
{
    merge_job_stopped(merge_job(job));
}

/* Step 5, and the end of every active commit. */
static void active_clean(Job *job)
{
    ActiveCommitJob *s = active_job(job);
    Chain *chain = s->common.chain;

    chain_topo_wrlock(chain);
    active_unhook(s);
    merge_reopen_ro(chain, s->common.reopened);
    chain_topo_unlock(chain);
}

static void active_free(Job *job)
{
    ActiveCommitJob *s = active_job(job);

    merge_job_free_common(&s->common);
    g_free(s->dirty);
    if (s->granule) {
        g_mutex_clear(&s->dirty_lock);
    }
}

static const JobDriver active_job_driver = {
    .type = "active-commit",
    .instance_size = sizeof(ActiveCommitJob),
    .run = active_run,
    .prepare = active_prepare,
    .abort = active_abort,
    .clean = active_clean,
    .free = active_free,
};

/* The dirty bitmap.  A crash before pivot starts over at the next mount
 * (base holds nothing the export shows until pivot, so that is always
 * safe): the checkpoint keeps no offset. */
static void active_init(MergeJob *mj)
{
    ActiveCommitJob *s = container_of(mj, ActiveCommitJob, common);

    g_mutex_init(&s->dirty_lock);
    s->granule = MAX((uint64_t)mj->base->cluster_size, 65536);
    s->nbits = (mj->size + s->granule - 1) / s->granule;
    s->dirty = g_new0(guint64, s->nbits / 64 + 1);
}

const MergeJobKind active_commit_job_kind = {
    .driver = &active_job_driver,
    .plan = commit_kind_plan,
    .check = commit_kind_check,
    .reopen = commit_kind_reopen,
    .words = commit_kind_words,
    .init = active_init,
};
