/*
 * events.c: the event bus (see events.h).
 *
 * Every reader has its own queue, so a reader that never reads costs the
 * others nothing and the emitter at most EVENT_QUEUE_MAX lines of memory
 * per reader.  A parked read is a fuse_req_t kept in its reader; exactly
 * one of three parties answers it, whichever takes it out of the reader's
 * parked queue under the bus lock first: an emitter (an event), the
 * interrupt callback (EINTR), or shutdown / release (end of file, EINTR).
 * The request is answered only after it was taken out, so no one can
 * answer it twice, and libfuse frees it in the reply.
 */
#define G_LOG_DOMAIN "chainfs"

#include <errno.h>
#include <poll.h>
#include <string.h>

#include "events.h"
#include "json.h"

/* One line waiting in a reader's queue.  line NULL: an overflow marker,
 * standing for the dropped events, rendered when it is read. */
typedef struct {
    char *line;
    uint64_t dropped;
    double time;          /* of the first drop */
} QueuedEvent;

typedef struct {
    fuse_req_t req;
    size_t size;
} ParkedRead;

struct EventReader {
    EventBus *bus;
    /* Guarded by bus->lock, as everything below. */
    GQueue events;        /* QueuedEvent *, oldest first */
    guint queued;         /* events in the queue, markers not counted */
    size_t head_done;     /* bytes of the head line already read */
    GQueue parked;        /* ParkedRead *, oldest first */
    struct fuse_pollhandle *ph; /* notify at the next event; owned */
};

struct EventBus {
    GMutex lock;
    GPtrArray *readers;   /* EventReader *, not owned until bus_free */
    bool shutdown;
};

/* An answer prepared under the lock and sent after it is dropped. */
typedef struct {
    fuse_req_t req;
    char *buf;            /* NULL with err 0: end of file */
    size_t len;
    int err;
} PendingReply;

static double event_now(void)
{
    return (double)g_get_real_time() / G_USEC_PER_SEC;
}

static char *event_line(double time, const char *export_name,
                        const char *event, const char *fields)
{
    GString *out = g_string_new("{");

    g_string_append_printf(out, "\"time\":%.6f,\"export\":", time);
    json_append_string(out, export_name);
    g_string_append(out, ",\"event\":");
    json_append_string(out, event);
    if (fields && fields[0] != '\0') {
        g_string_append_c(out, ',');
        g_string_append(out, fields);
    }
    g_string_append(out, "}\n");
    return g_string_free(out, FALSE);
}

static void queued_event_free(QueuedEvent *q)
{
    g_free(q->line);
    g_free(q);
}

EventBus *event_bus_new(void)
{
    EventBus *bus = g_new0(EventBus, 1);

    g_mutex_init(&bus->lock);
    bus->readers = g_ptr_array_new();
    return bus;
}

/* Call with the bus lock held.  Queue line (owned) for r, or count it as
 * dropped when r's queue is full. */
static void reader_push_locked(EventReader *r, char *line, double time)
{
    QueuedEvent *q;

    if (r->queued >= EVENT_QUEUE_MAX) {
        QueuedEvent *tail = g_queue_peek_tail(&r->events);

        g_free(line);
        /* One marker per gap: a run of drops adds to the same one. */
        if (tail && !tail->line) {
            tail->dropped++;
            return;
        }
        q = g_new0(QueuedEvent, 1);
        q->dropped = 1;
        q->time = time;
        g_queue_push_tail(&r->events, q);
        return;
    }
    q = g_new0(QueuedEvent, 1);
    q->line = line;
    q->time = time;
    g_queue_push_tail(&r->events, q);
    r->queued++;
}

/* Call with the bus lock held and an event queued: up to size bytes of
 * the head line (one read returns at most one line; the rest of a longer
 * line comes with the next read). */
static char *reader_take_locked(EventReader *r, size_t size, size_t *len)
{
    QueuedEvent *q = g_queue_peek_head(&r->events);
    size_t line_len, n;
    char *buf;

    if (!q->line) {
        g_autofree char *fields = g_strdup_printf("\"dropped\":%" G_GUINT64_FORMAT,
                                                  q->dropped);
        q->line = event_line(q->time, NULL, "overflow", fields);
        /* Now a line of its own: it leaves the queue like one. */
        r->queued++;
    }
    line_len = strlen(q->line);
    n = MIN(size, line_len - r->head_done);
    buf = g_memdup2(q->line + r->head_done, n);
    r->head_done += n;
    if (r->head_done == line_len) {
        g_queue_pop_head(&r->events);
        queued_event_free(q);
        r->queued--;
        r->head_done = 0;
    }
    *len = n;
    return buf;
}

