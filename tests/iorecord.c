/*
 * iorecord.c: an LD_PRELOAD shim that records, in one global order, every
 * call by which a process changes what a disk would hold for the files of
 * one directory: the input of the power-loss replay (tests/powerloss.py),
 * after CrashMonkey's recorder.  A SIGKILL keeps the page cache; only a
 * record of writes and flushes shows what a power cut may leave.
 *
 *   CHAINFS_IORECORD_DIR   absolute, canonical directory whose files (and
 *                          which itself, for a directory fsync) are recorded
 *   CHAINFS_IORECORD_LOG   the log, one line per record, opened O_APPEND
 *                          (the test appends its own marker lines to it)
 *   CHAINFS_IORECORD_DATA  the bytes of the recorded writes, back to back
 *
 * Records, "SEQ OP ARGS" (paths absolute, '%XX'-escaped, see log_path):
 *   W PATH OFF LEN DATAOFF   a write that completed, LEN bytes at OFF, its
 *                            bytes at DATAOFF in the data file (pwrite,
 *                            pwritev, write, writev, copy_file_range)
 *   T PATH SIZE              ftruncate
 *   A PATH MODE OFF LEN      fallocate (mode as the call's flags)
 *   C PATH TRUNC             open with O_CREAT or O_TRUNC that succeeded
 *   N OLD NEW                rename, renameat, renameat2 (flags 0)
 *   U PATH                   unlink, unlinkat
 *   L OLD NEW                link, linkat
 *   S ID PATH KIND           fsync/fdatasync about to start (KIND f = file,
 *                            d = directory); everything recorded before it
 *                            is what that flush covers
 *   s ID RC                  the same flush returned RC (0 or -errno)
 *   R PATH OFF LEN           sync_file_range (starts write-back; durable
 *                            nothing)
 * A record is written after its call completed and before the call returns
 * to the caller, so whatever the caller orders after a return (a flush, a
 * header write) is recorded after it.  A flush is recorded on entry: a write
 * that completes while the flush runs is recorded after the S line and
 * counts as not covered, which is the conservative reading.
 *
 * The file descriptor -> path map is taken by readlink of /proc/self/fd at
 * open time.  Only the calls chainfs makes (grep src/ for them) and their
 * siblings are wrapped; dup and friends are not.  Built by tests/meson.build
 * as a shared module; works in the ASan build too, with the sanitizer's
 * runtime first in LD_PRELOAD (tests/test_power_loss.py puts it there).
 * posix_fallocate and glibc's own internal calls bypass the wrappers;
 * chainfs makes none of them on images.
 */
#undef _FILE_OFFSET_BITS
#undef _FORTIFY_SOURCE
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define IOREC_MAX_FD 65536
#define IOREC_LINE 3 * PATH_MAX + 128

/* The real functions, found once by dlsym(RTLD_NEXT). */
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off64_t);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pread)(int, void *, size_t, off_t);
static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_close)(int);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off64_t);
static int (*real_fallocate)(int, int, off_t, off_t);
static int (*real_fallocate64)(int, int, off64_t, off64_t);
static ssize_t (*real_copy_file_range)(int, off64_t *, int, off64_t *,
                                       size_t, unsigned);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_sync_file_range)(int, off64_t, off64_t, unsigned);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_renameat2)(int, const char *, int, const char *, unsigned);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);
static int (*real_link)(const char *, const char *);
static int (*real_linkat)(int, const char *, int, const char *, int);

/* Guards everything below, and makes the log one global order. */
static pthread_mutex_t iorec_lock = PTHREAD_MUTEX_INITIALIZER;
static char iorec_dir[PATH_MAX];
static size_t iorec_dir_len;
static int iorec_log_fd = -1;
static int iorec_data_fd = -1;
static uint64_t iorec_seq;
static uint64_t iorec_data_off;
static uint64_t iorec_sync_id;
static char *iorec_fd_path[IOREC_MAX_FD];   /* NULL: not recorded */

