/* Row kernels: quantize, dequantize, dot products (scalar, AVX2, AVX-512 VNNI, NEON), norms, activations.
 * Every function here has a NumPy reference in dllama/testing/reference.py and a test comparing the two. */
#include <math.h>

#include "common.h"

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAVE_VNNI 1
#endif

int simd_best(void) {
#if defined(HAVE_VNNI)
    return SIMD_AVX512VNNI;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    return SIMD_AVX2;
#elif defined(__ARM_NEON)
    return SIMD_NEON;
#else
    return SIMD_SCALAR;
#endif
}

int g_simd = -1; /* set by module init to simd_best() */

const char *simd_name(int level) {
    switch (level) {
    case SIMD_AVX512VNNI: return "avx512-vnni";
    case SIMD_AVX2: return "avx2";
    case SIMD_NEON: return "neon";
    default: return "scalar";
    }
}

/* ================================ quantize / dequantize ================================ */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* the scalar code below in 8-lane steps, bit-identical: same multiply by 1/d, cvtps rounds half to even like
 * nearbyintf in the default rounding mode */
static void quantize_row_q80_avx(const float *x, block_q8_0 *y, float *s, int nb) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        __m256 v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xb + 8 * i);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absmask), _mm256_and_ps(v[1], absmask)),
                                 _mm256_max_ps(_mm256_and_ps(v[2], absmask), _mm256_and_ps(v[3], absmask)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float d = _mm_cvtss_f32(m4) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t dh = f32_to_f16(d);
        y[b].d = dh;
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
        if (s) {
            const __m256i t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
            s[b] = f16_to_f32(dh) * (float)_mm_cvtsi128_si32(t4);
        }
        /* packs work per 128-bit lane: restore element order with one dword permute */
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)y[b].qs, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
}
#endif

void quantize_row_q80(const float *x, block_q8_0 *y, float *s, int n) {
    const int nb = n / QK;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (g_simd >= SIMD_AVX2) {
        quantize_row_q80_avx(x, y, s, nb);
        return;
    }
#endif
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) {
            const float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t dh = f32_to_f16(d);
        y[b].d = dh;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            const int q = (int)nearbyintf(xb[j] * id); /* round half to even, like NumPy's rint */
            y[b].qs[j] = (int8_t)q;
            sum += q;
        }
        if (s) s[b] = f16_to_f32(dh) * (float)sum;
    }
}

void dequant_f32(const void *src, float *dst, int n) { memcpy(dst, src, (size_t)n * 4); }

void dequant_f16(const void *src, float *dst, int n) {
    const uint16_t *h = (const uint16_t *)src;
    for (int i = 0; i < n; i++) dst[i] = f16_to_f32(h[i]);
}

void dequant_q4_0(const void *src, float *dst, int n) {
    const block_q4_0 *b = (const block_q4_0 *)src;
    for (int i = 0; i < n / QK; i++) {
        const float d = f16_to_f32(b[i].d);
        for (int j = 0; j < QK / 2; j++) {
            dst[i * QK + j] = ((b[i].qs[j] & 0x0F) - 8) * d;
            dst[i * QK + j + QK / 2] = ((b[i].qs[j] >> 4) - 8) * d;
        }
    }
}

void dequant_q4_1(const void *src, float *dst, int n) {
    const block_q4_1 *b = (const block_q4_1 *)src;
    for (int i = 0; i < n / QK; i++) {
        const float d = f16_to_f32(b[i].d), m = f16_to_f32(b[i].m);
        for (int j = 0; j < QK / 2; j++) {
            dst[i * QK + j] = (b[i].qs[j] & 0x0F) * d + m;
            dst[i * QK + j + QK / 2] = (b[i].qs[j] >> 4) * d + m;
        }
    }
}

void dequant_q8_0(const void *src, float *dst, int n) {
    const block_q8_0 *b = (const block_q8_0 *)src;
    for (int i = 0; i < n / QK; i++) {
        const float d = f16_to_f32(b[i].d);
        for (int j = 0; j < QK; j++) dst[i * QK + j] = b[i].qs[j] * d;
    }
}

