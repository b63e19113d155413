/*
 * image-refs.c: the references in an image header (see image-refs.h).
 *
 * Layout (docs/interop/qcow2.txt): magic, version, backing file offset and
 * length, cluster bits at byte 20; v3 has its header length at byte 100.
 * Header extensions follow the header, each a 4-byte type, a 4-byte length
 * and the data padded to 8 bytes, up to an end-of-extensions entry, the
 * backing file name or the end of the first cluster.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "image-refs.h"

#define REFS_MAGIC "QFI\xfb"
/* Shorter files are never taken for qcow2; longer ones with the magic
 * are, even when too short for a header, so that opening them says why. */
#define REFS_MIN_FILE 20
#define REFS_V2_HEADER_LEN 72
#define REFS_V3_HEADER_MIN 104
#define REFS_MIN_CLUSTER_BITS 9
#define REFS_MAX_CLUSTER_BITS 21
#define REFS_MAX_NAME 1023
#define REFS_EXT_END 0x00000000U
#define REFS_EXT_BACKING_FORMAT 0xe2792acaU
#define REFS_EXT_DATA_FILE 0x44415441U

static uint64_t refs_be64(const uint8_t *p)
{
    uint64_t v = 0;

    for (int i = 0; i < 8; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

static uint32_t refs_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
           ((uint32_t)p[2] << 8) | p[3];
}

/* Read exactly len bytes at off; 0 or a negative errno (EIO: short). */
static int refs_pread(int fd, void *buf, size_t len, uint64_t off)
{
    uint8_t *p = buf;

    while (len > 0) {
        ssize_t n = pread(fd, p, len, off);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            return -errno;
        }
        if (n == 0) {
            return -EIO;
        }
        p += n;
        off += n;
        len -= n;
    }
    return 0;
}

/*
 * Walk the extensions in buf[0, len) and keep the two that name files.
 * A malformed list just ends the walk: the driver refuses it at open.
 */
static void refs_parse_exts(const uint8_t *buf, uint64_t len,
                            ImageRefs *refs)
{
    uint64_t off = 0;

    while (off + 8 <= len) {
        uint32_t type = refs_be32(buf + off);
        uint32_t elen = refs_be32(buf + off + 4);

        if (type == REFS_EXT_END || off + 8 + (uint64_t)elen > len) {
            return;
        }
        const char *data = (const char *)buf + off + 8;

        if (type == REFS_EXT_BACKING_FORMAT && elen <= REFS_MAX_NAME) {
            g_free(refs->backing_fmt);
            refs->backing_fmt = g_strndup(data, elen);
        } else if (type == REFS_EXT_DATA_FILE && elen > 0 &&
                   elen <= REFS_MAX_NAME) {
            g_free(refs->data_file);
            refs->data_file = g_strndup(data, elen);
        }
        off += 8 + (((uint64_t)elen + 7) & ~7ULL);
    }
}

/* The extensions of a qcow2 header whose first bytes are in first. */
static int refs_read_exts(int fd, const uint8_t *first, uint64_t file_size,
                          uint64_t backing_off, ImageRefs *refs)
{
    uint32_t version = refs_be32(first + 4);
    uint32_t cluster_bits = refs_be32(first + 20);
    uint64_t start = REFS_V2_HEADER_LEN;

    if (cluster_bits < REFS_MIN_CLUSTER_BITS ||
        cluster_bits > REFS_MAX_CLUSTER_BITS) {
        return 0; /* the driver names the corruption */
    }
    if (version == 3) {
        start = refs_be32(first + 100);
        if (start < REFS_V3_HEADER_MIN) {
            return 0;
        }
    }

    uint64_t end = backing_off > start ? backing_off : 1ULL << cluster_bits;

    end = MIN(end, 1ULL << cluster_bits);
    end = MIN(end, file_size);
    if (end <= start) {
        return 0;
    }

    g_autofree uint8_t *buf = g_malloc(end - start);
    int ret = refs_pread(fd, buf, end - start, start);

    if (ret < 0) {
        return ret;
    }
    refs_parse_exts(buf, end - start, refs);
    return 0;
}

bool image_refs_read(int fd, const char *name, ImageRefs *refs,
                     GError **error)
{
    uint8_t first[REFS_V3_HEADER_MIN];
    struct stat st;
    int ret;

    memset(refs, 0, sizeof(*refs));
    if (fstat(fd, &st) < 0) {
        int err = errno;

        chainfs_set_error(error, err, "%s: %s", name, g_strerror(err));
        return false;
    }
    if ((uint64_t)st.st_size < REFS_MIN_FILE) {
        return true; /* too short for qcow2: raw, if anything */
    }
    memset(first, 0, sizeof(first));
    ret = refs_pread(fd, first, MIN(sizeof(first), (uint64_t)st.st_size), 0);
    if (ret < 0) {
        chainfs_set_error(error, -ret, "%s: cannot read header: %s", name,
                          g_strerror(-ret));
        return false;
    }
    if (memcmp(first, REFS_MAGIC, 4) != 0) {
        return true;
    }
    refs->qcow2 = true;

    uint32_t version = refs_be32(first + 4);
    uint64_t boff = refs_be64(first + 8);
    uint32_t blen = refs_be32(first + 16);

    if (version != 2 && version != 3) {
        chainfs_set_error(error, EOPNOTSUPP,
                          "%s: qcow2 version %u is not supported", name,
                          version);
        return false;
    }
    if (boff != 0 && blen != 0) {
        if (blen > REFS_MAX_NAME || boff + blen > (uint64_t)st.st_size) {
            chainfs_set_error(error, EINVAL,
                              "%s: corrupt backing file name in the header",
                              name);
            return false;
        }
        refs->backing = g_malloc0(blen + 1);
        ret = refs_pread(fd, refs->backing, blen, boff);
        if (ret < 0) {
            chainfs_set_error(error, -ret, "%s: cannot read backing file "
                              "name: %s", name, g_strerror(-ret));
            image_refs_clear(refs);
            return false;
        }
    }
    ret = refs_read_exts(fd, first, st.st_size, boff && blen ? boff : 0,
                         refs);
    if (ret < 0) {
        chainfs_set_error(error, -ret, "%s: cannot read header extensions: "
                          "%s", name, g_strerror(-ret));
        image_refs_clear(refs);
        return false;
    }
    return true;
}

void image_refs_clear(ImageRefs *refs)
{
    g_clear_pointer(&refs->backing, g_free);
    g_clear_pointer(&refs->backing_fmt, g_free);
    g_clear_pointer(&refs->data_file, g_free);
    refs->qcow2 = false;
}
