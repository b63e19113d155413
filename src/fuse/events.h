/*
 * events.h: the daemon-wide event bus behind MOUNTPOINT/.events
 * (design.md "Events").
 *
 * Emitters (job state changes, snapshot, pivot, a latched I/O error) hand
 * one event to event_bus_emit(); each open of .events is an EventReader
 * that gets every event emitted from its open on, one JSON line per read:
 *
 *     {"time":1765150000.123456,"export":"vm1","event":"job-ready",...}
 *
 * An emitter never waits for a reader: guest I/O paths and job threads
 * emit.  Each reader's queue holds at most EVENT_QUEUE_MAX events; one
 * that finds it full is dropped and counted, and the reader later reads
 * one "overflow" event ({"dropped": N}) in the place of those it missed.
 *
 * A read that finds nothing is parked, not served: the request is kept in
 * the reader and its FUSE worker thread returns to the loop, so any
 * number of blocked readers (bounded by memory only) hold no worker.  The
 * emitter that brings the next event answers it from its own thread; an
 * interrupt (FUSE_INTERRUPT: a Ctrl-C'd cat) answers it with EINTR;
 * event_bus_shutdown() answers every parked read with end of file.  A
 * read of a reader opened (or set) O_NONBLOCK that finds nothing fails
 * with EAGAIN.  poll()/select() are FUSE poll requests: the last poll
 * handle of a reader is notified when an event comes.
 *
 * Locking: EventBus.lock is innermost: emitters call in holding a job's
 * lock, a chain's topology lock or an image's meta_lock, and nothing is
 * called under it.  Replies and poll notifications are written to
 * /dev/fuse after it is dropped; that write never waits for the reading
 * process.
 */
#ifndef CHAINFS_EVENTS_H
#define CHAINFS_EVENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <glib.h>

#include <fuse_lowlevel.h>

/* Events one reader may have waiting before new ones are dropped. */
#define EVENT_QUEUE_MAX 1024

typedef struct EventBus EventBus;
typedef struct EventReader EventReader;

EventBus *event_bus_new(void);
/* After event_bus_shutdown (or when no request ever came): frees the
 * readers still open too. */
void event_bus_free(EventBus *bus);
/*
 * Queue one event for every reader: export NULL for a daemon-wide event
 * (JSON null), fields the event's own members without braces (may be
 * "" or NULL).  Never blocks but on the bus lock.
 */
void event_bus_emit(EventBus *bus, const char *export_name, const char *event,
                    const char *fields);
/* The request loop ended: answer every parked read with end of file; from
 * now on reads that find nothing return end of file at once. */
void event_bus_shutdown(EventBus *bus);

/* open / release of .events */
EventReader *event_reader_new(EventBus *bus);
void event_reader_free(EventReader *r);
/* A FUSE read: answered now (an event, EAGAIN when nonblock, end of file
 * after shutdown) or parked until an event, an interrupt or shutdown. */
void event_reader_read(EventReader *r, fuse_req_t req, size_t size,
                       bool nonblock);
/* A FUSE poll: replies POLLIN when an event waits; keeps ph (when not
 * NULL) to notify at the next event. */
void event_reader_poll(EventReader *r, fuse_req_t req,
                       struct fuse_pollhandle *ph);

#endif