void accumulate_q80(float *dst, const block_q8_0 *src, int n) {
    const int nb = n / QK;
    for (int i = 0; i < nb; i++) {
        const float d = f16_to_f32(src[i].d);
        float *o = dst + i * QK;
        for (int j = 0; j < QK; j++) o[j] += src[i].qs[j] * d;
    }
}

/* ================================ dot products ================================ */

/* ---- scalar reference paths ---- */
static float dot_q40_scalar(const block_q4_0 *w, const block_q8_0 *x, const float *xs, int nb) {
    float acc = 0.0f, corr = 0.0f;
    for (int b = 0; b < nb; b++) {
        int isum = 0;
        for (int j = 0; j < QK / 2; j++) {
            isum += (w[b].qs[j] & 0x0F) * x[b].qs[j] + (w[b].qs[j] >> 4) * x[b].qs[j + QK / 2];
        }
        const float dw = f16_to_f32(w[b].d);
        acc += dw * f16_to_f32(x[b].d) * (float)isum;
        corr += dw * xs[b];
    }
    return acc - 8.0f * corr;
}

static float dot_q41_scalar(const block_q4_1 *w, const block_q8_0 *x, const float *xs, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        int isum = 0;
        for (int j = 0; j < QK / 2; j++) {
            isum += (w[b].qs[j] & 0x0F) * x[b].qs[j] + (w[b].qs[j] >> 4) * x[b].qs[j + QK / 2];
        }
        acc += f16_to_f32(w[b].d) * f16_to_f32(x[b].d) * (float)isum + f16_to_f32(w[b].m) * xs[b];
    }
    return acc;
}

static float dot_q80_scalar(const block_q8_0 *w, const block_q8_0 *x, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        int isum = 0;
        for (int j = 0; j < QK; j++) isum += w[b].qs[j] * x[b].qs[j];
        acc += f16_to_f32(w[b].d) * f16_to_f32(x[b].d) * (float)isum;
    }
    return acc;
}

static float dot_f16_scalar_(const uint16_t *w, const float *x, int n) {
    float acc = 0.0f;
    for (int i = 0; i < n; i++) acc += f16_to_f32(w[i]) * x[i];
    return acc;
}

static float dot_f32_scalar_(const float *a, const float *b, int n) {
    float acc = 0.0f;
    for (int i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* ---- AVX2 / AVX-512 VNNI ---- */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 packed bytes -> 32 unsigned nibbles in element order (low nibbles = 0..15, high = 16..31) */
static inline __m256i unpack_nibbles(const uint8_t *qs) {
    const __m128i t = _mm_loadu_si128((const __m128i *)qs);
    const __m256i v = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

/* sum over 32 lanes of u8 * s8 into 8 int32 lanes */
static inline __m256i dot_us8(__m256i u, __m256i s, int vnni) {
#if defined(HAVE_VNNI)
    if (vnni) return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#endif
    (void)vnni;
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* Q4_0 / Q4_1 / Q8_0 rows (GGUF layout) . NT activation rows (`xstride` blocks apart), out[t]. One sequence per
 * (row, token) whatever NT, so a prompt batch (NT = 4) and a single token (NT = 1) give bit-identical results:
 * even blocks into acc0, odd ones into acc1 (fma(float(isum), dw * dx, acc)), c * xs into a scalar chain in block
 * order (c = -8 dw for Q4_0, m for Q4_1), then hsum(acc0 + acc1) + corr. */
static inline __attribute__((always_inline)) void dotn_q_avx(const int type, const uint8_t *w, const block_q8_0 *x,
                                                             const float *xs, int xstride, int nb, float *out,
                                                             const int NT, int vnni) {
    const size_t bsize = type == T_Q4_1 ? sizeof(block_q4_1) : type == T_Q4_0 ? sizeof(block_q4_0) : sizeof(block_q8_0);
    __m256 acc[4][2];
    float corr[4];
    for (int t = 0; t < NT; t++) {
        acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        corr[t] = 0.0f;
    }
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * bsize;
        uint16_t dh, mh = 0;
        memcpy(&dh, blk, 2);
        if (type == T_Q4_1) memcpy(&mh, blk + 2, 2);
        const float dw = _cvtsh_ss(dh), c = type == T_Q4_1 ? _cvtsh_ss(mh) : -8.0f * dw;
        __m256i wq, wv = _mm256_setzero_si256();
        if (type == T_Q8_0) {
            wv = _mm256_loadu_si256((const __m256i *)(blk + 2));
            wq = _mm256_sign_epi8(wv, wv); /* signed x signed via |w| (unsigned) x sign(x, w) */
        } else {
            wq = unpack_nibbles(blk + (type == T_Q4_1 ? 4 : 2));
        }
        for (int t = 0; t < NT; t++) {
            const block_q8_0 *xb = x + (size_t)t * xstride + b;
            __m256i xv = _mm256_loadu_si256((const __m256i *)xb->qs);
            if (type == T_Q8_0) xv = _mm256_sign_epi8(xv, wv);
            const __m256i p = dot_us8(wq, xv, vnni);
            acc[t][b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * _cvtsh_ss(xb->d)), acc[t][b & 1]);
            if (type != T_Q8_0) corr[t] = fmaf(c, xs[(size_t)t * xstride + b], corr[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t] = hsum256(_mm256_add_ps(acc[t][0], acc[t][1])) + corr[t];
}

static float dot_f16_avx(const uint16_t *w, const float *x, int n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i))), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 8))),
                               _mm256_loadu_ps(x + i + 8), acc1);
    }
    float r = hsum256(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) r += _cvtsh_ss(w[i]) * x[i];
    return r;
}

