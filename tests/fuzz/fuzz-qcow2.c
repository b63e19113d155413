/*
 * fuzz-qcow2: open the fuzz input as a qcow2 image the way chainfs does
 * (an ImageSet on a directory, chain_open on the file) and read through it.
 *
 * The directory is made once per process and holds the input as
 * fuzz.qcow2 and a fixed 1 MiB raw file base.raw with a pattern, so an
 * input that names "base.raw" as its backing file gets a real chain (the
 * seeds made by make-seeds.sh do); any other reference resolves inside
 * the directory to nothing, itself (a loop) or outside it, and is refused.
 *
 * Per input: the chain's description (user.chainfs.chain), the whole
 * disk's runs (chain_range_kind, bounded in count so that a huge sparse
 * disk stays fast), a few reads at fixed and
 * input-derived offsets, and then the same on a read-write copy with a
 * partial-cluster write, a zero write and a flush, all of which may fail
 * but must not crash, hang, leak or read out of bounds.
 *
 * Set FUZZ_QCOW2_DIR to keep the directory somewhere else (default: a new
 * directory in /dev/shm, else under $TMPDIR or /tmp, removed at exit).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <glib/gstdio.h>

#include "chain-info.h"
#include "chain-io.h"
#include "chain.h"
#include "fuzz-common.h"

#define FUZZ_BASE_SIZE (1024 * 1024)
#define FUZZ_MAX_RUNS 4096            /* chain_range_kind calls per disk */
#define FUZZ_MAX_READ (256 * 1024)    /* bytes per pread */

static char *fuzz_dir;

static void fuzz_remove_dir(void)
{
    const char *names[] = { "fuzz.qcow2", "copy.qcow2", "base.raw" };

    for (size_t i = 0; i < G_N_ELEMENTS(names); i++) {
        g_autofree char *p = g_build_filename(fuzz_dir, names[i], NULL);
        g_unlink(p);
    }
    g_rmdir(fuzz_dir);
}

static void fuzz_write_file(const char *name, const void *data, size_t size)
{
    g_autofree char *path = g_build_filename(fuzz_dir, name, NULL);
    const uint8_t *p = data;
    int fd;

    /* A new inode per input, as a new image; no fsync (that is what made
     * g_file_set_contents cost most of the time). */
    g_unlink(path);
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        g_error("fuzz-qcow2: %s: %s", path, g_strerror(errno));
    }
    while (size > 0) {
        ssize_t n = write(fd, p, size);

        if (n <= 0) {
            g_error("fuzz-qcow2: writing %s: %s", path, g_strerror(errno));
        }
        p += n;
        size -= (size_t)n;
    }
    close(fd);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    g_autoptr(GError) error = NULL;
    const char *dir = g_getenv("FUZZ_QCOW2_DIR");
    uint8_t *base = g_malloc(FUZZ_BASE_SIZE);

    fuzz_quiet_logs();
    if (dir) {
        g_mkdir_with_parents(dir, 0700);
        fuzz_dir = g_strdup(dir);
    } else {
        /* tmpfs when there is one: the library's fdatasync is free there. */
        fuzz_dir = g_file_test("/dev/shm", G_FILE_TEST_IS_DIR)
            ? g_mkdtemp(g_strdup("/dev/shm/fuzz-qcow2-XXXXXX"))
            : g_dir_make_tmp("fuzz-qcow2-XXXXXX", &error);
        if (!fuzz_dir) {
            g_error("fuzz-qcow2: %s", error->message);
        }
        atexit(fuzz_remove_dir);
    }
    for (size_t i = 0; i < FUZZ_BASE_SIZE; i++) {
        base[i] = (uint8_t)(i / 512 + 1);
    }
    fuzz_write_file("base.raw", base, FUZZ_BASE_SIZE);
    g_free(base);
    return 0;
}

