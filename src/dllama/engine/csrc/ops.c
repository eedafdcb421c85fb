/* Parallel ops: every op splits its output rows across the pool's threads, so the threads stream disjoint
 * weight rows and never write the same output (attention lives in attention.c). */
#include <math.h>
#include <stdlib.h>

#include "common.h"

void act_prepare(act *a, const float *x, int T, int cols, block_q8_0 *qbuf, float *sbuf, float *dbuf, int need_quant) {
    const int nb = cols / QK;
    a->T = T;
    a->cols = cols;
    a->xf = x;
    a->xq = qbuf;
    a->xs = sbuf;
    a->xd = dbuf;
    if (need_quant) {
        for (int t = 0; t < T; t++) quantize_row_q80(x + (size_t)t * cols, qbuf + (size_t)t * nb, sbuf + (size_t)t * nb, cols);
        for (size_t i = 0; i < (size_t)T * nb; i++) dbuf[i] = f16_to_f32(qbuf[i].d);
    }
}

/* rows per chunk: ~8 chunks per thread for balance, whole pairs of 8-row groups (the AVX-512 kernel's 16-row
 * tile; the repacked layout's unit is 8 rows) */
static int chunk_rows(const pool *p, int total) {
    const int nth = pool_size(p);
    if (nth == 1) return total > 0 ? (total + 15) & ~15 : 16;
    int ch = (total + nth * 8 - 1) / (nth * 8);
    ch = (ch + 15) & ~15;
    return ch < 16 ? 16 : ch;
}

static inline void dot_rows(const act *a, const tensor *w, int r0, int r1, float *y, int ldy) {
    const int nb = a->cols / QK;
    if (type_is_x8(w->type)) { /* r0 is a multiple of 16 (chunks are), rows % 8 == 0 (repack condition) */
        gemm_x8(w->type, w->data + (size_t)(r0 / 8) * w->stride, w->stride, (r1 - r0 + 7) / 8, nb, a->xq, a->xs, a->xd, nb,
                a->T, y + r0, ldy);
        return;
    }
    const int quant = type_is_quant(w->type);
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = w->data + (size_t)r * w->stride;
        int t = 0;
        if (quant) { /* prompt batches: one pass over the weight row serves 4 tokens */
            for (; t + 4 <= a->T; t += 4) {
                float o[4];
                vec_dot4(w->type, row, a->xq + (size_t)t * nb, a->xs + (size_t)t * nb, nb, a->cols, o);
                for (int i = 0; i < 4; i++) y[(size_t)(t + i) * ldy + r] = o[i];
            }
        }
        for (; t < a->T; t++) {
            y[(size_t)t * ldy + r] = vec_dot(w->type, row, a->xq + (size_t)t * nb, a->xs + (size_t)t * nb,
                                              a->xf + (size_t)t * a->cols, a->cols);
        }
    }
}

typedef struct {
    const act *a;
    int njobs;
    const tensor *w;
    float *const *y;
    const int *ldy;
    int ch;
    int first[4]; /* first chunk index of each job: chunks never straddle two jobs, so each starts 8-aligned */
    rows_fn epi;
    void *ctx;
} mm_args;

static void mm_task(void *varg, int chunk, int ith) {
    const mm_args *m = (const mm_args *)varg;
    (void)ith;
    int j = 0;
    while (j + 1 < m->njobs && chunk >= m->first[j + 1]) j++;
    const int start = (chunk - m->first[j]) * m->ch;
    const int end = start + m->ch < m->w[j].rows ? start + m->ch : m->w[j].rows;
    if (start >= end) return;
    dot_rows(m->a, &m->w[j], start, end, m->y[j], m->ldy[j]);
    if (m->epi) m->epi(m->ctx, j, start, end);
}

