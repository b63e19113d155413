/*
 * chain-io.c: reading and writing a chain as one flat disk (chain-io.h).
 *
 * THE CHAIN MAP
 *
 * A read must not cost more at depth 64 than at depth 2.  So, per granule
 * (the smallest cluster size of the chain; every layer allocates whole
 * clusters, hence whole granules), the map records which layer a read must
 * go to: an owner index counted FROM THE BOTTOM (0 = bottom layer), so that
 * a new empty top layer leaves every entry valid, or MAP_NONE (reads as
 * zeros: nothing allocated, a zero cluster, or past a layer's end), or
 * MAP_MIXED (the granule is not uniform, e.g. a layer ends inside it: such
 * granules are served by walking the layers).  The map is cut into regions
 * of MAP_REGION_GRANULES entries, built on first touch by asking each
 * layer's block_status, top-down, only about the granules no layer above
 * has claimed, in runs.
 *
 * ORDERING AND CONCURRENCY
 *
 * Every request holds the chain's topology lock for reading; the map
 * pointer, the layer list and the owner indices change only under the
 * write lock (chain_map_invalidate, chain_map_note_push), so a request sees
 * one map for one layer list from start to end.
 *
 * Within a topology, the only thing that changes what a granule's owner
 * should be is a write into the active layer (the lower layers are
 * read-only for guests; jobs that copy data into lower layers copy what the
 * chain already shows there, so the owner recorded above stays right until
 * the topology changes).  A guest write therefore: (1) writes through the
 * driver, (2) on success, under map->lock, bumps the write generation of
 * the regions it touched and points the entries of every ACTIVE-LAYER
 * cluster it touched at the active layer (the driver allocated or
 * copied-on-write whole clusters), (3) calls the write hook, (4) returns.
 * A read that starts after the write was acknowledged thus finds the new
 * owner; a read racing with it may find either owner, and either gives
 * valid content (the old owner still holds the old data, the active layer
 * holds the completed cluster) -- which is all a disk promises for
 * overlapping requests in flight.
 *
 * A region is built WITHOUT map->lock held (building may read L2 tables
 * from disk), so a write can complete while a build runs and the build may
 * or may not have seen it.  The builder reads the region's generation
 * before it starts and installs its result, under map->lock, only if the
 * generation is unchanged; otherwise it builds again (after a few tries it
 * builds holding the lock, which writers then wait for).  Once a region is
 * installed, writers update it in place.  Entries are read without the
 * lock, with relaxed atomic loads: each entry is always a valid value.
 *
 * The map records that a layer owns a granule, not whether the layer
 * stores data or a zero cluster there (a zeroing write makes the active
 * layer the owner, since its clusters now read as zeros).  chain_pread
 * does not care; chain_range_kind (SEEK_DATA / SEEK_HOLE, not a hot path)
 * asks the owning layer's block_status for each run.
 *
 * No lock is held across data I/O: map->lock covers entry updates and
 * region installs only; the topology read lock is shared; range locks
 * (below) are taken only while a job serialises.
 *
 * RANGE LOCKS
 *
 * While Chain.serialize_count > 0 (a job copies into a layer that guests
 * also write), guest writes and the job's copies take chain_range_lock on
 * their range, so that a copy cannot overwrite a newer guest write with
 * older data.  serialize_count changes only under the topology write lock,
 * so a request holding the read lock sees one value throughout; the lock
 * token remembers whether it was real.
 */
#include <errno.h>
#include <string.h>

#include "chain-io.h"

#define MAP_NONE 0xFFFFu   /* reads as zeros */
#define MAP_MIXED 0xFFFEu  /* not uniform: walk the layers */
#define MAP_UNSET 0xFFFDu  /* only while building: no layer claimed it yet */
#define MAP_REGION_BITS 16 /* granules per region: 64 Ki entries, 128 KiB */
#define MAP_BUILD_TRIES 3  /* lock-free builds before building locked */

struct ChainMap {
    unsigned gbits;        /* log2 of the granule; constant */
    uint64_t size;         /* chain size when created; constant.  Offsets
                              past it (the active layer grew) are walked */
    uint64_t nregions;     /* constant */
    GMutex lock;
    uint16_t **regions;    /* [nregions]; a slot is set once, under lock,
                              and read with atomic loads */
    uint64_t *gen;         /* [nregions] write generations; protected by
                              lock */
};

static inline uint16_t map_ent_get(const uint16_t *e)
{
    return __atomic_load_n(e, __ATOMIC_RELAXED);
}

