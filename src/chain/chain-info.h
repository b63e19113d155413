/*
 * chain-info.h: what chainfs tells about a chain, as JSON.
 *
 * One builder serves both sides: the daemon's user.chainfs.chain attribute
 * (and the chain member of the control file's status) and chainctl's
 * offline `info`, so that `chainctl info` shows the same fields whether it
 * asks a mounted export or opens the image files itself.  Likewise for the
 * room a commit needs: the control file's dry-run reply and chainctl's
 * offline --dry-run describe it with the same object.
 *
 * Both builders take the chain's topology lock for reading themselves (it
 * nests, so a caller may hold it to keep the layers put across several
 * calls).
 */
#ifndef CHAINFS_CHAIN_INFO_H
#define CHAINFS_CHAIN_INFO_H

#include "chain.h"

/*
 * The chain as design.md's object {"name", "layers": [...]}, active layer
 * first.  Each layer: "file" (its name in the image directory), "format",
 * "virtual_size", "allocated" (bytes its file uses on disk), "backing" (the
 * reference as stored, or null), and beyond design.md "cluster_size" (null
 * for raw) and "backing_format" (the backing file's format, as recorded or,
 * when the image records none, as resolved; null without a backing file).
 * Newly allocated.
 */
char *chain_info_json(Chain *chain);

/*
 * The layers a commit names, by design.md's defaults: top NULL is the
 * active layer; base NULL the bottom, or with shallow top's backing file.
 * Indices into the layer list as it is now (hold the topology lock to keep
 * them).  ENOENT when a name is no layer, EINVAL when base is not below
 * top.
 */
bool chain_info_commit_layers(Chain *chain, const char *top,
                              const char *base, bool shallow,
                              guint *top_idx, guint *base_idx,
                              GError **error);

/*
 * The room a commit of chain needs, needed_bytes as src/merge estimated it
 * (merge_commit_estimate), as {"top", "base", "needed_bytes",
 * "available_bytes"}: top and base resolved as chain_info_commit_layers()
 * does, available_bytes what base's filesystem has free for an
 * unprivileged writer (what the commit's ENOSPC check compares with).
 * NULL with *error set (CHAINFS_ERROR) when the layers do not resolve or
 * the filesystem cannot be asked.
 * Newly allocated.
 */
char *chain_info_commit_room_json(Chain *chain, const char *top,
                                  const char *base, bool shallow,
                                  uint64_t needed_bytes, GError **error);

#endif
