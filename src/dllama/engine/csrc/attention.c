/* Causal GQA attention over a KV cache stored as F32, F16 or Q8_0 rows.
 *
 * Keys and values are streamed in blocks of ATT_BLK positions with an online softmax (running max m, running
 * sum l, accumulator rescaled by exp(m_old - m_new) when the max grows), so no buffer grows with the context.
 * The query heads that share a KV head (GQA group) and, in prompt batches, several rows are one tile: every K/V
 * row is read (and converted) once per tile, not once per query head.
 *
 * Every query's context is cut into fixed ranges of ATT_RANGE positions; each range gets its own online softmax
 * (acc, m, l), and the ranges are folded in order (att_fold). The arithmetic of a query therefore depends only on its
 * own context: a prompt batch, the same tokens one at a time, and any thread count give bit-identical outputs (a
 * seeded answer must not change when the prompt cache lets part of a prompt run as single steps).
 *
 * Work items are (KV head, tile of queries, group of ranges). When there are too few (decode: T = 1 and a
 * handful of KV heads) the ranges are spread over items handled by different threads, each writing one partial
 * per range, folded afterwards in the same order, so all cores stream the cache at long contexts.
 *
 * Q8_0 keys: the query is quantized to Q8_0 once per tile and K.q uses int8 dot products, as llama.cpp does for a
 * q8_0 K cache. Values are converted to float row by row into the accumulator. */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#define ATT_BLK 128       /* key positions per online-softmax step */
#define ATT_QT 16         /* max queries per tile */
#define ATT_RANGE 256    /* positions per range (a multiple of ATT_BLK): the unit of the fold and of splitting */
#define ATT_SPLIT_T 4     /* only batches of up to this many rows spread their ranges over threads */
#define ATT_ITEMS 8       /* work items per thread wanted when the positions are split (equal items: balance) */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ATT_X86 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define ATT_VNNI 1
#endif
#if defined(__ARM_NEON) && defined(__aarch64__)
#define ATT_NEON 1
#endif

/* ================================ row primitives ================================ */

#if defined(ATT_X86)
static inline float att_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline float att_dot(const float *a, const float *b, int n, int simd) {
    int i = 0;
    float r = 0.0f;
#if defined(ATT_X86)
    if (simd >= SIMD_AVX2) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
        }
        for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        r = att_hsum(_mm256_add_ps(a0, a1));
    }
#elif defined(ATT_NEON)
    if (simd == SIMD_NEON) {
        float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0);
        for (; i + 8 <= n; i += 8) {
            a0 = vfmaq_f32(a0, vld1q_f32(a + i), vld1q_f32(b + i));
            a1 = vfmaq_f32(a1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        }
        r = vaddvq_f32(vaddq_f32(a0, a1));
    }
#endif
    (void)simd;
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* y += a * x */
static inline void att_axpy(float *y, float a, const float *x, int n, int simd) {
    int i = 0;
#if defined(ATT_X86)
    if (simd >= SIMD_AVX2) {
        const __m256 av = _mm256_set1_ps(a);
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    }
#elif defined(ATT_NEON)
    if (simd == SIMD_NEON) {
        const float32x4_t av = vdupq_n_f32(a);
        for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_f32(vld1q_f32(y + i), av, vld1q_f32(x + i)));
    }
#endif
    (void)simd;
    for (; i < n; i++) y[i] += a * x[i];
}

/* one cache row -> float (F16, Q8_0; F32 rows are used in place) */
static inline void att_row_f32(int type, const uint8_t *src, float *dst, int n, int simd) {
    int i = 0;
    (void)simd;
    if (type == T_F16) {
        const uint16_t *h = (const uint16_t *)src;
#if defined(ATT_X86)
        if (simd >= SIMD_AVX2)
            for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#elif defined(ATT_NEON)
        if (simd == SIMD_NEON)
            for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + i))));
#endif
        for (; i < n; i++) dst[i] = f16_to_f32(h[i]);
        return;
    }
    const block_q8_0 *b = (const block_q8_0 *)src; /* T_Q8_0, n % 32 == 0 */
    for (int k = 0; k < n / QK; k++) {
        const float d = f16_to_f32(b[k].d);
        float *o = dst + k * QK;
#if defined(ATT_X86)
        if (simd >= SIMD_AVX2) {
            const __m256 dv = _mm256_set1_ps(d);
            for (int j = 0; j < QK; j += 8) {
                const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b[k].qs + j)));
                _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_cvtepi32_ps(w), dv));
            }
            continue;
        }
