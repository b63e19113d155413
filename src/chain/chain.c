/*
 * chain.c: image sets and backing chains (see chain.h).
 *
 * An ImageSet opens each file of the image directory at most once per
 * process and counts its users, so that two chains sharing a golden base
 * share one ChainImage: one descriptor, one set of QEMU-compatible locks
 * (which would otherwise conflict with each other, OFD locks being per
 * descriptor) and one metadata cache.
 *
 * Resolution follows QEMU: a backing reference is relative to the
 * directory of the image holding it; its format comes from the
 * backing-format header extension, or is probed.  Everything must stay
 * inside the image directory: a reference that leaves it is refused even
 * when the file exists, because chainfs exports and may rewrite what it
 * resolves.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chain-io.h"
#include "chain.h"
#include "image-file.h"
#include "lock.h"

struct ImageSet {
    char *dir;               /* canonical absolute path, constant */
    GMutex lock;
    GHashTable *images;      /* canonical path -> ChainImage *; protected
                                by lock, as is every ChainImage.refcnt */
    bool force_share;        /* read-only opens take no lock (qemu-img -U) */
};

ImageSet *image_set_new(const char *image_dir, GError **error)
{
    char *canon = realpath(image_dir, NULL);
    struct stat st;

    if (!canon) {
        int err = errno;

        chainfs_set_error(error, err, "image directory %s: %s", image_dir,
                          g_strerror(err));
        return NULL;
    }
    if (stat(canon, &st) < 0 || !S_ISDIR(st.st_mode)) {
        chainfs_set_error(error, ENOTDIR, "%s is not a directory",
                          image_dir);
        free(canon);
        return NULL;
    }

    ImageSet *set = g_new0(ImageSet, 1);

    set->dir = g_strdup(canon);
    free(canon);
    g_mutex_init(&set->lock);
    set->images = g_hash_table_new(g_str_hash, g_str_equal);
    return set;
}

/* Close fd and free what ChainImage owns (the driver state is gone). */
static void image_free(ChainImage *img)
{
    if (img->fd >= 0) {
        close(img->fd); /* releases the OFD locks too */
    }
    g_mutex_clear(&img->meta_lock);
    g_free(img->path);
    g_free(img->name);
    g_free(img->dir);
    g_free(img->backing_ref);
    g_free(img->backing_fmt);
    g_free(img->read_only_reason);
    g_free(img->io_error);
    g_free(img);
}

static void image_close_now(ChainImage *img)
{
    if (img->writable && img->drv->flush) {
        int ret = img->drv->flush(img);

        if (ret < 0) {
            g_warning("flushing %s on close: %s", img->path,
                      g_strerror(-ret));
        }
    }
    if (img->drv->close) {
        img->drv->close(img);
    }
    image_free(img);
}

void image_set_free(ImageSet *set)
{
    GHashTableIter it;
    gpointer value;

    if (!set) {
        return;
    }
    /* Images still referenced here were leaked by a caller; close them
     * anyway so that their data is flushed and their locks released. */
    g_hash_table_iter_init(&it, set->images);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        ChainImage *img = value;

        g_warning("image %s still in use when its set is freed", img->name);
        g_hash_table_iter_remove(&it);
        image_close_now(img);
    }
    g_hash_table_destroy(set->images);
    g_mutex_clear(&set->lock);
    g_free(set->dir);
    g_free(set);
}

const char *image_set_dir(ImageSet *set)
{
    return set->dir;
}

void image_set_force_share(ImageSet *set)
{
    set->force_share = true;
}

/* On exit: the part of canon below set->dir ("a.qcow2"), or NULL when
 * canon is not inside the directory. */
static const char *set_relative(ImageSet *set, const char *canon)
{
    size_t n = strlen(set->dir);

    if (n == 1 && set->dir[0] == '/') {
        return canon[0] == '/' && canon[1] ? canon + 1 : NULL;
    }
    if (strncmp(canon, set->dir, n) != 0 || canon[n] != '/' ||
        canon[n + 1] == '\0') {
        return NULL;
    }
    return canon + n + 1;
}

/*
 * Canonicalise path (relative paths are relative to base_dir).  On
 * failure: ENOENT (or the errno of realpath) with a message naming ref
 * and, when given, the image `user` that refers to it.
 */
