/* Q4_0 / Q4_1 / Q8_0 weights repacked into groups of 8 rows for the SIMD GEMV / GEMM kernels.
 *
 * Per 8-row group and block column b: 8 fp16 scales d (Q4_1: then 8 fp16 mins m), then the quant bytes in chunks
 * of 32 bytes, chunk c holding bytes qs[4c..4c+3] of rows 0..7 in turn (Q4: 4 chunks, Q8_0: 8 chunks).
 *   Q4_0 / Q4_1: a byte keeps its GGUF meaning (element 4c+k in the low nibble, element 4c+k+16 in the high one),
 *     so masking chunk c gives, in each 32-bit lane, one row's weights for elements 4c..4c+3 (low nibbles) or
 *     4c+16..4c+19 (high nibbles).
 *   Q8_0: chunk c holds elements 4c..4c+3, each byte stored as q + 128 (XOR 0x80) so that it is the unsigned
 *     operand of the u8 x s8 dot product; the -128 * d * sum(x) it adds is taken back with the block sums s.
 * One dot-product instruction against 4 broadcast activation bytes thus advances all 8 rows by 4 elements; the
 * AVX-512 kernel puts two groups side by side in a zmm register (16 rows). Same bytes as the source, just moved:
 * memory does not grow.
 *
 * Every kernel computes, per row and block, d * xd * sum(u * xq) + c * xs, where u are the unsigned weights
 * (nibbles, or q + 128), xd / xs the activation block's scale and d * sum(q), and c = -8d (Q4_0), m (Q4_1) or
 * -128d (Q8_0). */
#include <stdlib.h>

#include "common.h"

/* layout sizes come from the type table (types.c); inside a kernel `type` is a constant */
static inline size_t x8_head(int type) { return (size_t)g_types[type].head_bytes; }
static inline size_t x8_block_bytes(int type) { return (size_t)g_types[type].block_bytes; }

void repack_x8(int type, const uint8_t *src, size_t stride, int rows, int cols, uint8_t *dst) {
    const type_traits *st = &g_types[type];
    const int xt = st->x8_type, nb = cols / QK;
    const size_t bs = (size_t)st->block_bytes, hd = x8_head(xt), xb = x8_block_bytes(xt);
    const size_t qoff = (size_t)st->head_bytes; /* quants after d (and m) in the GGUF block */
    const int nchunks = (st->block_bytes - st->head_bytes) / 4; /* 4-byte pieces of one row's quants */
    const int scales = st->head_bytes / 2;                      /* fp16 d (and m) per GGUF block */
    for (int g = 0; g < rows / 8; g++) {
        uint8_t *out = dst + (size_t)g * nb * xb;
        for (int b = 0; b < nb; b++, out += xb) {
            for (int i = 0; i < 8; i++) {
                const uint8_t *blk = src + (size_t)(8 * g + i) * stride + (size_t)b * bs;
                for (int k = 0; k < scales; k++) memcpy(out + 16 * k + 2 * i, blk + 2 * k, 2); /* d, then m */
                for (int c = 0; c < nchunks; c++) memcpy(out + hd + 32 * c + 4 * i, blk + qoff + 4 * c, 4);
            }
            if (g_types[xt].x8_xor)
                for (size_t k = hd; k < xb; k++) out[k] ^= g_types[xt].x8_xor;
        }
    }
}

/* ---- scalar reference of the x8 kernels (and the path on CPUs without AVX2) ---- */
static inline float x8_corr_scalar(int type, const uint8_t *blk, int i, float dw) {
    if (type == T_Q4_1_X8) {
        uint16_t mh;
        memcpy(&mh, blk + 16 + 2 * i, 2);
        return f16_to_f32(mh);
    }
    return (type == T_Q4_0_X8 ? -8.0f : -128.0f) * dw;
}

