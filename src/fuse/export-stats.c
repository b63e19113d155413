/*
 * export-stats.c: the I/O counters of one export (export-stats.h).
 */
#include "export-stats.h"
#include "json.h"

void export_stats_init(ExportStats *s)
{
    atomic_init(&s->reads, 0);
    atomic_init(&s->writes, 0);
    atomic_init(&s->flushes, 0);
    atomic_init(&s->discards, 0);
    atomic_init(&s->read_bytes, 0);
    atomic_init(&s->written_bytes, 0);
    atomic_init(&s->discarded_bytes, 0);
    atomic_init(&s->errors, 0);
    atomic_init(&s->in_flight, 0);
}

void export_stats_begin(ExportStats *s)
{
    atomic_fetch_add(&s->in_flight, 1);
}

void export_stats_end(ExportStats *s, ExportOp op, uint64_t bytes, int err)
{
    atomic_uint_fast64_t *count = &s->reads;
    atomic_uint_fast64_t *moved = NULL;

    switch (op) {
    case EXPORT_OP_READ:
        count = &s->reads;
        moved = &s->read_bytes;
        break;
    case EXPORT_OP_WRITE:
        count = &s->writes;
        moved = &s->written_bytes;
        break;
    case EXPORT_OP_FLUSH:
        count = &s->flushes;
        break;
    case EXPORT_OP_DISCARD:
        count = &s->discards;
        moved = &s->discarded_bytes;
        break;
    }
    atomic_fetch_add(count, 1);
    if (err) {
        atomic_fetch_add(&s->errors, 1);
    } else if (moved && bytes) {
        atomic_fetch_add(moved, bytes);
    }
    /* Last: a reader that loads in_flight first and sees it 0 sees the
     * counts above too (export_stats_json). */
    atomic_fetch_sub(&s->in_flight, 1);
}

char *export_stats_json(ExportStats *s)
{
    /* First: when it is 0, every request that ended before this load has
     * its counts in the loads below (export_stats_end's order). */
    uint64_t in_flight = atomic_load(&s->in_flight);
    GString *out = g_string_new("{");

    json_append_member_uint(out, "reads", atomic_load(&s->reads));
    json_append_member_uint(out, "writes", atomic_load(&s->writes));
    json_append_member_uint(out, "flushes", atomic_load(&s->flushes));
    json_append_member_uint(out, "discards", atomic_load(&s->discards));
    json_append_member_uint(out, "read_bytes", atomic_load(&s->read_bytes));
    json_append_member_uint(out, "written_bytes",
                            atomic_load(&s->written_bytes));
    json_append_member_uint(out, "discarded_bytes",
                            atomic_load(&s->discarded_bytes));
    json_append_member_uint(out, "errors", atomic_load(&s->errors));
    json_append_member_uint(out, "in_flight", in_flight);
    g_string_append_c(out, '}');
    return g_string_free(out, FALSE);
}
