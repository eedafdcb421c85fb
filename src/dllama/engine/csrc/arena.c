/* The weight arena (arena.h). Chunks are mmap'ed, not malloc'ed, so that (on Linux >= 6.7, which aligns large
 * anonymous mappings to 2 MiB) each chunk starts on a huge-page boundary and MADV_HUGEPAGE applies to all of it, also
 * where the system's THP mode is `madvise`. Pages are only backed when written: the unused tail of a chunk costs at
 * most the huge page it ends in. */
#define _DEFAULT_SOURCE
#include "arena.h"

#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#define CHUNK ((size_t)64 << 20) /* a chunk holds many tensors; a larger tensor gets a chunk of its own size */
#define ALIGN 64

typedef struct chunk {
    struct chunk *next;
    uint8_t *base;
    size_t size, used;
} chunk;

struct arena {
    chunk *head; /* the chunk being filled first, then the older ones */
};

arena *arena_new(void) { return (arena *)calloc(1, sizeof(arena)); }

static chunk *chunk_new(size_t size) {
    chunk *c = (chunk *)calloc(1, sizeof(chunk));
    if (!c) return NULL;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        free(c);
        return NULL;
    }
#ifdef MADV_HUGEPAGE
    madvise(p, size, MADV_HUGEPAGE); /* advice only: without THP the arena still works with small pages */
#endif
    c->base = (uint8_t *)p;
    c->size = size;
    return c;
}

void *arena_alloc(arena *a, size_t n) {
    if (!a || n == 0) return NULL;
    n = (n + ALIGN - 1) & ~(size_t)(ALIGN - 1);
    chunk *c = a->head;
    if (!c || c->size - c->used < n) {
        chunk *nc = chunk_new(n > CHUNK ? n : CHUNK);
        if (!nc) return NULL;
        if (c && n > CHUNK) { /* a big tensor: its own chunk, kept behind the one still being filled */
            nc->next = c->next;
            c->next = nc;
        } else {
            nc->next = c;
            a->head = nc;
        }
        c = nc;
    }
    void *p = c->base + c->used;
    c->used += n;
    return p;
}

void arena_free(arena *a) {
    if (!a) return;
    for (chunk *c = a->head, *next; c; c = next) {
        next = c->next;
        munmap(c->base, c->size);
        free(c);
    }
    free(a);
}
