/*
 * faultinject.c: an LD_PRELOAD shim that makes chosen I/O calls fail, for
 * the tests of what chainfs does when its disk fails (tests/test_faults.py).
 *
 * Rules, in CHAINFS_FAULT or in the control file (one rule per line or
 * separated by ';'):
 *
 *     OP:PATH-SUBSTRING:NTH:ERRNO[:COUNT[:THREAD]]
 *
 * OP is fdatasync, fsync, sync (both), pwrite (pwrite, pwritev and their
 * 64-bit names), pread (likewise), fallocate, ftruncate or
 * sync_file_range.  The rule counts the calls of OP on a file whose path
 * (readlink of /proc/self/fd/FD) contains PATH-SUBSTRING ("" matches
 * every file) and fails calls NTH (1-based) to NTH+COUNT-1 with ERRNO (EIO,
 * ENOSPC, EROFS, EDQUOT or a number) without performing them.  COUNT 0
 * fails every call from the NTH on; the default is 1.  THREAD, when given,
 * limits the rule to calls from threads whose name (prctl PR_GET_NAME)
 * contains it, or with a leading '!' does not: the daemon's FUSE threads
 * are all named "chainfs" and its jobs' threads are not, so that
 * "!chainfs" picks a job's I/O out of the guest's on the same file.
 *
 * CHAINFS_FAULT_CTL=FILE arms rules at run time: on every intercepted call
 * the shim stats FILE, and when it changed (replace it with rename(2) so
 * that it changes atomically) its rules replace the current ones, counts
 * starting again from 0.  A test can so inject a fault in the phase it
 * tests (after a job started, after the guest wrote).
 *
 * CHAINFS_FAULT_LOG=FILE: one line per injected fault, "OP PATH ERRNO N"
 * (N the call number the rule counted), so that a test can prove that the
 * fault fired, and on which file.
 *
 * Only what the test needs and nothing that could change a call that is
 * not failed: every call that no rule fails goes to the next definition
 * (libc, or ASan's interceptor when the daemon is built with ASan) as is.
 */
#undef _FILE_OFFSET_BITS /* define pread and pread64 as the two symbols */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#ifndef _LARGEFILE64_SOURCE
#define _LARGEFILE64_SOURCE
#endif

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum {
    FI_FDATASYNC = 1 << 0,
    FI_FSYNC = 1 << 1,
    FI_PWRITE = 1 << 2,
    FI_PREAD = 1 << 3,
    FI_FALLOCATE = 1 << 4,
    FI_FTRUNCATE = 1 << 5,
    FI_SYNC_FILE_RANGE = 1 << 6,
};

#define FI_MAX_RULES 16
#define FI_MAX_PATTERN 256

typedef struct {
    unsigned ops;                  /* FI_* mask */
    char pattern[FI_MAX_PATTERN];  /* path substring */
    unsigned long nth;             /* first failing call, 1-based */
    unsigned long count;           /* how many fail; 0: all from nth */
    char thread[32];               /* thread name substring; "" any */
    bool thread_not;               /* thread must NOT contain it */
    int err;
    unsigned long seen;            /* matching calls so far */
} FaultRule;

/* Everything below is guarded by fi_lock. */
static pthread_mutex_t fi_lock = PTHREAD_MUTEX_INITIALIZER;
static FaultRule fi_rules[FI_MAX_RULES];
static int fi_nrules;
static unsigned fi_ops;            /* union of the rules' ops */
static char fi_ctl_path[PATH_MAX];
static struct stat fi_ctl_st;      /* the control file as last read */
static bool fi_ctl_seen;
static char fi_log_path[PATH_MAX];

static const struct {
    const char *name;
    unsigned ops;
} fi_op_names[] = {
    { "fdatasync", FI_FDATASYNC },
    { "fsync", FI_FSYNC },
    { "sync", FI_FDATASYNC | FI_FSYNC },
    { "pwrite", FI_PWRITE },
    { "pread", FI_PREAD },
    { "fallocate", FI_FALLOCATE },
    { "ftruncate", FI_FTRUNCATE },
    { "sync_file_range", FI_SYNC_FILE_RANGE },
};

