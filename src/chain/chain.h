/*
 * chain.h: image sets and backing chains.
 *
 * An ImageSet is the directory of images and every image file opened from
 * it, each at most once per process, so that chains sharing a base share
 * one ChainImage (one fd, one lock, one metadata cache).
 *
 * A Chain is an ordered list of layers: layers[0] is the active (top)
 * layer, layers[n-1] the bottom.  Every I/O request holds the chain's
 * topology lock for reading; changes of the layer list (live snapshot,
 * pivot, dropping layers after a commit or stream) hold it for writing,
 * which also drains every in-flight request of the chain.
 */
#ifndef CHAINFS_CHAIN_H
#define CHAINFS_CHAIN_H

#include <pthread.h>
#include <sys/types.h>

#include "image.h"

typedef struct ImageSet ImageSet;
typedef struct Chain Chain;
typedef struct ChainMap ChainMap; /* merged allocation map, chain-io.c */

/*
 * Called after every successful guest write of the chain (chain_pwrite,
 * chain_pwrite_zeroes: buf NULL) with the topology read lock held, before
 * the write is acknowledged.  A non-zero return (negative errno) fails the
 * guest write.  Active commit installs one to track dirty ranges and to
 * mirror writes to its base.
 */
typedef int (*ChainWriteHook)(void *opaque, uint64_t offset, uint64_t bytes,
                              const void *buf);

struct Chain {
    char *name;            /* export name; stable across snapshot/pivot */
    ImageSet *set;         /* not owned */

    /* Writer-preferring rwlock (a continuous stream of readers cannot
     * starve a pivot).  Readers: every I/O request.  Writer: topology
     * changes, which thereby drain in-flight requests. */
    pthread_rwlock_t topo_lock;

    /* protected by topo_lock: */
    GPtrArray *layers;     /* ChainImage *, [0] active ... [n-1] bottom;
                              each holds a reference in set */
    ChainMap *map;         /* rebuilt lazily after a topology change */
    ChainWriteHook write_hook;   /* NULL when none */
    void *write_hook_opaque;

    /* Serialising requests: while serialize_count > 0 (set under the
     * topology write lock by a job that copies into a layer guests also
     * write), overlapping chain_range_lock() holders exclude each other.
     * Guest writes take the range lock then too. */
    int serialize_count;
    GMutex range_mutex;
    GCond range_cond;
    GList *locked_ranges;  /* protected by range_mutex */

    /* The chain's current or last job; owned and guarded by src/merge. */
    void *job;
};

/* ---- image sets ---------------------------------------------------- */

/* image_dir must exist; it is canonicalised. */
ImageSet *image_set_new(const char *image_dir, GError **error);
void image_set_free(ImageSet *set);
const char *image_set_dir(ImageSet *set);
/*
 * From now on open the set's images read-only without any lock, as
 * `qemu-img -U` (force-share) does: for a reader that tolerates another
 * process writing the files meanwhile (chainctl map of a mounted chain,
 * whose daemon holds the active layer's write lock).  What such a reader
 * sees is the files as they are on disk at that moment.  Read-write opens
 * still lock.
 */
void image_set_force_share(ImageSet *set);

/*
 * Open the image named name (a file name in the image directory, or a path
 * that resolves inside it), or take a new reference to it when already
 * open.  writable opens it read-write (an image already open read-only is
 * reopened read-write).  Takes QEMU-compatible locks (lock.h).  Does not
 * resolve the backing file.  Refuses a path outside the image directory
 * (EACCES... with a message naming both), a missing file (ENOENT).
 */
ChainImage *image_set_open(ImageSet *set, const char *name, bool writable,
                           GError **error);
/* Drop a reference; the last one flushes (if writable) and closes. */
void image_set_release(ImageSet *set, ChainImage *img);

/*
 * Reopen img read-write or read-only, atomically: the new fd and its locks
 * are acquired before the old fd is closed; on failure img is untouched.
 * img->fd keeps its number (the new open file description is dup3()ed
 * onto it), so drivers keep no per-descriptor state to redo.  Going
 * read-only flushes first.  Call with the topology write lock of every
 * chain using img held, or where no I/O can run.
 */
bool chain_image_reopen(ChainImage *img, bool writable, GError **error);

/*
 * The owner and permission bits of img's file (image-owner.c): set them
 * (uid, gid or mode (type)-1 to keep one), or give `to` those of `from`.
 * Errors name the image (EPERM when the daemon may not chown).
 */
bool chain_image_set_owner(ChainImage *img, uid_t uid, gid_t gid,
                           mode_t mode, GError **error);
bool chain_image_copy_owner(ChainImage *from, ChainImage *to, GError **error);

/* ---- chains -------------------------------------------------------- */

/*
 * Resolve the chain whose active layer is top_name, as QEMU does: each
 * backing reference relative to the directory of the image holding it;
 * format from the backing-format extension or probed.  The active layer is
 * opened read-write when top_writable, every lower layer read-only.
 * Refuses, naming the files: a loop (ELOOP), a missing backing file
 * (ENOENT), a reference leaving the image directory (EACCES), a backing
 * format that does not match the file (EINVAL), a chain deeper than
 * CHAIN_MAX_DEPTH (ELOOP), any refusal of a driver's open.  name is the
 * export name (NULL: top_name without its extension).
 */
Chain *chain_open(ImageSet *set, const char *top_name, const char *name,
                  bool top_writable, GError **error);
void chain_free(Chain *chain);

/* Layer helpers: index of the layer whose name is file (-1 if none). */
int chain_find_layer(Chain *chain, const char *file);
static inline ChainImage *chain_layer(Chain *chain, guint i)
{
    return g_ptr_array_index(chain->layers, i);
}
static inline guint chain_depth(Chain *chain)
{
    return chain->layers->len;
}

/* Topology lock, writer-preferring (see Chain).  Nests within a thread:
 * a holder (read or write) may call entry points that take it again; a
 * read holder must not ask for the write lock. */
void chain_topo_rdlock(Chain *chain);
void chain_topo_wrlock(Chain *chain);
void chain_topo_unlock(Chain *chain);

/*
 * Topology changes; call with the topology write lock held.  Each keeps
 * the ImageSet references right and invalidates the chain map.
 */
/* Put img (opened read-write, img->backing == old top) on top. */
void chain_push_top(Chain *chain, ChainImage *img);
/* Remove layers [first, last] (indices) from the list; layer first-1's
 * backing pointer becomes layer last+1 (or NULL).  Used after the on-disk
 * backing references were rewritten. */
void chain_drop_layers(Chain *chain, guint first, guint last);

/* Canonical name of a format's usual extension stripped: "vm1.qcow2" ->
 * "vm1". */
char *chain_export_name_for(const char *file_name);

#endif
