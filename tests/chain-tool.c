/*
 * chain-tool: drives src/chain directly, for the chain library's end-to-end
 * tests (tests/test_chain_*.py).  No FUSE, no daemon: what it reads and
 * writes goes through chain_open / chain_pread / chain_pwrite only, so a
 * difference from qemu-img is the library's.
 *
 *   chain-tool open IMAGE [--rw]
 *       Resolve IMAGE's chain (through an ImageSet on IMAGE's directory) and
 *       print one line per layer, active first: "NAME FORMAT VSIZE CLUSTER".
 *   chain-tool read IMAGE OUT [--seed N]
 *       Write the whole flat disk to OUT with chain_pread, in chunks of
 *       seeded varying sizes (so most reads start and end unaligned).
 *   chain-tool status IMAGE
 *       Print the runs of chain_range_kind: "OFFSET LENGTH data|hole".
 *   chain-tool randwrite IMAGE --seed N --count N [--max-len N]
 *                        [--zero-pct P] [--threads T [--stripe S]]
 *                        [--flush-every K] [--model MODEL.raw]
 *       Seeded random unaligned writes (and P% zero writes) into the active
 *       layer, then chain_flush; the same writes applied to MODEL.raw, and
 *       the disk read back through the still open chain must equal it.  With
 *       --flush-every K, flush after every K writes and print "acked N"
 *       (line-buffered) once writes 1..N are durable.  With --threads T,
 *       write i goes to thread i % T, which owns a disjoint slice of the
 *       disk, so the end state does not depend on scheduling; with
 *       --stripe S the slices are interleaved stripes of S bytes instead
 *       (thread t owns stripes t, t+T, ...), so threads race on clusters.
 *   chain-tool crashcheck ACTUAL.raw --initial INIT.raw --seed N --count N
 *                        --acked A --flush-every K [--max-len N] [--zero-pct P]
 *       After randwrite was killed: ACTUAL (the image converted to raw) must
 *       equal INIT with writes 1..A applied, except where a write in
 *       (A, A+K] -- the only ones that may have started -- touches a byte;
 *       such a byte may hold its old value or that of one of those writes.
 *
 * The plan of writes is a pure function of (seed, count, disk size,
 * max-len, zero-pct, threads): randwrite and crashcheck regenerate it
 * identically.  Errors go to stderr as "chain-tool: MESSAGE [ERRNO-NAME]",
 * exit status 1; wrong usage exits 2.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib.h>

#include "chain-io.h"
#include "chain.h"

/* ---------------------------------------------------------------- helpers */

