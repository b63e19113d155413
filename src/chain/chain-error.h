/*
 * chain-error.h: the CHAINFS_ERROR GError domain.
 *
 * Control paths (open, resolve, parse a command, start a job) report
 * failures as a GError in this domain.  The error code IS the errno value
 * the user should see (EINVAL, ENOENT, EBUSY, EACCES, EROFS, ENOSPC, EIO,
 * EOPNOTSUPP, ELOOP, ...), because a setxattr or a write on the control
 * file can only return an errno; the message goes to last_error.
 */
#ifndef CHAINFS_CHAIN_ERROR_H
#define CHAINFS_CHAIN_ERROR_H

#include <errno.h>
#include <glib.h>

#define CHAINFS_ERROR (chainfs_error_quark())
GQuark chainfs_error_quark(void);

/* Set *error (if error is not NULL) in CHAINFS_ERROR with code errnum. */
void chainfs_set_error(GError **error, int errnum, const char *fmt, ...)
    G_GNUC_PRINTF(3, 4);

/* The errno an error carries: its code in CHAINFS_ERROR, EIO otherwise. */
int chainfs_error_errno(const GError *error);

#endif
