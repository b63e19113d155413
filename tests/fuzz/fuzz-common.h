/*
 * fuzz-common.h: what every libFuzzer target of chainfs shares.
 *
 * Log messages are dropped (a corrupt image logs on every input, and
 * printing would be most of the time spent), except criticals and errors:
 * a g_return_if_fail() that trips, or g_error(), is a bug the fuzzer must
 * keep the input of, so they abort.
 */
#ifndef CHAINFS_FUZZ_COMMON_H
#define CHAINFS_FUZZ_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <glib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static inline GLogWriterOutput fuzz_log_writer(GLogLevelFlags level,
                                               const GLogField *fields,
                                               gsize n_fields, gpointer data)
{
    if (level & (G_LOG_LEVEL_ERROR | G_LOG_LEVEL_CRITICAL)) {
        g_log_writer_standard_streams(level, fields, n_fields, data);
        abort();
    }
    return G_LOG_WRITER_HANDLED;
}

static inline void fuzz_quiet_logs(void)
{
    g_log_set_writer_func(fuzz_log_writer, NULL, NULL);
}

/* The input as a NUL-terminated string (a NUL inside ends it early, as it
 * would for a setxattr value or a C string from the kernel). */
static inline char *fuzz_input_string(const uint8_t *data, size_t size)
{
    return g_strndup((const char *)data, size);
}

#endif
