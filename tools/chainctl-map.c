/*
 * chainctl-map.c: `chainctl map`, where each layer of a chain holds data.
 *
 * Both modes read the image files themselves, read-only, through the same
 * src/chain drivers the daemon uses, and ask each layer alone (its
 * driver's block_status, not the merged chain map) which ranges it holds:
 * that is `qemu-img map` of each layer, at a glance.
 *
 * Offline the chain is opened as `chainctl info IMAGE` opens it, with a
 * reader's QEMU-compatible locks.  Online the daemon holds the active
 * layer's write lock, which a reader's lock refuses to share, so the files
 * named by user.chainfs.chain (its "image_dir" and layer "file"s) are
 * opened force-shared, as `qemu-img map -U` would: no lock at all, no
 * write.  What that shows is the files as they are on disk: the daemon's
 * writes since its last flush may not be in them yet.
 */
#include <errno.h>
#include <locale.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "chainctl.h"
#include "chainctl-map.h"
#include "chain-io.h"
#include "chain.h"
#include "json.h"

/* ---- what each layer holds ---------------------------------------- */

static void ctl_map_layer_free(gpointer p)
{
    CtlMapLayer *l = p;

    g_free(l->file);
    g_free(l->format);
    if (l->extents) {
        g_array_free(l->extents, TRUE);
    }
    g_free(l);
}

static void ctl_map_chain_clear(CtlMapChain *m)
{
    g_clear_pointer(&m->name, g_free);
    g_clear_pointer(&m->layers, g_ptr_array_unref);
}

G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(CtlMapChain, ctl_map_chain_clear)

/* Append a run, merged with the previous one when they touch and agree. */
static void ctl_map_add_extent(CtlMapLayer *l, uint64_t off, uint64_t len,
                               bool zero)
{
    if (l->extents->len > 0) {
        CtlMapExtent *last = &g_array_index(l->extents, CtlMapExtent,
                                            l->extents->len - 1);

        if (last->zero == zero && last->offset + last->length == off) {
            last->length += len;
            return;
        }
    }
    CtlMapExtent e = { .offset = off, .length = len, .zero = zero };
    g_array_append_val(l->extents, e);
}

/* Walk one layer alone from 0 to its own end.  0 or negative errno. */
static int ctl_map_scan_layer(ChainImage *img, CtlMapLayer *l)
{
    uint64_t off = 0;

    while (off < img->virtual_size) {
        uint64_t pnum = 0;
        int st = img->drv->block_status(img, off, img->virtual_size - off,
                                        &pnum);

        if (st < 0) {
            return st;
        }
        g_assert(pnum > 0);
        if (st == BLOCK_ZERO) {
            ctl_map_add_extent(l, off, pnum, true);
            l->zero_bytes += pnum;
        } else if (st == BLOCK_DATA || st == BLOCK_COMPRESSED) {
            ctl_map_add_extent(l, off, pnum, false);
            l->data_bytes += pnum;
        }
        off += pnum;
    }
    return 0;
}

/* Bytes of the flat disk that read as data from some layer. */
static int ctl_map_scan_visible(Chain *chain, uint64_t size, uint64_t *out)
{
    uint64_t off = 0;

    *out = 0;
    while (off < size) {
        uint64_t pnum = 0;
        int owner;
        int st = chain_status_above(chain, 0, chain_depth(chain), off,
                                    size - off, &pnum, &owner);

        if (st < 0) {
            return st;
        }
        if (st == BLOCK_DATA || st == BLOCK_COMPRESSED) {
            *out += pnum;
        }
        off += pnum;
    }
    return 0;
}

/* Fill m from an open chain.  On failure prints the reason. */
static bool ctl_map_scan(Chain *chain, CtlMapChain *m)
{
    int ret = 0;

    m->name = g_strdup(chain->name);
    m->layers = g_ptr_array_new_with_free_func(ctl_map_layer_free);
    chain_topo_rdlock(chain);
    m->disk_size = chain_layer(chain, 0)->virtual_size;
    for (guint i = 0; i < chain_depth(chain) && ret == 0; i++) {
        ChainImage *img = chain_layer(chain, i);
        CtlMapLayer *l = g_new0(CtlMapLayer, 1);

        l->file = g_strdup(img->name);
        l->format = g_strdup(img->drv->format_name);
        l->virtual_size = img->virtual_size;
        l->extents = g_array_new(FALSE, FALSE, sizeof(CtlMapExtent));
        g_ptr_array_add(m->layers, l);
        ret = ctl_map_scan_layer(img, l);
        if (ret < 0) {
            chain_topo_unlock(chain);
            ctl_fail("%s: reading its allocation: %s", img->name,
                     g_strerror(-ret));
            return false;
        }
        l->has_commit = i + 1 < chain_depth(chain);
        l->commit_bytes = l->has_commit ? l->data_bytes : 0;
    }
    ret = ctl_map_scan_visible(chain, m->disk_size, &m->visible_data_bytes);
    chain_topo_unlock(chain);
    if (ret < 0) {
        ctl_fail("%s: reading the chain's allocation: %s", m->name,
                 g_strerror(-ret));
        return false;
    }
    return true;
}