static inline void map_ent_set(uint16_t *e, uint16_t v)
{
    __atomic_store_n(e, v, __ATOMIC_RELAXED);
}

/* ---- walking the layers ---------------------------------------------- */

/* Read what img and at most count-1 images below it show.  0 or -errno. */
static int walk_read(ChainImage *img, guint count, uint64_t offset,
                     uint8_t *buf, uint64_t bytes)
{
    while (bytes > 0) {
        uint64_t n;
        ChainImage *owner;
        guint steps;
        int ret = chain_walk_status(img, count, offset, bytes, &n, &owner, &steps);

        if (ret < 0) {
            return ret;
        }
        if (ret == BLOCK_DATA) {
            ret = owner->drv->pread(owner, offset, buf, n);
            if (ret < 0) {
                return ret;
            }
        } else {
            memset(buf, 0, n);
        }
        offset += n;
        buf += n;
        bytes -= n;
    }
    return 0;
}

int chain_image_read_through(ChainImage *img, uint64_t offset, void *buf,
                             uint64_t bytes)
{
    return walk_read(img, G_MAXUINT, offset, buf, bytes);
}

int chain_image_read_below(ChainImage *img, uint64_t offset, void *buf,
                           uint64_t bytes)
{
    if (!img->backing) {
        memset(buf, 0, bytes);
        return 0;
    }
    return walk_read(img->backing, G_MAXUINT, offset, buf, bytes);
}

int chain_status_above(Chain *chain, guint top, guint base, uint64_t offset,
                       uint64_t bytes, uint64_t *pnum, int *owner)
{
    ChainImage *o;
    guint steps;
    int ret;

    if (top >= base || base > chain_depth(chain) || bytes == 0) {
        return -EINVAL;
    }
    ret = chain_walk_status(chain_layer(chain, top), base - top, offset, bytes,
                      pnum, &o, &steps);
    if (ret < 0) {
        return ret;
    }
    *owner = o ? (int)(top + steps) : -1;
    return ret;
}

/* ---- the chain map ---------------------------------------------------- */

void chain_map_free(ChainMap *map)
{
    if (!map) {
        return;
    }
    for (uint64_t r = 0; r < map->nregions; r++) {
        g_free(map->regions[r]);
    }
    g_free(map->regions);
    g_free(map->gen);
    g_mutex_clear(&map->lock);
    g_free(map);
}

void chain_map_invalidate(Chain *chain)
{
    chain_map_free(chain->map);
    chain->map = NULL;
}

static unsigned map_granule_bits(Chain *chain)
{
    uint32_t g = G_MAXUINT32;

    for (guint i = 0; i < chain_depth(chain); i++) {
        g = MIN(g, chain_layer(chain, i)->cluster_size);
    }
    /* The largest power of two not above the smallest cluster, >= 512. */
    unsigned bits = 9;

    while (bits < 31 && (1u << (bits + 1)) <= g) {
        bits++;
    }
    return bits;
}

void chain_map_note_push(Chain *chain)
{
    ChainMap *m = chain->map;

    if (m && chain_layer(chain, 0)->cluster_size < (1u << m->gbits)) {
        chain_map_invalidate(chain);
    }
}

/* Caller holds the topology lock.  NULL when the chain is too deep for
 * 16-bit owners (it is then always walked). */
static ChainMap *map_get(Chain *chain)
{
    ChainMap *m = g_atomic_pointer_get(&chain->map);

    if (m) {
        return m;
    }
    if (chain_depth(chain) >= MAP_UNSET) {
        return NULL;
    }
    m = g_new0(ChainMap, 1);
    m->gbits = map_granule_bits(chain);
    m->size = chain_layer(chain, 0)->virtual_size;
    m->nregions = (m->size + (1ULL << (m->gbits + MAP_REGION_BITS)) - 1) >>
                  (m->gbits + MAP_REGION_BITS);
    g_mutex_init(&m->lock);
    m->regions = g_new0(uint16_t *, MAX(m->nregions, 1));
    m->gen = g_new0(uint64_t, MAX(m->nregions, 1));
    /* Readers race to create it; the first one wins. */
    if (!g_atomic_pointer_compare_and_exchange(&chain->map, NULL, m)) {
        chain_map_free(m);
        m = g_atomic_pointer_get(&chain->map);
    }
    return m;
}

static inline uint64_t map_region_start(ChainMap *m, uint64_t r)
{
    return r << (m->gbits + MAP_REGION_BITS);
}