static const struct {
    const char *name;
    int err;
} fi_errno_names[] = {
    { "EIO", EIO }, { "ENOSPC", ENOSPC }, { "EROFS", EROFS },
    { "EDQUOT", EDQUOT }, { "EINTR", EINTR },
};

static const char *fi_errno_name(int err)
{
    for (size_t i = 0; i < sizeof(fi_errno_names) / sizeof(fi_errno_names[0]); i++) {
        if (fi_errno_names[i].err == err) {
            return fi_errno_names[i].name;
        }
    }
    return "E?";
}

static void fi_complain(const char *what, const char *rule)
{
    /* A rule the test got wrong must not go unnoticed as "no fault". */
    fprintf(stderr, "faultinject: %s in rule \"%s\"\n", what, rule);
    abort();
}

/* Parse one rule "OP:PATTERN:NTH:ERRNO[:COUNT]" (rule is modified). */
static void fi_parse_rule(char *rule, FaultRule *out)
{
    char copy[FI_MAX_PATTERN * 2];
    char *field[6] = { 0 };
    int n = 0;
    char *p = rule;

    snprintf(copy, sizeof(copy), "%s", rule);
    while (n < 6) {
        field[n++] = p;
        p = strchr(p, ':');
        if (!p) {
            break;
        }
        *p++ = '\0';
    }
    if (n < 4) {
        fi_complain("too few fields", copy);
    }
    memset(out, 0, sizeof(*out));
    for (size_t i = 0; i < sizeof(fi_op_names) / sizeof(fi_op_names[0]); i++) {
        if (strcmp(field[0], fi_op_names[i].name) == 0) {
            out->ops = fi_op_names[i].ops;
        }
    }
    if (!out->ops) {
        fi_complain("unknown call", copy);
    }
    if (strlen(field[1]) >= FI_MAX_PATTERN) {
        fi_complain("pattern too long", copy);
    }
    strcpy(out->pattern, field[1]);
    out->nth = strtoul(field[2], NULL, 10);
    if (out->nth == 0) {
        fi_complain("NTH must be 1 or more", copy);
    }
    for (size_t i = 0; i < sizeof(fi_errno_names) / sizeof(fi_errno_names[0]); i++) {
        if (strcmp(field[3], fi_errno_names[i].name) == 0) {
            out->err = fi_errno_names[i].err;
        }
    }
    if (!out->err) {
        out->err = (int)strtol(field[3], NULL, 10);
    }
    if (out->err <= 0) {
        fi_complain("unknown errno", copy);
    }
    out->count = field[4] && field[4][0] ? strtoul(field[4], NULL, 10) : 1;
    if (field[5]) {
        const char *t = field[5];

        out->thread_not = t[0] == '!';
        if (strlen(t + out->thread_not) >= sizeof(out->thread)) {
            fi_complain("thread name too long", copy);
        }
        strcpy(out->thread, t + out->thread_not);
    }
}

/* Does the calling thread's name select rule r? */
static bool fi_thread_matches(const FaultRule *r)
{
    char name[32] = "";

    if (!r->thread[0]) {
        return true;
    }
    prctl(PR_GET_NAME, name, 0, 0, 0);
    return (strstr(name, r->thread) != NULL) != r->thread_not;
}

/* Replace the rules by those of text (modified).  fi_lock held. */
static void fi_load_rules(char *text)
{
    char *save = NULL;

    fi_nrules = 0;
    fi_ops = 0;
    for (char *r = strtok_r(text, ";\n", &save); r;
         r = strtok_r(NULL, ";\n", &save)) {
        if (r[0] == '\0' || r[0] == '#') {
            continue;
        }
        if (fi_nrules == FI_MAX_RULES) {
            fi_complain("too many rules", r);
        }
        fi_parse_rule(r, &fi_rules[fi_nrules]);
        fi_ops |= fi_rules[fi_nrules].ops;
        fi_nrules++;
    }
}

