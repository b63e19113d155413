/*
 * image-refs.h: what an image file's header says it refers to, read
 * without opening anything else.
 *
 * Discovery must know, for every file of the image directory, whether it
 * looks like qcow2 and which other files it names (its backing file with
 * the format recorded for it, and an external data file), before it knows
 * which files are chains.  It does not trust any of it: the qcow2 driver
 * checks the header for real when a chain is opened.  This reader only
 * needs to be safe on any bytes.
 */
#ifndef CHAINFS_IMAGE_REFS_H
#define CHAINFS_IMAGE_REFS_H

#include <stdbool.h>
#include <glib.h>

#include "chain-error.h"

typedef struct {
    bool qcow2;          /* has the qcow2 magic */
    char *backing;       /* backing reference as stored, NULL: none */
    char *backing_fmt;   /* recorded backing format, NULL: none */
    char *data_file;     /* external data file name as stored, NULL: none */
} ImageRefs;

/*
 * Read the header of the regular file open at fd (name: for messages).
 * On success fills *refs (free with image_refs_clear); a file too short
 * for a header, or without the qcow2 magic, is not qcow2 and refers to
 * nothing.  Fails on a read error or a qcow2 header of an unknown
 * version or with a backing file name that runs off the file.
 */
bool image_refs_read(int fd, const char *name, ImageRefs *refs,
                     GError **error);
void image_refs_clear(ImageRefs *refs);

#endif