/* Runs of the whole disk, at most FUZZ_MAX_RUNS of them. */
static void fuzz_walk(Chain *chain, uint64_t size)
{
    uint64_t offset = 0;

    for (int i = 0; i < FUZZ_MAX_RUNS && offset < size; i++) {
        uint64_t pnum = 0;
        int kind = chain_range_kind(chain, offset, size - offset, &pnum);

        if (kind < 0) {
            return;
        }
        g_assert(kind == CHAIN_HOLE || kind == CHAIN_DATA);
        g_assert(pnum > 0 && pnum <= size - offset);
        offset += pnum;
    }
}

/* Read [offset, offset + len) clamped to the disk. */
static void fuzz_read(Chain *chain, uint64_t size, uint64_t offset,
                      uint64_t len, uint8_t *buf)
{
    if (offset >= size) {
        return;
    }
    len = MIN(len, size - offset);
    len = MIN(len, FUZZ_MAX_READ);
    if (len > 0) {
        (void)chain_pread(chain, offset, buf, len);
    }
}

/* A little-endian number from the input's last bytes, to pick offsets. */
static uint64_t fuzz_tail_word(const uint8_t *data, size_t size, size_t k)
{
    uint64_t v = 0;

    for (size_t i = 0; i < 8 && (k + 1) * 8 <= size; i++) {
        v |= (uint64_t)data[size - (k + 1) * 8 + i] << (8 * i);
    }
    return v;
}

static void fuzz_reads(Chain *chain, const uint8_t *data, size_t size)
{
    uint64_t disk = chain_size(chain);
    g_autofree uint8_t *buf = g_malloc(FUZZ_MAX_READ);
    uint32_t cs = chain_layer(chain, 0)->cluster_size;
    g_autofree char *info = chain_info_json(chain); /* user.chainfs.chain */

    g_assert(info && info[0] == '{');
    fuzz_walk(chain, disk);
    fuzz_read(chain, disk, 0, 65536, buf);
    fuzz_read(chain, disk, cs > 1 ? cs - 1 : 0, 2, buf); /* across a cluster */
    if (disk > 65536) {
        fuzz_read(chain, disk, disk - 65536, 65536, buf);
    }
    for (size_t k = 0; k < 2 && disk > 0; k++) {
        uint64_t w = fuzz_tail_word(data, size, k);

        fuzz_read(chain, disk, w % disk, (w >> 40) % FUZZ_MAX_READ + 1, buf);
    }
}

static void fuzz_writes(Chain *chain, const uint8_t *data, size_t size)
{
    uint64_t disk = chain_size(chain);
    uint8_t buf[8192];

    if (disk == 0) {
        return;
    }
    memset(buf, 0xa5, sizeof(buf));
    uint64_t w = fuzz_tail_word(data, size, 2);
    uint64_t offset = w % disk;
    uint64_t len = MIN((uint64_t)sizeof(buf), disk - offset);

    if (chain_pwrite(chain, offset, buf, len) == 0) {
        (void)chain_pread(chain, offset, buf, len);
    }
    offset = (w >> 32) % disk;
    (void)chain_pwrite_zeroes(chain, offset, MIN(65536, disk - offset));
    (void)chain_flush(chain);
}

static void fuzz_open_and_run(const char *name, bool writable,
                              const uint8_t *data, size_t size)
{
    g_autoptr(GError) error = NULL;
    ImageSet *set = image_set_new(fuzz_dir, &error);
    Chain *chain;

    g_assert(set);
    chain = chain_open(set, name, NULL, writable, &error);
    if (chain) {
        fuzz_reads(chain, data, size);
        if (writable) {
            fuzz_writes(chain, data, size);
        }
        chain_free(chain);
    } else {
        g_assert(error && error->message[0]);
    }
    image_set_free(set);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_write_file("fuzz.qcow2", data, size);
    fuzz_open_and_run("fuzz.qcow2", false, data, size);
    fuzz_write_file("copy.qcow2", data, size);
    fuzz_open_and_run("copy.qcow2", true, data, size);
    return 0;
}
