/* chain-error.c: the CHAINFS_ERROR domain (see chain-error.h). */
#include "chain-error.h"

G_DEFINE_QUARK(chainfs-error-quark, chainfs_error)

void chainfs_set_error(GError **error, int errnum, const char *fmt, ...)
{
    va_list ap;

    if (!error) {
        return;
    }
    va_start(ap, fmt);
    g_autofree char *msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_set_error_literal(error, CHAINFS_ERROR, errnum, msg);
}

int chainfs_error_errno(const GError *error)
{
    if (error && error->domain == CHAINFS_ERROR && error->code > 0) {
        return error->code;
    }
    return EIO;
}
