/*
 * directory.h: the image directory: which chains it holds, and the state
 * file chainfs keeps inside it.
 *
 * A chain is every image that no other (non-dropped) image of the
 * directory uses as its backing file, with its backing files below it.
 * Images that a commit or stream dropped from a chain are recorded in the
 * state file IMAGE_DIR/.chainfs-state: they are never chains of their own
 * and do not count as users of their backing file.
 */
#ifndef CHAINFS_DIRECTORY_H
#define CHAINFS_DIRECTORY_H

#include "chain.h"

#define CHAINFS_STATE_FILE ".chainfs-state"

/* One chain top found by discovery. */
typedef struct {
    char *top_file;     /* file name of the active layer */
    char *export_name;  /* from the state file, else derived from top_file */
} DirChain;

/*
 * Probe every regular file of dir (qcow2 by magic; raw only as a backing
 * file or by its extension .img/.raw), read backing references (without
 * opening chains) and list the chain tops, sorted by export name.  Files
 * whose header cannot be read are reported in *warnings (one message per
 * file, may be NULL) and skipped.  Two tops whose export names clash: the
 * second gets its full file name.
 */
GPtrArray *dir_discover(const char *dir, GPtrArray *warnings,
                        GError **error); /* of DirChain *, with free func */
void dir_chain_free(DirChain *c);

/*
 * Names of the images in dir, other than the ones in `except` (the layers
 * of the chain asking), whose backing chain includes `file`.  That is, the
 * other users of a layer: commit refuses a shared base without force.
 */
GPtrArray *dir_users_of(const char *dir, const char *file,
                        GPtrArray *except, GError **error);

/*
 * The state file: a GKeyFile.  Groups: [dropped] file=1 per dropped image;
 * [exports] export-name=active-file; [job EXPORT] checkpoint keys owned by
 * src/merge.  Every change rewrites it atomically (temporary file, fsync,
 * rename, fsync of the directory).  Thread-safe: one mutex per process.
 */
GKeyFile *dir_state_load(const char *dir, GError **error);
bool dir_state_save(const char *dir, GKeyFile *state, GError **error);
/* Load, apply fn(state, opaque), save; under the process-wide mutex. */
bool dir_state_update(const char *dir,
                      void (*fn)(GKeyFile *state, void *opaque),
                      void *opaque, GError **error);
bool dir_state_is_dropped(GKeyFile *state, const char *file);

#endif
