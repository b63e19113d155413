/*
 * fuzz-control: lines written to MOUNTPOINT/.control, through the parser
 * the daemon uses (ctl_parse_line, src/fuse/control.c), then the words of
 * the command as its handler parses them (commit and stream words, sizes).
 *
 * What it checks beyond memory safety: a line that parses has a verb, a
 * name and words that lie inside the line and start at neither a blank
 * nor the name; a refused one has a message.
 */
#include <string.h>

#include "export.h"
#include "fuzz-common.h"
#include "merge.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_quiet_logs();
    return 0;
}

static void fuzz_words_of(const char *command, const char *words)
{
    if (strcmp(command, "commit") == 0) {
        CommitOptions opts = { 0 };

        (void)commit_options_parse(words, &opts, NULL);
        commit_options_clear(&opts);
    } else if (strcmp(command, "stream") == 0) {
        StreamOptions opts = { 0 };

        (void)stream_options_parse(words, &opts, NULL);
        stream_options_clear(&opts);
    } else if (strcmp(command, "job.speed") == 0) {
        uint64_t speed;

        (void)parse_size(words, &speed);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    g_auto(CtlLine) cl = { 0 };
    g_autoptr(GError) error = NULL;

    if (!ctl_parse_line((const char *)data, size, &cl, &error)) {
        g_assert(error && error->message[0]);
        return 0;
    }
    g_assert(cl.command && ctl_is_command(cl.command));
    g_assert(cl.parts[0] && cl.parts[1] && cl.parts[1][0]);
    g_assert(cl.words >= cl.line &&
             cl.words <= cl.line + strlen(cl.line));
    g_assert(!strchr(" \t\r\n", cl.words[0]) || cl.words[0] == '\0');
    fuzz_words_of(cl.command, cl.words);
    return 0;
}