static void gemm_x8_scalar(int type, const uint8_t *grp, int nb, const block_q8_0 *xq, const float *xs, int xstride,
                           int T, float *y, int ldy) {
    const size_t hd = x8_head(type), xb = x8_block_bytes(type);
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < 8; i++) {
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *blk = grp + (size_t)b * xb;
                uint16_t dh;
                memcpy(&dh, blk + 2 * i, 2);
                const block_q8_0 *x = xq + (size_t)t * xstride + b;
                int isum = 0;
                if (type == T_Q8_0_X8) {
                    for (int e = 0; e < QK; e++) isum += blk[hd + 32 * (e / 4) + 4 * i + e % 4] * x->qs[e];
                } else {
                    for (int c = 0; c < 4; c++)
                        for (int k = 0; k < 4; k++) {
                            const uint8_t byte = blk[hd + 32 * c + 4 * i + k];
                            isum += (byte & 0x0F) * x->qs[4 * c + k] + (byte >> 4) * x->qs[16 + 4 * c + k];
                        }
                }
                const float dw = f16_to_f32(dh);
                acc += dw * f16_to_f32(x->d) * (float)isum + x8_corr_scalar(type, blk, i, dw) * xs[(size_t)t * xstride + b];
            }
            y[(size_t)t * ldy + i] = acc;
        }
    }
}

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* ---- AVX2 (and AVX-512 VL VNNI on ymm): one 8-row group x NT tokens ---- */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAVE_VNNI_YMM 1
#endif

static inline int32_t load_i32(const void *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* s += u8 w . s8 x over 4-byte lanes; without VNNI, Q8_0 (u up to 255 would saturate maddubs) uses |w| x sign(x, w)
 * on the signed weights instead, and then needs no -128 correction */
static ALWAYS_INLINE __m256i dp_ymm(__m256i s, __m256i w, __m256i x, const int vnni, const int q8) {
#if defined(HAVE_VNNI_YMM)
    if (vnni) return _mm256_dpbusd_epi32(s, w, x);
#endif
    (void)vnni;
    if (q8) {
        const __m256i ws = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
        return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(ws, ws), _mm256_sign_epi8(x, ws)),
                                                     _mm256_set1_epi16(1)));
    }
    return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}

/* c * xs of every block, summed in block order into its own accumulator: the same FMA chain whatever the tile */
static ALWAYS_INLINE __m256 x8_cw(const int type, const uint8_t *blk, __m256 dw, const int vnni) {
    if (type == T_Q4_1_X8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)));
    if (type == T_Q4_0_X8) return _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f));
    return _mm256_mul_ps(dw, _mm256_set1_ps(vnni ? -128.0f : 0.0f));
}

/* Every (row, token) pair follows one operation sequence whatever NT and whichever kernel (this one, the 16-row
 * AVX-512 one) computes it: per block b, acc = fma(float(isum_b), d_b * xd_b, acc) and corr = fma(c_b, xs_b, corr)
 * in block order, then y = acc + corr. A token thus gets bit-identical outputs in a prompt batch and alone. */
static ALWAYS_INLINE void x8_ymm(const int type, const uint8_t *grp, int nb, const block_q8_0 *xq, const float *xs,
                                 const float *xd, int xstride, float *y, int ldy, const int NT, const int vnni) {
    const int q8 = type == T_Q8_0_X8;
    const size_t hd = x8_head(type), xb = x8_block_bytes(type);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    /* few tokens (decode): the c * xs chain runs beside the main one; more tokens: in a second pass over the
     * group's scales (L1-resident by then), which keeps the main loop's accumulators in registers */
    const int inl = NT <= 2;
    __m256 acc[8], corr[8];
    for (int t = 0; t < NT; t++) acc[t] = corr[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = grp + (size_t)b * xb;
        if (inl)
            for (size_t o = 0; o < xb; o += 64) PREFETCH_AHEAD(blk + o); /* decode: see DECODE_PF */
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        __m256i w[8];
        if (q8) {
            for (int k = 0; k < 8; k++) w[k] = _mm256_loadu_si256((const __m256i *)(blk + hd + 32 * k));
        } else {
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + hd + 32 * c));
                w[c] = _mm256_and_si256(v, m4);
                w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
        }
        for (int t = 0; t < NT; t++) {
            const size_t o = (size_t)t * xstride + b;
            const int8_t *a = xq[o].qs;
            __m256i s = _mm256_setzero_si256();
            for (int k = 0; k < 8; k++) s = dp_ymm(s, w[k], _mm256_set1_epi32(load_i32(a + 4 * k)), vnni, q8);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(xd[o])), acc[t]);
            if (inl) corr[t] = _mm256_fmadd_ps(x8_cw(type, blk, dw, vnni), _mm256_set1_ps(xs[o]), corr[t]);
        }
    }
    if (!inl)
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = grp + (size_t)b * xb;
            const __m256 cw = x8_cw(type, blk, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk)), vnni);
            for (int t = 0; t < NT; t++) corr[t] = _mm256_fmadd_ps(cw, _mm256_set1_ps(xs[(size_t)t * xstride + b]), corr[t]);
        }
    for (int t = 0; t < NT; t++) _mm256_storeu_ps(y + (size_t)t * ldy, _mm256_add_ps(acc[t], corr[t]));
}