#endif
        for (int j = 0; j < QK; j++) o[j] = (float)b[k].qs[j] * d;
    }
}

/* K row (Q8_0) . query (Q8_0, block scales qd as floats) */
static inline float att_dot_q8(const block_q8_0 *k, const block_q8_0 *x, const float *qd, int nb, int simd) {
#if defined(ATT_X86)
    if (simd >= SIMD_AVX2) {
        __m256 acc = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const __m256i kv = _mm256_loadu_si256((const __m256i *)k[b].qs);
            const __m256i xv = _mm256_loadu_si256((const __m256i *)x[b].qs);
            const __m256i ku = _mm256_sign_epi8(kv, kv), xs = _mm256_sign_epi8(xv, kv); /* |k| (u8) x sign(x, k) */
            __m256i p;
#if defined(ATT_VNNI)
            if (simd == SIMD_AVX512VNNI) p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ku, xs);
            else
#endif
                p = _mm256_madd_epi16(_mm256_maddubs_epi16(ku, xs), _mm256_set1_epi16(1));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(f16_to_f32(k[b].d) * qd[b]), acc);
        }
        return att_hsum(acc);
    }
#elif defined(ATT_NEON)
    if (simd == SIMD_NEON) {
        float acc = 0.0f;
        for (int b = 0; b < nb; b++) {
            int32x4_t p = vdupq_n_s32(0);
            for (int h = 0; h < QK; h += 16) {
                const int8x16_t a = vld1q_s8(k[b].qs + h), c = vld1q_s8(x[b].qs + h);
#if defined(__ARM_FEATURE_DOTPROD)
                p = vdotq_s32(p, a, c);
#else
                p = vpadalq_s16(p, vmull_s8(vget_low_s8(a), vget_low_s8(c)));
                p = vpadalq_s16(p, vmull_s8(vget_high_s8(a), vget_high_s8(c)));
#endif
            }
            acc += f16_to_f32(k[b].d) * qd[b] * (float)vaddvq_s32(p);
        }
        return acc;
    }
#endif
    (void)simd;
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        int isum = 0;
        for (int j = 0; j < QK; j++) isum += k[b].qs[j] * x[b].qs[j];
        acc += f16_to_f32(k[b].d) * qd[b] * (float)isum;
    }
    return acc;
}

/* max(m, x[0..n)) */
static inline float att_max(const float *x, int n, float m, int simd) {
    int i = 0;
#if defined(ATT_X86)
    if (simd >= SIMD_AVX2 && n >= 8) {
        __m256 v = _mm256_loadu_ps(x);
        for (i = 8; i + 8 <= n; i += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(x + i));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float r = _mm_cvtss_f32(h);
        m = r > m ? r : m;
    }
#endif
    (void)simd;
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* x[i] = exp(x[i] - m) for i < n; returns the sum */
static inline float att_exp_sum(float *x, int n, float m, int simd) {
    int i = 0;
    float s = 0.0f;
#if defined(ATT_X86)
    if (simd >= SIMD_AVX2) {
        const __m256 mv = _mm256_set1_ps(m);
        __m256 acc = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
            const __m256 e = exp8_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
            _mm256_storeu_ps(x + i, e);
            acc = _mm256_add_ps(acc, e);
        }
        s = att_hsum(acc);
    }
#endif
    (void)simd;
    for (; i < n; i++) {
        x[i] = expf(x[i] - m);
        s += x[i];
    }
    return s;
}

