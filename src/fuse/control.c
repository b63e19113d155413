/*
 * control.c: the control surface (design.md "Control surface"): the
 * user.chainfs.* extended attributes of each export and the control file
 * at the mount root.  Both end in ctl_run_command(), which dispatches to
 * src/merge and turns a refusal into an errno plus last_error.
 *
 * Beyond design.md, the commit command takes the word dry-run: it starts
 * nothing and changes nothing, and on the control file its reply carries
 * the estimate of the room the commit needs in base (what its up-front
 * ENOSPC check compares) and the room base's filesystem has, which is what
 * `chainctl commit MOUNTPOINT/NAME --dry-run` prints.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <string.h>

#include "chain-info.h"
#include "chain-io.h"
#include "chain-log.h"
#include "export.h"
#include "json.h"

const char ctl_xattr_list[] =
    "user.chainfs.chain\0user.chainfs.job\0user.chainfs.last_error\0"
    "user.chainfs.stats";
const size_t ctl_xattr_list_len = sizeof(ctl_xattr_list);

static const char *const ctl_commands[] = {
    "commit", "stream", "snapshot", "job.pivot", "job.cancel", "job.pause",
    "job.resume", "job.speed", NULL,
};

bool ctl_is_command(const char *verb)
{
    return g_strv_contains(ctl_commands, verb);
}

/*
 * words without every copy of word; whether there was one.  The dry run
 * is a word of the control surface, not of the job: src/merge's parser
 * (commit_options_parse) refuses words it does not know, so it never sees
 * it.
 */
static bool ctl_take_word(const char *words, const char *word, char **rest)
{
    g_auto(GStrv) list = g_strsplit_set(words, " \t\r\n", -1);
    g_autoptr(GPtrArray) kept = g_ptr_array_new();
    bool found = false;

    for (guint i = 0; list[i]; i++) {
        if (strcmp(list[i], word) == 0) {
            found = true;
        } else if (list[i][0] != '\0') {
            g_ptr_array_add(kept, list[i]);
        }
    }
    g_ptr_array_add(kept, NULL);
    *rest = g_strjoinv(" ", (char **)kept->pdata);
    return found;
}

/*
 * commit ... dry-run: the estimate that the commit's up-front ENOSPC check
 * uses, as commit_estimate_json() in *estimate.  Starts nothing and writes
 * nothing.
 */
static bool ctl_commit_dry_run(Chain *chain, const CommitOptions *opts,
                               char **estimate, GError **error)
{
    CommitEstimate est;

    if (!merge_commit_estimate(chain, opts, &est, error)) {
        return false;
    }
    *estimate = commit_estimate_json(&est);
    commit_estimate_clear(&est);
    return true;
}

/*
 * On exit *error is set iff FALSE is returned.  *estimate (NULL when the
 * caller has no use for it) gets the estimate of a commit dry run, and
 * stays NULL for every other command.
 */
static bool ctl_dispatch(Daemon *d, Export *e, const char *verb,
                         const char *value, char **estimate, GError **error)
{
    Chain *chain = e->chain;

    if (strcmp(verb, "commit") == 0) {
        g_autofree char *job_words = NULL;
        g_autofree char *room = NULL;
        bool dry_run = ctl_take_word(value, "dry-run", &job_words);
        CommitOptions opts = { 0 };
        bool ok = commit_options_parse(job_words, &opts, error);

        if (ok && dry_run) {
            ok = ctl_commit_dry_run(chain, &opts, &room, error);
            if (ok && estimate) {
                *estimate = g_steal_pointer(&room);
            }
        } else if (ok) {
            ok = merge_start_commit(d->merge, chain, &opts, error);
        }
        commit_options_clear(&opts);
        return ok;
    }
    if (strcmp(verb, "stream") == 0) {
        StreamOptions opts = { 0 };
        bool ok = stream_options_parse(value, &opts, error) &&
                  merge_start_stream(d->merge, chain, &opts, error);
        stream_options_clear(&opts);
        return ok;
    }
    if (strcmp(verb, "snapshot") == 0) {
        if (value[0] == '\0' || strpbrk(value, " \t")) {
            chainfs_set_error(error, EINVAL,
                              "snapshot needs exactly one file name, got \"%s\"",
                              value);
            return false;
        }
        return merge_snapshot(d->merge, chain, value, error);
    }
    if (strcmp(verb, "job.pivot") == 0) {
        return merge_job_pivot(chain, error);
    }
    if (strcmp(verb, "job.cancel") == 0) {
        return merge_job_cancel(chain, error);
    }
    if (strcmp(verb, "job.pause") == 0) {
        return merge_job_pause(chain, error);
    }
    if (strcmp(verb, "job.resume") == 0) {
        return merge_job_resume(chain, error);
    }
    if (strcmp(verb, "job.speed") == 0) {
        uint64_t speed;

        if (!parse_size(value, &speed)) {
            chainfs_set_error(error, EINVAL,
                              "bad speed \"%s\": bytes per second, suffixes K, M, G",
                              value);
            return false;
        }
        return merge_job_set_speed(chain, speed, error);
    }
    chainfs_set_error(error, EOPNOTSUPP, "unknown command \"%s\"", verb);
    return false;
}

