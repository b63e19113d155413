/*
 * snapshot.c: live snapshot (merge_snapshot in merge.h), after QEMU's
 * blockdev-snapshot-sync: a new empty qcow2 overlay on the active layer
 * becomes the active layer, while guests go on writing.
 *
 * Order, and why:
 *   0. make sure the state file maps the export name to a file of the
 *      chain (the active layer's, unless some record is there already):
 *      a crash after step 1 leaves the overlay as the top of the chain on
 *      disk, and discovery gives it the recorded name of the chain below
 *      it; without a record it would be served under its own file name;
 *   1. create and open the overlay outside any lock (guest I/O must not
 *      wait for that).  qcow2_create writes it under a hidden name, fsyncs
 *      it, renames it into place and fsyncs the directory: a power cut
 *      leaves either no overlay (discovery skips the hidden file) or a
 *      whole one, never a name whose header reached the disk without its
 *      refcount block or L1 table; and guest writes that later reach the
 *      overlay are reachable through a durable name;
 *   2. take the topology write lock, which drains every in-flight request,
 *      and check that the active layer is still the one the overlay backs
 *      onto (a concurrent snapshot may have won);
 *   3. flush the old active layer, so that everything acknowledged so far
 *      is durable in it before it becomes a read-only backing file;
 *   4. reopen it read-only (its write lock goes, as in QEMU);
 *   5. record the export name -> new active file in the state file, so a
 *      restart serves the same name;
 *   6. push the overlay on top, unlock.
 * A failure in 1-5 undoes what was done (the old layer reopened
 * read-write, the overlay closed and unlinked): nothing changes.  Step 6
 * cannot fail.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "directory.h"
#include "json.h"
#include "merge-int.h"
#include "qcow2.h"

/* Cluster size of a new overlay: QEMU's default. */
#define SNAPSHOT_CLUSTER_SIZE 65536

typedef enum {
    SNAPSHOT_RECORD,      /* export_name -> file */
    SNAPSHOT_RECORD_NEW,  /* the same, unless export_name has a record */
    SNAPSHOT_FORGET,      /* drop export_name's record if it names file */
} SnapshotStateOp;

typedef struct {
    const char *export_name;
    const char *file;
    SnapshotStateOp op;
} SnapshotStateUpdate;

static void snapshot_state_apply(GKeyFile *state, void *opaque)
{
    SnapshotStateUpdate *u = opaque;
    g_autofree char *cur = g_key_file_get_string(state, "exports",
                                                 u->export_name, NULL);

    switch (u->op) {
    case SNAPSHOT_RECORD_NEW:
        if (cur) {
            return;
        }
        /* fall through */
    case SNAPSHOT_RECORD:
        g_key_file_set_string(state, "exports", u->export_name, u->file);
        break;
    case SNAPSHOT_FORGET:
        if (g_strcmp0(cur, u->file) == 0) {
            g_key_file_remove_key(state, "exports", u->export_name, NULL);
        }
        break;
    }
}

/*
 * Step 0: record export_name -> active_file unless the state file names
 * a file for export_name already (an earlier snapshot or pivot wrote the
 * active file then, and no job changes the active file without writing
 * it).  Costs a state-file write only at the first snapshot of a chain;
 * *added says whether it wrote one.
 */
static bool snapshot_record_name(const char *dir, const char *export_name,
                                 const char *active_file, bool *added,
                                 GError **error)
{
    g_autoptr(GKeyFile) state = dir_state_load(dir, error);
    SnapshotStateUpdate update = {
        .export_name = export_name, .file = active_file,
        .op = SNAPSHOT_RECORD_NEW,
    };

    *added = false;
    if (!state) {
        return false;
    }
    if (g_key_file_has_key(state, "exports", export_name, NULL)) {
        return true;
    }
    *added = dir_state_update(dir, snapshot_state_apply, &update, error);
    return *added;
}

/* Undo step 0 after a failure (the record was true, but a refused
 * command changes nothing). */
static void snapshot_forget_name(const char *dir, const char *export_name,
                                 const char *active_file)
{
    g_autoptr(GError) err = NULL;
    SnapshotStateUpdate update = {
        .export_name = export_name, .file = active_file,
        .op = SNAPSHOT_FORGET,
    };

    if (!dir_state_update(dir, snapshot_state_apply, &update, &err)) {
        g_message("%s: %s", export_name, err->message);
    }
}

/*
 * On entry chain is open and served, the caller holds no topology lock.
 * On success file is the active layer (read-write), the old active layer is
 * read-only below it, and the state file maps chain->name to file.  On
 * failure nothing changed and file does not exist (unless it existed
 * before: EEXIST).
 */