#if defined(ATT_X86)
/* 8 vectors -> one vector of their 8 horizontal sums */
static inline __m256 att_hsum8x8(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* out[s] = scale * q . k_s for n keys (rows rb bytes apart), 8 keys per step so one reduction serves 8 scores.
 * F32 / F16 keys: hd % 8 == 0; Q8_0 keys: q given as Q8_0 blocks qq with float scales qd. */
static void att_scores_avx(int type, const float *q, const block_q8_0 *qq, const float *qd, const uint8_t *k, size_t rb,
                           int n, int hd, float scale, float *out, int simd) {
    const __m256 sv = _mm256_set1_ps(scale);
    int s = 0;
    for (; s + 8 <= n; s += 8) {
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        const uint8_t *k0 = k + (size_t)s * rb;
        for (size_t o = 0; o < 8 * rb; o += 64) PREFETCH_AHEAD(k0 + o); /* the cache streams like weights */
        if (type == T_Q8_0) {
            for (int b = 0; b < hd / QK; b++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)qq[b].qs);
                for (int j = 0; j < 8; j++) {
                    const block_q8_0 *kb = (const block_q8_0 *)(k0 + (size_t)j * rb) + b;
                    const __m256i kv = _mm256_loadu_si256((const __m256i *)kb->qs);
                    const __m256i ku = _mm256_sign_epi8(kv, kv), xs = _mm256_sign_epi8(xv, kv);
                    __m256i p;
#if defined(ATT_VNNI)
                    if (simd == SIMD_AVX512VNNI) p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ku, xs);
                    else
#endif
                        p = _mm256_madd_epi16(_mm256_maddubs_epi16(ku, xs), _mm256_set1_epi16(1));
                    a[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(_cvtsh_ss(kb->d) * qd[b]), a[j]);
                }
            }
        } else if (type == T_F16) {
            for (int d = 0; d < hd; d += 8) {
                const __m256 qv = _mm256_loadu_ps(q + d);
                for (int j = 0; j < 8; j++) {
                    const uint16_t *kr = (const uint16_t *)(k0 + (size_t)j * rb) + d;
                    a[j] = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)kr)), a[j]);
                }
            }
        } else {
            for (int d = 0; d < hd; d += 8) {
                const __m256 qv = _mm256_loadu_ps(q + d);
                for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps((const float *)(k0 + (size_t)j * rb) + d), a[j]);
            }
        }
        _mm256_storeu_ps(out + s, _mm256_mul_ps(att_hsum8x8(a), sv));
    }
    (void)simd;
    for (; s < n; s++) {
        const uint8_t *kr = k + (size_t)s * rb;
        if (type == T_Q8_0) out[s] = att_dot_q8((const block_q8_0 *)kr, qq, qd, hd / QK, SIMD_AVX2 + (simd == SIMD_AVX512VNNI)) * scale;
        else if (type == T_F16) { /* a decode step always has n % 8 of these (hd % 8 == 0 here) */
            __m256 a = _mm256_setzero_ps();
            for (int d = 0; d < hd; d += 8)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)kr + d))), a);
            out[s] = att_hsum(a) * scale;
        } else out[s] = att_dot(q, (const float *)kr, hd, SIMD_AVX2) * scale;
    }
}

/* one loop per (cache type, query count): constants let the compiler drop the per-key type tests */
#define ATT_NQ_CASES(CALL, TYPE) \
    if (nq == 3) CALL(TYPE, 3);     \
    else if (nq == 2) CALL(TYPE, 2); \
    else CALL(TYPE, 1);
#define ATT_TYPE_CASES(CALL)      \
    if (type == T_F16) {          \
        ATT_NQ_CASES(CALL, T_F16) \
    } else if (type == T_F32) {   \
        ATT_NQ_CASES(CALL, T_F32) \
    } else {                      \
        ATT_NQ_CASES(CALL, T_Q8_0) \
    }

/* acc[i] += sum_s P[i][s] * v_s for nq (<= 3) queries and n value rows; hd % 32 == 0. The accumulators of a
 * 32-wide column strip stay in registers over the whole block; Q8_0 rows fold the block scale into the weight. */
