/*
 * directory.c: which chains an image directory holds, and the state file
 * (see directory.h).
 *
 * Discovery reads just enough of each file to know its format and what
 * it refers to (backing file and its recorded format, external data
 * file): it opens no chain and takes no image lock, so it can run while
 * the images are in use (by us or by QEMU), and it never opens anything
 * that could block (FIFOs, sockets, devices are reported, never opened
 * for reading; see image-file.h).  Resolving a chain
 * for real, with every refusal, is chain_open()'s job; a top whose backing
 * reference is broken is still listed here, so that the daemon can say why
 * it leaves that chain out.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "directory.h"
#include "image-file.h"
#include "image-refs.h"

/* What discovery knows about one file of the directory. */
typedef struct {
    char *name;        /* file name in the directory */
    bool qcow2;        /* has the qcow2 magic */
    char *backing;     /* name (in dir) the backing reference resolves to,
                          NULL when none or when it leaves the directory */
    bool backing_raw;  /* the backing format is recorded as raw */
    char *data_file;   /* name (in dir) of its external data file, or NULL */
    /* Its own references count: false when every image that uses it
     * records it as raw, so that it is read as raw and its content (a
     * guest's disk, maybe holding a qcow2 header) names nothing.  Set by
     * dir_mark_raw_only; only then are backing and data_file meaningful. */
    bool refs_count;
} DirImage;

static void dir_image_free(gpointer p)
{
    DirImage *d = p;

    g_free(d->name);
    g_free(d->backing);
    g_free(d->data_file);
    g_free(d);
}

/* The image di's chain continues with, if its references count. */
static const char *dir_image_below(const DirImage *di)
{
    return di && di->refs_count ? di->backing : NULL;
}

void dir_chain_free(DirChain *c)
{
    if (!c) {
        return;
    }
    g_free(c->top_file);
    g_free(c->export_name);
    g_free(c);
}

/* The name inside canon_dir that path resolves to, relative to canon_dir
 * (the image's own directory), or NULL when it is not a direct child. */
static char *dir_resolve(const char *canon_dir, const char *ref)
{
    g_autofree char *joined = g_path_is_absolute(ref)
        ? g_strdup(ref) : g_build_filename(canon_dir, ref, NULL);
    char *canon = realpath(joined, NULL);
    char *ret = NULL;

    if (!canon) {
        return NULL;
    }

    g_autofree char *parent = g_path_get_dirname(canon);

    if (strcmp(parent, canon_dir) == 0) {
        ret = g_path_get_basename(canon);
    }
    free(canon);
    return ret;
}

static bool has_raw_extension(const char *name)
{
    return g_str_has_suffix(name, ".img") || g_str_has_suffix(name, ".raw");
}

/*
 * What one entry of the directory is, read without ever blocking: NULL
 * for what is not an image file (with a message in *warning for what a
 * user would want to hear about; directories are passed over silently).
 *
 * fstatat() first, so that a FIFO, socket or device is never opened at
 * all; but the decision is made by fstat() on the descriptor opened
 * non-blocking (image_file_openat), because the entry may be swapped
 * between the two calls.
 */
static DirImage *dir_scan_entry(int dfd, const char *canon_dir,
                                const char *name, char **warning)
{
    g_autoptr(GError) err = NULL;
    struct stat st;

    *warning = NULL;
    if (fstatat(dfd, name, &st, 0) < 0) {
        int e = errno;
        struct stat lst;

        if (e == ENOENT && fstatat(dfd, name, &lst, AT_SYMLINK_NOFOLLOW) == 0
            && S_ISLNK(lst.st_mode)) {
            *warning = g_strdup_printf("%s is a dangling symbolic link, not "
                                       "an image file", name);
        } else if (e != ENOENT) {
            *warning = g_strdup_printf("%s: %s", name, g_strerror(e));
        }
        return NULL; /* ENOENT alone: removed while we looked */
    }
    if (S_ISDIR(st.st_mode)) {
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        *warning = g_strdup_printf("%s is %s, not an image file", name,
                                   image_file_type_name(st.st_mode));
        return NULL;
    }

    int fd = image_file_openat(dfd, name, O_RDONLY, name, NULL, &err);

    if (fd < 0) {
        *warning = g_strdup(err->message);
        return NULL;
    }

    ImageRefs refs;
    bool ok = image_refs_read(fd, name, &refs, &err);

    close(fd);
    if (!ok) {
        *warning = g_strdup(err->message);
        return NULL;
    }

    DirImage *di = g_new0(DirImage, 1);

    di->name = g_strdup(name);
    di->qcow2 = refs.qcow2;
    di->refs_count = true;
    if (refs.backing) {
        di->backing = dir_resolve(canon_dir, refs.backing);
        di->backing_raw = g_strcmp0(refs.backing_fmt, "raw") == 0;
    }
    if (refs.data_file) {
        di->data_file = dir_resolve(canon_dir, refs.data_file);
    }
    image_refs_clear(&refs);
    return di;
}

