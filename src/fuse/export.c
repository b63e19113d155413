/*
 * export.c: discovery of the chains of IMAGE_DIR and the exports that
 * serve them (export.h).
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chain-io.h"
#include "chain-log.h"
#include "directory.h"
#include "export.h"

static void export_free(Export *e)
{
    if (!e) {
        return;
    }
    if (e->chain) {
        chain_free(e->chain);
    }
    g_free(e->name);
    g_free(e->last_error);
    g_mutex_clear(&e->lock);
    g_free(e);
}

/*
 * On entry chain is open; on exit the Export owns it.  Its times start at
 * the active layer's modification time, so that they stay put across a
 * remount that changed nothing.
 */
static Export *export_new(Daemon *d, Chain *chain, uint64_t ino)
{
    Export *e = g_new0(Export, 1);
    struct stat st;

    e->name = g_strdup(chain->name);
    e->chain = chain;
    e->ino = ino;
    export_stats_init(&e->stats);
    g_mutex_init(&e->lock);
    e->mode = 0644;
    e->uid = d->uid;
    e->gid = d->gid;
    if (stat(chain_layer(chain, 0)->path, &st) == 0) {
        /* Owner and mode live in the active layer's file (image-owner.c). */
        e->mode = st.st_mode & 07777;
        e->uid = st.st_uid;
        e->gid = st.st_gid;
        e->mtime = st.st_mtim;
        e->ctime = st.st_mtim;
        e->atime = st.st_atim;
    } else {
        e->mtime = e->ctime = e->atime = d->start_time;
    }
    return e;
}

/*
 * Open a discovered chain, its active layer read-write.  When that layer
 * cannot be written (a read-only file or filesystem, a dirty or
 * corrupt-flagged qcow2 image, refcount blocks that cannot be trusted) the
 * chain is still served, read-only: opened again with the top read-only,
 * which records why (chain_image_mark_read_only), and its writes fail with
 * EROFS.  Any other refusal (EBUSY for a lock held elsewhere, a broken
 * chain) leaves it out, with the first error.
 */
static Chain *export_open_chain(Daemon *d, DirChain *dc, bool writable,
                                GError **error)
{
    g_autoptr(GError) ro_err = NULL;
    Chain *chain = chain_open(d->set, dc->top_file, dc->export_name, writable,
                              error);
    int err;

    if (chain) {
        if (!writable) {
            chain_image_mark_read_only(chain_layer(chain, 0),
                                       "the mount is read-only (-o ro)");
        }
        return chain;
    }
    err = chainfs_error_errno(*error);
    if (err != EROFS && err != EACCES && err != EPERM && err != EOPNOTSUPP) {
        return NULL;
    }
    chain = chain_open(d->set, dc->top_file, dc->export_name, false, &ro_err);
    if (!chain) {
        return NULL; /* the read-write error says it best */
    }
    /* The driver may have recorded the reason itself (a dirty or corrupt
     * image); else it is why the read-write open failed. */
    chain_image_mark_read_only(chain_layer(chain, 0), (*error)->message);
    chainfs_log(G_LOG_LEVEL_WARNING, dc->export_name, NULL,
                "chain %s served read-only: %s", dc->top_file,
                chain_image_read_only_reason(chain_layer(chain, 0)));
    g_clear_error(error);
    return chain;
}

Daemon *daemon_new(const char *image_dir, bool writable, GError **error)
{
    g_autoptr(GPtrArray) warnings = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) found = NULL;
    Daemon *d = g_new0(Daemon, 1);

    clock_gettime(CLOCK_REALTIME, &d->start_time);
    d->uid = getuid();
    d->gid = getgid();
    d->exports = g_ptr_array_new_with_free_func((GDestroyNotify)export_free);

    d->set = image_set_new(image_dir, error);
    if (!d->set) {
        goto fail;
    }
    found = dir_discover(image_set_dir(d->set), warnings, error);
    if (!found) {
        goto fail;
    }
    for (guint i = 0; i < warnings->len; i++) {
        g_warning("%s", (const char *)g_ptr_array_index(warnings, i));
    }
    d->merge = merge_context_new(d->set);

    for (guint i = 0; i < found->len; i++) {
        DirChain *dc = g_ptr_array_index(found, i);
        g_autoptr(GError) err = NULL;
        Chain *chain;

        if (strcmp(dc->export_name, CHAINFS_CONTROL_NAME) == 0 ||
            strchr(dc->export_name, '/') || dc->export_name[0] == '\0') {
            g_warning("chain %s left out: export name \"%s\" is not usable",
                      dc->top_file, dc->export_name);
            continue;
        }
        chain = export_open_chain(d, dc, writable, &err);
        if (!chain) {
            chainfs_log(G_LOG_LEVEL_WARNING, dc->export_name, NULL,
                        "chain %s left out: %s", dc->top_file, err->message);
            continue;
        }
        g_ptr_array_add(d->exports,
                        export_new(d, chain,
                                   CHAINFS_EXPORT_INO_BASE + d->exports->len));
        merge_context_add_chain(d->merge, chain);
        chainfs_log(G_LOG_LEVEL_MESSAGE, chain->name, NULL,
                    "serving %s, %u layer%s%s", dc->top_file,
                    chain_depth(chain), chain_depth(chain) == 1 ? "" : "s",
                    writable ? "" : ", read-only");
    }

    return d;