/*
 * Open the chain whose active layer is file in dir, every layer
 * read-only (force_share: without locks), and scan it into m.  export
 * names the chain (NULL: from file).  On failure prints the reason.
 */
static bool ctl_map_open_and_scan(const char *dir, const char *file,
                                  const char *export, bool force_share,
                                  CtlMapChain *m)
{
    g_autoptr(GError) err = NULL;
    ImageSet *set = image_set_new(dir, &err);
    Chain *chain;
    bool ok;

    if (!set) {
        ctl_fail("%s", err->message);
        return false;
    }
    if (force_share) {
        image_set_force_share(set);
    }
    chain = chain_open(set, file, export, false, &err);
    if (!chain) {
        image_set_free(set);
        ctl_fail("%s", err->message);
        return false;
    }
    ok = ctl_map_scan(chain, m);
    chain_free(chain);
    image_set_free(set);
    return ok;
}

/* ---- the two ways in ------------------------------------------------- */

static bool ctl_map_offline(const char *path, CtlMapChain *m)
{
    g_autofree char *real = realpath(path, NULL);
    g_autofree char *dir = NULL;
    g_autofree char *file = NULL;

    if (!real) {
        ctl_fail("%s: %s", path, g_strerror(errno));
        return false;
    }
    dir = g_path_get_dirname(real);
    file = g_path_get_basename(real);
    return ctl_map_open_and_scan(dir, file, NULL, false, m);
}

/* The layer names a chain object lists, active first; NULL if malformed. */
static GPtrArray *ctl_map_attr_layer_files(const char *chain_json)
{
    g_autofree char *layers_text = json_get_member(chain_json, "layers");
    g_autoptr(GPtrArray) items = layers_text ?
                                 ctl_json_array_items(layers_text) : NULL;
    g_autoptr(GPtrArray) files = g_ptr_array_new_with_free_func(g_free);

    if (!items || items->len == 0) {
        return NULL;
    }
    for (guint i = 0; i < items->len; i++) {
        char *file = ctl_json_member(g_ptr_array_index(items, i), "file");

        if (!file) {
            return NULL;
        }
        g_ptr_array_add(files, file);
    }
    return g_steal_pointer(&files);
}

static bool ctl_map_online(const char *path, CtlMapChain *m)
{
    g_autofree char *chain_json = ctl_xattr_get(path, "chain");
    g_autofree char *dir = NULL;
    g_autofree char *name = NULL;
    g_autoptr(GPtrArray) files = NULL;

    if (!chain_json) {
        ctl_fail("cannot read the chain of %s: %s", path, g_strerror(errno));
        return false;
    }
    files = ctl_map_attr_layer_files(chain_json);
    name = ctl_json_member(chain_json, "name");
    if (!files || !name) {
        ctl_fail("malformed chain JSON from %s", path);
        return false;
    }
    dir = ctl_json_member(chain_json, "image_dir");
    if (!dir) {
        ctl_fail("%s: the daemon does not report its image directory "
                 "(\"image_dir\"); run chainctl map on the active image "
                 "file %s instead", path, (char *)g_ptr_array_index(files, 0));
        return false;
    }
    if (!ctl_map_open_and_scan(dir, g_ptr_array_index(files, 0), name, true,
                               m)) {
        return false;
    }
    /*
     * The files were resolved here, from their headers, while the daemon
     * may have changed the chain (a snapshot, a commit's end) since it
     * answered: a picture of another chain than the one it serves would
     * mislead, so say so rather than print it.
     */
    bool same = files->len == m->layers->len;

    for (guint i = 0; same && i < files->len; i++) {
        const CtlMapLayer *l = g_ptr_array_index(m->layers, i);

        same = strcmp(l->file, g_ptr_array_index(files, i)) == 0;
    }
    if (!same) {
        ctl_fail("%s: the chain changed while it was read (the daemon "
                 "serves other layers than the files name); run chainctl "
                 "map again", path);
        return false;
    }
    return true;
}