static inline __attribute__((always_inline)) void att_values_avx_t(const int type, const float *P, int ldp, const int nq, const uint8_t *v, size_t rb, int n, int hd,
                           float *acc) {
    for (int d0 = 0; d0 < hd; d0 += 32) {
        __m256 a[3][4];
        for (int i = 0; i < nq; i++)
            for (int r = 0; r < 4; r++) a[i][r] = _mm256_loadu_ps(acc + (size_t)i * hd + d0 + 8 * r);
        for (int s = 0; s < n; s++) {
            const uint8_t *vr = v + (size_t)s * rb;
            if (d0 == 0) /* the first strip reads each row from memory: keep the stream ahead */
                for (size_t o = 0; o < rb; o += 64) PREFETCH_AHEAD(vr + o);
            __m256 x[4];
            float dscale = 1.0f;
            if (type == T_F32) {
                for (int r = 0; r < 4; r++) x[r] = _mm256_loadu_ps((const float *)vr + d0 + 8 * r);
            } else if (type == T_F16) {
                for (int r = 0; r < 4; r++) x[r] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)vr + d0 + 8 * r)));
            } else {
                const block_q8_0 *b = (const block_q8_0 *)vr + d0 / QK;
                dscale = _cvtsh_ss(b->d);
                for (int r = 0; r < 4; r++)
                    x[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b->qs + 8 * r))));
            }
            for (int i = 0; i < nq; i++) {
                const __m256 w = _mm256_set1_ps(P[i * ldp + s] * dscale);
                for (int r = 0; r < 4; r++) a[i][r] = _mm256_fmadd_ps(w, x[r], a[i][r]);
            }
        }
        for (int i = 0; i < nq; i++)
            for (int r = 0; r < 4; r++) _mm256_storeu_ps(acc + (size_t)i * hd + d0 + 8 * r, a[i][r]);
    }
}

static void att_values_avx(int type, const float *P, int ldp, int nq, const uint8_t *v, size_t rb, int n, int hd, float *acc) {
#define ATT_VA(T, NQ) att_values_avx_t(T, P, ldp, NQ, v, rb, n, hd, acc)
    ATT_TYPE_CASES(ATT_VA)
#undef ATT_VA
}
#endif

#if defined(ATT_VNNI) && defined(__AVX512F__) && defined(__AVX512DQ__)
#define ATT_512 1
/* AVX-512 forms of the F32 / F16 block kernels (hd % 16 == 0): half the instructions per key */
/* S[i][s] = scale * q_i . k_s for NQ (1-3) queries that see the same n keys (the heads of one GQA group at one
 * token): each K row is read and converted once for all of them. Every score follows the one-query sequence
 * (FMAs over d in order, then the same reduction), so grouping never changes a bit. */
static inline __attribute__((always_inline)) void att_scores_512_nq(int type, const float *const *q, const int NQ,
                                                                    const uint8_t *k, size_t rb, int n, int hd,
                                                                    float scale, float *S, int lds) {
    const __m256 sv = _mm256_set1_ps(scale);
    int s = 0;
    for (; s + 8 <= n; s += 8) {
        __m512 a[3][8];
        for (int i = 0; i < NQ; i++)
            for (int j = 0; j < 8; j++) a[i][j] = _mm512_setzero_ps();
        const uint8_t *k0 = k + (size_t)s * rb;
        for (size_t o = 0; o < 8 * rb; o += 64) PREFETCH_AHEAD(k0 + o); /* the cache streams like weights */
        for (int d = 0; d < hd; d += 16) {
            for (int j = 0; j < 8; j++) {
                const uint8_t *kr = k0 + (size_t)j * rb;
                const __m512 kv = type == T_F16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)kr + d)))
                                                : _mm512_loadu_ps((const float *)kr + d);
                for (int i = 0; i < NQ; i++) a[i][j] = _mm512_fmadd_ps(_mm512_loadu_ps(q[i] + d), kv, a[i][j]);
            }
        }
        for (int i = 0; i < NQ; i++) {
            __m256 h[8];
            for (int j = 0; j < 8; j++) h[j] = _mm256_add_ps(_mm512_castps512_ps256(a[i][j]), _mm512_extractf32x8_ps(a[i][j], 1));
            _mm256_storeu_ps(S + (size_t)i * lds + s, _mm256_mul_ps(att_hsum8x8(h), sv));
        }
    }
    if (s < n)
        for (int i = 0; i < NQ; i++)
            att_scores_avx(type, q[i], NULL, NULL, k + (size_t)s * rb, rb, n - s, hd, scale, S + (size_t)i * lds + s, SIMD_AVX2);
}

static void att_scores_512(int type, const float *const *q, int nq, const uint8_t *k, size_t rb, int n, int hd, float scale,
                           float *S, int lds) {
#define ATT_SC(T, NQ) att_scores_512_nq(T, q, NQ, k, rb, n, hd, scale, S, lds)
    if (type == T_F16) {
        ATT_NQ_CASES(ATT_SC, T_F16)
    } else {
        ATT_NQ_CASES(ATT_SC, T_F32)
    }
#undef ATT_SC
}

