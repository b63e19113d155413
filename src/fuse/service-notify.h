/*
 * service-notify.h: tell systemd how the service is doing (Type=notify).
 *
 * The sd_notify protocol, by hand so that chainfs needs no libsystemd:
 * one datagram of "KEY=VALUE\n" lines to the Unix socket named by
 * $NOTIFY_SOCKET (a path, or an abstract name written with a leading
 * '@').  Without $NOTIFY_SOCKET (not run by systemd) it does nothing.
 */
#ifndef CHAINFS_SERVICE_NOTIFY_H
#define CHAINFS_SERVICE_NOTIFY_H

#include <stdbool.h>

/*
 * Send state ("READY=1\nSTATUS=...", "STOPPING=1").  Returns false when
 * $NOTIFY_SOCKET is set but the message could not be sent (errno set);
 * true when sent or when there is no one to tell.
 */
bool service_notify(const char *state);

#endif