/* The id of the job an accepted command started or acted on, for the
 * log's CHAINFS_JOB field; NULL for a snapshot (no job) and a dry run. */
static char *ctl_command_job_id(Export *e, const char *verb,
                                const char *words)
{
    g_auto(GStrv) word = g_strsplit_set(words, " \t", -1);
    g_autofree char *json = NULL;

    if (strcmp(verb, "snapshot") == 0 ||
        g_strv_contains((const char *const *)word, "dry-run")) {
        return NULL;
    }
    json = merge_job_info_json(e->chain);
    return json_get_member(json, "id");
}

/* ctl_run_command(), with what the command gives back (see ctl_dispatch). */
static bool ctl_run(Daemon *d, Export *e, const char *verb, const char *value,
                    char **estimate, GError **error)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *words = g_strstrip(g_strdup(value ? value : ""));
    g_autofree char *job_id = NULL;

    if (!ctl_dispatch(d, e, verb, words, estimate, &err)) {
        export_set_last_error(e, verb, err);
        g_propagate_error(error, g_steal_pointer(&err));
        return false;
    }
    job_id = ctl_command_job_id(e, verb, words);
    chainfs_log(G_LOG_LEVEL_MESSAGE, e->name, job_id, "%s%s%s", verb,
                words[0] ? " " : "", words);
    return true;
}

bool ctl_run_command(Daemon *d, Export *e, const char *verb,
                     const char *value, GError **error)
{
    /* An attribute has no reply: a dry run there only says whether the
     * commit's words and layers are right. */
    return ctl_run(d, e, verb, value, NULL, error);
}

char *ctl_read_attribute(Daemon *d, Export *e, const char *attr)
{
    if (strcmp(attr, "chain") == 0) {
        return chain_info_json(e->chain);
    }
    if (strcmp(attr, "job") == 0) {
        return merge_job_info_json(e->chain);
    }
    if (strcmp(attr, "last_error") == 0) {
        return export_last_error(e);
    }
    if (strcmp(attr, "stats") == 0) {
        return export_stats_json(&e->stats);
    }
    return NULL;
}

/* ---- the control file ----------------------------------------------- */

CtlHandle *ctl_handle_new(void)
{
    CtlHandle *h = g_new0(CtlHandle, 1);

    g_mutex_init(&h->lock);
    return h;
}

void ctl_handle_free(CtlHandle *h)
{
    if (!h) {
        return;
    }
    if (h->reply) {
        g_string_free(h->reply, TRUE);
    }
    g_mutex_clear(&h->lock);
    g_free(h);
}

char *ctl_status_json(Daemon *d)
{
    GString *out = g_string_new("{");

    json_append_key(out, "exports");
    g_string_append_c(out, '[');
    for (guint i = 0; i < d->exports->len; i++) {
        Export *e = g_ptr_array_index(d->exports, i);
        g_autofree char *file = export_active_file(e);
        g_autofree char *chain = chain_info_json(e->chain);
        g_autofree char *job = merge_job_info_json(e->chain);
        g_autofree char *last_error = export_last_error(e);
        g_autofree char *stats = export_stats_json(&e->stats);

        if (i > 0) {
            g_string_append_c(out, ',');
        }
        g_string_append_c(out, '{');
        json_append_member_string(out, "name", e->name);
        json_append_member_string(out, "file", file);
        json_append_member_uint(out, "size", chain_size(e->chain));
        json_append_key(out, "chain");
        g_string_append(out, chain);
        json_append_key(out, "job");
        g_string_append(out, job);
        json_append_member_string(out, "last_error", last_error);
        json_append_key(out, "stats");
        g_string_append(out, stats);
        g_string_append_c(out, '}');
    }
    g_string_append(out, "]}\n");
    return g_string_free(out, FALSE);
}

/* Control-file verbs and the attribute each stands for. */
static const struct {
    const char *verb;
    const char *command;
} ctl_verbs[] = {
    { "commit", "commit" },
    { "stream", "stream" },
    { "snapshot", "snapshot" },
    { "pivot", "job.pivot" },
    { "cancel", "job.cancel" },
    { "pause", "job.pause" },
    { "resume", "job.resume" },
    { "speed", "job.speed" },
};