static float dot_f32_avx(const float *a, const float *b, int n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    float r = hsum256(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}
#endif

/* ---- NEON ---- */
#if defined(__ARM_NEON) && defined(__aarch64__)
static inline int32x4_t dot_s8x16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, a, b);
#else
    const int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    const int16x8_t hi = vmull_s8(vget_high_s8(a), vget_high_s8(b));
    return vpadalq_s16(vpadalq_s16(acc, lo), hi);
#endif
}

static float dot_q4x_neon(const uint8_t *wbase, size_t bsize, const block_q8_0 *x, const float *xs, int nb, int q41) {
    float acc = 0.0f, corr = 0.0f;
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = wbase + (size_t)b * bsize;
        uint16_t dh, mh = 0;
        memcpy(&dh, blk, 2);
        if (q41) memcpy(&mh, blk + 2, 2);
        const uint8x16_t v = vld1q_u8(blk + (q41 ? 4 : 2));
        const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, m4));
        const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        int32x4_t p = dot_s8x16(vdupq_n_s32(0), lo, vld1q_s8(x[b].qs));
        p = dot_s8x16(p, hi, vld1q_s8(x[b].qs + 16));
        const float dw = f16_to_f32(dh);
        acc += dw * f16_to_f32(x[b].d) * (float)vaddvq_s32(p);
        corr += (q41 ? f16_to_f32(mh) : -8.0f * dw) * xs[b];
    }
    return acc + corr;
}

static float dot_q80_neon(const block_q8_0 *w, const block_q8_0 *x, int nb) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        int32x4_t p = dot_s8x16(vdupq_n_s32(0), vld1q_s8(w[b].qs), vld1q_s8(x[b].qs));
        p = dot_s8x16(p, vld1q_s8(w[b].qs + 16), vld1q_s8(x[b].qs + 16));
        acc += f16_to_f32(w[b].d) * f16_to_f32(x[b].d) * (float)vaddvq_s32(p);
    }
    return acc;
}

static float dot_f32_neon_(const float *a, const float *b, int n) {
    float32x4_t acc0 = vdupq_n_f32(0), acc1 = vdupq_n_f32(0);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        acc0 = vfmaq_f32(acc0, vld1q_f32(a + i), vld1q_f32(b + i));
        acc1 = vfmaq_f32(acc1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
    }
    float r = vaddvq_f32(vaddq_f32(acc0, acc1));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}
#endif

float dot_f32(const float *a, const float *b, int n) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (g_simd >= SIMD_AVX2) return dot_f32_avx(a, b, n);
#endif
#if defined(__ARM_NEON) && defined(__aarch64__)
    if (g_simd == SIMD_NEON) return dot_f32_neon_(a, b, n);
#endif
    return dot_f32_scalar_(a, b, n);
}

void axpy_f32(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i]; /* auto-vectorised at -O3 */
}