void matmul_epi(pool *p, const act *a, int njobs, const tensor *w, float *const *y, const int *ldy, int unit, rows_fn epi,
                void *ctx) {
    mm_args m = {a, njobs, w, y, ldy, 0, {0}, epi, ctx};
    int total = 0;
    for (int j = 0; j < njobs; j++) total += w[j].rows;
    m.ch = chunk_rows(p, total);
    if (unit > 1) m.ch = (m.ch + unit - 1) / unit * unit;
    int n = 0;
    for (int j = 0; j < njobs; j++) {
        m.first[j] = n;
        n += (w[j].rows + m.ch - 1) / m.ch;
    }
    pool_run(p, mm_task, &m, n);
}

void matmul(pool *p, const act *a, int njobs, const tensor *w, float *const *y, const int *ldy) {
    matmul_epi(p, a, njobs, w, y, ldy, 1, NULL, NULL);
}

typedef struct {
    const act *a;
    const tensor *wg, *wu;
    float *g;
    int ldh, ch;
} swiglu_args;

static void swiglu_task(void *varg, int chunk, int ith) {
    const swiglu_args *m = (const swiglu_args *)varg;
    const act *a = m->a;
    const int nb = a->cols / QK;
    (void)ith;
    const int start = chunk * m->ch;
    const int end = start + m->ch < m->wg->rows ? start + m->ch : m->wg->rows;
    if (type_is_x8(m->wg->type) && type_is_x8(m->wu->type)) {
        float u[16 * 16]; /* [16 tokens][16 rows] of `up` for one pair of groups */
        for (int r = start; r < end; r += 16) {
            const int ng = end - r >= 16 ? 2 : 1, nr = 8 * ng;
            for (int t0 = 0; t0 < a->T; t0 += 16) {
                const int tb = a->T - t0 < 16 ? a->T - t0 : 16;
                const size_t o = (size_t)t0 * nb;
                float *gy = m->g + (size_t)t0 * m->ldh + r;
                gemm_x8(m->wg->type, m->wg->data + (size_t)(r / 8) * m->wg->stride, m->wg->stride, ng, nb, a->xq + o, a->xs + o,
                        a->xd + o, nb, tb, gy, m->ldh);
                gemm_x8(m->wu->type, m->wu->data + (size_t)(r / 8) * m->wu->stride, m->wu->stride, ng, nb, a->xq + o, a->xs + o,
                        a->xd + o, nb, tb, u, nr);
                for (int t = 0; t < tb; t++) silu_mul(gy + (size_t)t * m->ldh, u + t * nr, nr);
            }
        }
        return;
    }
    for (int r = start; r < end; r++) {
        const uint8_t *rg = m->wg->data + (size_t)r * m->wg->stride;
        const uint8_t *ru = m->wu->data + (size_t)r * m->wu->stride;
        int t = 0;
        if (type_is_quant(m->wg->type) && type_is_quant(m->wu->type)) {
            for (; t + 4 <= a->T; t += 4) {
                float g[4], u[4];
                vec_dot4(m->wg->type, rg, a->xq + (size_t)t * nb, a->xs + (size_t)t * nb, nb, a->cols, g);
                vec_dot4(m->wu->type, ru, a->xq + (size_t)t * nb, a->xs + (size_t)t * nb, nb, a->cols, u);
                for (int i = 0; i < 4; i++) m->g[(size_t)(t + i) * m->ldh + r] = g[i] / (1.0f + expf(-g[i])) * u[i];
            }
        }
        for (; t < a->T; t++) {
            const block_q8_0 *xq = a->xq + (size_t)t * nb;
            const float *xs = a->xs + (size_t)t * nb;
            const float *xf = a->xf + (size_t)t * a->cols;
            const float g = vec_dot(m->wg->type, rg, xq, xs, xf, a->cols);
            const float u = vec_dot(m->wu->type, ru, xq, xs, xf, a->cols);
            m->g[(size_t)t * m->ldh + r] = g / (1.0f + expf(-g)) * u;
        }
    }
}

void matmul_swiglu(pool *p, const act *a, const tensor *wg, const tensor *wu, float *g, int ldh) {
    swiglu_args m = {a, wg, wu, g, ldh, chunk_rows(p, wg->rows)};
    pool_run(p, swiglu_task, &m, (wg->rows + m.ch - 1) / m.ch);
}