static ALWAYS_INLINE void x8_ymm_tile(const int type, const uint8_t *grp, int nb, const block_q8_0 *xq, const float *xs,
                                      const float *xd, int xstride, float *y, int ldy, int NT, const int vnni) {
    switch (NT) {
    case 8: x8_ymm(type, grp, nb, xq, xs, xd, xstride, y, ldy, 8, vnni); return;
    case 4: x8_ymm(type, grp, nb, xq, xs, xd, xstride, y, ldy, 4, vnni); return;
    case 2: x8_ymm(type, grp, nb, xq, xs, xd, xstride, y, ldy, 2, vnni); return;
    default: x8_ymm(type, grp, nb, xq, xs, xd, xstride, y, ldy, 1, vnni); return;
    }
}
#endif

/* ---- AVX-512 VNNI on zmm: two adjacent 8-row groups (16 rows) x NT tokens, sharing each activation broadcast ---- */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAVE_ZMM 1

static ALWAYS_INLINE __m512i load_pair(const uint8_t *g0, const uint8_t *g1) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)g0)),
                              _mm256_loadu_si256((const __m256i *)g1), 1);
}

static ALWAYS_INLINE __m512 f16_pair(const uint8_t *g0, const uint8_t *g1) {
    return _mm512_cvtph_ps(_mm256_set_m128i(_mm_loadu_si128((const __m128i *)g1), _mm_loadu_si128((const __m128i *)g0)));
}

/* the operation sequence of x8_ymm (see there), on two groups at once */
static ALWAYS_INLINE void x16_zmm(const int type, const uint8_t *g0, const uint8_t *g1, int nb, const block_q8_0 *xq,
                                  const float *xs, const float *xd, int xstride, float *y, int ldy, const int NT) {
    const size_t hd = x8_head(type), xb = x8_block_bytes(type);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 acc[8], corr[8];
    for (int t = 0; t < NT; t++) acc[t] = corr[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *b0 = g0 + (size_t)b * xb, *b1 = g1 + (size_t)b * xb;
        const __m512 dw = f16_pair(b0, b1);
        __m512i w[8];
        if (type == T_Q8_0_X8) {
            for (int k = 0; k < 8; k++) w[k] = load_pair(b0 + hd + 32 * k, b1 + hd + 32 * k);
        } else {
            for (int c = 0; c < 4; c++) {
                const __m512i v = load_pair(b0 + hd + 32 * c, b1 + hd + 32 * c);
                w[c] = _mm512_and_si512(v, m4);
                w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
        }
        for (int t = 0; t < NT; t++) {
            const size_t o = (size_t)t * xstride + b;
            const int8_t *a = xq[o].qs;
            /* two partial sums halve the dependency chain of the 8 dot products (integer: exact in any order) */
            __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(load_i32(a)));
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[4], _mm512_set1_epi32(load_i32(a + 16)));
            for (int k = 1; k < 4; k++) {
                s0 = _mm512_dpbusd_epi32(s0, w[k], _mm512_set1_epi32(load_i32(a + 4 * k)));
                s1 = _mm512_dpbusd_epi32(s1, w[k + 4], _mm512_set1_epi32(load_i32(a + 16 + 4 * k)));
            }
            const __m512 sf = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
            acc[t] = _mm512_fmadd_ps(sf, _mm512_mul_ps(dw, _mm512_set1_ps(xd[o])), acc[t]);
        }
    }
    for (int b = 0; b < nb; b++) {
        const uint8_t *b0 = g0 + (size_t)b * xb, *b1 = g1 + (size_t)b * xb;
        const __m512 cw = type == T_Q4_1_X8 ? f16_pair(b0 + 16, b1 + 16)
                                            : _mm512_mul_ps(f16_pair(b0, b1), _mm512_set1_ps(type == T_Q4_0_X8 ? -8.0f : -128.0f));
        for (int t = 0; t < NT; t++) corr[t] = _mm512_fmadd_ps(cw, _mm512_set1_ps(xs[(size_t)t * xstride + b]), corr[t]);
    }
    for (int t = 0; t < NT; t++) _mm512_storeu_ps(y + (size_t)t * ldy, _mm512_add_ps(acc[t], corr[t]));
}

