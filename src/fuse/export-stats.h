/*
 * export-stats.h: the I/O counters of one export (design.md "Counters").
 *
 * Every guest request that reaches an export's read, write, fsync or
 * fallocate handler is counted once: export_stats_begin() when the
 * handler has found its export, export_stats_end() right before the
 * reply.  Counting before the reply means that a client that has its
 * answer (its write returned) and then reads the counters sees its own
 * request in them, and in_flight back to 0 once every request returned.
 *
 * The counters are C11 atomics, each updated on its own: the I/O path
 * takes no lock for them, and a reader may see one request's count
 * without its bytes yet (the snapshot is not one instant, each value is
 * exact).
 */
#ifndef CHAINFS_EXPORT_STATS_H
#define CHAINFS_EXPORT_STATS_H

#include <stdatomic.h>
#include <stdint.h>

#include <glib.h>

/* What a counted request was. */
typedef enum {
    EXPORT_OP_READ,
    EXPORT_OP_WRITE,
    EXPORT_OP_FLUSH,    /* fsync / fdatasync: what makes writes durable */
    EXPORT_OP_DISCARD,  /* fallocate punch-hole or zero-range */
} ExportOp;

typedef struct ExportStats {
    atomic_uint_fast64_t reads;
    atomic_uint_fast64_t writes;
    atomic_uint_fast64_t flushes;
    atomic_uint_fast64_t discards;
    atomic_uint_fast64_t read_bytes;      /* bytes served by reads */
    atomic_uint_fast64_t written_bytes;   /* bytes acknowledged to writes */
    atomic_uint_fast64_t discarded_bytes; /* bytes made to read as zeros */
    atomic_uint_fast64_t errors;          /* requests answered with an error */
    atomic_uint_fast64_t in_flight;       /* begun and not yet answered */
} ExportStats;

void export_stats_init(ExportStats *s);
/* A request has reached its export's handler. */
void export_stats_begin(ExportStats *s);
/*
 * The request is about to be answered: err 0 and bytes the length it
 * moved (read, written or zeroed), or err the positive errno it fails
 * with (its bytes are not counted).  Counted in its op either way.
 */
void export_stats_end(ExportStats *s, ExportOp op, uint64_t bytes, int err);
/* {"reads":...,"in_flight":...}: newly allocated, no newline. */
char *export_stats_json(ExportStats *s);

#endif
