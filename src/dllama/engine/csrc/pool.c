/* Persistent thread pool with dynamic chunk claiming.
 *
 * The caller's thread is thread 0 and claims chunks too, so nthreads=1 creates no thread, and a worker
 * that the OS has descheduled (more nodes than cores) only delays the chunk it already claimed. Claims go
 * through one 64-bit atomic: high half = task generation, low half = next chunk, so a late worker can never
 * claim a chunk of a newer task with an older task's function. Workers spin for 0.2 ms after a task (the ops of
 * one forward pass follow each other within microseconds), then sleep on a condition variable: an idle node
 * burns no CPU between tokens. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, CLOCK_MONOTONIC under -std=c11 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "common.h"

#define SPIN_NS 200000LL

struct pool {
    int n;
    pthread_t *threads;
    _Atomic uint64_t state; /* gen << 32 | next chunk */
    atomic_int done;        /* chunks finished in the current task */
    atomic_int sleepers;
    atomic_int stop;
    chunk_fn fn;
    void *arg;
    int nchunks;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

typedef struct { pool *p; int index; } worker_arg;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* claim and run chunks of generation `gen` until none is left */
static void work(pool *p, uint32_t gen, int ith) {
    for (;;) {
        uint64_t s = atomic_load(&p->state);
        if ((uint32_t)(s >> 32) != gen) return;
        const int c = (int)(uint32_t)s;
        if (c >= p->nchunks) return;
        if (!atomic_compare_exchange_weak(&p->state, &s, s + 1)) continue;
        p->fn(p->arg, c, ith);
        atomic_fetch_add(&p->done, 1);
    }
}

static void *worker_main(void *varg) {
    worker_arg *wa = (worker_arg *)varg;
    pool *p = wa->p;
    const int index = wa->index;
    free(wa);
    uint32_t seen = 0;
    for (;;) {
        long long start = 0;
        for (unsigned k = 0;; k++) {
            if ((uint32_t)(atomic_load(&p->state) >> 32) != seen || atomic_load(&p->stop)) break;
            cpu_relax();
            if ((k & 255) == 255) {
                const long long t = now_ns();
                if (!start) start = t;
                else if (t - start > SPIN_NS) {
                    pthread_mutex_lock(&p->mu);
                    atomic_fetch_add(&p->sleepers, 1);
                    while ((uint32_t)(atomic_load(&p->state) >> 32) == seen && !atomic_load(&p->stop))
                        pthread_cond_wait(&p->cv, &p->mu);
                    atomic_fetch_sub(&p->sleepers, 1);
                    pthread_mutex_unlock(&p->mu);
                    break;
                }
            }
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = (uint32_t)(atomic_load(&p->state) >> 32);
        work(p, seen, index);
    }
}

pool *pool_create(int nthreads) {
    pool *p = (pool *)calloc(1, sizeof(pool));
    if (!p) return NULL;
    p->n = nthreads < 1 ? 1 : nthreads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->threads = (pthread_t *)calloc((size_t)p->n, sizeof(pthread_t));
    for (int i = 1; i < p->n; i++) {
        worker_arg *wa = (worker_arg *)malloc(sizeof(worker_arg));
        wa->p = p;
        wa->index = i;
        pthread_create(&p->threads[i], NULL, worker_main, wa);
    }
    return p;
}

void pool_destroy(pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->threads);
    free(p);
}

int pool_size(const pool *p) { return p ? p->n : 1; }

void pool_run(pool *p, chunk_fn fn, void *arg, int nchunks) {
    if (nchunks <= 0) return;
    if (!p || p->n == 1 || nchunks == 1) {
        for (int c = 0; c < nchunks; c++) fn(arg, c, 0);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    p->nchunks = nchunks;
    atomic_store(&p->done, 0);
    const uint32_t gen = (uint32_t)(atomic_load(&p->state) >> 32) + 1;
    atomic_store(&p->state, (uint64_t)gen << 32); /* seq_cst: pairs with the sleepers increment */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    work(p, gen, 0);
    for (unsigned k = 0; atomic_load(&p->done) < nchunks; k++) {
        cpu_relax();
        if ((k & 1023) == 1023) sched_yield(); /* the claimer of the last chunk may be descheduled */
    }
}