/* ---- the entry points of the type table (types.c): one signature per kind ---- */
float dot_f32_scalar(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n) {
    (void)xq, (void)xs;
    return dot_f32_scalar_((const float *)w, xf, n);
}
float dot_f16_scalar(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n) {
    (void)xq, (void)xs;
    return dot_f16_scalar_((const uint16_t *)w, xf, n);
}
float dot_q4_0_scalar(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n) {
    (void)xf;
    return dot_q40_scalar((const block_q4_0 *)w, xq, xs, n / QK);
}
float dot_q4_1_scalar(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n) {
    (void)xf;
    return dot_q41_scalar((const block_q4_1 *)w, xq, xs, n / QK);
}
float dot_q8_0_scalar(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n) {
    (void)xs, (void)xf;
    return dot_q80_scalar((const block_q8_0 *)w, xq, n / QK);
}

#if defined(DL_AVX2)
float dot_f32_avx2(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n) {
    (void)xq, (void)xs;
    return dot_f32_avx((const float *)w, xf, n);
}
float dot_f16_avx2(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n) {
    (void)xq, (void)xs;
    return dot_f16_avx((const uint16_t *)w, xf, n);
}
/* Q4_0 / Q4_1 / Q8_0: one inline kernel for 1 and 4 tokens (bit-identical), per type and dot product flavour */
#define DOTS_Q_AVX(NAME, TYPE, LEVEL, VNNI)                                                                          \
    float dot_##NAME##_##LEVEL(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n) {       \
        float r;                                                                                                    \
        (void)xf;                                                                                                   \
        dotn_q_avx(TYPE, (const uint8_t *)w, xq, xs, 0, n / QK, &r, 1, VNNI);                                       \
        return r;                                                                                                   \
    }                                                                                                               \
    void dot4_##NAME##_##LEVEL(const void *w, const block_q8_0 *xq, const float *xs, int xstride, int n, float *out) { \
        dotn_q_avx(TYPE, (const uint8_t *)w, xq, xs, xstride, n / QK, out, 4, VNNI);                                \
    }
DOTS_Q_AVX(q4_0, T_Q4_0, avx2, 0)
DOTS_Q_AVX(q4_1, T_Q4_1, avx2, 0)
DOTS_Q_AVX(q8_0, T_Q8_0, avx2, 0)
#if defined(HAVE_VNNI)
DOTS_Q_AVX(q4_0, T_Q4_0, vnni, 1)
DOTS_Q_AVX(q4_1, T_Q4_1, vnni, 1)
DOTS_Q_AVX(q8_0, T_Q8_0, vnni, 1)
#endif
#endif

#if defined(DL_NEON)
float dot_f32_neon(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n) {
    (void)xq, (void)xs;
    return dot_f32_neon_((const float *)w, xf, n);
}
float dot_q4_0_neon(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n) {
    (void)xf;
    return dot_q4x_neon((const uint8_t *)w, sizeof(block_q4_0), xq, xs, n / QK, 0);
}
float dot_q4_1_neon(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n) {
    (void)xf;
    return dot_q4x_neon((const uint8_t *)w, sizeof(block_q4_1), xq, xs, n / QK, 1);
}
float dot_q8_0_neon(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n) {
    (void)xs, (void)xf;
    return dot_q80_neon((const block_q8_0 *)w, xq, n / QK);
}
#endif

/* ================================ elementwise ================================ */

void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    const float ss = dot_f32(x, x, n);
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

/* interleaved-pair RoPE (GGUF llama layout): (x[2i], x[2i+1]) rotated by pos * freq[i] */
void rope_rows(float *x, int n_heads, int head_dim, const float *cos_t, const float *sin_t) {
    const int half = head_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            const float a = v[2 * i], b = v[2 * i + 1];
            v[2 * i] = a * cos_t[i] - b * sin_t[i];
            v[2 * i + 1] = a * sin_t[i] + b * cos_t[i];
        }
    }
}

/* exp8_ps clamps its argument, so silu gives -0 / x at the extremes, like the scalar code */
void silu_mul(float *g, const float *u, int n) {
    int i = 0;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (g_simd >= SIMD_AVX2) {
        for (; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(g + i);
            const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8_ps(_mm256_sub_ps(_mm256_setzero_ps(), v)));
            _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(v, den), _mm256_loadu_ps(u + i)));
        }
    }
#endif
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