/* Reload the control file if it changed since it was last read.  The
 * reads go through syscalls no rule can fail (read(2), not pread).
 * fi_lock held. */
static void fi_poll_ctl(void)
{
    struct stat st;
    char buf[4096];
    ssize_t n;
    int fd;

    if (!fi_ctl_path[0] || stat(fi_ctl_path, &st) < 0) {
        return;
    }
    if (fi_ctl_seen && st.st_ino == fi_ctl_st.st_ino &&
        st.st_dev == fi_ctl_st.st_dev && st.st_size == fi_ctl_st.st_size &&
        st.st_mtim.tv_sec == fi_ctl_st.st_mtim.tv_sec &&
        st.st_mtim.tv_nsec == fi_ctl_st.st_mtim.tv_nsec) {
        return;
    }
    fd = open(fi_ctl_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return;
    }
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n < 0) {
        return;
    }
    buf[n] = '\0';
    fi_ctl_st = st;
    fi_ctl_seen = true;
    fi_load_rules(buf);
}

__attribute__((constructor))
static void fi_init(void)
{
    const char *rules = getenv("CHAINFS_FAULT");
    const char *ctl = getenv("CHAINFS_FAULT_CTL");
    const char *log = getenv("CHAINFS_FAULT_LOG");

    pthread_mutex_lock(&fi_lock);
    if (rules) {
        char *copy = strdup(rules);

        if (copy) {
            fi_load_rules(copy);
            free(copy);
        }
    }
    if (ctl) {
        snprintf(fi_ctl_path, sizeof(fi_ctl_path), "%s", ctl);
    }
    if (log) {
        snprintf(fi_log_path, sizeof(fi_log_path), "%s", log);
    }
    pthread_mutex_unlock(&fi_lock);
}

/* One line in the fault log: a single O_APPEND write, whole. */
static void fi_log(const char *op, const char *path, int err,
                   unsigned long nth)
{
    char line[PATH_MAX + 64];
    int len, fd;

    if (!fi_log_path[0]) {
        return;
    }
    len = snprintf(line, sizeof(line), "%s %s %s %lu\n", op, path,
                   fi_errno_name(err), nth);
    fd = open(fi_log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd >= 0) {
        if (write(fd, line, (size_t)len) < 0) {
            /* Nothing to do: the test will see no line and fail. */
        }
        close(fd);
    }
}

/*
 * Should this call of op on fd fail?  Returns the errno to fail it with,
 * or 0 to perform it.  Counts it in every rule it matches.
 */
static int fi_check(unsigned op, const char *op_name, int fd)
{
    char link[64], path[PATH_MAX];
    ssize_t n;
    int err = 0;

    pthread_mutex_lock(&fi_lock);
    fi_poll_ctl();
    if (!(fi_ops & op)) {
        pthread_mutex_unlock(&fi_lock);
        return 0;
    }
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof(path) - 1);
    if (n < 0) {
        pthread_mutex_unlock(&fi_lock);
        return 0;
    }
    path[n] = '\0';
    for (int i = 0; i < fi_nrules; i++) {
        FaultRule *r = &fi_rules[i];

        if (!(r->ops & op) || !strstr(path, r->pattern) ||
            !fi_thread_matches(r)) {
            continue;
        }
        r->seen++;
        if (!err && r->seen >= r->nth &&
            (r->count == 0 || r->seen < r->nth + r->count)) {
            err = r->err;
            fi_log(op_name, path, err, r->seen);
        }
    }
    pthread_mutex_unlock(&fi_lock);
    return err;
}

/* The next definition of a symbol, looked up once. */
#define FI_REAL(type, name, args)                                         \
    static type (*real_fn) args;                                          \
    if (!real_fn) {                                                       \
        real_fn = (type (*) args)dlsym(RTLD_NEXT, name);                  \
    }

#define FI_FAIL_IF(op, op_name, fd, failval)                              \
    do {                                                                  \
        int fi_err_ = fi_check(op, op_name, fd);                          \
        if (fi_err_) {                                                    \
            errno = fi_err_;                                              \
            return failval;                                               \
        }                                                                 \
    } while (0)