static inline __attribute__((always_inline)) void att_values_512_t(const int type, const float *P, int ldp, const int nq, const uint8_t *v,
                                                                 size_t rb, int n, int hd, float *acc) {
    for (int d0 = 0; d0 < hd; d0 += 32) {
        __m512 a[3][2];
        for (int i = 0; i < nq; i++)
            for (int r = 0; r < 2; r++) a[i][r] = _mm512_loadu_ps(acc + (size_t)i * hd + d0 + 16 * r);
        for (int s = 0; s < n; s++) {
            const uint8_t *vr = v + (size_t)s * rb;
            if (d0 == 0) /* the first strip reads each row from memory: keep the stream ahead */
                for (size_t o = 0; o < rb; o += 64) PREFETCH_AHEAD(vr + o);
            __m512 x[2];
            float dscale = 1.0f;
            if (type == T_F32) {
                for (int r = 0; r < 2; r++) x[r] = _mm512_loadu_ps((const float *)vr + d0 + 16 * r);
            } else if (type == T_F16) {
                for (int r = 0; r < 2; r++)
                    x[r] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)vr + d0 + 16 * r)));
            } else {
                const block_q8_0 *b = (const block_q8_0 *)vr + d0 / QK;
                dscale = _cvtsh_ss(b->d);
                for (int r = 0; r < 2; r++)
                    x[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b->qs + 16 * r))));
            }
            for (int i = 0; i < nq; i++) {
                const __m512 w = _mm512_set1_ps(P[i * ldp + s] * dscale);
                for (int r = 0; r < 2; r++) a[i][r] = _mm512_fmadd_ps(w, x[r], a[i][r]);
            }
        }
        for (int i = 0; i < nq; i++)
            for (int r = 0; r < 2; r++) _mm512_storeu_ps(acc + (size_t)i * hd + d0 + 16 * r, a[i][r]);
    }
}
static void att_values_512(int type, const float *P, int ldp, int nq, const uint8_t *v, size_t rb, int n, int hd, float *acc) {
#define ATT_VA(T, NQ) att_values_512_t(T, P, ldp, NQ, v, rb, n, hd, acc)
    ATT_TYPE_CASES(ATT_VA)
#undef ATT_VA
}
#endif

/* ================================ public entry points ================================ */

void kv_store(int kv_type, uint8_t *dst, const float *src, int head_dim) {
    switch (kv_type) {
    case T_F16: {
        uint16_t *h = (uint16_t *)dst;
        for (int i = 0; i < head_dim; i++) h[i] = f32_to_f16(src[i]); /* round to nearest even, like NumPy */
        break;
    }
    case T_Q8_0: quantize_row_q80(src, (block_q8_0 *)dst, NULL, head_dim); break;
    default: memcpy(dst, src, sizeof(float) * (size_t)head_dim); break;
    }
}

static size_t up16(size_t n) { return (n + 15) & ~(size_t)15; } /* 64-byte aligned segments */

/* state (acc, m, l) <- state (+) one range's (pacc, pm, pl), as a softmax over both: the one merge used by every path
 * (noinline: the same instructions whichever caller) */
static __attribute__((noinline)) void att_fold(float *acc, float *m, float *l, const float *pacc, float pm, float pl,
                                               int hd) {
    const float M = pm > *m ? pm : *m, a = expf(*m - M), b = expf(pm - M);
    for (int d = 0; d < hd; d++) acc[d] = acc[d] * a + pacc[d] * b;
    *l = *l * a + pl * b;
    *m = M;
}

/* per-thread workspace: scores [QT][BLK], converted K and V rows, acc [QT][hd], m, l [QT] of the current range,
 * the folded acc [QT][hd], m, l [QT], quantized queries [QT][hd/32] and their block scales */
static size_t ws_floats(int hd) {
    const size_t nbq = (size_t)(hd / QK);
    return up16((size_t)ATT_QT * ATT_BLK) + 2 * up16((size_t)hd) + 2 * up16((size_t)ATT_QT * hd) + 4 * up16(ATT_QT) +
           up16((ATT_QT * nbq * sizeof(block_q8_0) + 3) / 4) + up16(ATT_QT * nbq);
}