static inline uint64_t map_region_end(ChainMap *m, uint64_t r)
{
    return MIN(map_region_start(m, r + 1), m->size);
}

/*
 * Record that [a, b) (inside the region starting at rbase, ending at rend)
 * has value v in the layer being scanned.  Granules are fed in increasing
 * order within one layer pass and were MAP_UNSET at its start, so the
 * first piece of a granule starts at the granule and sets it; a later
 * piece that disagrees makes it MAP_MIXED.
 */
static void map_piece(ChainMap *m, uint16_t *ent, uint64_t rbase,
                      uint64_t rend, uint64_t a, uint64_t b, uint16_t v)
{
    uint64_t gbytes = 1ULL << m->gbits;

    while (a < b) {
        uint64_t g = (a - rbase) >> m->gbits;
        uint64_t gs = rbase + (g << m->gbits);
        uint64_t ge = MIN(gs + gbytes, rend);

        if (a == gs) {
            ent[g] = v;
        } else if (ent[g] != v) {
            ent[g] = MAP_MIXED;
        }
        a = MIN(b, ge);
    }
}

/* One layer's pass over the unclaimed run [a, b) of a region. */
static int map_scan_layer(ChainMap *m, uint16_t *ent, uint64_t rbase,
                          uint64_t rend, ChainImage *l, uint16_t owner,
                          uint64_t a, uint64_t b)
{
    uint64_t lend = l->virtual_size;
    uint64_t off = a;
    uint64_t e = MIN(b, lend);

    while (off < e) {
        uint64_t pnum;
        int ret = l->drv->block_status(l, off, e - off, &pnum);
        uint16_t v;

        if (ret < 0) {
            return ret;
        }
        if (pnum == 0) {
            return -EIO;
        }
        pnum = MIN(pnum, e - off);
        v = ret == BLOCK_UNALLOCATED ? MAP_UNSET
          : ret == BLOCK_ZERO ? MAP_NONE : owner;
        map_piece(m, ent, rbase, rend, off, off + pnum, v);
        off += pnum;
    }
    if (b > lend) {
        map_piece(m, ent, rbase, rend, MAX(a, lend), b, MAP_NONE);
    }
    return 0;
}

/* Build region r from the layers.  NULL with *err set on failure. */
static uint16_t *map_build(Chain *chain, ChainMap *m, uint64_t r, int *err)
{
    uint64_t rbase = map_region_start(m, r);
    uint64_t rend = map_region_end(m, r);
    uint64_t n = (rend - rbase + (1ULL << m->gbits) - 1) >> m->gbits;
    guint depth = chain_depth(chain);
    g_autofree uint16_t *ent = g_new(uint16_t, n);

    for (uint64_t g = 0; g < n; g++) {
        ent[g] = MAP_UNSET;
    }
    for (guint li = 0; li < depth; li++) {
        ChainImage *l = chain_layer(chain, li);
        uint16_t owner = depth - 1 - li;
        bool pending = false;

        for (uint64_t g = 0; g < n;) {
            uint64_t g1;
            int ret;

            if (ent[g] != MAP_UNSET) {
                g++;
                continue;
            }
            pending = true;
            for (g1 = g + 1; g1 < n && ent[g1] == MAP_UNSET; g1++) {
            }
            ret = map_scan_layer(m, ent, rbase, rend, l, owner,
                                 rbase + (g << m->gbits),
                                 MIN(rbase + (g1 << m->gbits), rend));
            if (ret < 0) {
                *err = ret;
                return NULL;
            }
            g = g1;
        }
        if (!pending) {
            break;
        }
    }
    for (uint64_t g = 0; g < n; g++) {
        if (ent[g] == MAP_UNSET) {
            ent[g] = MAP_NONE;
        }
    }
    return g_steal_pointer(&ent);
}

