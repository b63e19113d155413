/*
 * image-file.h: opening a file that should be an image, without ever
 * blocking on it.
 *
 * Anything in the image directory, or named by a backing reference, may be
 * a FIFO, a socket or a device: a plain open() of a FIFO waits for a
 * writer forever, and opening a device can have side effects.  So every
 * image file is opened with O_NONBLOCK | O_NOCTTY, checked with fstat() on
 * the descriptor itself (a stat() before the open would race with a rename
 * that swaps the file), and only then, once it is known to be a regular
 * file, switched back to blocking I/O.
 */
#ifndef CHAINFS_IMAGE_FILE_H
#define CHAINFS_IMAGE_FILE_H

#include <stdbool.h>
#include <sys/stat.h>
#include <glib.h>

#include "chain-error.h"

/* "a FIFO", "a socket", "a character device", ... for a non-regular mode. */
const char *image_file_type_name(mode_t mode);

/*
 * Open path (flags: O_RDONLY or O_RDWR, plus O_CLOEXEC added here) as an
 * image file.  On success returns a descriptor of a regular file in
 * blocking mode and fills *st (may be NULL) from fstat() of it.  On failure
 * returns -1 with error set: the errno of open(), or EINVAL with "PATH is a
 * FIFO, not an image file" (socket, character device, ...).  `what` names
 * the file in messages (NULL: path).  Never blocks on a special file.
 */
int image_file_open(const char *path, int flags, const char *what,
                    struct stat *st, GError **error);

/* Same, relative to the directory descriptor dirfd (openat). */
int image_file_openat(int dirfd, const char *name, int flags,
                      const char *what, struct stat *st, GError **error);

#endif