int fdatasync(int fd)
{
    FI_REAL(int, "fdatasync", (int));
    FI_FAIL_IF(FI_FDATASYNC, "fdatasync", fd, -1);
    return real_fn(fd);
}

int fsync(int fd)
{
    FI_REAL(int, "fsync", (int));
    FI_FAIL_IF(FI_FSYNC, "fsync", fd, -1);
    return real_fn(fd);
}

int sync_file_range(int fd, off64_t off, off64_t len, unsigned int flags)
{
    FI_REAL(int, "sync_file_range", (int, off64_t, off64_t, unsigned int));
    FI_FAIL_IF(FI_SYNC_FILE_RANGE, "sync_file_range", fd, -1);
    return real_fn(fd, off, len, flags);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    FI_REAL(ssize_t, "pwrite", (int, const void *, size_t, off_t));
    FI_FAIL_IF(FI_PWRITE, "pwrite", fd, -1);
    return real_fn(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off)
{
    FI_REAL(ssize_t, "pwrite64", (int, const void *, size_t, off64_t));
    FI_FAIL_IF(FI_PWRITE, "pwrite", fd, -1);
    return real_fn(fd, buf, n, off);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
    FI_REAL(ssize_t, "pwritev", (int, const struct iovec *, int, off_t));
    FI_FAIL_IF(FI_PWRITE, "pwrite", fd, -1);
    return real_fn(fd, iov, cnt, off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off64_t off)
{
    FI_REAL(ssize_t, "pwritev64", (int, const struct iovec *, int, off64_t));
    FI_FAIL_IF(FI_PWRITE, "pwrite", fd, -1);
    return real_fn(fd, iov, cnt, off);
}

ssize_t pread(int fd, void *buf, size_t n, off_t off)
{
    FI_REAL(ssize_t, "pread", (int, void *, size_t, off_t));
    FI_FAIL_IF(FI_PREAD, "pread", fd, -1);
    return real_fn(fd, buf, n, off);
}

ssize_t pread64(int fd, void *buf, size_t n, off64_t off)
{
    FI_REAL(ssize_t, "pread64", (int, void *, size_t, off64_t));
    FI_FAIL_IF(FI_PREAD, "pread", fd, -1);
    return real_fn(fd, buf, n, off);
}

ssize_t preadv(int fd, const struct iovec *iov, int cnt, off_t off)
{
    FI_REAL(ssize_t, "preadv", (int, const struct iovec *, int, off_t));
    FI_FAIL_IF(FI_PREAD, "pread", fd, -1);
    return real_fn(fd, iov, cnt, off);
}

ssize_t preadv64(int fd, const struct iovec *iov, int cnt, off64_t off)
{
    FI_REAL(ssize_t, "preadv64", (int, const struct iovec *, int, off64_t));
    FI_FAIL_IF(FI_PREAD, "pread", fd, -1);
    return real_fn(fd, iov, cnt, off);
}

int fallocate(int fd, int mode, off_t off, off_t len)
{
    FI_REAL(int, "fallocate", (int, int, off_t, off_t));
    FI_FAIL_IF(FI_FALLOCATE, "fallocate", fd, -1);
    return real_fn(fd, mode, off, len);
}

int fallocate64(int fd, int mode, off64_t off, off64_t len)
{
    FI_REAL(int, "fallocate64", (int, int, off64_t, off64_t));
    FI_FAIL_IF(FI_FALLOCATE, "fallocate", fd, -1);
    return real_fn(fd, mode, off, len);
}

int ftruncate(int fd, off_t len)
{
    FI_REAL(int, "ftruncate", (int, off_t));
    FI_FAIL_IF(FI_FTRUNCATE, "ftruncate", fd, -1);
    return real_fn(fd, len);
}

int ftruncate64(int fd, off64_t len)
{
    FI_REAL(int, "ftruncate64", (int, off64_t));
    FI_FAIL_IF(FI_FTRUNCATE, "ftruncate", fd, -1);
    return real_fn(fd, len);
}
