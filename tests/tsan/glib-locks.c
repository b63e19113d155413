/*
 * glib-locks.c: GMutex, GRecMutex, GRWLock and GCond over pthreads, for the
 * ThreadSanitizer run only (LD_PRELOAD, run-tests.sh).
 *
 * Why: on Linux GLib implements GMutex and GCond with raw futex calls,
 * which ThreadSanitizer cannot see, so every field guarded by a GMutex
 * would be reported as a race.  Preloaded, these definitions take the
 * place of GLib's for every call from chainfs's code (GLib binds its own
 * internal calls directly, so its private locks keep its implementation;
 * a lock is always handled by one implementation or the other, never
 * both, since chainfs never hands a GMutex to GLib other than through
 * g_cond_wait*, which is here too).  The pthread calls are intercepted by
 * TSan, which then knows every lock and wait.
 *
 * Each lock's first pointer-sized word holds a pointer to its pthread
 * object, made by *_init (or on first use: a zeroed static GMutex needs no
 * init, as in GLib) and freed by *_clear.  Not built with TSan itself:
 * LD_PRELOAD reaches every process the tests start (qemu-img, python),
 * which have no TSan runtime.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include <glib.h>

typedef enum { SHIM_MUTEX, SHIM_REC_MUTEX, SHIM_RWLOCK, SHIM_COND } ShimKind;

static void *shim_new(ShimKind kind)
{
    switch (kind) {
    case SHIM_MUTEX: {
        pthread_mutex_t *m = malloc(sizeof(*m));
        pthread_mutex_init(m, NULL);
        return m;
    }
    case SHIM_REC_MUTEX: {
        pthread_mutex_t *m = malloc(sizeof(*m));
        pthread_mutexattr_t attr;
        pthread_mutexattr_init(&attr);
        pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
        pthread_mutex_init(m, &attr);
        pthread_mutexattr_destroy(&attr);
        return m;
    }
    case SHIM_RWLOCK: {
        pthread_rwlock_t *l = malloc(sizeof(*l));
        pthread_rwlock_init(l, NULL);
        return l;
    }
    case SHIM_COND: {
        pthread_cond_t *c = malloc(sizeof(*c));
        pthread_condattr_t attr;
        /* g_cond_wait_until() takes a g_get_monotonic_time() deadline. */
        pthread_condattr_init(&attr);
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        pthread_cond_init(c, &attr);
        pthread_condattr_destroy(&attr);
        return c;
    }
    }
    abort();
}

static void shim_free(ShimKind kind, void *obj)
{
    switch (kind) {
    case SHIM_MUTEX:
    case SHIM_REC_MUTEX:
        pthread_mutex_destroy(obj);
        break;
    case SHIM_RWLOCK:
        pthread_rwlock_destroy(obj);
        break;
    case SHIM_COND:
        pthread_cond_destroy(obj);
        break;
    }
    free(obj);
}

/*
 * The pthread object behind *slot.  An initialised lock got it in its
 * *_init, in the initialising thread, and is published to other threads
 * by chainfs's own code, which TSan sees.  A zeroed static lock gets it
 * on first use under shim_lazy_lock, and is marked (low bit) so that every
 * later use also takes that lock: this file is not instrumented, so TSan
 * would not see the publication otherwise.
 */
static pthread_mutex_t shim_lazy_lock = PTHREAD_MUTEX_INITIALIZER;

static void *shim_get(void **slot, ShimKind kind)
{
    uintptr_t v = (uintptr_t)__atomic_load_n(slot, __ATOMIC_ACQUIRE);

    if (v && !(v & 1)) {
        return (void *)v;
    }
    pthread_mutex_lock(&shim_lazy_lock);
    v = (uintptr_t)*slot;
    if (!v) {
        v = (uintptr_t)shim_new(kind) | 1;
        __atomic_store_n(slot, (void *)v, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&shim_lazy_lock);
    return (void *)(v & ~(uintptr_t)1);
}

static void shim_init(void **slot, ShimKind kind)
{
    *slot = shim_new(kind);
}

static void shim_clear(void **slot, ShimKind kind)
{
    uintptr_t v = (uintptr_t)*slot;

    *slot = NULL;
    if (v) {
        shim_free(kind, (void *)(v & ~(uintptr_t)1));
    }
}

#define MUTEX(m) ((pthread_mutex_t *)shim_get(&(m)->p, SHIM_MUTEX))
#define REC(m) ((pthread_mutex_t *)shim_get(&(m)->p, SHIM_REC_MUTEX))
#define RW(l) ((pthread_rwlock_t *)shim_get(&(l)->p, SHIM_RWLOCK))
#define COND(c) ((pthread_cond_t *)shim_get(&(c)->p, SHIM_COND))

void g_mutex_init(GMutex *m) { shim_init(&m->p, SHIM_MUTEX); }
void g_mutex_clear(GMutex *m) { shim_clear(&m->p, SHIM_MUTEX); }
void g_mutex_lock(GMutex *m) { pthread_mutex_lock(MUTEX(m)); }
void g_mutex_unlock(GMutex *m) { pthread_mutex_unlock(MUTEX(m)); }
gboolean g_mutex_trylock(GMutex *m) { return pthread_mutex_trylock(MUTEX(m)) == 0; }

void g_rec_mutex_init(GRecMutex *m) { shim_init(&m->p, SHIM_REC_MUTEX); }
void g_rec_mutex_clear(GRecMutex *m) { shim_clear(&m->p, SHIM_REC_MUTEX); }
void g_rec_mutex_lock(GRecMutex *m) { pthread_mutex_lock(REC(m)); }
void g_rec_mutex_unlock(GRecMutex *m) { pthread_mutex_unlock(REC(m)); }
gboolean g_rec_mutex_trylock(GRecMutex *m) { return pthread_mutex_trylock(REC(m)) == 0; }

void g_rw_lock_init(GRWLock *l) { shim_init(&l->p, SHIM_RWLOCK); }
void g_rw_lock_clear(GRWLock *l) { shim_clear(&l->p, SHIM_RWLOCK); }
void g_rw_lock_writer_lock(GRWLock *l) { pthread_rwlock_wrlock(RW(l)); }
gboolean g_rw_lock_writer_trylock(GRWLock *l) { return pthread_rwlock_trywrlock(RW(l)) == 0; }
void g_rw_lock_writer_unlock(GRWLock *l) { pthread_rwlock_unlock(RW(l)); }
void g_rw_lock_reader_lock(GRWLock *l) { pthread_rwlock_rdlock(RW(l)); }
gboolean g_rw_lock_reader_trylock(GRWLock *l) { return pthread_rwlock_tryrdlock(RW(l)) == 0; }
void g_rw_lock_reader_unlock(GRWLock *l) { pthread_rwlock_unlock(RW(l)); }

void g_cond_init(GCond *c) { shim_init(&c->p, SHIM_COND); }
void g_cond_clear(GCond *c) { shim_clear(&c->p, SHIM_COND); }
void g_cond_wait(GCond *c, GMutex *m) { pthread_cond_wait(COND(c), MUTEX(m)); }
void g_cond_signal(GCond *c) { pthread_cond_signal(COND(c)); }
void g_cond_broadcast(GCond *c) { pthread_cond_broadcast(COND(c)); }

gboolean g_cond_wait_until(GCond *c, GMutex *m, gint64 end_time)
{
    struct timespec ts = {
        .tv_sec = end_time / G_USEC_PER_SEC,
        .tv_nsec = (end_time % G_USEC_PER_SEC) * 1000,
    };

    return pthread_cond_timedwait(COND(c), MUTEX(m), &ts) != ETIMEDOUT;
}
