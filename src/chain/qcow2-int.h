/*
 * qcow2-int.h: private state and helpers of the qcow2 driver, shared by
 * qcow2.c (header, open, create, control paths, read path),
 * qcow2-cluster.c (L2 cache, cluster mapping, write path) and
 * qcow2-refcount.c (refcounts, the allocation pool, deferred frees).
 *
 * Layout of the format: QEMU's docs/interop/qcow2.txt.  All on-disk
 * integers are big-endian.
 *
 * Locking: every field of BDRVQcow2State below "protected by meta_lock" is
 * read and written with img->meta_lock held.  Fields marked "constant" are
 * set by open (or by grow/set_backing, which run with no I/O in flight) and
 * read without the lock.
 */
#ifndef CHAINFS_QCOW2_INT_H
#define CHAINFS_QCOW2_INT_H

#include <stdbool.h>
#include <stdint.h>
#include <glib.h>

#include "qcow2.h"

#define QCOW2_MAGIC 0x514649fbU /* "QFI\xfb" */

#define QCOW2_V2_HEADER_LEN 72
#define QCOW2_V3_HEADER_MIN 104
#define QCOW2_V3_HEADER_LEN 112 /* with the compression type byte */

#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_MAX_L1_BYTES (32 * 1024 * 1024)
#define QCOW2_MAX_RT_BYTES (8 * 1024 * 1024)
#define QCOW2_MAX_BACKING_NAME 1023

/* Header extension types. */
#define QCOW2_EXT_END            0x00000000U
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acaU
#define QCOW2_EXT_FEATURE_TABLE  0x6803f857U
#define QCOW2_EXT_BITMAPS        0x23852875U
#define QCOW2_EXT_CRYPTO         0x0537be77U
#define QCOW2_EXT_DATA_FILE      0x44415441U

/* Autoclear feature bits. */
#define QCOW2_AUTOCLEAR_BITMAPS (1ULL << 0)

/* Fixed part of a snapshot table entry. */
#define QCOW2_SNAPSHOT_ENTRY_MIN 40

/* Incompatible feature bits. */
#define QCOW2_INCOMPAT_DIRTY       (1ULL << 0)
#define QCOW2_INCOMPAT_CORRUPT     (1ULL << 1)
#define QCOW2_INCOMPAT_DATA_FILE   (1ULL << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ULL << 3)
#define QCOW2_INCOMPAT_EXTL2       (1ULL << 4)

/* L1 / L2 entry bits. */
#define QCOW2_OFLAG_COPIED     (1ULL << 63)
#define QCOW2_OFLAG_COMPRESSED (1ULL << 62)
#define QCOW2_OFLAG_ZERO       (1ULL << 0)
#define QCOW2_L1E_OFFSET_MASK  0x00fffffffffffe00ULL
#define QCOW2_L2E_OFFSET_MASK  0x00fffffffffffe00ULL
#define QCOW2_RTE_OFFSET_MASK  0xfffffffffffffe00ULL

/* What one L2 entry says about its guest cluster. */
typedef enum {
    QCOW2_CL_UNALLOCATED,
    QCOW2_CL_ZERO_PLAIN,  /* zero flag, no host cluster */
    QCOW2_CL_ZERO_ALLOC,  /* zero flag, host cluster kept (preallocated) */
    QCOW2_CL_NORMAL,
    QCOW2_CL_COMPRESSED,
    QCOW2_CL_CORRUPT,     /* the table or entry leading here is corrupt
                             (past the end of the file, misaligned, or on
                             metadata): reads fail with EIO */
} Qcow2ClusterType;

/* What a host range of the image file holds (qcow2-overlap.c). */
typedef enum {
    QCOW2_META_DATA = 0,     /* guest data: never in the map */
    QCOW2_META_HEADER,
    QCOW2_META_L1,
    QCOW2_META_L2,
    QCOW2_META_RT,
    QCOW2_META_RB,
    QCOW2_META_SNAPSHOTS,
    QCOW2_META_SNAPSHOT_L1,
    QCOW2_META_BITMAP_DIR,
    QCOW2_META_BITMAP_TABLE,
} Qcow2MetaKind;

/* One range of the metadata map: [start, end), cluster aligned. */
typedef struct {
    uint64_t start;
    uint64_t end;
    Qcow2MetaKind kind;
} Qcow2MetaRange;

/* A header extension we do not interpret, kept verbatim for rewrites. */
typedef struct {
    uint32_t type;
    uint32_t len;
    uint8_t *data;
} Qcow2Ext;