static void tool_fail_errno(int errnum, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
static void tool_fail_errno(int errnum, const char *fmt, ...)
{
    va_list ap;
    const char *name = errnum > 0 ? strerrorname_np(errnum) : NULL;

    fputs("chain-tool: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    if (name) {
        fprintf(stderr, " [%s]", name);
    }
    fputc('\n', stderr);
}

/* The library's message alone, so tests see what it names by itself. */
static int tool_fail_gerror(GError *error)
{
    tool_fail_errno(chainfs_error_errno(error), "%s", error->message);
    return 1;
}

/* splitmix64: tiny, seedable, identical on every platform. */
static uint64_t tool_mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

typedef struct {
    uint64_t state;
} ToolRng;

static uint64_t tool_rng_next(ToolRng *rng)
{
    rng->state += 0x9e3779b97f4a7c15ULL;
    return tool_mix(rng->state);
}

/* Uniform in [lo, hi], hi >= lo. */
static uint64_t tool_rng_range(ToolRng *rng, uint64_t lo, uint64_t hi)
{
    return lo + tool_rng_next(rng) % (hi - lo + 1);
}

/*
 * What write `index` of plan `seed` stores: the 8-byte group holding disk
 * offset pos is one mix of (seed, index, pos / 8).  It depends on the
 * absolute position, so a write landing shifted, or a stale copy-on-write,
 * shows up as a mismatch.
 */
static inline uint64_t tool_data_word(uint64_t seed, uint64_t index,
                                      uint64_t pos)
{
    return tool_mix((seed * 0x100000001b3ULL) ^ (index << 40) ^ (pos >> 3));
}

static inline uint8_t tool_data_byte(uint64_t seed, uint64_t index,
                                     uint64_t pos)
{
    return (uint8_t)(tool_data_word(seed, index, pos) >> ((pos & 7) * 8));
}

/* tool_data_byte() for a whole range, one mix per 8 bytes: byte k of a
 * group is bits 8k.. of its word, which is the little-endian layout. */
static void tool_fill(uint8_t *buf, uint64_t seed, uint64_t index,
                      uint64_t offset, uint64_t len)
{
    uint64_t i = 0;

    for (; i < len && ((offset + i) & 7); i++) {
        buf[i] = tool_data_byte(seed, index, offset + i);
    }
    for (; i + 8 <= len; i += 8) {
        uint64_t le = GUINT64_TO_LE(tool_data_word(seed, index, offset + i));
        memcpy(buf + i, &le, 8);
    }
    for (; i < len; i++) {
        buf[i] = tool_data_byte(seed, index, offset + i);
    }
}

/* Split IMAGE into its directory and file name, and open its chain. */
static bool tool_open_chain(const char *image, bool writable, ImageSet **pset,
                            Chain **pchain)
{
    g_autoptr(GError) error = NULL;
    g_autofree char *dir = g_path_get_dirname(image);
    g_autofree char *base = g_path_get_basename(image);
    ImageSet *set = image_set_new(dir, &error);
    Chain *chain;

    if (!set) {
        tool_fail_gerror(error);
        return false;
    }
    chain = chain_open(set, base, NULL, writable, &error);
    if (!chain) {
        tool_fail_gerror(error);
        image_set_free(set);
        return false;
    }
    *pset = set;
    *pchain = chain;
    return true;
}

static void tool_close_chain(ImageSet *set, Chain *chain)
{
    chain_free(chain);
    image_set_free(set);
}

static bool tool_parse_u64(const char *text, uint64_t *out)
{
    char *end = NULL;
    guint64 v;

    if (!text || !*text) {
        return false;
    }
    errno = 0;
    v = g_ascii_strtoull(text, &end, 0);
    if (errno || !end || end == text) {
        return false;
    }
    switch (*end) {
    case 'k': case 'K': v <<= 10; end++; break;
    case 'm': case 'M': v <<= 20; end++; break;
    case 'g': case 'G': v <<= 30; end++; break;
    default: break;
    }
    if (*end) {
        return false;
    }
    *out = v;
    return true;
}

static int tool_usage(void)
{
    fputs("usage: chain-tool open IMAGE [--rw]\n"
          "       chain-tool read IMAGE OUT [--seed N]\n"
          "       chain-tool status IMAGE\n"
          "       chain-tool randwrite IMAGE --seed N --count N [--max-len N]\n"
          "                  [--zero-pct P] [--threads T [--stripe S]]\n"
          "                  [--flush-every K] [--model MODEL.raw]\n"
          "       chain-tool crashcheck ACTUAL.raw --initial INIT.raw --seed N\n"
          "                  --count N --acked A --flush-every K [--max-len N]\n"
          "                  [--zero-pct P]\n", stderr);
    return 2;
}

/* Options shared by the subcommands; positional arguments in pos[]. */
typedef struct {
    const char *pos[3];
    int npos;
    bool rw;
    uint64_t seed;
    uint64_t count;
    uint64_t max_len;
    uint64_t zero_pct;
    uint64_t threads;
    uint64_t flush_every;
    uint64_t stripe;
    uint64_t acked;
    bool have_acked;
    const char *model;
    const char *initial;
} ToolArgs;

static bool tool_parse_args(int argc, char **argv, ToolArgs *a)
{
    memset(a, 0, sizeof(*a));
    a->seed = 1;
    a->max_len = 65536 + 4096;
    a->zero_pct = 10;
    a->threads = 1;
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        uint64_t *num = NULL;
        const char **str = NULL;

        if (strcmp(arg, "--rw") == 0) {
            a->rw = true;
            continue;
        } else if (strcmp(arg, "--seed") == 0) {
            num = &a->seed;
        } else if (strcmp(arg, "--count") == 0) {
            num = &a->count;
        } else if (strcmp(arg, "--max-len") == 0) {
            num = &a->max_len;
        } else if (strcmp(arg, "--zero-pct") == 0) {
            num = &a->zero_pct;
        } else if (strcmp(arg, "--threads") == 0) {
            num = &a->threads;
        } else if (strcmp(arg, "--flush-every") == 0) {
            num = &a->flush_every;
        } else if (strcmp(arg, "--stripe") == 0) {
            num = &a->stripe;
        } else if (strcmp(arg, "--acked") == 0) {
            num = &a->acked;
            a->have_acked = true;
        } else if (strcmp(arg, "--model") == 0) {
            str = &a->model;
        } else if (strcmp(arg, "--initial") == 0) {
            str = &a->initial;
        } else if (arg[0] == '-' && arg[1] == '-') {
            fprintf(stderr, "chain-tool: unknown option %s\n", arg);
            return false;
        } else {
            if (a->npos == G_N_ELEMENTS(a->pos)) {
                fprintf(stderr, "chain-tool: too many arguments\n");
                return false;
            }
            a->pos[a->npos++] = arg;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "chain-tool: %s needs a value\n", arg);
            return false;
        }
        i++;
        if (str) {
            *str = argv[i];
        } else if (!tool_parse_u64(argv[i], num)) {
            fprintf(stderr, "chain-tool: bad number for %s: %s\n", arg, argv[i]);
            return false;
        }
    }
    if (a->max_len == 0 || a->threads == 0 || a->threads > 64 ||
        a->zero_pct > 100) {
        fprintf(stderr, "chain-tool: --max-len, --threads or --zero-pct out of range\n");
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------ plan */

typedef struct {
    uint64_t offset;
    uint64_t len;
    bool zero;
} ToolWrite;

/*
 * The writes 1..count (plan[0] is write 1).  Write i belongs to thread
 * (i - 1) % threads and lies inside that thread's slice of the disk.  A
 * quarter of the writes are 4 KiB-aligned (whole clusters with small
 * cluster sizes, and the fast paths), the rest start and end anywhere;
 * half the zero writes are 64 KiB-aligned so v3 zero clusters get made.
 */
static ToolWrite *tool_plan(uint64_t seed, uint64_t count, uint64_t size,
                            uint64_t max_len, uint64_t zero_pct,
                            uint64_t threads, uint64_t stripe)
{
    ToolWrite *plan = g_new0(ToolWrite, count ? count : 1);
    ToolRng rng = { .state = seed };
    uint64_t slice = size / threads;
    uint64_t nstripes = stripe ? size / stripe : 0;

    for (uint64_t i = 0; i < count; i++) {
        uint64_t t = i % threads;
        uint64_t lo = t * slice;
        uint64_t hi = (t == threads - 1) ? size : lo + slice; /* exclusive */
        uint64_t room;

        if (nstripes >= threads) {
            /* Stripe j belongs to thread j % threads: neighbouring threads
             * write different parts of one cluster at the same time. */
            uint64_t mine = (nstripes - t + threads - 1) / threads;
            uint64_t j = t + threads * tool_rng_range(&rng, 0, mine - 1);
            lo = j * stripe;
            hi = lo + stripe;
        }
        room = hi - lo;
        uint64_t choice = tool_rng_range(&rng, 0, 99);
        bool zero = tool_rng_range(&rng, 0, 99) < zero_pct;
        uint64_t len, off;

        len = tool_rng_range(&rng, 1, MIN(max_len, room));
        if (choice < 25 && room >= 4096 && len >= 4096) {
            len &= ~(uint64_t)4095;
            off = lo + (tool_rng_range(&rng, 0, room - len) & ~(uint64_t)4095);
        } else if (zero && choice < 60 && room >= 131072 && max_len >= 65536) {
            len = 65536 * tool_rng_range(&rng, 1, MAX(1, MIN(max_len, room) / 65536));
            off = lo + (tool_rng_range(&rng, 0, room - len) & ~(uint64_t)65535);
        } else {
            off = lo + tool_rng_range(&rng, 0, room - len);
        }
        plan[i].offset = off;
        plan[i].len = len;
        plan[i].zero = zero;
    }
    return plan;
}

/* Apply writes [first, last) of the plan to a memory image. */
static void tool_apply(uint8_t *disk, const ToolWrite *plan, uint64_t seed,
                       uint64_t first, uint64_t last)
{
    for (uint64_t i = first; i < last; i++) {
        if (plan[i].zero) {
            memset(disk + plan[i].offset, 0, plan[i].len);
        } else {
            tool_fill(disk + plan[i].offset, seed, i + 1, plan[i].offset,
                      plan[i].len);
        }
    }
}

static bool tool_load_file(const char *path, uint8_t **data, uint64_t *len)
{
    g_autoptr(GError) error = NULL;
    gchar *contents = NULL;
    gsize n = 0;

    if (!g_file_get_contents(path, &contents, &n, &error)) {
        tool_fail_errno(0, "%s", error->message);
        return false;
    }
    *data = (uint8_t *)contents;
    *len = n;
    return true;
}

static bool tool_save_file(const char *path, const uint8_t *data, uint64_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    uint64_t done = 0;

    if (fd < 0) {
        tool_fail_errno(errno, "cannot open %s: %s", path, g_strerror(errno));
        return false;
    }
    while (done < len) {
        ssize_t n = pwrite(fd, data + done, MIN(len - done, 1 << 24), done);
        if (n <= 0) {
            int err = n < 0 ? errno : EIO;
            tool_fail_errno(err, "cannot write %s: %s", path, g_strerror(err));
            close(fd);
            return false;
        }
        done += n;
    }
    if (close(fd) < 0) {
        tool_fail_errno(errno, "cannot close %s: %s", path, g_strerror(errno));
        return false;
    }
    return true;
}

/* ------------------------------------------------------------ subcommands */

static int tool_cmd_open(ToolArgs *a)
{
    ImageSet *set;
    Chain *chain;

    if (a->npos != 1) {
        return tool_usage();
    }
    if (!tool_open_chain(a->pos[0], a->rw, &set, &chain)) {
        return 1;
    }
    for (guint i = 0; i < chain_depth(chain); i++) {
        ChainImage *img = chain_layer(chain, i);
        printf("%s %s %" PRIu64 " %" PRIu32 "\n", img->name,
               img->drv->format_name, img->virtual_size, img->cluster_size);
    }
    tool_close_chain(set, chain);
    return 0;
}

static int tool_cmd_read(ToolArgs *a)
{
    ImageSet *set;
    Chain *chain;
    ToolRng rng;
    uint64_t size, off = 0;
    g_autofree uint8_t *buf = NULL;
    int fd, ret = 0;
    const uint64_t buf_size = 3 * 1024 * 1024;

    if (a->npos != 2) {
        return tool_usage();
    }
    if (!tool_open_chain(a->pos[0], a->rw, &set, &chain)) {
        return 1;
    }
    fd = open(a->pos[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        tool_fail_errno(errno, "cannot open %s: %s", a->pos[1], g_strerror(errno));
        tool_close_chain(set, chain);
        return 1;
    }
    size = chain_size(chain);
    buf = g_malloc(buf_size);
    rng.state = a->seed;
    while (off < size) {
        /* Mostly odd sizes (unaligned ends), sometimes tiny, sometimes
         * spanning several clusters of any size up to 2 MiB. */
        uint64_t pick = tool_rng_range(&rng, 0, 9);
        uint64_t len;
        ssize_t n;

        if (pick == 0) {
            len = tool_rng_range(&rng, 1, 600);
        } else if (pick < 5) {
            len = tool_rng_range(&rng, 1, 200000);
        } else {
            len = tool_rng_range(&rng, 1, buf_size);
        }
        len = MIN(len, size - off);
        ret = chain_pread(chain, off, buf, len);
        if (ret < 0) {
            tool_fail_errno(-ret, "chain_pread at %" PRIu64 " +%" PRIu64 ": %s",
                            off, len, g_strerror(-ret));
            break;
        }
        n = pwrite(fd, buf, len, off);
        if (n != (ssize_t)len) {
            ret = -(n < 0 ? errno : EIO);
            tool_fail_errno(-ret, "cannot write %s: %s", a->pos[1], g_strerror(-ret));
            break;
        }
        off += len;
    }
    if (ret == 0 && ftruncate(fd, size) < 0) {
        ret = -errno;
        tool_fail_errno(errno, "cannot size %s: %s", a->pos[1], g_strerror(errno));
    }
    close(fd);
    tool_close_chain(set, chain);
    return ret < 0 ? 1 : 0;
}

static int tool_cmd_status(ToolArgs *a)
{
    ImageSet *set;
    Chain *chain;
    uint64_t size, off = 0;
    uint64_t run_start = 0;
    int run_kind = -1;
    int ret = 0;

    if (a->npos != 1) {
        return tool_usage();
    }
    if (!tool_open_chain(a->pos[0], a->rw, &set, &chain)) {
        return 1;
    }
    size = chain_size(chain);
    /* Merge adjacent runs of one kind: the library may split runs at
     * layer or map-region boundaries, which is no concern of SEEK_DATA. */
    while (off < size) {
        uint64_t pnum = 0;

        ret = chain_range_kind(chain, off, size - off, &pnum);
        if (ret < 0) {
            tool_fail_errno(-ret, "chain_range_kind at %" PRIu64 ": %s", off,
                            g_strerror(-ret));
            break;
        }
        if (pnum == 0 || pnum > size - off) {
            tool_fail_errno(EIO, "chain_range_kind at %" PRIu64
                            " returned a run of %" PRIu64, off, pnum);
            ret = -EIO;
            break;
        }
        if (ret != run_kind) {
            if (run_kind >= 0) {
                printf("%" PRIu64 " %" PRIu64 " %s\n", run_start, off - run_start,
                       run_kind == CHAIN_DATA ? "data" : "hole");
            }
            run_kind = ret;
            run_start = off;
        }
        off += pnum;
    }
    if (ret >= 0 && run_kind >= 0) {
        printf("%" PRIu64 " %" PRIu64 " %s\n", run_start, off - run_start,
               run_kind == CHAIN_DATA ? "data" : "hole");
    }
    tool_close_chain(set, chain);
    return ret < 0 ? 1 : 0;
}

typedef struct {
    Chain *chain;
    const ToolWrite *plan;
    uint64_t seed;
    uint64_t count;
    uint64_t threads;
    uint64_t thread;       /* this worker's index */
    uint64_t flush_every;  /* 0: flush once at the end (by main) */
    int ret;               /* first error, negative errno */
} ToolWorker;

static gpointer tool_worker_run(gpointer opaque)
{
    ToolWorker *w = opaque;
    g_autofree uint8_t *buf = NULL;
    uint64_t max_len = 0;

    for (uint64_t i = w->thread; i < w->count; i += w->threads) {
        max_len = MAX(max_len, w->plan[i].len);
    }
    buf = g_malloc(MAX(max_len, 1));
    for (uint64_t i = w->thread; i < w->count; i += w->threads) {
        const ToolWrite *wr = &w->plan[i];
        int ret;

        if (wr->zero) {
            ret = chain_pwrite_zeroes(w->chain, wr->offset, wr->len);
        } else {
            tool_fill(buf, w->seed, i + 1, wr->offset, wr->len);
            ret = chain_pwrite(w->chain, wr->offset, buf, wr->len);
        }
        if (ret < 0) {
            tool_fail_errno(-ret, "write %" PRIu64 " (%s at %" PRIu64 " +%" PRIu64
                            "): %s", i + 1, wr->zero ? "zeroes" : "data",
                            wr->offset, wr->len, g_strerror(-ret));
            w->ret = ret;
            return NULL;
        }
        /* Only single-threaded runs ack: writes 1..i are then all done. */
        if (w->flush_every && (i + 1) % w->flush_every == 0) {
            ret = chain_flush(w->chain);
            if (ret < 0) {
                tool_fail_errno(-ret, "flush after write %" PRIu64 ": %s", i + 1,
                                g_strerror(-ret));
                w->ret = ret;
                return NULL;
            }
            printf("acked %" PRIu64 "\n", i + 1);
        }
    }
    return NULL;
}

/*
 * Read the whole disk back through the chain still open (so through the
 * chain map as the writes left it, not one rebuilt from disk) and compare
 * with the model; every hole chain_range_kind reports must be zeros.
 */
static int tool_verify(Chain *chain, const uint8_t *model, uint64_t size)
{
    const uint64_t chunk = 1024 * 1024 + 4097; /* runs straddle clusters */
    g_autofree uint8_t *buf = g_malloc(chunk);
    uint64_t off;
    int ret;

    for (off = 0; off < size; off += chunk) {
        uint64_t len = MIN(chunk, size - off);

        ret = chain_pread(chain, off, buf, len);
        if (ret < 0) {
            tool_fail_errno(-ret, "verify: chain_pread at %" PRIu64 ": %s", off,
                            g_strerror(-ret));
            return ret;
        }
        if (memcmp(buf, model + off, len) != 0) {
            uint64_t i = 0;
            while (buf[i] == model[off + i]) {
                i++;
            }
            tool_fail_errno(EIO, "verify: byte %" PRIu64 " reads 0x%02x, the "
                            "model has 0x%02x", off + i, buf[i], model[off + i]);
            return -EIO;
        }
    }
    for (off = 0; off < size;) {
        uint64_t pnum = 0;

        ret = chain_range_kind(chain, off, size - off, &pnum);
        if (ret < 0 || pnum == 0 || pnum > size - off) {
            tool_fail_errno(ret < 0 ? -ret : EIO, "verify: chain_range_kind at %"
                            PRIu64 " returned %d, run %" PRIu64, off, ret, pnum);
            return ret < 0 ? ret : -EIO;
        }
        if (ret == CHAIN_HOLE) {
            for (uint64_t i = off; i < off + pnum; i++) {
                if (model[i]) {
                    tool_fail_errno(EIO, "verify: hole run %" PRIu64 "+%" PRIu64
                                    " but byte %" PRIu64 " is 0x%02x", off,
                                    pnum, i, model[i]);
                    return -EIO;
                }
            }
        }
        off += pnum;
    }
    return 0;
}

static int tool_cmd_randwrite(ToolArgs *a)
{
    ImageSet *set;
    Chain *chain;
    uint64_t size;
    g_autofree ToolWrite *plan = NULL;
    g_autofree ToolWorker *workers = NULL;
    g_autofree uint8_t *model = NULL;
    GThread **threads;
    int ret = 0;

    if (a->npos != 1 || a->count == 0) {
        return tool_usage();
    }
    if (a->flush_every && a->threads > 1) {
        fprintf(stderr, "chain-tool: --flush-every needs --threads 1\n");
        return 2;
    }
    if (!tool_open_chain(a->pos[0], true, &set, &chain)) {
        return 1;
    }
    size = chain_size(chain);
    if (size < a->threads) {
        tool_fail_errno(EINVAL, "disk of %" PRIu64 " bytes is too small", size);
        tool_close_chain(set, chain);
        return 1;
    }
    if (a->model) {
        uint64_t len;

        if (!tool_load_file(a->model, &model, &len)) {
            tool_close_chain(set, chain);
            return 1;
        }
        if (len != size) {
            tool_fail_errno(EINVAL, "model %s has %" PRIu64 " bytes, the disk %"
                            PRIu64, a->model, len, size);
            tool_close_chain(set, chain);
            return 1;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    plan = tool_plan(a->seed, a->count, size, a->max_len, a->zero_pct, a->threads,
                     a->threads > 1 ? a->stripe : 0);
    workers = g_new0(ToolWorker, a->threads);
    threads = g_new0(GThread *, a->threads);
    for (uint64_t t = 0; t < a->threads; t++) {
        workers[t] = (ToolWorker) {
            .chain = chain, .plan = plan, .seed = a->seed, .count = a->count,
            .threads = a->threads, .thread = t, .flush_every = a->flush_every,
        };
        if (a->threads == 1) {
            tool_worker_run(&workers[t]);
        } else {
            threads[t] = g_thread_new("writer", tool_worker_run, &workers[t]);
        }
    }
    for (uint64_t t = 0; t < a->threads; t++) {
        if (threads[t]) {
            g_thread_join(threads[t]);
        }
        if (workers[t].ret < 0 && ret == 0) {
            ret = workers[t].ret;
        }
    }
    g_free(threads);
    if (ret == 0) {
        ret = chain_flush(chain);
        if (ret < 0) {
            tool_fail_errno(-ret, "final flush: %s", g_strerror(-ret));
        } else if (a->flush_every && a->count % a->flush_every) {
            printf("acked %" PRIu64 "\n", a->count);
        }
    }
    if (ret == 0 && model) {
        tool_apply(model, plan, a->seed, 0, a->count);
        ret = tool_verify(chain, model, size);
    }
    tool_close_chain(set, chain);

    if (ret == 0 && model && !tool_save_file(a->model, model, size)) {
        return 1;
    }
    return ret < 0 ? 1 : 0;
}

static int tool_cmd_crashcheck(ToolArgs *a)
{
    g_autofree uint8_t *model = NULL;
    g_autofree uint8_t *actual = NULL;
    g_autofree ToolWrite *plan = NULL;
    uint64_t size, actual_len, first_open, last_open;
    uint64_t uncertain = 0, landed_new = 0;

    if (a->npos != 1 || !a->initial || a->count == 0 || !a->have_acked ||
        a->flush_every == 0 || a->acked > a->count || a->threads != 1) {
        return tool_usage();
    }
    if (!tool_load_file(a->initial, &model, &size) ||
        !tool_load_file(a->pos[0], &actual, &actual_len)) {
        return 1;
    }
    if (actual_len != size) {
        tool_fail_errno(EINVAL, "%s has %" PRIu64 " bytes, %s %" PRIu64,
                        a->pos[0], actual_len, a->initial, size);
        return 1;
    }
    plan = tool_plan(a->seed, a->count, size, a->max_len, a->zero_pct, 1, 0);
    tool_apply(model, plan, a->seed, 0, a->acked);
    /* Writes (acked, acked + K] may have started before the kill; later
     * ones cannot have: the tool would have printed another ack first. */
    first_open = a->acked;
    last_open = MIN(a->acked + a->flush_every, a->count);

    for (uint64_t pos = 0; pos < size; pos++) {
        bool ok;

        if (actual[pos] == model[pos]) {
            continue;
        }
        ok = false;
        for (uint64_t i = first_open; i < last_open && !ok; i++) {
            const ToolWrite *wr = &plan[i];
            if (pos >= wr->offset && pos < wr->offset + wr->len) {
                uint8_t v = wr->zero ? 0 : tool_data_byte(a->seed, i + 1, pos);
                ok = actual[pos] == v;
            }
        }
        if (!ok) {
            int owner = -1;
            for (uint64_t i = 0; i < a->count; i++) {
                if (pos >= plan[i].offset && pos < plan[i].offset + plan[i].len) {
                    owner = (int)(i + 1);
                }
            }
            tool_fail_errno(0, "byte %" PRIu64 " is 0x%02x, expected 0x%02x "
                            "(acked %" PRIu64 "; last write of the plan touching "
                            "it: %d)", pos, actual[pos], model[pos], a->acked,
                            owner);
            return 1;
        }
        landed_new++;
    }
    for (uint64_t i = first_open; i < last_open; i++) {
        uncertain += plan[i].len;
    }
    printf("ok: %" PRIu64 " bytes checked; writes %" PRIu64 "..%" PRIu64
           " in flight (%" PRIu64 " bytes), %" PRIu64 " bytes of them landed\n",
           size, first_open + 1, last_open, uncertain, landed_new);
    return 0;
}

int main(int argc, char **argv)
{
    ToolArgs args;
    const char *cmd;

    if (argc < 2) {
        return tool_usage();
    }
    cmd = argv[1];
    /* A chain 1024 deep holds an fd per layer: allow what the hard limit
     * allows, as QEMU does. */
    {
        struct rlimit rl;
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
            rl.rlim_cur = rl.rlim_max;
            setrlimit(RLIMIT_NOFILE, &rl);
        }
    }
    if (!tool_parse_args(argc - 2, argv + 2, &args)) {
        return 2;
    }
    if (strcmp(cmd, "open") == 0) {
        return tool_cmd_open(&args);
    } else if (strcmp(cmd, "read") == 0) {
        return tool_cmd_read(&args);
    } else if (strcmp(cmd, "status") == 0) {
        return tool_cmd_status(&args);
    } else if (strcmp(cmd, "randwrite") == 0) {
        return tool_cmd_randwrite(&args);
    } else if (strcmp(cmd, "crashcheck") == 0) {
        return tool_cmd_crashcheck(&args);
    }
    return tool_usage();
}
