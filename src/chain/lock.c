/*
 * lock.c: image locks compatible with QEMU's file driver (see lock.h).
 *
 * QEMU (block/file-posix.c) describes what a user of an image does with
 * permission bits, numbered as in QEMU 7.2's BLK_PERM_*: 0 consistent
 * read, 1 write, 2 write-unchanged, 3 resize.  For each bit i it holds it
 * takes a shared open-file-description lock on byte 100 + i; for each bit i
 * it does not let others hold it locks byte 200 + i.  Every lock is a read
 * (shared) lock: conflicts are found by asking F_OFD_GETLK whether a write
 * lock on the byte could be taken, which fails exactly when some other open
 * file description holds a lock on it.  So a process that wants to write
 * checks byte 201 (does anyone refuse to share writing?) and one that
 * refuses to share writing checks byte 101 (is anyone writing?).
 *
 * Like QEMU we first take our bytes and then check, so that two processes
 * racing for the same image both see each other and at worst both refuse.
 * OFD locks belong to the open file description, not to the process: two
 * descriptors of one process conflict like two processes would, which is
 * why chain_image_reopen() moves the locks in two steps (image_lock_fd on
 * the old descriptor, then image_lock_apply on the new one).
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "chain-error.h"
#include "lock.h"

#define LOCK_PERM_BASE 100
#define LOCK_SHARED_BASE 200

enum {
    PERM_CONSISTENT_READ = 1 << 0,
    PERM_WRITE = 1 << 1,
    PERM_WRITE_UNCHANGED = 1 << 2,
    PERM_RESIZE = 1 << 3,
    PERM_BITS = 4,
};

static const char *const perm_names[PERM_BITS] = {
    "consistent read", "write", "write unchanged", "resize",
};

/* What a reader and the writer hold, and what they refuse to share. */
static unsigned lock_held(bool writable)
{
    /* As QEMU's qcow2-on-file writer: no write-unchanged bit. */
    return writable ? (PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE)
                    : PERM_CONSISTENT_READ;
}

static unsigned lock_unshared(bool writable)
{
    /* Nobody else may change what we read or write. */
    return PERM_WRITE | PERM_RESIZE;
}

/*
 * F_OFD_SETLK, never F_OFD_SETLKW: taking a lock must not wait, because
 * the daemon opens every chain before it mounts, and one image that
 * another process holds must not delay the others (QEMU does not wait
 * either).  Every byte we and QEMU take is a shared (read) lock, and
 * shared locks never conflict with each other, so in practice this does
 * not fail because of another holder (if one held a write lock, we would
 * get EAGAIN, not wait); conflicts are found by lock_byte_taken() and
 * refused at once.
 */
static int lock_byte(int fd, int off, short type)
{
    struct flock fl = {
        .l_whence = SEEK_SET,
        .l_start = off,
        .l_len = 1,
        .l_type = type,
    };

    if (fcntl(fd, F_OFD_SETLK, &fl) < 0) {
        return -errno;
    }
    return 0;
}

/* 1 if another open file description holds a lock on byte off, 0 if not,
 * negative errno on failure. */
static int lock_byte_taken(int fd, int off)
{
    struct flock fl = {
        .l_whence = SEEK_SET,
        .l_start = off,
        .l_len = 1,
        .l_type = F_WRLCK,
    };

    if (fcntl(fd, F_OFD_GETLK, &fl) < 0) {
        return -errno;
    }
    return fl.l_type != F_UNLCK;
}

static int lock_set(int fd, unsigned held, unsigned unshared)
{
    for (int i = 0; i < PERM_BITS; i++) {
        int ret = lock_byte(fd, LOCK_PERM_BASE + i,
                            (held & (1u << i)) ? F_RDLCK : F_UNLCK);

        if (ret < 0) {
            return ret;
        }
        ret = lock_byte(fd, LOCK_SHARED_BASE + i,
                        (unshared & (1u << i)) ? F_RDLCK : F_UNLCK);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

bool image_lock_apply(int fd, const char *path, bool writable,
                      GError **error)
{
    int ret = lock_set(fd, lock_held(writable), lock_unshared(writable));

    if (ret < 0) {
        chainfs_set_error(error, -ret, "cannot lock %s: %s", path,
                          g_strerror(-ret));
        return false;
    }
    return true;
}

void image_unlock_fd(int fd)
{
    lock_set(fd, 0, 0);
}

bool image_lock_fd(int fd, const char *path, bool writable, GError **error)
{
    unsigned held = lock_held(writable);
    unsigned unshared = lock_unshared(writable);

    if (!image_lock_apply(fd, path, writable, error)) {
        image_unlock_fd(fd);
        return false;
    }
    for (int i = 0; i < PERM_BITS; i++) {
        if (held & (1u << i)) {
            int ret = lock_byte_taken(fd, LOCK_SHARED_BASE + i);

            if (ret != 0) {
                image_unlock_fd(fd);
                chainfs_set_error(error, ret < 0 ? -ret : EBUSY,
                                  "Failed to get \"%s\" lock on %s: is "
                                  "another process using the image?",
                                  perm_names[i], path);
                return false;
            }
        }
    }
    for (int i = 0; i < PERM_BITS; i++) {
        if (unshared & (1u << i)) {
            int ret = lock_byte_taken(fd, LOCK_PERM_BASE + i);

            if (ret != 0) {
                image_unlock_fd(fd);
                chainfs_set_error(error, ret < 0 ? -ret : EBUSY,
                                  "Failed to get shared \"%s\" lock on %s: "
                                  "is another process using the image?",
                                  perm_names[i], path);
                return false;
            }
        }
    }
    return true;
}
