/* Persistent thread pool: each thread runs its own contiguous range of chunks, then steals from the others.
 *
 * The caller's thread is thread 0 and runs chunks too, so nthreads=1 creates no thread. Every task's chunks are cut
 * into one contiguous range per thread: a thread streams its range front to back (one long sequential read of its
 * weight rows, which the hardware prefetcher follows; chunks handed out round-robin made every thread's stream
 * jump at each chunk), and a thread done with its range takes the back half of another's. So a worker the OS has
 * descheduled (more nodes than cores) only delays the chunk it is running. Each range is one 64-bit atomic
 * (task generation | front | back): a late worker can never claim a chunk of a newer task with an older task's
 * function. Workers spin for 0.2 ms after a task (the ops of one forward pass follow each other within
 * microseconds), then sleep on a condition variable: an idle node burns no CPU between tokens. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, CLOCK_MONOTONIC under -std=c11 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "common.h"

#define SPIN_NS 200000LL

/* a range word: generation (24 bits) | front (20 bits) | back (20 bits), chunks [front, back) left to run */
#define R_BITS 20
#define R_MASK ((1ULL << R_BITS) - 1)
#define MAX_CHUNKS ((int)R_MASK)
static inline uint64_t r_pack(uint32_t gen, uint32_t front, uint32_t back) {
    return ((uint64_t)(gen & 0xFFFFFF) << (2 * R_BITS)) | ((uint64_t)front << R_BITS) | back;
}
static inline uint32_t r_gen(uint64_t r) { return (uint32_t)(r >> (2 * R_BITS)); }
static inline uint32_t r_front(uint64_t r) { return (uint32_t)(r >> R_BITS) & R_MASK; }
static inline uint32_t r_back(uint64_t r) { return (uint32_t)r & R_MASK; }

typedef struct {
    _Alignas(64) _Atomic uint64_t r; /* own cache line: the owner updates it at every chunk */
} range;

struct pool {
    int n;
    pthread_t *threads;
    range *ranges;                 /* [n] */
    _Alignas(64) atomic_uint gen;  /* task generation (24 bits used), what idle workers watch */
    atomic_int stop;
    chunk_fn fn;
    void *arg;
    atomic_int nchunks; /* read by thieves before they hold a chunk: a stale value only makes a worse split */
    _Alignas(64) atomic_int done;  /* chunks finished in the current task (added once per thread and task) */
    atomic_int sleepers;
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

/* the front chunk of our own range for generation `gen`, or -1 when it is empty */
static inline int claim(pool *p, int ith, uint32_t gen) {
    _Atomic uint64_t *r = &p->ranges[ith].r;
    uint64_t s = atomic_load_explicit(r, memory_order_acquire);
    for (;;) {
        if (r_gen(s) != (gen & 0xFFFFFF) || r_front(s) >= r_back(s)) return -1;
        if (atomic_compare_exchange_weak_explicit(r, &s, r_pack(gen, r_front(s) + 1, r_back(s)), memory_order_acq_rel,
                                                  memory_order_acquire))
            return (int)r_front(s);
    }
}

/* our range is empty: take the back half of another thread's range (all of it if its owner has not started: it is
 * most likely descheduled), make all but its first chunk our range (a contiguous piece again, open to thieves in
 * turn) and return that first chunk; -1 when every range is empty. A thread left alone (the others descheduled)
 * thus reads the whole task front to back, like one thread. */
static int steal(pool *p, int ith, uint32_t gen) {
    for (int k = 1; k < p->n; k++) {
        const int v = (ith + k) % p->n;
        _Atomic uint64_t *r = &p->ranges[v].r;
        uint64_t s = atomic_load_explicit(r, memory_order_acquire);
        for (;;) {
            const uint32_t f = r_front(s), b = r_back(s);
            if (r_gen(s) != (gen & 0xFFFFFF) || f >= b) break;
            const int n = atomic_load_explicit(&p->nchunks, memory_order_relaxed);
            const uint32_t start = (uint32_t)((long long)n * v / p->n); /* its front when the task began */
            const uint32_t mid = f == start ? f : f + (b - f) / 2; /* the owner keeps [f, mid), we take [mid, b) */
            if (atomic_compare_exchange_weak_explicit(r, &s, r_pack(gen, f, mid), memory_order_acq_rel,
                                                      memory_order_acquire)) {
                /* only we write our own range while it is empty (thieves skip empty ranges) */
                atomic_store_explicit(&p->ranges[ith].r, r_pack(gen, mid + 1, b), memory_order_release);
                return (int)mid;
            }
        }
    }
    return -1;
}

/* run chunks of generation `gen`: our own range front to back, then stolen ones. fn and arg are read only once a
 * chunk is claimed: the task is then unfinished, so pool_run cannot be writing the next task's. */
static void work(pool *p, uint32_t gen, int ith) {
    chunk_fn fn = NULL;
    void *arg = NULL;
    int ran = 0;
    for (int c; (c = claim(p, ith, gen)) >= 0 || (c = steal(p, ith, gen)) >= 0; ran++) {
        if (!fn) {
            fn = p->fn;
            arg = p->arg;
        }
        fn(arg, c, ith);
    }
    if (ran) atomic_fetch_add_explicit(&p->done, ran, memory_order_release);
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
            if (atomic_load_explicit(&p->gen, memory_order_acquire) != seen || atomic_load(&p->stop)) break;
            cpu_relax();
            if ((k & 255) == 255) {
                const long long t = now_ns();
                if (!start) start = t;
                else if (t - start > SPIN_NS) {
                    pthread_mutex_lock(&p->mu);
                    atomic_fetch_add(&p->sleepers, 1);
                    while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
                    atomic_fetch_sub(&p->sleepers, 1);
                    pthread_mutex_unlock(&p->mu);
                    break;
                }
            }
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = atomic_load_explicit(&p->gen, memory_order_acquire);
        work(p, seen, index);
    }
}