static char *canonical_path(const char *base_dir, const char *ref,
                            const char *user, GError **error)
{
    g_autofree char *joined = g_path_is_absolute(ref)
        ? g_strdup(ref) : g_build_filename(base_dir, ref, NULL);
    char *canon = realpath(joined, NULL);

    if (!canon) {
        int err = errno;

        if (user) {
            chainfs_set_error(error, err,
                              "backing file '%s' of %s: %s (looked for %s)",
                              ref, user, g_strerror(err), joined);
        } else {
            chainfs_set_error(error, err, "image %s: %s", joined,
                              g_strerror(err));
        }
        return NULL;
    }
    char *ret = g_strdup(canon);

    free(canon);
    return ret;
}

/*
 * The driver for a file about to be opened: the recorded format when
 * there is one, else what the first bytes look like.
 *
 * A recorded raw format wins without looking at the content: a raw disk
 * holds whatever its guest wrote, a qcow2 header included, and reading that
 * header would follow references (backing file, data file) that the guest
 * chose, to files on the host.  QEMU does the same.  A recorded qcow2 must
 * match the file, since its header is what we are about to trust.
 */
static const ImageDriver *set_pick_driver(ImageSet *set, int fd,
                                          const char *canon,
                                          const ImageDriver *want,
                                          const char *want_fmt,
                                          const char *user, GError **error)
{
    if (want == &raw_driver) {
        return want;
    }

    const ImageDriver *drv = image_probe_fd(fd);

    if (want && drv != want) {
        chainfs_set_error(error, EINVAL,
                          "backing file %s of %s is %s, but its format is "
                          "recorded as %s", set_relative(set, canon),
                          user ? user : "?", drv->format_name, want_fmt);
        return NULL;
    }
    return drv;
}

/*
 * Open canon (canonical, inside the directory) or take a reference.
 * want: the format the reference records (NULL: probe).  user: the image
 * referring to it, for messages (NULL for a chain top).
 * Call with set->lock held.
 */
static ChainImage *set_open_locked(ImageSet *set, const char *canon,
                                   const char *want_fmt, const char *user,
                                   bool writable, GError **error)
{
    ChainImage *img = g_hash_table_lookup(set->images, canon);
    const ImageDriver *want = NULL;

    if (want_fmt) {
        want = image_driver_by_name(want_fmt);
        if (!want) {
            chainfs_set_error(error, EINVAL,
                              "%s records backing format '%s' for %s, which "
                              "chainfs does not support", user ? user : "?",
                              want_fmt, set_relative(set, canon));
            return NULL;
        }
    }
    if (img) {
        if (want && img->drv != want) {
            chainfs_set_error(error, EINVAL,
                              "backing file %s of %s is %s, but its format "
                              "is recorded as %s", img->name,
                              user ? user : "?", img->drv->format_name,
                              want_fmt);
            return NULL;
        }
        if (writable && !img->writable &&
            !chain_image_reopen(img, true, error)) {
            return NULL;
        }
        img->refcnt++;
        return img;
    }

    /* Never blocks: a FIFO, socket or device is refused by type.  canon
     * has no symbolic link in it; O_NOFOLLOW refuses one put in its place
     * since. */
    int fd = image_file_open(canon,
                             (writable ? O_RDWR : O_RDONLY) | O_NOFOLLOW,
                             NULL, NULL, error);

    if (fd < 0) {
        if (user) {
            g_prefix_error(error, "backing file %s of %s: ",
                           set_relative(set, canon), user);
        }
        return NULL;
    }
    /* A force-shared reader takes no lock bytes at all: it neither holds
     * "consistent read" nor refuses the writer another process is. */
    if (!(set->force_share && !writable) &&
        !image_lock_fd(fd, canon, writable, error)) {
        close(fd);
        return NULL;
    }

    const ImageDriver *drv = set_pick_driver(set, fd, canon, want, want_fmt,
                                             user, error);

    if (!drv) {
        close(fd);
        return NULL;
    }

    img = g_new0(ChainImage, 1);
    img->drv = drv;
    img->path = g_strdup(canon);
    img->name = g_strdup(set_relative(set, canon));
    img->dir = g_path_get_dirname(canon);
    img->fd = fd;
    img->writable = writable;
    g_mutex_init(&img->meta_lock);
    if (!drv->open(img, error)) {
        image_free(img);
        return NULL;
    }
    img->refcnt = 1;
    g_hash_table_insert(set->images, img->path, img);
    return img;
}