static void ctl_reply_error(GString *reply, const GError *err)
{
    g_string_truncate(reply, 0);
    g_string_append_c(reply, '{');
    json_append_member_bool(reply, "ok", false);
    json_append_member_uint(reply, "errno", chainfs_error_errno(err));
    json_append_member_string(reply, "error", err->message);
    g_string_append(reply, "}\n");
}

void ctl_line_clear(CtlLine *cl)
{
    g_clear_pointer(&cl->line, g_free);
    g_clear_pointer(&cl->parts, g_strfreev);
    cl->command = NULL;
    cl->words = NULL;
}

/*
 * line split at runs of blanks, byte by byte.  Not a GRegex: export names
 * are file names, any bytes, and a GRegex split returns NULL on a subject
 * that is not UTF-8 (fuzz-control found "pivot \xf6m1" crashing the
 * daemon on that NULL).
 */
static GStrv ctl_split_blanks(const char *line)
{
    g_auto(GStrv) all = g_strsplit_set(line, " \t\r\n", -1);
    GPtrArray *kept = g_ptr_array_new();

    for (guint i = 0; all[i]; i++) {
        if (all[i][0] != '\0') {
            g_ptr_array_add(kept, g_strdup(all[i]));
        }
    }
    g_ptr_array_add(kept, NULL);
    return (GStrv)g_ptr_array_free(kept, FALSE);
}

bool ctl_parse_line(const char *buf, size_t len, CtlLine *cl, GError **error)
{
    guint nparts;

    cl->line = g_strstrip(g_strndup(buf, len));
    cl->parts = ctl_split_blanks(cl->line);
    cl->command = NULL;
    cl->words = "";
    nparts = g_strv_length(cl->parts);
    if (nparts < 2 || cl->parts[0][0] == '\0') {
        chainfs_set_error(error, EINVAL,
                          "control command must be \"VERB NAME [WORDS]\", got \"%s\"",
                          cl->line);
        return false;
    }
    for (size_t i = 0; i < G_N_ELEMENTS(ctl_verbs); i++) {
        if (strcmp(cl->parts[0], ctl_verbs[i].verb) == 0) {
            cl->command = ctl_verbs[i].command;
        }
    }
    if (!cl->command) {
        chainfs_set_error(error, EINVAL, "unknown verb \"%s\"", cl->parts[0]);
        return false;
    }
    /* The words are the rest of the line after the name, as written. */
    {
        const char *p = cl->line + strlen(cl->parts[0]);
        p += strspn(p, " \t\r\n");
        p += strlen(cl->parts[1]);
        p += strspn(p, " \t\r\n");
        cl->words = p;
    }
    return true;
}

int ctl_handle_write(Daemon *d, CtlHandle *h, const char *buf, size_t len)
{
    g_auto(CtlLine) cl = { 0 };
    g_autoptr(GError) err = NULL;
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&h->lock);
    g_autofree char *estimate = NULL;
    Export *e = NULL;

    if (!h->reply) {
        h->reply = g_string_new(NULL);
    }
    if (!ctl_parse_line(buf, len, &cl, &err)) {
        goto refused;
    }
    e = daemon_export_by_name(d, cl.parts[1]);
    if (!e) {
        chainfs_set_error(&err, ENOENT, "no export named \"%s\"", cl.parts[1]);
        goto refused;
    }
    if (!ctl_run(d, e, cl.command, cl.words, &estimate, &err)) {
        ctl_reply_error(h->reply, err);
        return -chainfs_error_errno(err);
    }
    {
        g_autofree char *job = merge_job_info_json(e->chain);

        g_string_truncate(h->reply, 0);
        g_string_append_c(h->reply, '{');
        json_append_member_bool(h->reply, "ok", true);
        json_append_member_string(h->reply, "export", e->name);
        json_append_member_string(h->reply, "command", cl.parts[0]);
        if (estimate) {
            json_append_member_bool(h->reply, "dry_run", true);
            json_append_key(h->reply, "estimate");
            g_string_append(h->reply, estimate);
        }
        json_append_key(h->reply, "job");
        g_string_append(h->reply, job);
        g_string_append(h->reply, "}\n");
    }
    return 0;

refused:
    g_message("control command refused: %s", err->message);
    ctl_reply_error(h->reply, err);
    return -chainfs_error_errno(err);
}

GBytes *ctl_handle_read(Daemon *d, CtlHandle *h, uint64_t offset, size_t size)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&h->lock);

    if (!h->reply) {
        g_autofree char *status = ctl_status_json(d);
        h->reply = g_string_new(status);
    }
    if (offset >= h->reply->len) {
        return g_bytes_new(NULL, 0);
    }
    size = MIN(size, h->reply->len - offset);
    return g_bytes_new(h->reply->str + offset, size);
}