static void send_replies(GArray *replies)
{
    for (guint i = 0; i < replies->len; i++) {
        PendingReply *p = &g_array_index(replies, PendingReply, i);

        if (p->err) {
            fuse_reply_err(p->req, p->err);
        } else {
            fuse_reply_buf(p->req, p->buf, p->len);
        }
        g_free(p->buf);
    }
}

static void notify_polls(GPtrArray *handles)
{
    for (guint i = 0; i < handles->len; i++) {
        struct fuse_pollhandle *ph = g_ptr_array_index(handles, i);

        /* Fails only when the kernel is gone (unmounted): nothing to wake. */
        fuse_lowlevel_notify_poll(ph);
        fuse_pollhandle_destroy(ph);
    }
}

/* Call with the bus lock held: answer r's parked reads from its queue
 * while both last. */
static void reader_serve_parked_locked(EventReader *r, GArray *replies)
{
    while (!g_queue_is_empty(&r->parked) && !g_queue_is_empty(&r->events)) {
        ParkedRead *p = g_queue_pop_head(&r->parked);
        PendingReply reply = { .req = p->req };

        reply.buf = reader_take_locked(r, p->size, &reply.len);
        g_array_append_val(replies, reply);
        g_free(p);
    }
}

void event_bus_emit(EventBus *bus, const char *export_name, const char *event,
                    const char *fields)
{
    g_autoptr(GArray) replies = g_array_new(FALSE, FALSE,
                                            sizeof(PendingReply));
    g_autoptr(GPtrArray) polls = g_ptr_array_new();
    double time = event_now();
    g_autofree char *line = event_line(time, export_name, event, fields);

    g_mutex_lock(&bus->lock);
    for (guint i = 0; i < bus->readers->len; i++) {
        EventReader *r = g_ptr_array_index(bus->readers, i);

        reader_push_locked(r, g_strdup(line), time);
        reader_serve_parked_locked(r, replies);
        if (r->ph) {
            g_ptr_array_add(polls, g_steal_pointer(&r->ph));
        }
    }
    g_mutex_unlock(&bus->lock);
    send_replies(replies);
    notify_polls(polls);
}

/* Call with the bus lock held: take every parked read of r out, to be
 * answered with err (0: end of file). */
static void reader_unpark_all_locked(EventReader *r, int err, GArray *replies)
{
    ParkedRead *p;

    while ((p = g_queue_pop_head(&r->parked))) {
        PendingReply reply = { .req = p->req, .err = err };

        g_array_append_val(replies, reply);
        g_free(p);
    }
}

void event_bus_shutdown(EventBus *bus)
{
    g_autoptr(GArray) replies = g_array_new(FALSE, FALSE,
                                            sizeof(PendingReply));
    g_autoptr(GPtrArray) polls = g_ptr_array_new();

    g_mutex_lock(&bus->lock);
    bus->shutdown = true;
    for (guint i = 0; i < bus->readers->len; i++) {
        EventReader *r = g_ptr_array_index(bus->readers, i);

        reader_unpark_all_locked(r, 0, replies);
        if (r->ph) {
            g_ptr_array_add(polls, g_steal_pointer(&r->ph));
        }
    }
    g_mutex_unlock(&bus->lock);
    send_replies(replies);
    notify_polls(polls);
}

static void reader_clear(EventReader *r)
{
    g_queue_clear_full(&r->events, (GDestroyNotify)queued_event_free);
    if (r->ph) {
        fuse_pollhandle_destroy(r->ph);
    }
    g_free(r);
}

void event_bus_free(EventBus *bus)
{
    if (!bus) {
        return;
    }
    /* No request loop runs any more: nothing can be parked after
     * shutdown, and the readers left open are never released. */
    for (guint i = 0; i < bus->readers->len; i++) {
        EventReader *r = g_ptr_array_index(bus->readers, i);

        g_queue_clear_full(&r->parked, g_free);
        reader_clear(r);
    }
    g_ptr_array_free(bus->readers, TRUE);
    g_mutex_clear(&bus->lock);
    g_free(bus);
}