/* One cached L2 table. */
typedef struct {
    uint64_t offset;    /* host offset of the table; 0 = free slot */
    uint64_t *table;    /* cluster_size bytes, big-endian entries as on disk */
    uint64_t lru;       /* last use (s->lru_clock) */
    bool dirty;         /* entries [dirty_lo, dirty_hi) not on disk yet */
    uint64_t dirty_lo, dirty_hi;
} Qcow2CacheEntry;

/* A cluster range whose refcounts drop by one at the next flush. */
typedef struct {
    uint64_t offset;    /* host offset, cluster aligned */
    uint64_t nb_clusters;
} Qcow2PendingFree;

typedef struct BDRVQcow2State {
    /* constant after open (grow/set_backing change some with no I/O) */
    int version;
    unsigned cluster_bits;
    uint32_t cluster_size;
    unsigned l2_bits;          /* log2(entries per L2 table) */
    uint64_t l2_size;          /* entries per L2 table */
    unsigned refcount_order;
    unsigned refcount_bits;
    uint64_t refcount_max;
    uint64_t rb_entries;       /* refcount entries per refcount block */
    unsigned csize_shift;      /* compressed descriptor layout */
    uint64_t csize_mask;
    uint64_t coffset_mask;
    uint64_t incompat, compat, autoclear; /* autoclear: meta_lock */
    gint autoclear_pending;    /* atomic: autoclear != 0, checked per write */
    uint8_t *header_raw;       /* the header as read (header_len bytes) */
    uint32_t header_len;
    GPtrArray *exts;           /* of Qcow2Ext *: kept verbatim on rewrite */
    uint64_t snapshots_offset; /* preserved; checked at open */
    uint32_t nb_snapshots;
    uint64_t snapshots_size;   /* bytes of the snapshot table (open) */

    /* protected by meta_lock */
    uint64_t *l1_table;        /* host byte order */
    uint32_t l1_size;
    uint64_t l1_offset;
    uint64_t *rt;              /* refcount table, host byte order */
    uint64_t rt_offset;
    uint32_t rt_clusters;
    uint64_t rt_entries;

    /* protected by meta_lock: the L2 cache */
    Qcow2CacheEntry *cache;
    unsigned cache_n;
    uint64_t lru_clock;

    /* protected by meta_lock: allocation (see qcow2-refcount.c) */
    uint64_t pool_next;        /* next host cluster handed out */
    uint64_t pool_end;         /* end of the reserved batch */
    bool rc_unsynced;          /* refcount writes of a batch that no
                                  fdatasync has covered yet */
    GArray *pending_frees;     /* of Qcow2PendingFree */

    /* protected by meta_lock: guest clusters whose allocation is in flight
     * (data being written outside the lock); waiters use inflight_cond. */
    GHashTable *inflight;      /* guest cluster index (as pointer key) */
    GCond inflight_cond;

    /* protected by meta_lock: where metadata lies (qcow2-overlap.c) */
    GArray *meta;              /* of Qcow2MetaRange, sorted, disjoint */
    uint64_t file_end;         /* size of the file as we made it */
    /* L1 indices whose L2 table is corrupt (past the end of the file,
     * misaligned, on other metadata or shared by two entries): reads of
     * their range fail with EIO, a write marks the image corrupt.  NULL
     * when there is none; index -> reason (owned string). */
    GHashTable *bad_l2;

} BDRVQcow2State;

/* ---- byte order helpers -------------------------------------------- */
static inline uint64_t qcow2_be64(const void *p)
{
    const uint8_t *b = p;
    return ((uint64_t)b[0] << 56) | ((uint64_t)b[1] << 48) |
           ((uint64_t)b[2] << 40) | ((uint64_t)b[3] << 32) |
           ((uint64_t)b[4] << 24) | ((uint64_t)b[5] << 16) |
           ((uint64_t)b[6] << 8) | b[7];
}
static inline uint32_t qcow2_be32(const void *p)
{
    const uint8_t *b = p;
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) |
           ((uint32_t)b[2] << 8) | b[3];
}
static inline uint16_t qcow2_be16(const void *p)
{
    const uint8_t *b = p;
    return (uint16_t)(((unsigned)b[0] << 8) | b[1]);
}
static inline void qcow2_put_be64(void *p, uint64_t v)
{
    uint8_t *b = p;
    for (int i = 7; i >= 0; i--) {
        b[i] = v & 0xff;
        v >>= 8;
    }
}
static inline void qcow2_put_be32(void *p, uint32_t v)
{
    uint8_t *b = p;
    for (int i = 3; i >= 0; i--) {
        b[i] = v & 0xff;
        v >>= 8;
    }
}