/* Refuse canon outside the directory, naming what referred to it. */
static bool set_check_inside(ImageSet *set, const char *canon,
                             const char *ref, const char *user,
                             GError **error)
{
    if (set_relative(set, canon)) {
        return true;
    }
    if (user) {
        chainfs_set_error(error, EACCES,
                          "backing file '%s' of %s resolves to %s, outside "
                          "the image directory %s", ref, user, canon,
                          set->dir);
    } else {
        chainfs_set_error(error, EACCES,
                          "image '%s' resolves to %s, outside the image "
                          "directory %s", ref, canon, set->dir);
    }
    return false;
}

ChainImage *image_set_open(ImageSet *set, const char *name, bool writable,
                           GError **error)
{
    g_autofree char *canon = canonical_path(set->dir, name, NULL, error);

    if (!canon || !set_check_inside(set, canon, name, NULL, error)) {
        return NULL;
    }

    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&set->lock);

    return set_open_locked(set, canon, NULL, NULL, writable, error);
}

void image_set_release(ImageSet *set, ChainImage *img)
{
    if (!img) {
        return;
    }
    g_mutex_lock(&set->lock);
    g_assert(img->refcnt > 0);
    if (--img->refcnt > 0) {
        g_mutex_unlock(&set->lock);
        return;
    }
    g_hash_table_remove(set->images, img->path);
    g_mutex_unlock(&set->lock);
    image_close_now(img);
}

/*
 * The new descriptor gets its locks before the old one is closed, so the
 * image is never unlocked in between.  Because OFD locks of two
 * descriptors conflict with each other, the conflict check for a move to
 * read-write runs on the OLD descriptor (which then holds the writer's
 * bytes), and the new descriptor copies the bytes without checking.
 *
 * The swap itself is a dup3() of the new open file description onto the
 * old descriptor NUMBER: img->fd never changes, so drivers need no
 * reopen step, and a request of another chain sharing this image that
 * races with us (a shared base) reads through either description -- never
 * through a closed or reused descriptor number.  Replacing the number's
 * description closes the old one, which releases its locks.
 */
/*
 * A new descriptor of the file img->fd has open, by its path: never
 * blocking (the path may name a FIFO by now), and refused when the path no
 * longer names the same file (it was replaced since we opened it: writing
 * that one would write a file the chain never resolved).
 */
static int reopen_same_file(ChainImage *img, bool writable, GError **error)
{
    struct stat old_st, new_st;
    int fd;

    if (fstat(img->fd, &old_st) < 0) {
        int err = errno;

        chainfs_set_error(error, err, "cannot reopen %s: %s", img->name,
                          g_strerror(err));
        return -1;
    }
    fd = image_file_open(img->path,
                         (writable ? O_RDWR : O_RDONLY) | O_NOFOLLOW,
                         img->name, &new_st, error);
    if (fd < 0) {
        return -1;
    }
    if (new_st.st_dev != old_st.st_dev || new_st.st_ino != old_st.st_ino) {
        chainfs_set_error(error, ESTALE,
                          "cannot reopen %s: %s is no longer the file that "
                          "was opened (replaced since)", img->name,
                          img->path);
        close(fd);
        return -1;
    }
    return fd;
}