/* The entries of region r, built if needed.  NULL with *err on failure. */
static uint16_t *map_region(Chain *chain, ChainMap *m, uint64_t r, int *err)
{
    uint16_t *ent = g_atomic_pointer_get(&m->regions[r]);

    if (ent) {
        return ent;
    }
    for (int attempt = 0;; attempt++) {
        uint64_t gen0;
        bool locked_build = attempt >= MAP_BUILD_TRIES;

        g_mutex_lock(&m->lock);
        ent = m->regions[r];
        if (ent) {
            g_mutex_unlock(&m->lock);
            return ent;
        }
        gen0 = m->gen[r];
        if (locked_build) {
            /* Writers keep changing this region: build holding the lock,
             * so that none can slip between the walk and the install. */
            ent = map_build(chain, m, r, err);
            if (ent) {
                g_atomic_pointer_set(&m->regions[r], ent);
            }
            g_mutex_unlock(&m->lock);
            return ent;
        }
        g_mutex_unlock(&m->lock);

        uint16_t *built = map_build(chain, m, r, err);

        if (!built) {
            return NULL;
        }
        g_mutex_lock(&m->lock);
        if (m->regions[r]) {
            ent = m->regions[r];
            g_mutex_unlock(&m->lock);
            g_free(built);
            return ent;
        }
        if (m->gen[r] == gen0) {
            g_atomic_pointer_set(&m->regions[r], built);
            g_mutex_unlock(&m->lock);
            return built;
        }
        g_mutex_unlock(&m->lock);
        g_free(built);
    }
}

/*
 * The map's value at offset (< m->size) and in *pnum the length of the run
 * of granules sharing it, clipped to bytes and to the region.  A MAP_*
 * value or an owner index; negative errno if the region cannot be built.
 */
static int map_lookup(Chain *chain, ChainMap *m, uint64_t offset,
                      uint64_t bytes, uint64_t *pnum)
{
    uint64_t r = offset >> (m->gbits + MAP_REGION_BITS);
    uint64_t rbase = map_region_start(m, r);
    uint64_t rend = map_region_end(m, r);
    uint64_t end = MIN(offset + bytes, rend);
    int err = 0;
    uint16_t *ent = map_region(chain, m, r, &err);

    if (!ent) {
        return err;
    }

    uint64_t g = (offset - rbase) >> m->gbits;
    uint16_t v = map_ent_get(&ent[g]);
    uint64_t next = rbase + ((g + 1) << m->gbits);

    while (next < end && map_ent_get(&ent[(next - rbase) >> m->gbits]) == v) {
        next += 1ULL << m->gbits;
    }
    *pnum = MIN(next, end) - offset;
    return v;
}

/*
 * After a successful write into the active layer at [offset, offset+bytes):
 * every active-layer cluster it touched is now the active layer's.
 */
static void map_note_write(Chain *chain, uint64_t offset, uint64_t bytes)
{
    ChainMap *m = g_atomic_pointer_get(&chain->map);
    ChainImage *top = chain_layer(chain, 0);
    uint64_t cs;
    uint16_t owner;

    if (!m || bytes == 0) {
        return;
    }
    cs = MAX(top->cluster_size, 1ULL << m->gbits);
    owner = chain_depth(chain) - 1;

    uint64_t a = offset / cs * cs;
    uint64_t b = MIN((offset + bytes + cs - 1) / cs * cs, m->size);

    /* Round to granules in case the cluster size is not a multiple. */
    a &= ~((1ULL << m->gbits) - 1);
    if (a >= b) {
        return;
    }

    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&m->lock);
    uint64_t r0 = a >> (m->gbits + MAP_REGION_BITS);
    uint64_t r1 = (b - 1) >> (m->gbits + MAP_REGION_BITS);

    for (uint64_t r = r0; r <= r1; r++) {
        uint16_t *ent = m->regions[r];
        uint64_t rbase = map_region_start(m, r);
        uint64_t s = MAX(a, rbase);
        uint64_t e = MIN(b, map_region_end(m, r));

        m->gen[r]++;
        if (!ent) {
            continue;
        }
        for (uint64_t g = (s - rbase) >> m->gbits;
             rbase + (g << m->gbits) < e; g++) {
            map_ent_set(&ent[g], owner);
        }
    }
}

/* ---- reads -------------------------------------------------------------- */

uint64_t chain_size(Chain *chain)
{
    uint64_t size;

    chain_topo_rdlock(chain);
    size = chain_layer(chain, 0)->virtual_size;
    chain_topo_unlock(chain);
    return size;
}