/* ---- full-length I/O helpers (qcow2.c): 0 or negative errno --------- */
int qcow2_pread_full(int fd, void *buf, size_t len, uint64_t off);
int qcow2_pwrite_full(int fd, const void *buf, size_t len, uint64_t off);
int qcow2_datasync(int fd);

/* ---- clusters (qcow2-cluster.c) ------------------------------------ */
void qcow2_cache_init(BDRVQcow2State *s);
void qcow2_cache_free(BDRVQcow2State *s);
/* Drop a clean table from the cache (it was freed or replaced).
 * meta_lock held. */
void qcow2_cache_forget(BDRVQcow2State *s, uint64_t l2_offset);
/* Write the changed entries of every dirty table (after the caller synced
 * the data they point to).  meta_lock held.  Returns how many tables it
 * wrote, or negative errno. */
int qcow2_cache_write_dirty(ChainImage *img);

/* Classify an L2 entry (host byte order). */
Qcow2ClusterType qcow2_entry_type(BDRVQcow2State *s, uint64_t l2e);

/*
 * Mapping of a run of guest clusters starting at `offset`, at most `bytes`
 * long.  With meta_lock held.  On exit *type is the first cluster's type,
 * *host its host offset for offset (NORMAL only; for COMPRESSED the raw
 * L2 entry), and *pnum the length of the run sharing that type (for
 * NORMAL also contiguous on the host; COMPRESSED runs are one cluster
 * when want_contig).  Returns 0 or negative errno.
 */
int qcow2_get_run(ChainImage *img, uint64_t offset, uint64_t bytes,
                  bool want_contig, Qcow2ClusterType *type, uint64_t *host,
                  uint64_t *pnum);

/*
 * Whether an L2 entry (host byte order) points somewhere it may: for a
 * NORMAL, ZERO_ALLOC or COMPRESSED entry, NULL when its host range is
 * aligned, inside the file and clear of metadata; else what is wrong, as
 * a phrase naming the host offset ("host offset N is on the refcount
 * block at host offset M"), newly allocated.  NULL for other entries.
 * meta_lock held.
 */
char *qcow2_entry_fault(BDRVQcow2State *s, uint64_t l2e);

/* Decompress one compressed cluster (raw L2 entry l2e) into out
 * (cluster_size bytes).  No lock needed.  0 or negative errno. */
int qcow2_read_compressed(ChainImage *img, uint64_t l2e, uint8_t *out);

/* Before any write that changes what the image holds: -EROFS when it may
 * not be written; clears the autoclear bits (once, synced).  0 or
 * negative errno. */
int qcow2_before_write(ChainImage *img);

int qcow2_co_pwrite(ChainImage *img, uint64_t offset, const void *buf,
                    uint64_t bytes);
int qcow2_co_pwrite_zeroes(ChainImage *img, uint64_t offset, uint64_t bytes,
                           bool may_unmap);

/* ---- refcounts and allocation (qcow2-refcount.c) ------------------- */
/* Set entry i of a refcount block buffer (on-disk layout). */
void qcow2_rc_set(BDRVQcow2State *s, uint8_t *blk, uint64_t i, uint64_t v);
/* Refcount of the host cluster at offset.  meta_lock held. */
int qcow2_get_refcount(ChainImage *img, uint64_t offset, uint64_t *refcount);
/*
 * Hand out n contiguous new host clusters (n <= what one batch holds),
 * whose refcounts are already 1 on disk, durable once an fdatasync under
 * meta_lock follows (s->rc_unsynced is set until then): a caller that
 * writes a pointer to them other than through the L2 cache syncs first
 * while it is set.  meta_lock held.  Returns the host offset in *offset,
 * or negative errno.
 */
int qcow2_alloc_clusters(ChainImage *img, uint64_t n, uint64_t *offset);
/* How many clusters are left in the current batch (0: a new one is
 * reserved by the next qcow2_alloc_clusters). meta_lock held. */
uint64_t qcow2_pool_left(BDRVQcow2State *s);
/* Queue a refcount decrement of every host cluster overlapping
 * [offset, offset+len), applied after the next fdatasync. meta_lock held. */
void qcow2_defer_free(BDRVQcow2State *s, uint64_t offset, uint64_t len);
/* Queue the release of whatever an L2 entry points to (not the table). */
void qcow2_defer_free_entry(BDRVQcow2State *s, uint64_t l2e);
/* fdatasync of the image with meta_lock held: everything written before
 * is durable, the refcounts of the current batch included.  Every sync
 * under meta_lock goes through it, so that rc_unsynced costs no extra
 * sync. */