bool chain_image_reopen(ChainImage *img, bool writable, GError **error)
{
    if (img->writable == writable) {
        return true;
    }
    if (writable && chain_image_read_only_reason(img)) {
        chainfs_set_error(error, EOPNOTSUPP, "%s",
                          chain_image_read_only_reason(img));
        return false;
    }

    int fd = reopen_same_file(img, writable, error);

    if (fd < 0) {
        return false;
    }
    if (writable) {
        if (!image_lock_fd(img->fd, img->path, true, error)) {
            /* Put the reader's bytes back on the old descriptor. */
            image_lock_apply(img->fd, img->path, false, NULL);
            close(fd);
            return false;
        }
    } else if (img->drv->flush) {
        int ret = img->drv->flush(img);

        if (ret < 0) {
            chainfs_set_error(error, -ret, "flushing %s before reopening it "
                              "read-only: %s", img->name, g_strerror(-ret));
            close(fd);
            return false;
        }
    }
    if (!image_lock_apply(fd, img->path, writable, error)) {
        if (writable) {
            image_lock_apply(img->fd, img->path, false, NULL);
        }
        close(fd);
        return false;
    }

    if (writable && img->drv->prepare_writable &&
        !img->drv->prepare_writable(img, fd, error)) {
        image_lock_apply(img->fd, img->path, false, NULL);
        close(fd);
        return false;
    }
    if (dup3(fd, img->fd, O_CLOEXEC) < 0) {
        int err = errno;

        if (writable) {
            image_lock_apply(img->fd, img->path, false, NULL);
        }
        close(fd);
        chainfs_set_error(error, err, "cannot reopen %s: %s", img->name,
                          g_strerror(err));
        return false;
    }
    close(fd);
    img->writable = writable;
    return true;
}

/* ---- chains ---------------------------------------------------------- */

