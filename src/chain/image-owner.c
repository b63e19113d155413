/*
 * image-owner.c: the owner and permission bits of a disk, kept in the
 * file of its active layer (chain.h).
 *
 * libvirt's DAC driver hands a disk to the guest's qemu user by chown and
 * chmod of the disk file.  For an export that file is the chain's active
 * layer, which changes: a snapshot pushes a new overlay, a pivot makes
 * base the active layer.  Each change gives the new active layer the
 * owner and mode of the old one, so the disk keeps them, across a restart
 * too (the export takes them from its active layer's file).
 *
 * Durability: owner and mode are inode metadata, written by the file
 * system's journal on its own schedule (fdatasync does not cover them).
 * No fsync here: one failing on the active layer would have to latch the
 * image (image-latch.c), and libvirt sets them again at every domain
 * start anyway.  A new overlay is synced by the snapshot (qcow2_create
 * and its flushes).
 */
#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chain-error.h"
#include "chain.h"

bool chain_image_set_owner(ChainImage *img, uid_t uid, gid_t gid,
                           mode_t mode, GError **error)
{
    if ((uid != (uid_t)-1 || gid != (gid_t)-1) &&
        fchown(img->fd, uid, gid) < 0) {
        int e = errno;

        chainfs_set_error(error, e, "%s: cannot change the owner: %s",
                          img->name, g_strerror(e));
        return false;
    }
    if (mode != (mode_t)-1 && fchmod(img->fd, mode & 07777) < 0) {
        int e = errno;

        chainfs_set_error(error, e, "%s: cannot change the mode: %s",
                          img->name, g_strerror(e));
        return false;
    }
    return true;
}

bool chain_image_copy_owner(ChainImage *from, ChainImage *to, GError **error)
{
    struct stat st;

    if (fstat(from->fd, &st) < 0) {
        int e = errno;

        chainfs_set_error(error, e, "%s: cannot stat: %s", from->name,
                          g_strerror(e));
        return false;
    }
    return chain_image_set_owner(to, st.st_uid, st.st_gid, st.st_mode,
                                 error);
}