/*
 * Which images are read as raw by every image that uses them (all of
 * those users record the format raw): their own headers, if they look
 * like qcow2, say nothing (refs_count false).  Whether a user counts
 * depends in turn on its own users, so this runs until nothing changes;
 * real directories settle in one or two rounds, and the rounds are bounded
 * so that a crafted one cannot make discovery slow.
 */
static void dir_mark_raw_only(GHashTable *images, GKeyFile *state)
{
    for (int round = 0; round < 8; round++) {
        g_autoptr(GHashTable) not_raw = g_hash_table_new(g_str_hash,
                                                         g_str_equal);
        g_autoptr(GHashTable) as_raw = g_hash_table_new(g_str_hash,
                                                        g_str_equal);
        GHashTableIter it;
        gpointer value;
        bool changed = false;

        g_hash_table_iter_init(&it, images);
        while (g_hash_table_iter_next(&it, NULL, &value)) {
            DirImage *di = value;
            const char *below = dir_image_below(di);

            if (below && !dir_state_is_dropped(state, di->name)) {
                g_hash_table_add(di->backing_raw ? as_raw : not_raw,
                                 (gpointer)below);
            }
        }
        g_hash_table_iter_init(&it, images);
        while (g_hash_table_iter_next(&it, NULL, &value)) {
            DirImage *di = value;
            bool count = !g_hash_table_contains(as_raw, di->name) ||
                         g_hash_table_contains(not_raw, di->name);

            if (count != di->refs_count) {
                di->refs_count = count;
                changed = true;
            }
        }
        if (!changed) {
            return;
        }
    }
}

/*
 * Scan the directory: every regular, non-hidden file with its header.
 * Returns name -> DirImage (raw files included; the caller decides whether
 * a raw one is an image).  canon_dir receives the canonical directory.
 * What is not an image file (FIFO, socket, device, dangling link, a file
 * we cannot read) goes to *warnings, one line naming it.
 */
static GHashTable *dir_scan(const char *dir, char **canon_dir,
                            GPtrArray *warnings, GError **error)
{
    char *c = realpath(dir, NULL);

    if (!c) {
        int err = errno;

        chainfs_set_error(error, err, "image directory %s: %s", dir,
                          g_strerror(err));
        return NULL;
    }
    *canon_dir = g_strdup(c);
    free(c);

    DIR *d = opendir(*canon_dir);

    if (!d) {
        int err = errno;

        chainfs_set_error(error, err, "image directory %s: %s", dir,
                          g_strerror(err));
        g_clear_pointer(canon_dir, g_free);
        return NULL;
    }

    GHashTable *images = g_hash_table_new_full(g_str_hash, g_str_equal, NULL,
                                               dir_image_free);
    struct dirent *ent;

    while ((ent = readdir(d))) {
        char *warning;
        DirImage *di;

        if (ent->d_name[0] == '.') {
            continue;
        }
        di = dir_scan_entry(dirfd(d), *canon_dir, ent->d_name, &warning);
        if (warning && warnings) {
            g_ptr_array_add(warnings, warning);
        } else {
            g_free(warning);
        }
        if (di) {
            g_hash_table_insert(images, di->name, di);
        }
    }
    closedir(d);
    return images;
}

static gint dir_chain_cmp(gconstpointer a, gconstpointer b)
{
    const DirChain *x = *(DirChain *const *)a;
    const DirChain *y = *(DirChain *const *)b;

    return strcmp(x->export_name, y->export_name);
}