/* ---- output ---------------------------------------------------------- */

static void ctl_map_print_json(const CtlMapChain *m)
{
    g_autoptr(GString) out = g_string_new("{");
    uint64_t data = 0, zero = 0, commit = 0;

    json_append_member_string(out, "name", m->name);
    json_append_member_uint(out, "virtual_size", m->disk_size);
    json_append_key(out, "layers");
    g_string_append_c(out, '[');
    for (guint i = 0; i < m->layers->len; i++) {
        const CtlMapLayer *l = g_ptr_array_index(m->layers, i);

        if (i > 0) {
            g_string_append_c(out, ',');
        }
        g_string_append_c(out, '{');
        json_append_member_string(out, "file", l->file);
        json_append_member_string(out, "format", l->format);
        json_append_member_uint(out, "virtual_size", l->virtual_size);
        json_append_key(out, "extents");
        g_string_append_c(out, '[');
        for (guint j = 0; j < l->extents->len; j++) {
            const CtlMapExtent *e = &g_array_index(l->extents, CtlMapExtent,
                                                   j);

            if (j > 0) {
                g_string_append_c(out, ',');
            }
            g_string_append_c(out, '{');
            json_append_member_uint(out, "offset", e->offset);
            json_append_member_uint(out, "length", e->length);
            /* As qemu-img map --output=json names the two kinds. */
            json_append_member_bool(out, "data", !e->zero);
            json_append_member_bool(out, "zero", e->zero);
            g_string_append_c(out, '}');
        }
        g_string_append_c(out, ']');
        json_append_member_uint(out, "data_bytes", l->data_bytes);
        json_append_member_uint(out, "zero_bytes", l->zero_bytes);
        json_append_member_uint(out, "allocated_bytes",
                                l->data_bytes + l->zero_bytes);
        json_append_key(out, "commit_bytes");
        if (l->has_commit) {
            g_string_append_printf(out, "%" G_GUINT64_FORMAT,
                                   l->commit_bytes);
        } else {
            g_string_append(out, "null");
        }
        g_string_append_c(out, '}');
        data += l->data_bytes;
        zero += l->zero_bytes;
        commit += l->commit_bytes;
    }
    g_string_append_c(out, ']');
    json_append_key(out, "totals");
    g_string_append_c(out, '{');
    json_append_member_uint(out, "data_bytes", data);
    json_append_member_uint(out, "zero_bytes", zero);
    json_append_member_uint(out, "allocated_bytes", data + zero);
    json_append_member_uint(out, "commit_bytes", commit);
    json_append_member_uint(out, "visible_data_bytes", m->visible_data_bytes);
    g_string_append(out, "}}");
    printf("%s\n", out->str);
}

/*
 * Colour only for a person at a terminal that can show it: stdout is a
 * tty, TERM is set and not "dumb", and NO_COLOR (no-color.org) is unset
 * or empty.
 */
static bool ctl_map_want_colour(void)
{
    const char *term = getenv("TERM");
    const char *no_colour = getenv("NO_COLOR");

    return isatty(STDOUT_FILENO) && term && *term &&
           strcmp(term, "dumb") != 0 && !(no_colour && *no_colour);
}

/* The line width: --width, else the terminal's, else 80. */
static unsigned ctl_map_line_width(const CtlMapArgs *a)
{
    struct winsize ws;

    if (a->width > 0) {
        return a->width;
    }
    if (isatty(STDOUT_FILENO) && ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 &&
        ws.ws_col > 0) {
        return ws.ws_col;
    }
    return 80;
}

int ctl_map(const char *path, bool online, const CtlMapArgs *a)
{
    g_auto(CtlMapChain) m = { 0 };
    CtlMapStyle style;
    const char *charset = NULL;

    if (!(online ? ctl_map_online(path, &m) : ctl_map_offline(path, &m))) {
        return CTL_EXIT_FAIL;
    }
    if (a->json) {
        ctl_map_print_json(&m);
        return CTL_EXIT_OK;
    }
    /* Only the character type from the environment: numbers stay as C
     * prints them. */
    setlocale(LC_CTYPE, "");
    style.utf8 = g_get_charset(&charset);
    style.colour = ctl_map_want_colour();
    style.width = ctl_map_line_width(a);
    return ctl_map_draw(&m, &style) ? CTL_EXIT_OK : CTL_EXIT_FAIL;
}