#define RESOLVE(name) \
    (real_##name = (__typeof__(real_##name))dlsym(RTLD_NEXT, #name))

/* A wrapper may run before the constructor (another library's constructor
 * opening a file): resolve on demand too. */
#define REAL(name) (iorec_resolve(), real_##name)

static pthread_once_t iorec_resolved = PTHREAD_ONCE_INIT;

static void iorec_resolve_all(void)
{
    RESOLVE(pwrite); RESOLVE(pwrite64); RESOLVE(pwritev); RESOLVE(pwritev64);
    RESOLVE(write); RESOLVE(writev); RESOLVE(pread);
    RESOLVE(open); RESOLVE(open64); RESOLVE(openat); RESOLVE(openat64);
    RESOLVE(close); RESOLVE(ftruncate); RESOLVE(ftruncate64);
    RESOLVE(fallocate); RESOLVE(fallocate64); RESOLVE(copy_file_range);
    RESOLVE(fsync); RESOLVE(fdatasync); RESOLVE(sync_file_range);
    RESOLVE(rename); RESOLVE(renameat); RESOLVE(renameat2);
    RESOLVE(unlink); RESOLVE(unlinkat); RESOLVE(link); RESOLVE(linkat);
}

static void iorec_resolve(void)
{
    pthread_once(&iorec_resolved, iorec_resolve_all);
}

__attribute__((constructor)) static void iorec_init(void)
{
    const char *dir = getenv("CHAINFS_IORECORD_DIR");
    const char *log = getenv("CHAINFS_IORECORD_LOG");
    const char *data = getenv("CHAINFS_IORECORD_DATA");

    iorec_resolve();
    if (!dir || !log || !data || strlen(dir) >= sizeof(iorec_dir)) {
        return;
    }
    strcpy(iorec_dir, dir);
    iorec_dir_len = strlen(iorec_dir);
    while (iorec_dir_len > 1 && iorec_dir[iorec_dir_len - 1] == '/') {
        iorec_dir[--iorec_dir_len] = '\0';
    }
    iorec_log_fd = REAL(open)(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC,
                             0644);
    iorec_data_fd = REAL(open)(data, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                              0644);
    if (iorec_log_fd < 0 || iorec_data_fd < 0) {
        fprintf(stderr, "iorecord: cannot open %s or %s: %s\n", log, data,
                strerror(errno));
        abort();
    }
}

static int iorec_enabled(void)
{
    return iorec_log_fd >= 0;
}

/* Is path (absolute, canonical) the directory or a file inside it? */
static int iorec_wanted(const char *path)
{
    return strncmp(path, iorec_dir, iorec_dir_len) == 0 &&
           (path[iorec_dir_len] == '\0' || path[iorec_dir_len] == '/');
}

/* Append path to the line at *pos, escaping bytes that would split it. */
static void log_path(char *line, size_t *pos, const char *path)
{
    static const char hex[] = "0123456789ABCDEF";

    line[(*pos)++] = ' ';
    for (const unsigned char *p = (const unsigned char *)path; *p; p++) {
        if (*pos + 4 >= IOREC_LINE) {
            break;
        }
        if (*p <= ' ' || *p == '%' || *p >= 0x7f) {
            line[(*pos)++] = '%';
            line[(*pos)++] = hex[*p >> 4];
            line[(*pos)++] = hex[*p & 15];
        } else {
            line[(*pos)++] = (char)*p;
        }
    }
}

static void log_fmt(char *line, size_t *pos, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void log_fmt(char *line, size_t *pos, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(line + *pos, IOREC_LINE - *pos, fmt, ap);
    va_end(ap);
    if (n > 0) {
        *pos = *pos + (size_t)n < IOREC_LINE ? *pos + (size_t)n
                                             : IOREC_LINE - 1;
    }
}

/* Write one whole line (O_APPEND: one write keeps it whole).  Lock held. */
static void log_line(char *line, size_t pos)
{
    line[pos++] = '\n';
    if (REAL(write)(iorec_log_fd, line, pos) != (ssize_t)pos) {
        fprintf(stderr, "iorecord: cannot write the log: %s\n",
                strerror(errno));
        abort();
    }
}

/* Start a record "SEQ OP".  Lock held. */
static size_t log_start(char *line, char op)
{
    size_t pos = 0;

    log_fmt(line, &pos, "%llu %c", (unsigned long long)++iorec_seq, op);
    return pos;
}

/* Canonical absolute path of name relative to dirfd, the file itself not
 * resolved (it may not exist, or be a name about to go). */
static int iorec_abs(int dirfd, const char *name, char *out)
{
    char dirbuf[PATH_MAX], link[64];
    const char *slash = strrchr(name, '/');
    const char *base = slash ? slash + 1 : name;
    ssize_t n;

    if (slash) {
        char parent[PATH_MAX];
        size_t l = (size_t)(slash - name);

        if (l >= sizeof(parent)) {
            return -1;
        }
        memcpy(parent, name, l);
        parent[l] = '\0';
        if (l == 0) {
            strcpy(parent, "/");
        }
        if (parent[0] != '/' && dirfd != AT_FDCWD) {
            snprintf(link, sizeof(link), "/proc/self/fd/%d", dirfd);
            n = readlink(link, dirbuf, sizeof(dirbuf) - 1);
            if (n < 0) {
                return -1;
            }
            dirbuf[n] = '\0';
            char joined[2 * PATH_MAX];
            snprintf(joined, sizeof(joined), "%s/%s", dirbuf, parent);
            if (!realpath(joined, dirbuf)) {
                return -1;
            }
        } else if (!realpath(parent, dirbuf)) {
            return -1;
        }
    } else if (dirfd != AT_FDCWD) {
        snprintf(link, sizeof(link), "/proc/self/fd/%d", dirfd);
        n = readlink(link, dirbuf, sizeof(dirbuf) - 1);
        if (n < 0) {
            return -1;
        }
        dirbuf[n] = '\0';
    } else if (!getcwd(dirbuf, sizeof(dirbuf))) {
        return -1;
    }
    if (strlen(dirbuf) + strlen(base) + 2 > PATH_MAX) {
        return -1;
    }
    size_t dl = strcmp(dirbuf, "/") ? strlen(dirbuf) : 0;
    memcpy(out, dirbuf, dl);
    out[dl] = '/';
    strcpy(out + dl + 1, base);
    return 0;
}

/* ---- fd -> path -------------------------------------------------------- */

static void iorec_note_open(int fd, int flags)
{
    char link[64], path[PATH_MAX], line[IOREC_LINE];
    ssize_t n;

    if (!iorec_enabled() || fd < 0 || fd >= IOREC_MAX_FD) {
        return;
    }
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof(path) - 1);
    if (n < 0) {
        return;
    }
    path[n] = '\0';
    pthread_mutex_lock(&iorec_lock);
    free(iorec_fd_path[fd]);
    iorec_fd_path[fd] = iorec_wanted(path) ? strdup(path) : NULL;
    if (iorec_fd_path[fd] && (flags & (O_CREAT | O_TRUNC))) {
        size_t pos = log_start(line, 'C');
        log_path(line, &pos, path);
        log_fmt(line, &pos, " %d", (flags & O_TRUNC) ? 1 : 0);
        log_line(line, pos);
    }
    pthread_mutex_unlock(&iorec_lock);
}

/* The recorded path of fd, copied into out; 0 if fd is not recorded.
 * Lock held. */
static int iorec_fd_name(int fd, char *out)
{
    if (fd < 0 || fd >= IOREC_MAX_FD || !iorec_fd_path[fd]) {
        return 0;
    }
    strcpy(out, iorec_fd_path[fd]);
    return 1;
}

/* ---- writes ------------------------------------------------------------ */

/* Record a completed write of n bytes at off, its bytes from iov. */
static void iorec_note_write(int fd, off_t off, const struct iovec *iov,
                             int iovcnt, ssize_t n)
{
    char path[PATH_MAX], line[IOREC_LINE];
    size_t left = n > 0 ? (size_t)n : 0;

    if (!iorec_enabled() || n <= 0) {
        return;
    }
    pthread_mutex_lock(&iorec_lock);
    if (iorec_fd_name(fd, path)) {
        size_t pos = log_start(line, 'W');
        log_path(line, &pos, path);
        log_fmt(line, &pos, " %lld %zd %llu", (long long)off, n,
                (unsigned long long)iorec_data_off);
        for (int i = 0; i < iovcnt && left > 0; i++) {
            size_t l = iov[i].iov_len < left ? iov[i].iov_len : left;
            const char *p = iov[i].iov_base;
            size_t done = 0;

            while (done < l) {
                ssize_t w = REAL(write)(iorec_data_fd, p + done, l - done);
                if (w <= 0) {
                    fprintf(stderr, "iorecord: cannot write data: %s\n",
                            strerror(errno));
                    abort();
                }
                done += (size_t)w;
            }
            left -= l;
        }
        iorec_data_off += (uint64_t)n;
        log_line(line, pos);
    }
    pthread_mutex_unlock(&iorec_lock);
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off)
{
    ssize_t n = REAL(pwrite)(fd, buf, len, off);
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    int e = errno;

    iorec_note_write(fd, off, &iov, 1, n);
    errno = e;
    return n;
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off64_t off)
{
    ssize_t n = REAL(pwrite64)(fd, buf, len, off);
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    int e = errno;

    iorec_note_write(fd, off, &iov, 1, n);
    errno = e;
    return n;
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t off)
{
    ssize_t n = REAL(pwritev)(fd, iov, iovcnt, off);
    int e = errno;

    iorec_note_write(fd, off, iov, iovcnt, n);
    errno = e;
    return n;
}

ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off64_t off)
{
    ssize_t n = REAL(pwritev64)(fd, iov, iovcnt, off);
    int e = errno;

    iorec_note_write(fd, off, iov, iovcnt, n);
    errno = e;
    return n;
}