static ALWAYS_INLINE void x16_zmm_tile(const int type, const uint8_t *g0, const uint8_t *g1, int nb, const block_q8_0 *xq,
                                       const float *xs, const float *xd, int xstride, float *y, int ldy, int NT) {
    switch (NT) {
    case 8: x16_zmm(type, g0, g1, nb, xq, xs, xd, xstride, y, ldy, 8); return;
    case 4: x16_zmm(type, g0, g1, nb, xq, xs, xd, xstride, y, ldy, 4); return;
    case 2: x16_zmm(type, g0, g1, nb, xq, xs, xd, xstride, y, ldy, 2); return;
    default: x16_zmm(type, g0, g1, nb, xq, xs, xd, xstride, y, ldy, 1); return;
    }
}
#endif

/* token tiles of 8, then 4, 2, 1 */
static inline int tile_nt(int left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

/* the type table's gemm entries (gemm_fn, see common.h): one per x8 layout and SIMD level */
#define GEMM_ARGS                                                                                                   \
    const uint8_t *w, size_t gstride, int ngroups, int nb, const block_q8_0 *xq, const float *xs, const float *xd,  \
        int xstride, int T, float *y, int ldy

static ALWAYS_INLINE void gemm_x8_scalar_run(const int type, GEMM_ARGS) {
    (void)xd;
    for (int g = 0; g < ngroups; g++) gemm_x8_scalar(type, w + (size_t)g * gstride, nb, xq, xs, xstride, T, y + 8 * g, ldy);
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
static ALWAYS_INLINE void gemm_x8_ymm_run(const int type, const int vnni, GEMM_ARGS) {
    for (int g = 0; g < ngroups; g++) {
        for (int t = 0, nt; t < T; t += nt) {
            nt = tile_nt(T - t);
            const size_t o = (size_t)t * xstride;
            x8_ymm_tile(type, w + (size_t)g * gstride, nb, xq + o, xs + o, xd + o, xstride, y + (size_t)t * ldy + 8 * g, ldy, nt,
                        vnni);
        }
    }
}
#endif

#if defined(HAVE_ZMM)
static ALWAYS_INLINE void gemm_x8_zmm_run(const int type, GEMM_ARGS) {
    /* single tokens (decode) stay on the 8-row kernel: it streams one group at a time, while the pair's two streams
     * measured ~1.5x slower when the weights come from DRAM */
    if (T > 1) {
        int g = 0;
        for (; g + 2 <= ngroups; g += 2) {
            const uint8_t *g0 = w + (size_t)g * gstride;
            for (int t = 0, nt; t < T; t += nt) {
                nt = tile_nt(T - t);
                const size_t o = (size_t)t * xstride;
                x16_zmm_tile(type, g0, g0 + gstride, nb, xq + o, xs + o, xd + o, xstride, y + (size_t)t * ldy + 8 * g, ldy, nt);
            }
        }
        w += (size_t)g * gstride; /* an odd last group: the 8-row kernel */
        y += 8 * g;
        ngroups -= g;
    }
    gemm_x8_ymm_run(type, 1, w, gstride, ngroups, nb, xq, xs, xd, xstride, T, y, ldy);
}
#endif

#define GEMM_ENTRY(NAME, LEVEL, CALL)                                                                               \
    void gemm_##NAME##_##LEVEL(GEMM_ARGS) { CALL; }
#define GEMM_PASS w, gstride, ngroups, nb, xq, xs, xd, xstride, T, y, ldy
GEMM_ENTRY(q4_0x8, scalar, gemm_x8_scalar_run(T_Q4_0_X8, GEMM_PASS))
GEMM_ENTRY(q4_1x8, scalar, gemm_x8_scalar_run(T_Q4_1_X8, GEMM_PASS))
GEMM_ENTRY(q8_0x8, scalar, gemm_x8_scalar_run(T_Q8_0_X8, GEMM_PASS))
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
GEMM_ENTRY(q4_0x8, avx2, gemm_x8_ymm_run(T_Q4_0_X8, 0, GEMM_PASS))
GEMM_ENTRY(q4_1x8, avx2, gemm_x8_ymm_run(T_Q4_1_X8, 0, GEMM_PASS))
GEMM_ENTRY(q8_0x8, avx2, gemm_x8_ymm_run(T_Q8_0_X8, 0, GEMM_PASS))
#endif
#if defined(HAVE_ZMM)
GEMM_ENTRY(q4_0x8, vnni, gemm_x8_zmm_run(T_Q4_0_X8, GEMM_PASS))
GEMM_ENTRY(q4_1x8, vnni, gemm_x8_zmm_run(T_Q4_1_X8, GEMM_PASS))
GEMM_ENTRY(q8_0x8, vnni, gemm_x8_zmm_run(T_Q8_0_X8, GEMM_PASS))
#endif
