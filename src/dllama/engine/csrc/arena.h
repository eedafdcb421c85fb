/* Where an engine keeps the weights it owns (its repacked copies): a bump allocator over large anonymous mappings
 * marked for transparent huge pages, freed all at once with the engine. Decoding streams every weight once per
 * token, so with 4 KiB pages it walks a new page-table entry every 4 KiB; 2 MiB pages cut those TLB misses 512-fold.
 * Packing the tensors together is what lets small models profit: their tensors (0.1-0.5 MiB each) would never fill
 * a huge page on their own, while a mapping per tensor rounded up to 2 MiB would waste memory. */
#ifndef DLLAMA_ARENA_H
#define DLLAMA_ARENA_H

#include <stddef.h>

typedef struct arena arena;

arena *arena_new(void);
void *arena_alloc(arena *a, size_t n); /* 64-byte aligned, NULL when out of memory */
void arena_free(arena *a);             /* every block, and the arena */

#endif