static int n_ranges(int len) { return (len + ATT_RANGE - 1) / ATT_RANGE; }

size_t attention_scratch_floats(int nthreads, int max_seq, int head_dim, int n_heads, int T) {
    if (nthreads < 1) nthreads = 1;
    /* one partial per (range, row) of split work: only batches of T <= ATT_SPLIT_T rows are split */
    size_t parts = 0;
    if (nthreads > 1) {
        const size_t t = (size_t)(T < ATT_SPLIT_T ? T : ATT_SPLIT_T);
        parts = t * (size_t)n_heads * (size_t)n_ranges(max_seq) * (size_t)(head_dim + 2);
    }
    return (size_t)nthreads * ws_floats(head_dim) + parts + 16;
}

typedef struct {
    const float *q;
    const uint8_t *kc, *vc;
    float *out, *scratch, *part;
    size_t rb, head_bytes, ws;
    int type, simd, T, pos, nh, nkv, hd, G, qt, ntile, nsplit;
    float scale;
} att_ctx;

static void att_task(void *varg, int chunk, int ith) {
    const att_ctx *c = (const att_ctx *)varg;
    const int hd = c->hd, G = c->G, simd = c->simd, type = c->type, nbq = hd / QK;
    const int split = chunk % c->nsplit, r = chunk / c->nsplit;
    const int g = r % c->nkv, tile = c->ntile - 1 - r / c->nkv; /* longest tiles (latest rows) first */
    const int j0 = tile * c->qt, nq = c->T * G - j0 < c->qt ? c->T * G - j0 : c->qt;
    const int len = c->pos + (j0 + nq - 1) / G + 1; /* context of the tile's last query */
    const int nr = n_ranges(len), k0 = (int)((long long)nr * split / c->nsplit);
    const int k1 = (int)((long long)nr * (split + 1) / c->nsplit); /* this item's ranges */

    float *S = c->scratch + (size_t)ith * c->ws;
    float *kf = S + up16((size_t)ATT_QT * ATT_BLK);
    float *vf = kf + up16(hd);
    float *acc = vf + up16(hd);
    float *m = acc + up16((size_t)ATT_QT * hd);
    float *l = m + up16(ATT_QT);
    float *facc = l + up16(ATT_QT); /* the ranges folded so far (unsplit items) */
    float *fm = facc + up16((size_t)ATT_QT * hd);
    float *fl = fm + up16(ATT_QT);
    block_q8_0 *qq = (block_q8_0 *)(fl + up16(ATT_QT));
    float *qd = (float *)qq + up16((ATT_QT * (size_t)nbq * sizeof(block_q8_0) + 3) / 4);

    const float *qp[ATT_QT];
    int L[ATT_QT]; /* context length of each query: nondecreasing in i */
    for (int i = 0; i < nq; i++) {
        const int t = (j0 + i) / G, h = g * G + (j0 + i) % G;
        qp[i] = c->q + ((size_t)t * c->nh + h) * hd;
        L[i] = c->pos + t + 1;
        if (type == T_Q8_0) {
            quantize_row_q80(qp[i], qq + (size_t)i * nbq, NULL, hd);
            for (int b = 0; b < nbq; b++) qd[i * nbq + b] = f16_to_f32(qq[i * nbq + b].d);
        }
    }
    const uint8_t *kb = c->kc + (size_t)g * c->head_bytes, *vb = c->vc + (size_t)g * c->head_bytes;
#if defined(ATT_X86)
    const int fast = simd >= SIMD_AVX2 && hd % 8 == 0; /* block kernels (Q8_0 implies hd % 32 == 0) */
#endif

    for (int k = k0; k < k1; k++) {
        const int s0 = k * ATT_RANGE, s1 = s0 + ATT_RANGE < len ? s0 + ATT_RANGE : len;
        for (int i = 0; i < nq; i++) {
            m[i] = -INFINITY;
            l[i] = 0.0f;
            memset(acc + (size_t)i * hd, 0, sizeof(float) * hd);
        }
        for (int b0 = s0; b0 < s1; b0 += ATT_BLK) {
            const int b1 = b0 + ATT_BLK < s1 ? b0 + ATT_BLK : s1;
            int ilo = 0; /* first query that sees position s */
#if defined(ATT_X86)
            if (fast) {
                for (int i = 0; i < nq; i++) {
                    const int n = (L[i] < b1 ? L[i] : b1) - b0;
                    if (n <= 0) continue;
#if defined(ATT_512)
                    if (simd == SIMD_AVX512VNNI && type != T_Q8_0 && hd % 16 == 0) {
                        int e = i + 1; /* up to 3 queries with the same keys share each K row */
                        while (e < nq && e < i + 3 && (L[e] < b1 ? L[e] : b1) - b0 == n) e++;
                        att_scores_512(type, qp + i, e - i, kb + (size_t)b0 * c->rb, c->rb, n, hd, c->scale, S + i * ATT_BLK,
                                       ATT_BLK);
                        i = e - 1;
                        continue;
                    }
#endif
                    att_scores_avx(type, qp[i], qq + (size_t)i * nbq, qd + i * nbq, kb + (size_t)b0 * c->rb, c->rb, n, hd,
                                   c->scale, S + i * ATT_BLK, simd);
                }
            } else
#endif
            /* scores S[i][s - b0] = q_i . k_s * scale */
            for (int s = b0; s < b1; s++) {
                while (ilo < nq && L[ilo] <= s) ilo++;
                if (ilo == nq) break;
                const uint8_t *kr = kb + (size_t)s * c->rb;
                if (type == T_Q8_0) {
                    for (int i = ilo; i < nq; i++)
                        S[i * ATT_BLK + s - b0] =
                            att_dot_q8((const block_q8_0 *)kr, qq + (size_t)i * nbq, qd + i * nbq, nbq, simd) * c->scale;
                    continue;
                }
                const float *k = (const float *)kr;
                if (type == T_F16) {
                    att_row_f32(type, kr, kf, hd, simd);
                    k = kf;
                }
                for (int i = ilo; i < nq; i++) S[i * ATT_BLK + s - b0] = att_dot(qp[i], k, hd, simd) * c->scale;
            }
            /* online softmax: raise the running max, rescale what was accumulated under the old one */
            for (int i = 0; i < nq; i++) {
                const int n = (L[i] < b1 ? L[i] : b1) - b0;
                if (n <= 0) continue;
                float *si = S + i * ATT_BLK;
                float mx = att_max(si, n, m[i], simd);
                if (mx > m[i]) {
                    const float alpha = expf(m[i] - mx); /* 0 on the first block (m = -inf) */
                    l[i] *= alpha;
                    float *a = acc + (size_t)i * hd;
                    for (int d = 0; d < hd; d++) a[d] *= alpha;
                    m[i] = mx;
                }
                l[i] += att_exp_sum(si, n, mx, simd);
            }
            /* acc_i += p_i[s] * v_s */
#if defined(ATT_X86)
            if (fast && hd % 32 == 0) {
                for (int i0 = 0; i0 < nq; i0 += 3) {
                    const int ni = nq - i0 < 3 ? nq - i0 : 3;
                    const int n = (L[i0 + ni - 1] < b1 ? L[i0 + ni - 1] : b1) - b0; /* the group's longest context */
                    if (n <= 0) continue;
                    for (int i = i0; i < i0 + ni; i++) { /* positions a shorter query does not see weigh 0 */
                        const int ni_len = (L[i] < b1 ? L[i] : b1) - b0;
                        for (int s = ni_len < 0 ? 0 : ni_len; s < n; s++) S[i * ATT_BLK + s] = 0.0f;
                    }
                    const float *Pi = S + i0 * ATT_BLK;
                    const uint8_t *vrow = vb + (size_t)b0 * c->rb;
                    float *ai = acc + (size_t)i0 * hd;
#if defined(ATT_512)
                    if (simd == SIMD_AVX512VNNI) {
                        att_values_512(type, Pi, ATT_BLK, ni, vrow, c->rb, n, hd, ai);
                        continue;
                    }
#endif
                    att_values_avx(type, Pi, ATT_BLK, ni, vrow, c->rb, n, hd, ai);
                }
                continue;
            }
#endif
            ilo = 0;
            for (int s = b0; s < b1; s++) {
                while (ilo < nq && L[ilo] <= s) ilo++;
                if (ilo == nq) break;
                const uint8_t *vr = vb + (size_t)s * c->rb;
                const float *v = (const float *)vr;
                if (type != T_F32) {
                    att_row_f32(type, vr, vf, hd, simd);
                    v = vf;
                }
                for (int i = ilo; i < nq; i++) att_axpy(acc + (size_t)i * hd, S[i * ATT_BLK + s - b0], v, hd, simd);
            }
        }
        /* the range is done: keep it as a partial (split work) or fold it into the state (queries that see it only) */
        for (int i = 0; i < nq; i++) {
            if (L[i] <= s0) continue;
            const int t = (j0 + i) / G, h = g * G + (j0 + i) % G;
            const size_t row = (size_t)t * c->nh + h;
            float *ai = acc + (size_t)i * hd, *fi = facc + (size_t)i * hd;
            if (c->nsplit > 1) {
                float *pp = c->part + ((size_t)k * c->T * c->nh + row) * (hd + 2);
                memcpy(pp, ai, sizeof(float) * hd);
                pp[hd] = m[i];
                pp[hd + 1] = l[i];
            } else if (k == 0) {
                memcpy(fi, ai, sizeof(float) * hd);
                fm[i] = m[i];
                fl[i] = l[i];
            } else {
                att_fold(fi, fm + i, fl + i, ai, m[i], l[i], hd);
            }
        }
    }

    if (c->nsplit > 1) return;
    for (int i = 0; i < nq; i++) {
        const int t = (j0 + i) / G, h = g * G + (j0 + i) % G;
        const size_t row = (size_t)t * c->nh + h;
        const float inv = 1.0f / fl[i];
        float *o = c->out + row * hd;
        for (int d = 0; d < hd; d++) o[d] = facc[(size_t)i * hd + d] * inv;
    }
}