fail:
    daemon_free(d);
    return NULL;
}

void daemon_resume_jobs(Daemon *d)
{
    /* Every chain is known to the merge context before any job resumes,
     * so that a resumed commit sees every user of its base. */
    for (guint i = 0; i < d->exports->len; i++) {
        Export *e = g_ptr_array_index(d->exports, i);
        g_autoptr(GError) err = NULL;

        if (!merge_resume_interrupted(d->merge, e->chain, &err)) {
            chainfs_log(G_LOG_LEVEL_WARNING, e->name, NULL,
                        "cannot resume the interrupted job: %s", err->message);
        }
    }
}

bool daemon_free(Daemon *d)
{
    bool ok = true;

    if (!d) {
        return true;
    }
    /* Jobs first: they write into the chains' images. */
    if (d->merge) {
        merge_context_free(d->merge);
        d->merge = NULL;
    }
    for (guint i = 0; i < d->exports->len; i++) {
        Export *e = g_ptr_array_index(d->exports, i);
        int ret = chain_flush(e->chain);

        if (ret < 0) {
            chainfs_log(G_LOG_LEVEL_WARNING, e->name, NULL,
                        "flush at shutdown failed: %s", g_strerror(-ret));
            ok = false;
        }
    }
    g_ptr_array_free(d->exports, TRUE);
    if (d->set) {
        image_set_free(d->set);
    }
    g_free(d);
    return ok;
}

Export *daemon_export_by_name(Daemon *d, const char *name)
{
    for (guint i = 0; i < d->exports->len; i++) {
        Export *e = g_ptr_array_index(d->exports, i);
        if (strcmp(e->name, name) == 0) {
            return e;
        }
    }
    return NULL;
}

Export *daemon_export_by_ino(Daemon *d, uint64_t ino)
{
    if (ino < CHAINFS_EXPORT_INO_BASE ||
        ino - CHAINFS_EXPORT_INO_BASE >= d->exports->len) {
        return NULL;
    }
    return g_ptr_array_index(d->exports, ino - CHAINFS_EXPORT_INO_BASE);
}

/* Size and allocated bytes of the chain, consistent with each other. */
static void export_sizes(Export *e, uint64_t *size, uint64_t *allocated)
{
    Chain *chain = e->chain;

    *allocated = 0;
    chain_topo_rdlock(chain);
    *size = chain_layer(chain, 0)->virtual_size;
    for (guint i = 0; i < chain_depth(chain); i++) {
        ChainImage *img = chain_layer(chain, i);
        if (img->drv->allocated_bytes) {
            *allocated += img->drv->allocated_bytes(img);
        }
    }
    chain_topo_unlock(chain);
}

void export_stat(Daemon *d, Export *e, struct stat *st)
{
    uint64_t size, allocated;

    export_sizes(e, &size, &allocated);
    memset(st, 0, sizeof(*st));
    st->st_ino = e->ino;
    st->st_nlink = 1;
    st->st_size = (off_t)size;
    st->st_blocks = (blkcnt_t)((allocated + 511) / 512);
    st->st_blksize = 65536;

    g_mutex_lock(&e->lock);
    st->st_mode = S_IFREG | e->mode;
    st->st_uid = e->uid;
    st->st_gid = e->gid;
    st->st_atim = e->atime;
    st->st_mtim = e->mtime;
    st->st_ctim = e->ctime;
    g_mutex_unlock(&e->lock);
}

bool export_writable(Export *e)
{
    bool writable;

    chain_topo_rdlock(e->chain);
    ChainImage *top = chain_layer(e->chain, 0);
    writable = top->writable && !chain_image_read_only_reason(top);
    chain_topo_unlock(e->chain);
    return writable;
}

char *export_active_file(Export *e)
{
    char *name;

    chain_topo_rdlock(e->chain);
    name = g_strdup(chain_layer(e->chain, 0)->name);
    chain_topo_unlock(e->chain);
    return name;
}

void export_touch_content(Export *e)
{
    struct timespec now;

    clock_gettime(CLOCK_REALTIME, &now);
    g_mutex_lock(&e->lock);
    e->mtime = now;
    e->ctime = now;
    g_mutex_unlock(&e->lock);
}

void export_set_last_error(Export *e, const char *verb, const GError *err)
{
    g_mutex_lock(&e->lock);
    g_free(e->last_error);
    e->last_error = g_strdup(err->message);
    g_mutex_unlock(&e->lock);
    chainfs_log(G_LOG_LEVEL_MESSAGE, e->name, NULL, "%s refused: %s (%s)",
                verb, err->message, g_strerror(chainfs_error_errno(err)));
}

char *export_last_error(Export *e)
{
    char *msg;

    g_mutex_lock(&e->lock);
    msg = g_strdup(e->last_error ? e->last_error : "");
    g_mutex_unlock(&e->lock);
    return msg;
}