EventReader *event_reader_new(EventBus *bus)
{
    EventReader *r = g_new0(EventReader, 1);

    r->bus = bus;
    g_queue_init(&r->events);
    g_queue_init(&r->parked);
    /* From here on every event reaches r: "from the moment of the open". */
    g_mutex_lock(&bus->lock);
    g_ptr_array_add(bus->readers, r);
    g_mutex_unlock(&bus->lock);
    return r;
}

void event_reader_free(EventReader *r)
{
    g_autoptr(GArray) replies = g_array_new(FALSE, FALSE,
                                            sizeof(PendingReply));
    EventBus *bus;

    if (!r) {
        return;
    }
    bus = r->bus;
    g_mutex_lock(&bus->lock);
    g_ptr_array_remove(bus->readers, r);
    /* The kernel releases a file only when no read of it is in flight:
     * nothing should be parked; answer anything that is, all the same. */
    reader_unpark_all_locked(r, EINTR, replies);
    g_mutex_unlock(&bus->lock);
    send_replies(replies);
    reader_clear(r);
}

/*
 * libfuse calls this on FUSE_INTERRUPT for a request it registered for,
 * or at once from fuse_req_interrupt_func when the interrupt came first.
 * Only a read still parked is answered here; one an emitter took out is
 * being answered with its event.
 */
static void event_read_interrupted(fuse_req_t req, void *data)
{
    EventReader *r = data;
    EventBus *bus = r->bus;
    bool found = false;

    g_mutex_lock(&bus->lock);
    for (GList *l = r->parked.head; l; l = l->next) {
        ParkedRead *p = l->data;

        if (p->req == req) {
            g_queue_delete_link(&r->parked, l);
            g_free(p);
            found = true;
            break;
        }
    }
    g_mutex_unlock(&bus->lock);
    if (found) {
        fuse_reply_err(req, EINTR);
    }
}

void event_reader_read(EventReader *r, fuse_req_t req, size_t size,
                       bool nonblock)
{
    EventBus *bus = r->bus;
    PendingReply reply = { .req = req };

    if (size == 0) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    /* Registered before the request can be parked (seen by an emitter,
     * which may answer and free it at once); an interrupt that came
     * before is seen below as fuse_req_interrupted. */
    if (!nonblock) {
        fuse_req_interrupt_func(req, event_read_interrupted, r);
    }
    g_mutex_lock(&bus->lock);
    if (!g_queue_is_empty(&r->events)) {
        reply.buf = reader_take_locked(r, size, &reply.len);
    } else if (bus->shutdown) {
        /* end of file */
    } else if (nonblock) {
        reply.err = EAGAIN;
    } else if (fuse_req_interrupted(req)) {
        reply.err = EINTR;
    } else {
        ParkedRead *p = g_new0(ParkedRead, 1);

        p->req = req;
        p->size = size;
        g_queue_push_tail(&r->parked, p);
        g_mutex_unlock(&bus->lock);
        return;
    }
    g_mutex_unlock(&bus->lock);
    if (reply.err) {
        fuse_reply_err(req, reply.err);
    } else {
        fuse_reply_buf(req, reply.buf, reply.len);
    }
    g_free(reply.buf);
}

void event_reader_poll(EventReader *r, fuse_req_t req,
                       struct fuse_pollhandle *ph)
{
    EventBus *bus = r->bus;
    struct fuse_pollhandle *old = NULL;
    unsigned revents = 0;

    g_mutex_lock(&bus->lock);
    if (!g_queue_is_empty(&r->events) || bus->shutdown) {
        /* Readable now (end of file after shutdown counts): the kernel
         * asks again before it waits, no notification needed. */
        revents = POLLIN | POLLRDNORM;
        old = ph;
    } else if (ph) {
        old = r->ph;
        r->ph = ph;
    }
    g_mutex_unlock(&bus->lock);
    if (old) {
        fuse_pollhandle_destroy(old);
    }
    fuse_reply_poll(req, revents);
}