/* write/writev at the file position: the offset is where it ended minus
 * what it wrote (recorded files are not written with O_APPEND). */
ssize_t write(int fd, const void *buf, size_t len)
{
    ssize_t n = REAL(write)(fd, buf, len);
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    int e = errno;

    if (n > 0 && iorec_enabled() && fd != iorec_log_fd &&
        fd != iorec_data_fd) {
        iorec_note_write(fd, lseek(fd, 0, SEEK_CUR) - n, &iov, 1, n);
    }
    errno = e;
    return n;
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    ssize_t n = REAL(writev)(fd, iov, iovcnt);
    int e = errno;

    if (n > 0 && iorec_enabled()) {
        iorec_note_write(fd, lseek(fd, 0, SEEK_CUR) - n, iov, iovcnt, n);
    }
    errno = e;
    return n;
}

/* The bytes a copy_file_range put into fd_out are read back from it (the
 * source may be anywhere) and recorded as a write. */
ssize_t copy_file_range(int fd_in, off64_t *off_in, int fd_out,
                        off64_t *off_out, size_t len, unsigned flags)
{
    off64_t start = off_out ? *off_out : lseek(fd_out, 0, SEEK_CUR);
    ssize_t n = REAL(copy_file_range)(fd_in, off_in, fd_out, off_out, len,
                                     flags);
    int e = errno;

    if (n > 0 && iorec_enabled()) {
        char *buf = malloc((size_t)n);
        if (!buf || REAL(pread)(fd_out, buf, (size_t)n, start) != n) {
            fprintf(stderr, "iorecord: cannot read back a copy\n");
            abort();
        }
        struct iovec iov = { .iov_base = buf, .iov_len = (size_t)n };
        iorec_note_write(fd_out, start, &iov, 1, n);
        free(buf);
    }
    errno = e;
    return n;
}

