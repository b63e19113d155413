/*
 * image-file.c: open image files without blocking (see image-file.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "image-file.h"

const char *image_file_type_name(mode_t mode)
{
    switch (mode & S_IFMT) {
    case S_IFIFO:
        return "a FIFO";
    case S_IFSOCK:
        return "a socket";
    case S_IFCHR:
        return "a character device";
    case S_IFBLK:
        return "a block device";
    case S_IFDIR:
        return "a directory";
    case S_IFLNK:
        return "a symbolic link";
    case S_IFREG:
        return "a regular file";
    default:
        return "a special file";
    }
}

int image_file_openat(int dirfd, const char *name, int flags,
                      const char *what, struct stat *st, GError **error)
{
    struct stat local;
    const char *label = what ? what : name;
    /*
     * O_NONBLOCK: opening a FIFO for reading returns at once instead of
     * waiting for a writer (and fails with ENXIO for writing); O_NOCTTY: a
     * terminal never becomes our controlling tty.  Regular files ignore
     * both, so nothing is lost for a real image.
     */
    int fd = openat(dirfd, name,
                    flags | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);

    if (!st) {
        st = &local;
    }
    if (fd < 0) {
        int err = errno;

        /* open() of a socket fails (ENXIO); say what the file is rather
         * than the errno.  Only the message depends on this stat. */
        if (fstatat(dirfd, name, st, 0) == 0 && !S_ISREG(st->st_mode)) {
            chainfs_set_error(error, EINVAL, "%s is %s, not an image file",
                              label, image_file_type_name(st->st_mode));
            return -1;
        }
        chainfs_set_error(error, err, "cannot open %s%s: %s", label,
                          (flags & O_ACCMODE) == O_RDWR ? " read-write" : "",
                          g_strerror(err));
        return -1;
    }
    if (fstat(fd, st) < 0) {
        int err = errno;

        chainfs_set_error(error, err, "cannot stat %s: %s", label,
                          g_strerror(err));
        close(fd);
        return -1;
    }
    if (!S_ISREG(st->st_mode)) {
        chainfs_set_error(error, EINVAL, "%s is %s, not an image file", label,
                          image_file_type_name(st->st_mode));
        close(fd);
        return -1;
    }
    /* Back to blocking I/O: the drivers expect every pread/pwrite to
     * either complete or fail, never EAGAIN. */
    int fl = fcntl(fd, F_GETFL);

    if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
        int err = errno;

        chainfs_set_error(error, err, "cannot set up %s: %s", label,
                          g_strerror(err));
        close(fd);
        return -1;
    }
    return fd;
}

int image_file_open(const char *path, int flags, const char *what,
                    struct stat *st, GError **error)
{
    return image_file_openat(AT_FDCWD, path, flags, what, st, error);
}