static gint str_ptr_cmp(gconstpointer a, gconstpointer b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The export name whose recorded active file is file, or NULL. */
static char *state_export_recorded(GKeyFile *state, const char *file)
{
    g_auto(GStrv) keys = g_key_file_get_keys(state, "exports", NULL, NULL);

    for (guint i = 0; keys && keys[i]; i++) {
        g_autofree char *v = g_key_file_get_string(state, "exports", keys[i],
                                                   NULL);

        if (v && strcmp(v, file) == 0) {
            return g_strdup(keys[i]);
        }
    }
    return NULL;
}

/* Does the backing chain of top (top included) contain file? */
static bool dir_chain_contains(GHashTable *images, const char *top,
                               const char *file)
{
    const char *cur = top;

    for (int depth = 0; cur && depth <= CHAIN_MAX_DEPTH; depth++) {
        if (strcmp(cur, file) == 0) {
            return true;
        }
        cur = dir_image_below(g_hash_table_lookup(images, cur));
    }
    return false;
}

/*
 * The export name recorded for top in [exports], or NULL.  The record
 * names the active file when it was written; a live snapshot writes it
 * after creating the new overlay, so a crash in between leaves a record
 * naming the layer just below the new top.  The name then follows the
 * chain: it goes to the one top whose chain holds the recorded file (none
 * if two chains share it, for a shared layer says nothing of which chain
 * the name belongs to).
 */
static char *state_export_for(GKeyFile *state, GHashTable *images,
                              GPtrArray *tops, const char *top)
{
    char *exact = state_export_recorded(state, top);

    if (exact) {
        return exact;
    }

    const char *cur = dir_image_below(g_hash_table_lookup(images, top));

    for (int depth = 0; cur && depth < CHAIN_MAX_DEPTH; depth++) {
        g_autofree char *name = state_export_recorded(state, cur);

        if (name) {
            guint holders = 0;

            for (guint i = 0; i < tops->len; i++) {
                holders += dir_chain_contains(images,
                                              g_ptr_array_index(tops, i), cur);
            }
            return holders == 1 ? g_steal_pointer(&name) : NULL;
        }
        cur = dir_image_below(g_hash_table_lookup(images, cur));
    }
    return NULL;
}

/*
 * The export whose interrupted job drops file, or NULL.  A commit or a
 * stream rewrites backing references first and records the layers it
 * drops afterwards (merge_resume_interrupted finishes that at the next
 * mount); a crash in between leaves those layers as images nothing uses,
 * which must not be served as chains of their own, writable, meanwhile.
 * The checkpoint [job EXPORT] names them in its layers.  The file the
 * export itself serves is never one of them (an active commit lists its
 * top until the pivot is recorded).
 */
static char *state_job_dropping(GKeyFile *state, const char *file)
{
    g_auto(GStrv) groups = g_key_file_get_groups(state, NULL);

    for (guint i = 0; groups[i]; i++) {
        const char *export_name;
        g_auto(GStrv) layers = NULL;
        g_autofree char *recorded = NULL;
        g_autofree char *own_name = NULL;

        if (!g_str_has_prefix(groups[i], "job ")) {
            continue;
        }
        export_name = groups[i] + 4;
        layers = g_key_file_get_string_list(state, groups[i], "layers", NULL,
                                            NULL);
        if (!layers || !g_strv_contains((const char *const *)layers, file)) {
            continue;
        }
        recorded = g_key_file_get_string(state, "exports", export_name,
                                         NULL);
        own_name = chain_export_name_for(file);
        if (g_strcmp0(recorded, file) == 0 ||
            (!recorded && strcmp(own_name, export_name) == 0)) {
            continue;
        }
        return g_strdup(export_name);
    }
    return NULL;
}

GPtrArray *dir_discover(const char *dir, GPtrArray *warnings, GError **error)
{
    g_autofree char *canon_dir = NULL;
    g_autoptr(GHashTable) images = dir_scan(dir, &canon_dir, warnings, error);

    if (!images) {
        return NULL;
    }

    g_autoptr(GError) lerr = NULL;
    g_autoptr(GKeyFile) state = dir_state_load(canon_dir, &lerr);

    if (!state) {
        if (warnings) {
            g_ptr_array_add(warnings, g_strdup_printf(
                "state file ignored: %s", lerr->message));
        }
        state = g_key_file_new();
    }

    /* Which images a live (not dropped) image uses as its backing file
     * or as its external data file.  An image with a data file is refused
     * when opened, but its data file is still no disk of its own: it is
     * raw and nobody's backing file, and exporting it would serve (and let
     * a guest write) half of another disk. */
    g_autoptr(GHashTable) used = g_hash_table_new(g_str_hash, g_str_equal);
    GHashTableIter it;
    gpointer value;

    dir_mark_raw_only(images, state);
    g_hash_table_iter_init(&it, images);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        DirImage *di = value;

        if (!di->refs_count || dir_state_is_dropped(state, di->name)) {
            continue;
        }
        if (di->backing) {
            g_hash_table_add(used, di->backing);
        }
        if (di->data_file) {
            g_hash_table_add(used, di->data_file);
        }
    }

    /* Tops, in file-name order so that name clashes resolve the same way
     * every time. */
    g_autoptr(GPtrArray) tops = g_ptr_array_new();

    g_hash_table_iter_init(&it, images);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        DirImage *di = value;

        if (!di->qcow2 && !has_raw_extension(di->name)) {
            continue;
        }
        if (dir_state_is_dropped(state, di->name) ||
            g_hash_table_contains(used, di->name)) {
            continue;
        }
        g_autofree char *dropping = state_job_dropping(state, di->name);
        if (dropping) {
            if (warnings) {
                g_ptr_array_add(warnings, g_strdup_printf(
                    "%s: left out: the interrupted job of %s drops it",
                    di->name, dropping));
            }
            continue;
        }
        g_ptr_array_add(tops, di->name);
    }
    g_ptr_array_sort(tops, str_ptr_cmp);

    GPtrArray *chains = g_ptr_array_new_with_free_func(
        (GDestroyNotify)dir_chain_free);
    g_autoptr(GHashTable) names = g_hash_table_new(g_str_hash, g_str_equal);

    /* Names recorded in the state file first: they must stay stable. */
    for (int pass = 0; pass < 2; pass++) {
        for (guint i = 0; i < tops->len; i++) {
            const char *top = g_ptr_array_index(tops, i);
            g_autofree char *recorded = state_export_for(state, images, tops,
                                                        top);
            char *name;

            if ((pass == 0) != (recorded != NULL)) {
                continue;
            }
            name = recorded ? g_steal_pointer(&recorded)
                            : chain_export_name_for(top);
            if (g_hash_table_contains(names, name)) {
                g_free(name);
                name = g_strdup(top);
                if (g_hash_table_contains(names, name)) {
                    if (warnings) {
                        g_ptr_array_add(warnings, g_strdup_printf(
                            "%s: export name %s already taken; not "
                            "exported", top, name));
                    }
                    g_free(name);
                    continue;
                }
            }

            DirChain *c = g_new0(DirChain, 1);

            c->top_file = g_strdup(top);
            c->export_name = name;
            g_hash_table_add(names, c->export_name);
            g_ptr_array_add(chains, c);
        }
    }
    g_ptr_array_sort(chains, dir_chain_cmp);
    return chains;
}

