/*
 * options.c: the command words of design.md's commit and stream commands,
 * and sizes with K, M, G suffixes (powers of 1024).
 *
 * Parsing is strict: an unknown word, a repeated value word or a malformed
 * value refuses the whole command with EINVAL and a message that names the
 * word, because a typo in "on-eror=stop" must not silently run a job with
 * the default policy.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <string.h>

#include "merge-int.h"

bool parse_size(const char *text, uint64_t *out)
{
    uint64_t value = 0, mult = 1;
    const char *p = text;

    if (!text || !*text) {
        return false;
    }
    if (*p < '0' || *p > '9') {
        return false;
    }
    while (*p >= '0' && *p <= '9') {
        uint64_t digit = (uint64_t)(*p - '0');

        if (value > (UINT64_MAX - digit) / 10) {
            return false;
        }
        value = value * 10 + digit;
        p++;
    }
    switch (*p) {
    case '\0':
        break;
    case 'k': case 'K':
        mult = 1024ULL;
        p++;
        break;
    case 'm': case 'M':
        mult = 1024ULL * 1024;
        p++;
        break;
    case 'g': case 'G':
        mult = 1024ULL * 1024 * 1024;
        p++;
        break;
    default:
        return false;
    }
    /* "50M" and "50MiB" are both fine; "50MB" is 50 MiB too (as virsh). */
    if (mult > 1 && (strcmp(p, "iB") == 0 || strcmp(p, "B") == 0 ||
                     strcmp(p, "ib") == 0 || strcmp(p, "b") == 0)) {
        p += strlen(p);
    }
    if (*p != '\0') {
        return false;
    }
    if (value > UINT64_MAX / mult) {
        return false;
    }
    *out = value * mult;
    return true;
}

static bool options_parse_policy(const char *value, OnErrorPolicy *out,
                                 GError **error)
{
    if (strcmp(value, "report") == 0) {
        *out = ON_ERROR_REPORT;
    } else if (strcmp(value, "stop") == 0) {
        *out = ON_ERROR_STOP;
    } else if (strcmp(value, "ignore") == 0) {
        *out = ON_ERROR_IGNORE;
    } else {
        chainfs_set_error(error, EINVAL,
                          "bad on-error policy \"%s\": report, stop or ignore",
                          value);
        return false;
    }
    return true;
}

/* A layer name: one file name of the image directory. */
static bool options_check_file(const char *word, const char *value,
                               GError **error)
{
    if (value[0] == '\0') {
        chainfs_set_error(error, EINVAL, "%s needs a file name", word);
        return false;
    }
    return true;
}

static bool options_set_string(char **field, const char *key,
                               const char *value, GError **error)
{
    if (*field) {
        chainfs_set_error(error, EINVAL, "%s given twice", key);
        return false;
    }
    if (!options_check_file(key, value, error)) {
        return false;
    }
    *field = g_strdup(value);
    return true;
}

static bool options_set_bandwidth(uint64_t *field, const char *value,
                                  GError **error)
{
    if (!parse_size(value, field)) {
        chainfs_set_error(error, EINVAL,
                          "bad bandwidth \"%s\": bytes per second, suffixes "
                          "K, M, G", value);
        return false;
    }
    return true;
}

/* What one command made of one word. */
typedef enum {
    OPTIONS_WORD_APPLIED,
    OPTIONS_WORD_REFUSED,   /* error set */
    OPTIONS_WORD_UNKNOWN,   /* not a word of this command */
} OptionsWordResult;

/* Apply the word KEY=VALUE, or a bare KEY (value NULL), to opts. */
typedef OptionsWordResult (*OptionsApplyWord)(void *opts, const char *key,
                                              const char *value,
                                              GError **error);

static OptionsWordResult options_word_result(bool ok)
{
    return ok ? OPTIONS_WORD_APPLIED : OPTIONS_WORD_REFUSED;
}

/* base=, bandwidth= and on-error=, which commit and stream both take. */
static OptionsWordResult options_apply_shared_word(const char *key,
                                                   const char *value,
                                                   char **base,
                                                   uint64_t *bandwidth,
                                                   OnErrorPolicy *on_error,
                                                   GError **error)
{
    if (!value) {
        return OPTIONS_WORD_UNKNOWN;
    }
    if (strcmp(key, "base") == 0) {
        return options_word_result(options_set_string(base, key, value,
                                                      error));
    }
    if (strcmp(key, "bandwidth") == 0) {
        return options_word_result(options_set_bandwidth(bandwidth, value,
                                                         error));
    }
    if (strcmp(key, "on-error") == 0) {
        return options_word_result(options_parse_policy(value, on_error,
                                                        error));
    }
    return OPTIONS_WORD_UNKNOWN;
}

/*
 * Split words at blanks and hand each word to apply.  A word apply does
 * not know refuses the whole command, naming the command and listing
 * synopsis, the words it takes.
 */