int chain_pread_locked(Chain *chain, uint64_t offset, void *buf,
                       uint64_t bytes)
{
    uint8_t *p = buf;
    ChainMap *m = map_get(chain);
    guint depth = chain_depth(chain);

    if (offset + bytes < offset ||
        offset + bytes > chain_layer(chain, 0)->virtual_size) {
        return -EINVAL;
    }
    while (bytes > 0) {
        uint64_t n;
        int v;
        int ret;

        if (!m || offset >= m->size) {
            return walk_read(chain_layer(chain, 0), G_MAXUINT, offset, p,
                             bytes);
        }
        v = map_lookup(chain, m, offset, bytes, &n);
        if (v < 0) {
            return v;
        }
        if (v == MAP_NONE) {
            memset(p, 0, n);
        } else if (v == MAP_MIXED || (guint)v >= depth) {
            ret = walk_read(chain_layer(chain, 0), G_MAXUINT, offset, p, n);
            if (ret < 0) {
                return ret;
            }
        } else {
            ChainImage *l = chain_layer(chain, depth - 1 - v);

            ret = l->drv->pread(l, offset, p, n);
            if (ret < 0) {
                return ret;
            }
        }
        offset += n;
        p += n;
        bytes -= n;
    }
    return 0;
}

int chain_pread(Chain *chain, uint64_t offset, void *buf, uint64_t bytes)
{
    int ret;

    chain_topo_rdlock(chain);
    ret = chain_pread_locked(chain, offset, buf, bytes);
    chain_topo_unlock(chain);
    return ret;
}

int chain_pread_from(Chain *chain, guint from, uint64_t offset, void *buf,
                     uint64_t bytes)
{
    if (from >= chain_depth(chain)) {
        return -EINVAL;
    }
    if (from == 0 &&
        offset + bytes <= chain_layer(chain, 0)->virtual_size) {
        return chain_pread_locked(chain, offset, buf, bytes);
    }
    return walk_read(chain_layer(chain, from), G_MAXUINT, offset, buf,
                     bytes);
}

/* One run of chain_range_kind, topology lock held. */
static int range_kind_run(Chain *chain, uint64_t offset, uint64_t bytes,
                          uint64_t *pnum)
{
    int ret;
    ChainMap *m = map_get(chain);
    guint depth = chain_depth(chain);
    uint64_t n = bytes;
    int v = MAP_MIXED;

    if (m && offset < m->size) {
        v = map_lookup(chain, m, offset, bytes, &n);
        if (v < 0) {
            ret = v;
            goto out;
        }
    }
    if (v == MAP_NONE) {
        *pnum = n;
        ret = CHAIN_HOLE;
        goto out;
    }
    if (v != MAP_MIXED && (guint)v < depth) {
        /* The owner may hold zero clusters there: ask it. */
        ChainImage *l = chain_layer(chain, depth - 1 - v);
        uint64_t p;

        ret = l->drv->block_status(l, offset, n, &p);
        if (ret < 0) {
            goto out;
        }
        if (ret != BLOCK_UNALLOCATED) {
            *pnum = MAX(MIN(p, n), 1);
            ret = ret == BLOCK_ZERO ? CHAIN_HOLE : CHAIN_DATA;
            goto out;
        }
    }
    /* Mixed granules, past the map, or a surprise: walk every layer. */
    {
        ChainImage *o;
        guint steps;

        ret = chain_walk_status(chain_layer(chain, 0), G_MAXUINT, offset, n, pnum,
                          &o, &steps);
        if (ret >= 0) {
            ret = ret == BLOCK_DATA ? CHAIN_DATA : CHAIN_HOLE;
        }
    }
out:
    return ret;
}

/* Runs of the map and of the layers split where the kind does not change;
 * merge neighbours of one kind (a bounded number, so a fragmented disk
 * cannot make one lseek walk all of it). */
#define RANGE_KIND_MERGE_MAX 4096

int chain_range_kind(Chain *chain, uint64_t offset, uint64_t bytes,
                     uint64_t *pnum)
{
    uint64_t done = 0;
    int kind = -EINVAL;

    chain_topo_rdlock(chain);
    for (int i = 0; i < RANGE_KIND_MERGE_MAX && done < bytes; i++) {
        uint64_t n = 0;
        int k = range_kind_run(chain, offset + done, bytes - done, &n);

        if (k < 0) {
            if (done == 0) {
                kind = k;
            }
            break;
        }
        if (done > 0 && k != kind) {
            break;
        }
        kind = k;
        done += n;
    }
    chain_topo_unlock(chain);
    if (kind >= 0) {
        *pnum = done;
    }
    return kind;
}

/* ---- writes ------------------------------------------------------------- */

struct ChainRangeLock {
    uint64_t start;
    uint64_t end;
};

/* Handed out when the chain does not serialise; never freed. */
static ChainRangeLock range_lock_noop;

