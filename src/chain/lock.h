/*
 * lock.h: image locks compatible with QEMU's file driver.
 *
 * QEMU (block/file-posix.c) takes open-file-description byte-range locks:
 * byte 100 + i for each permission bit i it holds, byte 200 + i for each
 * permission bit i it refuses to share.  Taking the same locks makes
 * qemu-img / QEMU refuse to write an image chainfs uses ("Failed to get
 * "write" lock ... Is another process using the image?"), while
 * `qemu-img -U` still reads it; and a second chainfs refuses the image.
 */
#ifndef CHAINFS_LOCK_H
#define CHAINFS_LOCK_H

#include <stdbool.h>
#include <glib.h>

/*
 * Lock fd as a reader (writable false: consistent read held, write and
 * resize not shared) or as the writer (writable true: read+write+resize
 * held, write and resize not shared).  Fails with EBUSY and a message
 * naming path if another process holds a conflicting lock.  Replaces the
 * locks fd had; on failure fd is left holding no lock byte.
 */
bool image_lock_fd(int fd, const char *path, bool writable, GError **error);

/*
 * Take the lock bytes of a reader or the writer on fd without checking for
 * conflicts (they cannot fail because of other holders: all are shared
 * locks).  For moving locks from one descriptor of an image to a new one
 * after image_lock_fd() checked them on the old one.
 */
bool image_lock_apply(int fd, const char *path, bool writable,
                      GError **error);

/* Drop every lock byte fd holds. */
void image_unlock_fd(int fd);

#endif
