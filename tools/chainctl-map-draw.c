/*
 * chainctl-map-draw.c: the picture `chainctl map` prints.
 *
 *     LAYER     |0                            64 MiB|      HOLDS     COMMIT
 *     top.qcow2 |              ▓█                   |    4 MiB      4 MiB
 *     mid.qcow2 |████                               |   16 MiB     16 MiB
 *     base.raw  |███████████████████████████████████|   64 MiB          -
 *
 * Each column of a layer's line stands for an equal share of the disk and
 * shows by its density how much of that share the layer itself holds
 * (data or zeros it records): blank for nothing, a full block only for
 * all of it, three shades between (ASCII " .:#" outside a UTF-8 locale).
 * HOLDS is what the layer allocates, COMMIT what a commit of it into its
 * backing file copies (its data; "-" at the bottom).
 */
#include <stdio.h>
#include <string.h>

#include "chainctl.h"
#include "chainctl-map.h"

#define MAP_SIZE_COLS 10   /* each of HOLDS and COMMIT */
#define MAP_MIN_PICTURE 8  /* narrower says nothing */
#define MAP_MIN_NAME 5     /* "LAYER" */

static const char *const map_glyphs_utf8[5] = {
    " ", "\u2591", "\u2592", "\u2593", "\u2588",
};
static const char *const map_glyphs_ascii[5] = { " ", ".", ":", ":", "#" };

/* One colour per layer, cycling; zeros-only columns are dimmed. */
static const char *const map_colours[] = {
    "\033[32m", "\033[36m", "\033[33m", "\033[35m", "\033[34m",
};
#define MAP_DIM "\033[2m"
#define MAP_RESET "\033[0m"

unsigned ctl_map_density(uint64_t alloc, uint64_t len)
{
    if (alloc == 0 || len == 0) {
        return 0;
    }
    if (alloc >= len) {
        return 4;
    }
    /* 1..3 for (0, 1/3], (1/3, 2/3], (2/3, 1): never blank nor full. */
    unsigned shade = (unsigned)(((unsigned __int128)alloc * 3 + len - 1) / len);

    return MAX(1u, MIN(shade, 3u));
}

/*
 * A size in at most MAP_SIZE_COLS columns: three significant digits,
 * switching unit at 1000 so that "1020 KiB" never needs a fourth digit.
 * Newly allocated.
 */
static char *map_size_text(uint64_t bytes)
{
    static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB",
                                         "PiB", "EiB" };
    double v = (double)bytes;
    unsigned u = 0;

    while (v >= 1000.0 && u + 1 < G_N_ELEMENTS(units)) {
        v /= 1024.0;
        u++;
    }
    return g_strdup_printf("%.3g %s", v, units[u]);
}

/* Columns a name takes on the terminal (UTF-8 or, if invalid, bytes). */
static size_t map_text_cols(const char *s)
{
    return g_utf8_validate(s, -1, NULL) ? (size_t)g_utf8_strlen(s, -1)
                                        : strlen(s);
}

/* Print s in exactly cols columns: padded, or cut with a '~' at the end. */
static void map_print_cell(const char *s, size_t cols)
{
    size_t have = map_text_cols(s);

    if (have <= cols) {
        fputs(s, stdout);
        for (size_t i = have; i < cols; i++) {
            putchar(' ');
        }
        return;
    }
    if (g_utf8_validate(s, -1, NULL)) {
        const char *end = g_utf8_offset_to_pointer(s, (glong)cols - 1);

        fwrite(s, 1, (size_t)(end - s), stdout);
    } else {
        fwrite(s, 1, cols - 1, stdout);
    }
    putchar('~');
}

/* Start of column c of cols over size bytes (exact, no overflow). */
static uint64_t map_column_start(uint64_t size, unsigned c, unsigned cols)
{
    return (uint64_t)((unsigned __int128)size * c / cols);
}

