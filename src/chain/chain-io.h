/*
 * chain-io.h: reading and writing a chain as one flat disk.
 *
 * Reads are served through the chain map: a merged allocation map that
 * says, per granule (the smallest cluster size in the chain), which layer
 * owns it, built lazily per region by walking the layers' block_status
 * top-down once, and kept current on every write into the active layer.
 * A lookup therefore costs the same at depth 2 and depth 1000.  Lookups
 * return runs; I/O moves in runs.
 *
 * Every entry point takes the chain's topology lock for reading itself
 * (except the *_locked variants, for callers that hold it), and never
 * holds a lock across data I/O.
 */
#ifndef CHAINFS_CHAIN_IO_H
#define CHAINFS_CHAIN_IO_H

#include "chain.h"

/* What the flat disk holds at a range (for SEEK_DATA / SEEK_HOLE). */
typedef enum {
    CHAIN_HOLE = 0, /* reads as zeros: unallocated everywhere, or zero clusters */
    CHAIN_DATA = 1, /* data in some layer */
} ChainRangeKind;

uint64_t chain_size(Chain *chain); /* virtual size of the active layer */

/* Guest I/O.  Ranges must lie below chain_size().  0 or negative errno. */
int chain_pread(Chain *chain, uint64_t offset, void *buf, uint64_t bytes);
int chain_pwrite(Chain *chain, uint64_t offset, const void *buf,
                 uint64_t bytes);
int chain_pwrite_zeroes(Chain *chain, uint64_t offset, uint64_t bytes);
/* Flush every writable layer of the chain. */
int chain_flush(Chain *chain);

/* Same, for callers already holding the topology lock (read or write).
 * chain_pwrite_locked is the full guest write (range lock while the chain
 * serialises, map update, write hook): do not call it while holding an
 * overlapping range lock. */
int chain_pread_locked(Chain *chain, uint64_t offset, void *buf,
                       uint64_t bytes);
int chain_pwrite_locked(Chain *chain, uint64_t offset, const void *buf,
                        uint64_t bytes);

/*
 * Kind of [offset, offset+bytes) of the whole chain: returns a
 * ChainRangeKind and the run length in *pnum, or negative errno.
 */
int chain_range_kind(Chain *chain, uint64_t offset, uint64_t bytes,
                     uint64_t *pnum);

/*
 * Status of the layers [top, base) together (indices into chain->layers,
 * top < base <= depth; base == depth means "down to the bottom"): the first
 * of them, from top down, that has the range allocated decides.  Returns
 * BLOCK_UNALLOCATED when none has it, else BLOCK_DATA or BLOCK_ZERO (a
 * compressed cluster counts as DATA), with the run length in *pnum and the
 * deciding layer's index in *owner (-1 when unallocated).  A range past a
 * layer's end reads as zeros from that layer down (as in QEMU, a shorter
 * backing file hides what lies below its end): it is BLOCK_ZERO owned by
 * that layer.  Caller holds the topology lock.  Jobs use it to find what
 * to copy.
 */
int chain_status_above(Chain *chain, guint top, guint base, uint64_t offset,
                       uint64_t bytes, uint64_t *pnum, int *owner);

/*
 * Read the chain as layer `from` and those below see it (zeros past each
 * layer's end).  Caller holds the topology lock.
 */
int chain_pread_from(Chain *chain, guint from, uint64_t offset, void *buf,
                     uint64_t bytes);

/* Forget the chain map (after a topology change; chain.c calls it).
 * Call with the topology write lock held. */
void chain_map_invalidate(Chain *chain);
void chain_map_free(ChainMap *map);
/* After chain_push_top (topology write lock held): keep the map when the
 * new, empty top does not need a finer granule, else forget it. */
void chain_map_note_push(Chain *chain);

/*
 * Range locks for serialising requests (see Chain.serialize_count):
 * waits until no other holder overlaps [offset, offset+bytes), then holds
 * it.  A no-op token when the chain does not serialise.
 */
typedef struct ChainRangeLock ChainRangeLock;
ChainRangeLock *chain_range_lock(Chain *chain, uint64_t offset,
                                 uint64_t bytes);
void chain_range_unlock(Chain *chain, ChainRangeLock *lock);

#endif