static bool options_parse_words(const char *words, const char *command,
                                const char *synopsis, OptionsApplyWord apply,
                                void *opts, GError **error)
{
    g_auto(GStrv) list = g_strsplit_set(words ? words : "", " \t\n", -1);

    for (guint i = 0; list[i]; i++) {
        const char *w = list[i];
        const char *eq = strchr(w, '=');
        g_autofree char *key = NULL;

        if (w[0] == '\0') {
            continue;
        }
        key = eq ? g_strndup(w, (gsize)(eq - w)) : g_strdup(w);
        switch (apply(opts, key, eq ? eq + 1 : NULL, error)) {
        case OPTIONS_WORD_APPLIED:
            break;
        case OPTIONS_WORD_REFUSED:
            return false;
        case OPTIONS_WORD_UNKNOWN:
            chainfs_set_error(error, EINVAL,
                              "unknown %s word \"%s\" (words: %s)", command,
                              w, synopsis);
            return false;
        }
    }
    return true;
}

/* The flag a bare commit word sets; NULL when it names none. */
static bool *commit_options_flag(CommitOptions *opts, const char *key)
{
    if (strcmp(key, "shallow") == 0) {
        return &opts->shallow;
    }
    if (strcmp(key, "active") == 0) {
        return &opts->active;
    }
    if (strcmp(key, "delete") == 0) {
        return &opts->delete_dropped;
    }
    if (strcmp(key, "keep-relative") == 0) {
        return &opts->keep_relative;
    }
    if (strcmp(key, "force") == 0) {
        return &opts->force;
    }
    return NULL;
}

static OptionsWordResult commit_options_apply_word(void *data, const char *key,
                                                   const char *value,
                                                   GError **error)
{
    CommitOptions *opts = data;
    bool *flag = value ? NULL : commit_options_flag(opts, key);

    if (flag) {
        *flag = true;
        return OPTIONS_WORD_APPLIED;
    }
    if (value && strcmp(key, "top") == 0) {
        return options_word_result(options_set_string(&opts->top, key, value,
                                                      error));
    }
    return options_apply_shared_word(key, value, &opts->base,
                                     &opts->bandwidth, &opts->on_error, error);
}

static OptionsWordResult stream_options_apply_word(void *data, const char *key,
                                                   const char *value,
                                                   GError **error)
{
    StreamOptions *opts = data;

    return options_apply_shared_word(key, value, &opts->base,
                                     &opts->bandwidth, &opts->on_error, error);
}

/*
 * On entry opts is zeroed or cleared.  On success every word of words is
 * applied; on failure opts holds what was parsed so far (clear it).
 */
bool commit_options_parse(const char *words, CommitOptions *opts,
                          GError **error)
{
    memset(opts, 0, sizeof(*opts));
    if (!options_parse_words(words, "commit",
                             "top=FILE base=FILE shallow active delete "
                             "keep-relative bandwidth=N "
                             "on-error=report|stop|ignore force",
                             commit_options_apply_word, opts, error)) {
        return false;
    }
    if (opts->shallow && opts->base) {
        chainfs_set_error(error, EINVAL,
                          "shallow and base= cannot be used together");
        return false;
    }
    return true;
}

bool stream_options_parse(const char *words, StreamOptions *opts,
                          GError **error)
{
    memset(opts, 0, sizeof(*opts));
    return options_parse_words(words, "stream",
                               "base=FILE bandwidth=N "
                               "on-error=report|stop|ignore",
                               stream_options_apply_word, opts, error);
}

void commit_options_clear(CommitOptions *opts)
{
    g_clear_pointer(&opts->top, g_free);
    g_clear_pointer(&opts->base, g_free);
}

void stream_options_clear(StreamOptions *opts)
{
    g_clear_pointer(&opts->base, g_free);
}

static const char *const options_policy_names[] = {
    [ON_ERROR_REPORT] = "report",
    [ON_ERROR_STOP] = "stop",
    [ON_ERROR_IGNORE] = "ignore",
};

const char *on_error_policy_name(OnErrorPolicy p)
{
    return (unsigned)p < G_N_ELEMENTS(options_policy_names) ?
           options_policy_names[p] : "report";
}

/*
 * End the words of commit_options_format() and stream_options_format()
 * with the ones both share: bandwidth= when limited, and on-error= always,
 * so that a resumed job keeps the policy it ran with.  Returns the text,
 * s freed.
 */
static char *options_format_finish(GString *s, uint64_t bandwidth,
                                   OnErrorPolicy on_error)
{
    if (bandwidth) {
        g_string_append_printf(s, "bandwidth=%" G_GUINT64_FORMAT " ",
                               bandwidth);
    }
    g_string_append_printf(s, "on-error=%s", on_error_policy_name(on_error));
    return g_string_free(s, FALSE);
}

/* Words that parse back into the same options (for checkpoints). */
char *commit_options_format(const CommitOptions *opts)
{
    GString *s = g_string_new(NULL);

    if (opts->top) {
        g_string_append_printf(s, "top=%s ", opts->top);
    }
    if (opts->base) {
        g_string_append_printf(s, "base=%s ", opts->base);
    }
    if (opts->shallow) {
        g_string_append(s, "shallow ");
    }
    if (opts->active) {
        g_string_append(s, "active ");
    }
    if (opts->delete_dropped) {
        g_string_append(s, "delete ");
    }
    if (opts->keep_relative) {
        g_string_append(s, "keep-relative ");
    }
    if (opts->force) {
        g_string_append(s, "force ");
    }
    return options_format_finish(s, opts->bandwidth, opts->on_error);
}

char *stream_options_format(const StreamOptions *opts)
{
    GString *s = g_string_new(NULL);

    if (opts->base) {
        g_string_append_printf(s, "base=%s ", opts->base);
    }
    return options_format_finish(s, opts->bandwidth, opts->on_error);
}