/* One layer's picture: cols glyphs over [0, size) of the disk. */
static void map_print_picture(const CtlMapLayer *l, uint64_t size,
                              unsigned cols, const CtlMapStyle *style,
                              const char *colour)
{
    const char *const *glyphs = style->utf8 ? map_glyphs_utf8
                                            : map_glyphs_ascii;
    const char *current = NULL;   /* escape in effect, NULL: none */
    guint e = 0;

    for (unsigned c = 0; c < cols; c++) {
        uint64_t start = map_column_start(size, c, cols);
        uint64_t end = map_column_start(size, c + 1, cols);
        uint64_t data = 0, zero = 0;

        /* A disk of fewer bytes than columns: a column shows the byte it
         * lies on, rather than nothing. */
        if (end == start && start < size) {
            end = start + 1;
        }

        /* Extents are ascending: skip the ones that end before start. */
        while (e < l->extents->len) {
            const CtlMapExtent *x = &g_array_index(l->extents, CtlMapExtent,
                                                   e);
            if (x->offset + x->length > start) {
                break;
            }
            e++;
        }
        for (guint i = e; i < l->extents->len; i++) {
            const CtlMapExtent *x = &g_array_index(l->extents, CtlMapExtent,
                                                   i);
            uint64_t lo = MAX(x->offset, start);
            uint64_t hi = MIN(x->offset + x->length, end);

            if (x->offset >= end) {
                break;
            }
            if (hi > lo) {
                *(x->zero ? &zero : &data) += hi - lo;
            }
        }
        unsigned g = ctl_map_density(data + zero, end - start);

        if (style->colour) {
            const char *want = g == 0 ? NULL : zero > data ? MAP_DIM : colour;

            if (want != current) {
                if (current) {
                    fputs(MAP_RESET, stdout);
                }
                if (want) {
                    fputs(want, stdout);
                }
                current = want;
            }
        }
        fputs(glyphs[g], stdout);
    }
    if (style->colour && current) {
        fputs(MAP_RESET, stdout);
    }
}

bool ctl_map_draw(const CtlMapChain *m, const CtlMapStyle *style)
{
    size_t name_cols = MAP_MIN_NAME;
    size_t fixed;
    unsigned cols;

    for (guint i = 0; i < m->layers->len; i++) {
        const CtlMapLayer *l = g_ptr_array_index(m->layers, i);

        name_cols = MAX(name_cols, map_text_cols(l->file));
    }
    /* A long name gives way to the picture, down to a quarter of it. */
    name_cols = MIN(name_cols, MAX((size_t)MAP_MIN_NAME, style->width / 4));
    /* "NAME |picture| HOLDS COMMIT" */
    fixed = name_cols + 2 + 1 + 1 + MAP_SIZE_COLS + 1 + MAP_SIZE_COLS;
    /* On a narrow line the name gives way first, down to "LAYER". */
    while (style->width < fixed + MAP_MIN_PICTURE && name_cols > MAP_MIN_NAME) {
        name_cols--;
        fixed--;
    }
    if (style->width < fixed + MAP_MIN_PICTURE) {
        ctl_fail("--width %u is too narrow: a line needs at least %zu "
                 "columns", style->width, fixed + MAP_MIN_PICTURE);
        return false;
    }
    cols = (unsigned)(style->width - fixed);

    /* Header: the scale in the picture's place, 0 to the disk's size. */
    g_autofree char *size_text = map_size_text(m->disk_size);
    g_autofree char *scale = NULL;
    size_t gap = cols > strlen(size_text) + 1 ? cols - strlen(size_text) - 1
                                              : 0;

    scale = g_strdup_printf("0%*s%s", (int)gap, "", size_text);
    map_print_cell("LAYER", name_cols);
    printf(" |");
    map_print_cell(scale, cols);
    printf("| %*s %*s\n", MAP_SIZE_COLS, "HOLDS", MAP_SIZE_COLS, "COMMIT");

    for (guint i = 0; i < m->layers->len; i++) {
        const CtlMapLayer *l = g_ptr_array_index(m->layers, i);
        g_autofree char *holds = map_size_text(l->data_bytes + l->zero_bytes);
        g_autofree char *commit = l->has_commit ?
                                  map_size_text(l->commit_bytes) :
                                  g_strdup("-");

        map_print_cell(l->file, name_cols);
        printf(" |");
        map_print_picture(l, m->disk_size, cols, style,
                          map_colours[i % G_N_ELEMENTS(map_colours)]);
        printf("| %*s %*s\n", MAP_SIZE_COLS, holds, MAP_SIZE_COLS, commit);
    }
    g_autofree char *visible = map_size_text(m->visible_data_bytes);
    printf("%s: %s disk, %s of it data\n", m->name, size_text, visible);
    return true;
}