static bool range_overlaps(Chain *chain, uint64_t start, uint64_t end)
{
    for (GList *l = chain->locked_ranges; l; l = l->next) {
        ChainRangeLock *o = l->data;

        if (o->start < end && start < o->end) {
            return true;
        }
    }
    return false;
}

ChainRangeLock *chain_range_lock(Chain *chain, uint64_t offset,
                                 uint64_t bytes)
{
    if (bytes == 0 || g_atomic_int_get(&chain->serialize_count) <= 0) {
        return &range_lock_noop;
    }

    ChainRangeLock *lk = g_new(ChainRangeLock, 1);

    lk->start = offset;
    lk->end = offset + bytes;
    g_mutex_lock(&chain->range_mutex);
    while (range_overlaps(chain, lk->start, lk->end)) {
        g_cond_wait(&chain->range_cond, &chain->range_mutex);
    }
    chain->locked_ranges = g_list_prepend(chain->locked_ranges, lk);
    g_mutex_unlock(&chain->range_mutex);
    return lk;
}

void chain_range_unlock(Chain *chain, ChainRangeLock *lock)
{
    if (!lock || lock == &range_lock_noop) {
        return;
    }
    g_mutex_lock(&chain->range_mutex);
    chain->locked_ranges = g_list_remove(chain->locked_ranges, lock);
    g_cond_broadcast(&chain->range_cond);
    g_mutex_unlock(&chain->range_mutex);
    g_free(lock);
}

static int chain_check_write(Chain *chain, uint64_t offset, uint64_t bytes)
{
    ChainImage *top = chain_layer(chain, 0);

    if (!top->writable || !top->drv->pwrite) {
        return -EROFS;
    }
    if (offset + bytes < offset || offset + bytes > top->virtual_size) {
        return -EINVAL;
    }
    return 0;
}

/*
 * Guest write path, topology lock held by the caller.  Takes the range
 * lock while the chain serialises (so a caller must not hold an
 * overlapping one).
 */
int chain_pwrite_locked(Chain *chain, uint64_t offset, const void *buf,
                        uint64_t bytes)
{
    ChainImage *top = chain_layer(chain, 0);
    int ret = chain_check_write(chain, offset, bytes);

    if (ret < 0 || bytes == 0) {
        return ret;
    }

    ChainRangeLock *lk = chain_range_lock(chain, offset, bytes);

    ret = top->drv->pwrite(top, offset, buf, bytes);
    if (ret == 0) {
        map_note_write(chain, offset, bytes);
        if (chain->write_hook) {
            ret = chain->write_hook(chain->write_hook_opaque, offset, bytes,
                                    buf);
        }
    }
    chain_range_unlock(chain, lk);
    return ret;
}

int chain_pwrite(Chain *chain, uint64_t offset, const void *buf,
                 uint64_t bytes)
{
    int ret;

    chain_topo_rdlock(chain);
    ret = chain_pwrite_locked(chain, offset, buf, bytes);
    chain_topo_unlock(chain);
    return ret;
}

int chain_pwrite_zeroes(Chain *chain, uint64_t offset, uint64_t bytes)
{
    int ret;

    chain_topo_rdlock(chain);

    ChainImage *top = chain_layer(chain, 0);

    ret = chain_check_write(chain, offset, bytes);
    if (ret == 0 && bytes > 0) {
        ChainRangeLock *lk = chain_range_lock(chain, offset, bytes);

        ret = top->drv->pwrite_zeroes
            ? top->drv->pwrite_zeroes(top, offset, bytes, true) : -EROFS;
        if (ret == 0) {
            map_note_write(chain, offset, bytes);
            if (chain->write_hook) {
                ret = chain->write_hook(chain->write_hook_opaque, offset,
                                        bytes, NULL);
            }
        }
        chain_range_unlock(chain, lk);
    }
    chain_topo_unlock(chain);
    return ret;
}

int chain_flush(Chain *chain)
{
    int ret = 0;

    chain_topo_rdlock(chain);
    for (guint i = 0; i < chain_depth(chain); i++) {
        ChainImage *l = chain_layer(chain, i);

        /* A layer whose write-back failed fails the flush of every chain
         * that uses it, written or not (image.h: latched I/O errors). */
        if (chain_image_io_latched(l) && ret == 0) {
            ret = -EIO;
        }
        if (l->writable && l->drv->flush) {
            int r = l->drv->flush(l);

            if (r < 0 && ret == 0) {
                ret = r;
            }
        }
    }
    chain_topo_unlock(chain);
    return ret;
}
