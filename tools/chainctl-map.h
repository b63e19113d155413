/*
 * chainctl-map.h: what `chainctl map` finds in a chain and how it is drawn.
 *
 * chainctl-map.c opens the chain (offline: the image file named; online:
 * the layer files the daemon names, read-only and force-shared) and asks
 * each layer alone, through its driver's block_status, which ranges it
 * holds; chainctl-map-draw.c turns that into one line per layer.
 */
#ifndef CHAINCTL_MAP_H
#define CHAINCTL_MAP_H

#include <stdbool.h>
#include <stdint.h>
#include <glib.h>

/* One run of a layer that the layer itself holds. */
typedef struct {
    uint64_t offset;
    uint64_t length;
    bool zero;             /* recorded as zeros; else data */
} CtlMapExtent;

typedef struct {
    char *file;            /* name in the image directory */
    char *format;
    uint64_t virtual_size;
    GArray *extents;       /* CtlMapExtent, ascending, adjacent ones of
                              one kind merged */
    uint64_t data_bytes;
    uint64_t zero_bytes;
    /*
     * What a commit of this layer into its backing file copies as data
     * (copy.c: data runs are copied, zero runs become zero clusters and
     * copy nothing): data_bytes.  has_commit false for the bottom layer,
     * which has no backing file to commit into.
     */
    bool has_commit;
    uint64_t commit_bytes;
} CtlMapLayer;

typedef struct {
    char *name;            /* export name */
    uint64_t disk_size;    /* the flat disk: the active layer's size */
    uint64_t visible_data_bytes; /* bytes of the disk that read as data */
    GPtrArray *layers;     /* CtlMapLayer *, active layer first */
} CtlMapChain;

/* How the picture is drawn: decided once from the terminal and locale. */
typedef struct {
    unsigned width;        /* whole line, in columns */
    bool utf8;             /* density blocks, else ASCII " .:#" */
    bool colour;
} CtlMapStyle;

/*
 * Print the chain, one line per layer, each exactly style->width columns
 * wide, under a header line and over a scale line.  FALSE (after
 * ctl_fail) when the width leaves no room for the picture.
 */
bool ctl_map_draw(const CtlMapChain *m, const CtlMapStyle *style);

/* The glyph index (0 blank .. 4 full) for a column whose range of len
 * bytes holds alloc allocated bytes: 0 only for none, 4 only for all. */
unsigned ctl_map_density(uint64_t alloc, uint64_t len);

#endif