int qcow2_sync_meta(ChainImage *img);
/* fdatasync, then apply the frees queued before it.  Takes meta_lock
 * itself; call without it. */
int qcow2_flush_and_free(ChainImage *img);
/* Give back the unused rest of the batch (refcounts to 0, then truncate).
 * At close, with no I/O running. */
void qcow2_release_pool(ChainImage *img);
/* Same with meta_lock held; sync: fdatasync before and after truncating. */
void qcow2_release_pool_locked(ChainImage *img, bool sync);
/* ---- metadata map and overlap checks (qcow2-overlap.c) --------------
 * Every function with meta_lock held. */
void qcow2_meta_init(BDRVQcow2State *s);
void qcow2_meta_free(BDRVQcow2State *s);
const char *qcow2_meta_name(Qcow2MetaKind kind);
/* Record [off, off+len) (widened to clusters) as metadata of kind.  FALSE,
 * with the range it would overlap in *clash, when it overlaps any. */
bool qcow2_meta_add(BDRVQcow2State *s, Qcow2MetaKind kind, uint64_t off,
                    uint64_t len, Qcow2MetaRange *clash);
/* Forget the clusters of [off, off+len) recorded as kind. */
void qcow2_meta_remove(BDRVQcow2State *s, Qcow2MetaKind kind, uint64_t off,
                       uint64_t len);
/* The first metadata range other than `allowed` overlapping the clusters
 * of [off, off+len), or NULL.  O(log n). */
const Qcow2MetaRange *qcow2_meta_find(BDRVQcow2State *s, uint64_t off,
                                      uint64_t len, Qcow2MetaKind allowed);
/*
 * Before any write to the image file: a write of kind (QCOW2_META_DATA
 * for guest data) to [off, off+len) must not touch metadata of another
 * kind.  On a violation: -EIO, the image marked corrupt
 * (qcow2_signal_corruption).  0 when the write may go ahead.
 */
int qcow2_check_write(ChainImage *img, Qcow2MetaKind kind, uint64_t off,
                      uint64_t len);
/* qcow2_check_write, then qcow2_pwrite_full. */
int qcow2_pwrite_meta(ChainImage *img, Qcow2MetaKind kind, const void *buf,
                      size_t len, uint64_t off);
/*
 * Fatal metadata corruption met on a write: the first event logs one
 * line naming the image and what (printf format), sets the corrupt bit
 * (version 3) and makes the image read-only for the rest of its life in
 * this process (chain_image_mark_read_only).  Returns -EIO.
 */
int qcow2_signal_corruption(ChainImage *img, const char *fmt, ...)
    G_GNUC_PRINTF(2, 3);

/* ---- checks at open (qcow2-validate.c) ------------------------------- */
/*
 * After the L1 and refcount tables were read: check the header-level
 * tables (L1, refcount table, snapshot table and each snapshot's L1, the
 * bitmap directory and tables when the bitmaps extension is valid) lie
 * inside the file, aligned, within their size limits, clear of each
 * other; refuse the image otherwise (EINVAL, naming it and the table).
 * Then record every one of them, each refcount block and each L2 table in
 * the metadata map.  An L2 table that is corrupt puts its L1 index in
 * s->bad_l2; a refcount block that is makes the image read-only (it is
 * refused read-write with EROFS).  Reads only.
 */
bool qcow2_validate_and_map(ChainImage *img, GError **error);
/* The reason L1 index l1i's table is corrupt, or NULL.  meta_lock held. */
const char *qcow2_bad_l2(BDRVQcow2State *s, uint64_t l1i);
/* The bitmaps header extension, when the autoclear bit says it is valid
 * (QEMU ignores it otherwise), or NULL. */
const Qcow2Ext *qcow2_valid_bitmaps_ext(BDRVQcow2State *s);

/* ---- dirty images (qcow2-repair.c) ---------------------------------- */
/*
 * Rebuild the refcounts of an image whose dirty bit is set (lazy
 * refcounts not written back) from its tables, write them as a new
 * refcount structure through fd (a read-write descriptor of the file) in
 * crash-safe order, and clear the dirty bit; logs one line.  After open
 * (the tables checked and mapped), before the first write, no lock held.
 * Refuses, changing nothing the image names, when a table is corrupt or
 * the image has valid persistent bitmaps.
 */
bool qcow2_repair_refcounts(ChainImage *img, int fd, GError **error);

/* Header writes (qcow2.c) */
int qcow2_write_header_field64(ChainImage *img, unsigned off, uint64_t v);

#endif
