/*
 * checkpoint.c: the progress of a job in the state file ([job EXPORT]
 * group, see directory.h), so that a cancelled commit resumes when issued
 * again and one cut off by a crash resumes at the next mount.
 *
 * A checkpoint is written only after base was flushed, so the offset it
 * records never claims data that is not durable in base.  Every update
 * goes through dir_state_update(), which rewrites the file atomically.
 */
#define G_LOG_DOMAIN "chainfs"

#include <string.h>

#include "merge-int.h"

static char *checkpoint_group(const char *export_name)
{
    return g_strdup_printf("job %s", export_name);
}

typedef struct {
    const char *export_name;
    const Checkpoint *cp;
    char **dropped;
    const char *active_file;
    bool clear;
} CheckpointUpdate;

static void checkpoint_apply(GKeyFile *state, void *opaque)
{
    CheckpointUpdate *u = opaque;
    g_autofree char *group = checkpoint_group(u->export_name);

    if (u->clear) {
        g_key_file_remove_group(state, group, NULL);
    }
    if (u->cp) {
        const Checkpoint *cp = u->cp;

        g_key_file_set_string(state, group, "type", cp->type);
        g_key_file_set_string(state, group, "top", cp->top ? cp->top : "");
        g_key_file_set_string(state, group, "base", cp->base ? cp->base : "");
        g_key_file_set_string(state, group, "options",
                              cp->options ? cp->options : "");
        g_key_file_set_uint64(state, group, "offset", cp->offset);
        g_key_file_set_boolean(state, group, "cancelled", cp->cancelled);
        if (cp->layers) {
            g_key_file_set_string_list(state, group, "layers",
                                       (const char *const *)cp->layers,
                                       g_strv_length(cp->layers));
        }
    }
    for (guint i = 0; u->dropped && u->dropped[i]; i++) {
        g_key_file_set_string(state, "dropped", u->dropped[i], "1");
    }
    if (u->active_file) {
        g_key_file_set_string(state, "exports", u->export_name,
                              u->active_file);
    }
}

bool checkpoint_save(const char *dir, const char *export_name,
                     const Checkpoint *cp, GError **error)
{
    CheckpointUpdate u = {
        .export_name = export_name, .cp = cp, .clear = true,
    };

    return dir_state_update(dir, checkpoint_apply, &u, error);
}

bool checkpoint_clear(const char *dir, const char *export_name,
                      GError **error)
{
    CheckpointUpdate u = { .export_name = export_name, .clear = true };

    return dir_state_update(dir, checkpoint_apply, &u, error);
}

bool checkpoint_record_dropped(const char *dir, const char *export_name,
                               char **names, const char *active_file,
                               GError **error)
{
    CheckpointUpdate u = {
        .export_name = export_name, .dropped = names,
        .active_file = active_file, .clear = export_name != NULL,
    };

    return dir_state_update(dir, checkpoint_apply, &u, error);
}

bool checkpoint_load(const char *dir, const char *export_name,
                     Checkpoint *cp)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(GKeyFile) state = dir_state_load(dir, &err);
    g_autofree char *group = checkpoint_group(export_name);

    memset(cp, 0, sizeof(*cp));
    if (!state || !g_key_file_has_group(state, group)) {
        return false;
    }
    cp->type = g_key_file_get_string(state, group, "type", NULL);
    cp->top = g_key_file_get_string(state, group, "top", NULL);
    cp->base = g_key_file_get_string(state, group, "base", NULL);
    cp->options = g_key_file_get_string(state, group, "options", NULL);
    cp->offset = g_key_file_get_uint64(state, group, "offset", NULL);
    cp->cancelled = g_key_file_get_boolean(state, group, "cancelled", NULL);
    cp->layers = g_key_file_get_string_list(state, group, "layers", NULL,
                                            NULL);
    if (!cp->type) {
        checkpoint_clear_fields(cp);
        return false;
    }
    return true;
}

void checkpoint_clear_fields(Checkpoint *cp)
{
    g_clear_pointer(&cp->type, g_free);
    g_clear_pointer(&cp->top, g_free);
    g_clear_pointer(&cp->base, g_free);
    g_clear_pointer(&cp->options, g_free);
    g_clear_pointer(&cp->layers, g_strfreev);
}