void chain_image_start_writeback(ChainImage *img)
{
    /* img->fd keeps its number across a reopen (dup3), and write-back
     * needs no write access: no lock needed. */
    (void)sync_file_range(img->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
}

void chain_image_drop_cache(ChainImage *img)
{
    (void)posix_fadvise(img->fd, 0, 0, POSIX_FADV_DONTNEED);
}

static void chain_release_layers(ImageSet *set, GPtrArray *layers)
{
    for (guint i = 0; i < layers->len; i++) {
        image_set_release(set, g_ptr_array_index(layers, i));
    }
    g_ptr_array_set_size(layers, 0);
}

char *chain_export_name_for(const char *file_name)
{
    g_autofree char *base = g_path_get_basename(file_name);
    const char *dot = strrchr(base, '.');

    /* "vm1.qcow2" -> "vm1"; keep names that are nothing but an extension
     * (".hidden") or have none. */
    if (dot && dot != base && dot[1] != '\0') {
        return g_strndup(base, dot - base);
    }
    return g_strdup(base);
}

Chain *chain_open(ImageSet *set, const char *top_name, const char *name,
                  bool top_writable, GError **error)
{
    g_autoptr(GPtrArray) layers = g_ptr_array_new();
    ChainImage *top = image_set_open(set, top_name, top_writable, error);

    if (!top) {
        return NULL;
    }
    g_ptr_array_add(layers, top);

    ChainImage *cur = top;

    while (cur->backing_ref && cur->backing_ref[0]) {
        if (layers->len >= CHAIN_MAX_DEPTH) {
            chainfs_set_error(error, ELOOP,
                              "backing chain of %s is deeper than %d images "
                              "(at %s)", top->name, CHAIN_MAX_DEPTH,
                              cur->name);
            goto fail;
        }

        g_autofree char *canon = canonical_path(cur->dir, cur->backing_ref,
                                                cur->name, error);

        if (!canon ||
            !set_check_inside(set, canon, cur->backing_ref, cur->name,
                              error)) {
            goto fail;
        }
        for (guint i = 0; i < layers->len; i++) {
            ChainImage *l = g_ptr_array_index(layers, i);

            if (strcmp(l->path, canon) == 0) {
                chainfs_set_error(error, ELOOP,
                                  "backing chain of %s loops: %s refers "
                                  "back to %s", top->name, cur->name,
                                  l->name);
                goto fail;
            }
        }

        ChainImage *below;

        g_mutex_lock(&set->lock);
        below = set_open_locked(set, canon, cur->backing_fmt, cur->name,
                                false, error);
        g_mutex_unlock(&set->lock);
        if (!below) {
            goto fail;
        }
        cur->backing = below;
        g_ptr_array_add(layers, below);
        cur = below;
    }
    cur->backing = NULL;

    Chain *chain = g_new0(Chain, 1);
    pthread_rwlockattr_t attr;

    chain->name = name ? g_strdup(name) : chain_export_name_for(top->name);
    chain->set = set;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr,
                                  PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&chain->topo_lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    chain->layers = g_steal_pointer(&layers);
    g_mutex_init(&chain->range_mutex);
    g_cond_init(&chain->range_cond);
    return chain;

fail:
    chain_release_layers(set, layers);
    return NULL;
}

void chain_free(Chain *chain)
{
    if (!chain) {
        return;
    }
    chain_map_free(chain->map);
    chain->map = NULL;
    chain_release_layers(chain->set, chain->layers);
    g_ptr_array_free(chain->layers, TRUE);
    pthread_rwlock_destroy(&chain->topo_lock);
    g_mutex_clear(&chain->range_mutex);
    g_cond_clear(&chain->range_cond);
    g_list_free(chain->locked_ranges);
    g_free(chain->name);
    g_free(chain);
}

int chain_find_layer(Chain *chain, const char *file)
{
    if (!file) {
        return -1;
    }
    for (guint i = 0; i < chain->layers->len; i++) {
        ChainImage *img = chain_layer(chain, i);

        if (strcmp(img->name, file) == 0) {
            return i;
        }
    }
    /* Also accept a path naming the same file ("./a.qcow2", absolute). */
    g_autofree char *canon = canonical_path(image_set_dir(chain->set), file,
                                            NULL, NULL);

    if (!canon) {
        return -1;
    }
    for (guint i = 0; i < chain->layers->len; i++) {
        if (strcmp(chain_layer(chain, i)->path, canon) == 0) {
            return i;
        }
    }
    return -1;
}

/*
 * The topology lock nests within one thread: a thread that already holds
 * a chain's lock (read or write) and calls an entry point that takes it
 * again (chain_size, chain_pread, ... from a job or a write hook) just
 * counts.  Without this, a writer-preferring rwlock deadlocks as soon as a
 * writer queues between the two read acquisitions.  Each thread remembers
 * the few chains it holds; past TOPO_HELD_MAX the lock is taken untracked
 * (still correct, only not re-entrant).
 */
#define TOPO_HELD_MAX 16

typedef struct {
    Chain *chain;
    int depth;
    bool write;  /* held for writing */
} TopoHeld;

static __thread TopoHeld topo_held[TOPO_HELD_MAX];

static TopoHeld *topo_held_find(Chain *chain)
{
    for (int i = 0; i < TOPO_HELD_MAX; i++) {
        if (topo_held[i].chain == chain) {
            return &topo_held[i];
        }
    }
    return NULL;
}

static void topo_lock(Chain *chain, bool write)
{
    TopoHeld *h = topo_held_find(chain);
    int ret;

    if (h) {
        /* A read holder asking to write would deadlock on itself. */
        g_assert(!write || h->write);
        h->depth++;
        return;
    }
    ret = write ? pthread_rwlock_wrlock(&chain->topo_lock)
                : pthread_rwlock_rdlock(&chain->topo_lock);
    g_assert(ret == 0);
    h = topo_held_find(NULL);
    if (h) {
        h->chain = chain;
        h->depth = 1;
        h->write = write;
    }
}

void chain_topo_rdlock(Chain *chain)
{
    topo_lock(chain, false);
}

void chain_topo_wrlock(Chain *chain)
{
    topo_lock(chain, true);
}

void chain_topo_unlock(Chain *chain)
{
    TopoHeld *h = topo_held_find(chain);

    if (h) {
        if (--h->depth > 0) {
            return;
        }
        h->chain = NULL;
    }
    pthread_rwlock_unlock(&chain->topo_lock);
}

void chain_push_top(Chain *chain, ChainImage *img)
{
    ChainImage *old = chain_layer(chain, 0);

    g_assert(img->backing == NULL || img->backing == old);
    img->backing = old;
    g_ptr_array_insert(chain->layers, 0, img);
    chain_map_note_push(chain);
}

void chain_drop_layers(Chain *chain, guint first, guint last)
{
    g_assert(first <= last && last < chain->layers->len);

    ChainImage *below = last + 1 < chain->layers->len
        ? chain_layer(chain, last + 1) : NULL;

    if (first > 0) {
        chain_layer(chain, first - 1)->backing = below;
    }
    for (guint i = first; i <= last; i++) {
        image_set_release(chain->set, chain_layer(chain, i));
    }
    g_ptr_array_remove_range(chain->layers, first, last - first + 1);
    chain_map_invalidate(chain);
}
