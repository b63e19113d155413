/*
 * qcow2.h: what the rest of chainfs needs from the qcow2 driver besides the
 * ImageDriver table (qcow2_driver in image.h).  The driver's own state and
 * helpers live in qcow2-int.h, private to src/chain/qcow2*.c.
 */
#ifndef CHAINFS_QCOW2_H
#define CHAINFS_QCOW2_H

#include "image.h"

/*
 * Create a new, empty qcow2 image at path (refused with EEXIST if the file
 * exists; O_EXCL).  version 2 or 3; cluster_size a power of two from 512 B
 * to 2 MiB; backing_ref NULL for none, else stored as given (relative refs
 * are relative to the new image's directory) with backing_fmt recorded in
 * the backing-format header extension when not NULL.  virtual_size is
 * rounded up to a multiple of 512 (QEMU counts 512-byte sectors), as grow()
 * also does.  16-bit refcounts, no feature bits set.  The file passes
 * `qemu-img check` and is fsync'ed (and its directory) on return.  On
 * failure nothing is left behind.
 */
bool qcow2_create(const char *path, uint64_t virtual_size,
                  uint32_t cluster_size, int version, const char *backing_ref,
                  const char *backing_fmt, GError **error);

#endif