GPtrArray *dir_users_of(const char *dir, const char *file,
                        GPtrArray *except, GError **error)
{
    g_autofree char *canon_dir = NULL;
    g_autoptr(GHashTable) images = dir_scan(dir, &canon_dir, NULL, error);

    if (!images) {
        return NULL;
    }

    /* file may be a name or a path: compare names in the directory. */
    g_autofree char *target = dir_resolve(canon_dir, file);

    if (!target) {
        target = g_path_get_basename(file);
    }

    g_autoptr(GKeyFile) state = dir_state_load(canon_dir, NULL);
    GPtrArray *users = g_ptr_array_new_with_free_func(g_free);
    GHashTableIter it;
    gpointer value;

    if (!state) {
        state = g_key_file_new();
    }
    dir_mark_raw_only(images, state);
    g_hash_table_iter_init(&it, images);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        DirImage *di = value;
        bool excluded = false;

        if (strcmp(di->name, target) == 0 ||
            dir_state_is_dropped(state, di->name)) {
            continue;
        }
        for (guint i = 0; except && i < except->len; i++) {
            const char *e = g_ptr_array_index(except, i);
            g_autofree char *ebase = g_path_get_basename(e);

            if (strcmp(ebase, di->name) == 0) {
                excluded = true;
                break;
            }
        }
        if (excluded) {
            continue;
        }

        /* Follow the backing references down from this image. */
        DirImage *cur = di;

        for (int depth = 0; dir_image_below(cur) && depth < CHAIN_MAX_DEPTH;
             depth++) {
            if (strcmp(cur->backing, target) == 0) {
                g_ptr_array_add(users, g_strdup(di->name));
                break;
            }
            cur = g_hash_table_lookup(images, cur->backing);
        }
    }
    g_ptr_array_sort(users, str_ptr_cmp);
    return users;
}