static bool snapshot_idle(Chain *chain, void *opaque, GError **error)
{
    const char *file = opaque;
    const char *dir = image_set_dir(chain->set);
    g_autofree char *path = NULL;
    g_autofree char *backing_ref = NULL;
    g_autofree char *backing_fmt = NULL;
    ChainImage *old_top, *img = NULL;
    SnapshotStateUpdate update;
    struct stat st;
    bool recorded;
    uint64_t size;
    int ret;

    /* The active layer as it is now; checked again under the lock. */
    chain_topo_rdlock(chain);
    old_top = chain_layer(chain, 0);
    backing_ref = g_strdup(old_top->name);
    backing_fmt = g_strdup(old_top->drv->format_name);
    size = old_top->virtual_size;
    chain_topo_unlock(chain);

    path = g_build_filename(dir, file, NULL);
    if (lstat(path, &st) == 0) {
        chainfs_set_error(error, EEXIST, "cannot create snapshot %s: it "
                          "exists already", file);
        return false;
    }
    if (!snapshot_record_name(dir, chain->name, backing_ref, &recorded,
                              error)) {
        g_prefix_error(error, "cannot snapshot %s: ", chain->name);
        return false;
    }
    if (!qcow2_create(path, size, SNAPSHOT_CLUSTER_SIZE, 3, backing_ref,
                      backing_fmt, error)) {
        g_prefix_error(error, "cannot create snapshot %s: ", file);
        goto fail_forget;
    }
    img = image_set_open(chain->set, file, true, error);
    if (!img) {
        g_prefix_error(error, "cannot open snapshot %s: ", file);
        goto fail_unlink;
    }
    /* The disk keeps its owner and mode (libvirt's chown of the export):
     * the overlay takes the active layer's before it becomes it. */
    if (!chain_image_copy_owner(old_top, img, error)) {
        g_prefix_error(error, "cannot snapshot %s: ", chain->name);
        image_set_release(chain->set, img);
        goto fail_unlink;
    }
    merge_crash_point("snapshot-created");

    chain_topo_wrlock(chain);
    if (chain_layer(chain, 0) != old_top) {
        chainfs_set_error(error, EBUSY,
                          "the active layer of %s changed while %s was "
                          "created", chain->name, file);
        goto fail_unlock;
    }
    ret = old_top->drv->flush(old_top);
    if (ret < 0) {
        chainfs_set_error(error, -ret, "cannot flush %s: %s", old_top->name,
                          g_strerror(-ret));
        goto fail_unlock;
    }
    if (!chain_image_reopen(old_top, false, error)) {
        g_prefix_error(error, "cannot reopen %s read-only: ", old_top->name);
        goto fail_unlock;
    }
    merge_crash_point("snapshot-flushed");
    update.export_name = chain->name;
    update.file = file;
    update.op = SNAPSHOT_RECORD;
    if (!dir_state_update(dir, snapshot_state_apply, &update, error)) {
        g_autoptr(GError) undo_err = NULL;

        g_prefix_error(error, "cannot record snapshot %s: ", file);
        if (!chain_image_reopen(old_top, true, &undo_err)) {
            /* The chain stays readable but refuses writes; say so. */
            g_warning("%s: cannot reopen %s read-write after a failed "
                      "snapshot: %s", chain->name, old_top->name,
                      undo_err->message);
        }
        goto fail_unlock;
    }
    merge_crash_point("snapshot-recorded");
    img->backing = old_top;
    chain_push_top(chain, img);
    chain_topo_unlock(chain);
    g_message("%s: snapshot %s on top of %s", chain->name, file,
              backing_ref);
    return true;

fail_unlock:
    chain_topo_unlock(chain);
    image_set_release(chain->set, img);
fail_unlink:
    if (unlink(path) < 0 && errno != ENOENT) {
        g_warning("cannot remove the failed snapshot %s: %s", path,
                  g_strerror(errno));
    }
fail_forget:
    if (recorded) {
        snapshot_forget_name(dir, chain->name, backing_ref);
    }
    return false;
}

/* A job keeps the layer list for itself while it runs: the snapshot runs
 * under the job slot lock, so that none starts meanwhile either. */
bool merge_snapshot(MergeContext *ctx, Chain *chain, const char *file,
                    GError **error)
{
    g_autofree char *what = NULL;

    /* A bad name is refused as such, job or not. */
    if (!file || file[0] == '\0' || strchr(file, '/') ||
        strcmp(file, ".") == 0 || strcmp(file, "..") == 0) {
        chainfs_set_error(error, EINVAL,
                          "snapshot file \"%s\" must be a file name in the "
                          "image directory", file ? file : "");
        return false;
    }
    if (strcmp(file, CHAINFS_STATE_FILE) == 0) {
        chainfs_set_error(error, EINVAL, "%s is chainfs's state file", file);
        return false;
    }
    what = g_strdup_printf("snapshot %s", chain->name);
    return merge_run_idle(ctx, chain, what, snapshot_idle, (void *)file,
                          error);
}