/* ---- size and allocation ---------------------------------------------- */

static void iorec_note_fd_op(int fd, char op, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void iorec_note_fd_op(int fd, char op, const char *fmt, ...)
{
    char path[PATH_MAX], line[IOREC_LINE], args[128];
    va_list ap;

    if (!iorec_enabled()) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(args, sizeof(args), fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&iorec_lock);
    if (iorec_fd_name(fd, path)) {
        size_t pos = log_start(line, op);
        log_path(line, &pos, path);
        log_fmt(line, &pos, " %s", args);
        log_line(line, pos);
    }
    pthread_mutex_unlock(&iorec_lock);
}

int ftruncate(int fd, off_t size)
{
    int r = REAL(ftruncate)(fd, size);
    int e = errno;

    if (r == 0) {
        iorec_note_fd_op(fd, 'T', "%lld", (long long)size);
    }
    errno = e;
    return r;
}

int ftruncate64(int fd, off64_t size)
{
    int r = REAL(ftruncate64)(fd, size);
    int e = errno;

    if (r == 0) {
        iorec_note_fd_op(fd, 'T', "%lld", (long long)size);
    }
    errno = e;
    return r;
}

int fallocate(int fd, int mode, off_t off, off_t len)
{
    int r = REAL(fallocate)(fd, mode, off, len);
    int e = errno;

    if (r == 0) {
        iorec_note_fd_op(fd, 'A', "%d %lld %lld", mode, (long long)off,
                         (long long)len);
    }
    errno = e;
    return r;
}

int fallocate64(int fd, int mode, off64_t off, off64_t len)
{
    int r = REAL(fallocate64)(fd, mode, off, len);
    int e = errno;

    if (r == 0) {
        iorec_note_fd_op(fd, 'A', "%d %lld %lld", mode, (long long)off,
                         (long long)len);
    }
    errno = e;
    return r;
}

int sync_file_range(int fd, off64_t off, off64_t len, unsigned flags)
{
    int r = REAL(sync_file_range)(fd, off, len, flags);
    int e = errno;

    iorec_note_fd_op(fd, 'R', "%lld %lld", (long long)off, (long long)len);
    errno = e;
    return r;
}

/* ---- flushes ----------------------------------------------------------- */

static int iorec_sync(int fd, int (*fn)(int))
{
    char path[PATH_MAX], line[IOREC_LINE];
    uint64_t id = 0;
    struct stat st;
    int r, e;

    if (iorec_enabled()) {
        pthread_mutex_lock(&iorec_lock);
        if (iorec_fd_name(fd, path)) {
            size_t pos = log_start(line, 'S');
            id = ++iorec_sync_id;
            log_fmt(line, &pos, " %llu", (unsigned long long)id);
            log_path(line, &pos, path);
            log_fmt(line, &pos, " %c",
                    fstat(fd, &st) == 0 && S_ISDIR(st.st_mode) ? 'd' : 'f');
            log_line(line, pos);
        }
        pthread_mutex_unlock(&iorec_lock);
    }
    r = fn(fd);
    e = errno;
    if (id) {
        pthread_mutex_lock(&iorec_lock);
        size_t pos = log_start(line, 's');
        log_fmt(line, &pos, " %llu %d", (unsigned long long)id,
                r == 0 ? 0 : -e);
        log_line(line, pos);
        pthread_mutex_unlock(&iorec_lock);
    }
    errno = e;
    return r;
}

int fsync(int fd)
{
    return iorec_sync(fd, real_fsync);
}

int fdatasync(int fd)
{
    return iorec_sync(fd, real_fdatasync);
}

/* ---- opens and closes --------------------------------------------------- */

static mode_t iorec_mode(int flags, va_list ap)
{
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

int open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = iorec_mode(flags, ap);
    va_end(ap);
    int fd = REAL(open)(path, flags, mode);
    int e = errno;

    iorec_note_open(fd, flags);
    errno = e;
    return fd;
}

int open64(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = iorec_mode(flags, ap);
    va_end(ap);
    int fd = REAL(open64)(path, flags, mode);
    int e = errno;

    iorec_note_open(fd, flags);
    errno = e;
    return fd;
}

int openat(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = iorec_mode(flags, ap);
    va_end(ap);
    int fd = REAL(openat)(dirfd, path, flags, mode);
    int e = errno;

    iorec_note_open(fd, flags);
    errno = e;
    return fd;
}

int openat64(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = iorec_mode(flags, ap);
    va_end(ap);
    int fd = REAL(openat64)(dirfd, path, flags, mode);
    int e = errno;

    iorec_note_open(fd, flags);
    errno = e;
    return fd;
}

int close(int fd)
{
    if (iorec_enabled() && fd >= 0 && fd < IOREC_MAX_FD) {
        pthread_mutex_lock(&iorec_lock);
        free(iorec_fd_path[fd]);
        iorec_fd_path[fd] = NULL;
        pthread_mutex_unlock(&iorec_lock);
    }
    return REAL(close)(fd);
}

/* ---- names ------------------------------------------------------------- */

/* Record "OP A [B]" for names a (and b) relative to their dirfds, if
 * either is in the directory. */
static void iorec_note_names(char op, int da, const char *a, int db,
                             const char *b)
{
    char pa[PATH_MAX], pb[PATH_MAX], line[IOREC_LINE];

    if (!iorec_enabled() || iorec_abs(da, a, pa) < 0 ||
        (b && iorec_abs(db, b, pb) < 0)) {
        return;
    }
    if (!iorec_wanted(pa) && !(b && iorec_wanted(pb))) {
        return;
    }
    pthread_mutex_lock(&iorec_lock);
    size_t pos = log_start(line, op);
    log_path(line, &pos, pa);
    if (b) {
        log_path(line, &pos, pb);
    }
    log_line(line, pos);
    pthread_mutex_unlock(&iorec_lock);
}

int rename(const char *a, const char *b)
{
    int r = REAL(rename)(a, b);
    int e = errno;

    if (r == 0) {
        iorec_note_names('N', AT_FDCWD, a, AT_FDCWD, b);
    }
    errno = e;
    return r;
}

int renameat(int da, const char *a, int db, const char *b)
{
    int r = REAL(renameat)(da, a, db, b);
    int e = errno;

    if (r == 0) {
        iorec_note_names('N', da, a, db, b);
    }
    errno = e;
    return r;
}

int renameat2(int da, const char *a, int db, const char *b, unsigned flags)
{
    int r = REAL(renameat2)(da, a, db, b, flags);
    int e = errno;

    /* RENAME_NOREPLACE is a rename; RENAME_EXCHANGE and RENAME_WHITEOUT
     * are not modelled: say so loudly. */
    if (r == 0 && (flags & ~(unsigned)RENAME_NOREPLACE) && iorec_enabled()) {
        fprintf(stderr, "iorecord: renameat2 flags %u not recorded\n", flags);
        abort();
    }
    if (r == 0) {
        iorec_note_names('N', da, a, db, b);
    }
    errno = e;
    return r;
}

int unlink(const char *a)
{
    int r = REAL(unlink)(a);
    int e = errno;

    if (r == 0) {
        iorec_note_names('U', AT_FDCWD, a, AT_FDCWD, NULL);
    }
    errno = e;
    return r;
}

int unlinkat(int da, const char *a, int flags)
{
    int r = REAL(unlinkat)(da, a, flags);
    int e = errno;

    if (r == 0) {
        iorec_note_names('U', da, a, AT_FDCWD, NULL);
    }
    errno = e;
    return r;
}

int link(const char *a, const char *b)
{
    int r = REAL(link)(a, b);
    int e = errno;

    if (r == 0) {
        iorec_note_names('L', AT_FDCWD, a, AT_FDCWD, b);
    }
    errno = e;
    return r;
}

int linkat(int da, const char *a, int db, const char *b, int flags)
{
    int r = REAL(linkat)(da, a, db, b, flags);
    int e = errno;

    if (r == 0) {
        iorec_note_names('L', da, a, db, b);
    }
    errno = e;
    return r;
}