/* ---- the state file ------------------------------------------------------ */

/* Serialises every load-modify-save of any state file of the process. */
static GMutex state_mutex;

GKeyFile *dir_state_load(const char *dir, GError **error)
{
    g_autofree char *path = g_build_filename(dir, CHAINFS_STATE_FILE, NULL);
    g_autoptr(GKeyFile) kf = g_key_file_new();
    g_autoptr(GError) local = NULL;

    if (!g_key_file_load_from_file(kf, path, G_KEY_FILE_KEEP_COMMENTS,
                                   &local)) {
        if (g_error_matches(local, G_FILE_ERROR, G_FILE_ERROR_NOENT)) {
            return g_steal_pointer(&kf);
        }
        chainfs_set_error(error, EIO, "state file %s: %s", path,
                          local->message);
        return NULL;
    }
    return g_steal_pointer(&kf);
}

static bool state_save_unlocked(const char *dir, GKeyFile *state,
                                GError **error)
{
    g_autofree char *path = g_build_filename(dir, CHAINFS_STATE_FILE, NULL);
    /* Unique per process; state_mutex serialises the threads. */
    g_autofree char *tmp = g_strdup_printf("%s.tmp.%d", path, (int)getpid());
    gsize len;
    g_autofree char *data = g_key_file_to_data(state, &len, NULL);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int err = 0;

    if (fd < 0) {
        err = errno;
        chainfs_set_error(error, err, "cannot write state file in %s: %s",
                          dir, g_strerror(err));
        return false;
    }

    const char *p = data;
    gsize left = len;

    while (left > 0) {
        ssize_t n = write(fd, p, left);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            err = errno;
            break;
        }
        p += n;
        left -= n;
    }
    if (!err && fsync(fd) < 0) {
        err = errno;
    }
    if (close(fd) < 0 && !err) {
        err = errno;
    }
    if (!err && rename(tmp, path) < 0) {
        err = errno;
    }
    if (err) {
        unlink(tmp);
        chainfs_set_error(error, err, "cannot write state file %s: %s",
                          path, g_strerror(err));
        return false;
    }

    /* Make the rename itself durable. */
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

    if (dfd >= 0) {
        if (fsync(dfd) < 0) {
            err = errno;
        }
        close(dfd);
    }
    if (err) {
        chainfs_set_error(error, err, "cannot sync directory %s: %s", dir,
                          g_strerror(err));
        return false;
    }
    return true;
}

bool dir_state_save(const char *dir, GKeyFile *state, GError **error)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&state_mutex);

    return state_save_unlocked(dir, state, error);
}

bool dir_state_update(const char *dir,
                      void (*fn)(GKeyFile *state, void *opaque),
                      void *opaque, GError **error)
{
    g_autoptr(GMutexLocker) locker = g_mutex_locker_new(&state_mutex);
    g_autoptr(GKeyFile) state = dir_state_load(dir, error);

    if (!state) {
        return false;
    }
    fn(state, opaque);
    return state_save_unlocked(dir, state, error);
}

bool dir_state_is_dropped(GKeyFile *state, const char *file)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *base = NULL;
    gboolean v;

    if (!state || !file) {
        return false;
    }
    if (!g_key_file_has_key(state, "dropped", file, NULL)) {
        base = g_path_get_basename(file);
        if (!g_key_file_has_key(state, "dropped", base, NULL)) {
            return false;
        }
        file = base;
    }
    v = g_key_file_get_boolean(state, "dropped", file, &err);
    /* A value we cannot parse still marks the image as dropped: being
     * wrongly left out is safer than exporting an invalid disk. */
    return err ? true : v;
}
