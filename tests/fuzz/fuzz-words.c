/*
 * fuzz-words: the commit and stream words (src/merge/options.c) and sizes.
 *
 * Beyond "no crash, no leak, no UB", it checks what checkpoints rely on:
 * words that parse are formatted back (commit_options_format) into words
 * that parse into the same options, so that a resumed job runs as the one
 * that was cut off.  The first byte picks the parser; the rest are words.
 */
#include <string.h>

#include "fuzz-common.h"
#include "merge-int.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_quiet_logs();
    return 0;
}

static bool fuzz_same_string(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static void fuzz_commit_words(const char *words)
{
    CommitOptions opts = { 0 }, again = { 0 };
    g_autoptr(GError) error = NULL;

    if (!commit_options_parse(words, &opts, &error)) {
        g_assert(error && error->message[0]);
        commit_options_clear(&opts);
        return;
    }
    g_autofree char *formatted = commit_options_format(&opts);

    if (!commit_options_parse(formatted, &again, NULL)) {
        g_error("commit words \"%s\" formatted as \"%s\", which do not parse",
                words, formatted);
    }
    if (!fuzz_same_string(opts.top, again.top) ||
        !fuzz_same_string(opts.base, again.base) ||
        opts.shallow != again.shallow || opts.active != again.active ||
        opts.delete_dropped != again.delete_dropped ||
        opts.keep_relative != again.keep_relative ||
        opts.force != again.force || opts.bandwidth != again.bandwidth ||
        opts.on_error != again.on_error) {
        g_error("commit words \"%s\" do not survive formatting as \"%s\"",
                words, formatted);
    }
    commit_options_clear(&opts);
    commit_options_clear(&again);
}

static void fuzz_stream_words(const char *words)
{
    StreamOptions opts = { 0 }, again = { 0 };
    g_autoptr(GError) error = NULL;

    if (!stream_options_parse(words, &opts, &error)) {
        g_assert(error && error->message[0]);
        stream_options_clear(&opts);
        return;
    }
    g_autofree char *formatted = stream_options_format(&opts);

    if (!stream_options_parse(formatted, &again, NULL)) {
        g_error("stream words \"%s\" formatted as \"%s\", which do not parse",
                words, formatted);
    }
    if (!fuzz_same_string(opts.base, again.base) ||
        opts.bandwidth != again.bandwidth || opts.on_error != again.on_error) {
        g_error("stream words \"%s\" do not survive formatting as \"%s\"",
                words, formatted);
    }
    stream_options_clear(&opts);
    stream_options_clear(&again);
}

/* A size that parses prints back as a number that parses to itself. */
static void fuzz_size(const char *text)
{
    uint64_t value, again;

    if (!parse_size(text, &value)) {
        return;
    }
    g_autofree char *digits = g_strdup_printf("%" G_GUINT64_FORMAT, value);

    if (!parse_size(digits, &again) || again != value) {
        g_error("size \"%s\" = %" G_GUINT64_FORMAT " does not parse back",
                text, value);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) {
        return 0;
    }
    g_autofree char *words = fuzz_input_string(data + 1, size - 1);

    switch (data[0] % 3) {
    case 0:
        fuzz_commit_words(words);
        break;
    case 1:
        fuzz_stream_words(words);
        break;
    default:
        fuzz_size(words);
        break;
    }
    return 0;
}
