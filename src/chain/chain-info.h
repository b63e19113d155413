/*
 * chain-info.h: what chainfs tells about a chain, as JSON.
 *
 * One builder serves both sides: the daemon's user.chainfs.chain attribute
 * (and the chain member of the control file's status) and chainctl's
 * offline `info`, so that `chainctl info` shows the same fields whether it
 * asks a mounted export or opens the image files itself.
 *
 * It takes the chain's topology lock for reading itself; call it without
 * that lock (the lock prefers writers and does not nest).
 */
#ifndef CHAINFS_CHAIN_INFO_H
#define CHAINFS_CHAIN_INFO_H

#include "chain.h"

/*
 * The chain as design.md's object {"name", "writable", ["reason",]
 * "layers": [...]}, plus "image_dir" (the canonical image directory the
 * layers' "file" names are relative to): "writable" false when the active layer cannot be
 * written (its read-only reason, or a file or filesystem that refuses
 * writes), with "reason" saying why; layers active layer first.  Each layer: "file" (its name
 * in the image directory), "format",
 * "virtual_size", "allocated" (bytes its file uses on disk), "backing" (the
 * reference as stored, or null), and beyond design.md "cluster_size" (null
 * for raw) and "backing_format" (the backing file's format, as recorded or,
 * when the image records none, as resolved; null without a backing file).
 * Newly allocated.
 */
char *chain_info_json(Chain *chain);

#endif