pool *pool_create(int nthreads) {
    pool *p = (pool *)aligned_alloc(64, (sizeof(pool) + 63) / 64 * 64); /* its atomics on their own cache lines */
    if (!p) return NULL;
    memset(p, 0, sizeof(pool));
    p->n = nthreads < 1 ? 1 : nthreads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->threads = (pthread_t *)calloc((size_t)p->n, sizeof(pthread_t));
    p->ranges = (range *)aligned_alloc(64, sizeof(range) * (size_t)p->n);
    if (!p->threads || !p->ranges) {
        free(p->threads);
        free(p->ranges);
        free(p);
        return NULL;
    }
    for (int i = 0; i < p->n; i++) atomic_init(&p->ranges[i].r, 0);
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
    free(p->ranges);
    free(p);
}

int pool_size(const pool *p) { return p ? p->n : 1; }

void pool_run(pool *p, chunk_fn fn, void *arg, int nchunks) {
    if (nchunks <= 0) return;
    /* more chunks than a range word holds never happens (ops make tens of chunks); still correct, serially */
    if (!p || p->n == 1 || nchunks == 1 || nchunks > MAX_CHUNKS) {
        for (int c = 0; c < nchunks; c++) fn(arg, c, 0);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    atomic_store_explicit(&p->nchunks, nchunks, memory_order_relaxed);
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    const uint32_t gen = (atomic_load_explicit(&p->gen, memory_order_relaxed) + 1) & 0xFFFFFF;
    for (int i = 0; i < p->n; i++) /* thread i: chunks [i n / N, (i + 1) n / N) */
        atomic_store_explicit(&p->ranges[i].r,
                              r_pack(gen, (uint32_t)((long long)nchunks * i / p->n),
                                     (uint32_t)((long long)nchunks * (i + 1) / p->n)),
                              memory_order_relaxed);
    atomic_store(&p->gen, gen); /* seq_cst: publishes fn, arg and the ranges; pairs with the sleepers increment */
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    work(p, gen, 0);
    for (unsigned k = 0; atomic_load_explicit(&p->done, memory_order_acquire) < nchunks; k++) {
        cpu_relax();
        if ((k & 1023) == 1023) sched_yield(); /* the thread running the last chunk may be descheduled */
    }
}