void attention(pool *p, const float *q, const uint8_t *kc, const uint8_t *vc, int kv_type, float *out, float *scratch,
               int T, int pos, int n_heads, int n_kv_heads, int head_dim, int max_seq) {
    const int nth = pool_size(p);
    att_ctx c;
    c.q = q;
    c.kc = kc;
    c.vc = vc;
    c.out = out;
    c.scratch = scratch;
    c.type = kv_type;
    c.simd = g_simd;
    c.T = T;
    c.pos = pos;
    c.nh = n_heads;
    c.nkv = n_kv_heads;
    c.hd = head_dim;
    c.G = n_heads / n_kv_heads;
    c.qt = c.G <= ATT_QT ? ATT_QT / c.G * c.G : ATT_QT; /* whole rows per tile when a group fits */
    c.ntile = (T * c.G + c.qt - 1) / c.qt;
    c.rb = row_bytes(kv_type, head_dim);
    c.head_bytes = (size_t)max_seq * c.rb;
    c.ws = ws_floats(head_dim);
    c.part = scratch + (size_t)nth * c.ws;
    c.scale = 1.0f / sqrtf((float)head_dim);
    /* too few work items for the threads: spread the ranges over items too (decode at long contexts); this changes
     * who computes a range, never the arithmetic */
    const int base = n_kv_heads * c.ntile, target = ATT_ITEMS * nth, nr = n_ranges(pos + T);
    c.nsplit = 1;
    if (nth > 1 && base < target && T <= ATT_SPLIT_T && nr > 1) {
        const int want = (target + base - 1) / base;
        c.nsplit = want < nr ? want : nr;
    }
    pool_run(p, att_task, &c, base * c.nsplit);
    if (c.nsplit == 1) return;
    /* fold each row's ranges in order, exactly as an unsplit item does */
    const size_t rows = (size_t)T * n_heads, hd = (size_t)head_dim;
    for (size_t r = 0; r < rows; r++) {
        const int nrow = n_ranges(pos + (int)(r / (size_t)n_heads) + 1);
        const float *p0 = c.part + r * (hd + 2);
        float *o = out + r * hd, fm = p0[hd], fl = p0[hd + 1];
        memcpy(o, p0, sizeof(float) * hd);
        for (int k = 1; k < nrow; k++) {
            const float *pp = c.part + ((size_t)k * rows + r) * (hd + 2);
            att_fold(o, &fm, &fl, pp, pp[hd], pp[hd + 1], head_dim);
        }
        const float inv = 1.0f / fl;
        for (size_t d = 0; d < hd; d++) o[d] *= inv;
    }
}
