/* pool.c's contract, checked from C (tests/test_pool.py compiles and runs it): every chunk of a pool_run runs
 * exactly once, on a valid thread index, and all of them have finished when pool_run returns; with 1-6 threads
 * (more threads than cores, so workers get descheduled mid-task and the others take their chunks), chunk counts
 * from 1 to a few hundred, slow chunks, and pauses longer than the spin time between tasks (the workers go to
 * sleep and must wake up for the next task). Exit status 1 on the first violation.
 *
 *   cd src/dllama/engine/csrc && gcc -O2 -std=c11 -pthread -I. ../../../../tests/c/pool_check.c pool.c -o /tmp/pc && /tmp/pc
 * (add -fsanitize=thread to check the pool's memory ordering; an optional argument: tasks per thread count) */
#define _POSIX_C_SOURCE 200809L
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "common.h"

#define MAXC 600

typedef struct {
    atomic_int runs[MAXC];
    atomic_int bad_thread;
    int nthreads, slow;
} task;

static void chunk(void *arg, int c, int ith) {
    task *t = (task *)arg;
    if (ith < 0 || ith >= t->nthreads) atomic_store(&t->bad_thread, 1);
    if (c < 0 || c >= MAXC) {
        atomic_store(&t->bad_thread, 1);
        return;
    }
    /* slow chunks (every 7th, and every chunk a worker runs): the others must take the rest, and pool_run must
     * still wait for the slow ones */
    if (t->slow && (c % 7 == 0 || ith != 0)) {
        volatile unsigned x = 0;
        for (int i = 0; i < t->slow; i++) x += (unsigned)i;
    }
    atomic_fetch_add(&t->runs[c], 1);
}

static unsigned rnd(unsigned *s) { *s = *s * 1103515245u + 12345u; return *s >> 8; }

int main(int argc, char **argv) {
    const int iters = argc > 1 ? atoi(argv[1]) : 4000; /* tasks per thread count */
    unsigned seed = 7;
    static task t;
    for (int nth = 1; nth <= 6; nth++) {
        pool *p = pool_create(nth);
        if (!p || pool_size(p) != nth) {
            fprintf(stderr, "pool_create(%d) failed\n", nth);
            return 1;
        }
        for (int it = 0; it < iters; it++) {
            const int n = it % 5 == 0 ? 1 + (int)(rnd(&seed) % MAXC) : 1 + (int)(rnd(&seed) % 40);
            for (int c = 0; c < MAXC; c++) atomic_store(&t.runs[c], 0);
            atomic_store(&t.bad_thread, 0);
            t.nthreads = nth;
            t.slow = it % 3 == 0 ? 20000 : 0;
            pool_run(p, chunk, &t, n);
            for (int c = 0; c < MAXC; c++) {
                const int want = c < n ? 1 : 0, got = atomic_load(&t.runs[c]);
                if (got != want) {
                    fprintf(stderr, "threads %d task %d (%d chunks): chunk %d ran %d times when pool_run returned\n",
                            nth, it, n, c, got);
                    return 1;
                }
            }
            if (atomic_load(&t.bad_thread)) {
                fprintf(stderr, "threads %d task %d: a chunk ran with a bad thread or chunk index\n", nth, it);
                return 1;
            }
            if (it % 500 == 499) { /* idle longer than the spin: the workers sleep, the next task must wake them */
                const struct timespec ts = {0, 2000000};
                nanosleep(&ts, NULL);
            }
        }
        pool_destroy(p);
    }
    printf("ok\n");
    return 0;
}
