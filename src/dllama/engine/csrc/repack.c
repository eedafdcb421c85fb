/* Q4_0 / Q4_1 weights repacked into groups of 8 rows for the SIMD GEMV / GEMM kernels.
 *
 * Per 8-row group and block column b: 8 fp16 scales d (Q4_1: then 8 fp16 mins m), then 128 quant bytes: 4 chunks
 * of 32 bytes, chunk c holding bytes qs[4c..4c+3] of rows 0..7 in turn. A byte keeps its GGUF meaning (element
 * 4c+k in the low nibble, element 4c+k+16 in the high one), so after masking one chunk gives, in each 32-bit
 * lane, one row's 4 weights for 4 consecutive elements: one dot-product instruction against 4 broadcast
 * activation bytes advances all 8 rows. Same bytes as the source, just moved: memory does not grow. */
#include <stdlib.h>

#include "common.h"

size_t x8_block_bytes(int type) { return type == T_Q4_0_X8 ? 16 + 128 : 32 + 128; }
int x8_source_type(int type) { return type == T_Q4_0_X8 ? T_Q4_0 : T_Q4_1; }

void repack_x8(int type, const uint8_t *src, size_t stride, int rows, int cols, uint8_t *dst) {
    const int nb = cols / QK, q41 = type == T_Q4_1;
    const size_t bs = q41 ? sizeof(block_q4_1) : sizeof(block_q4_0), hd = q41 ? 32 : 16;
    const size_t xb = hd + 128;
    for (int g = 0; g < rows / 8; g++) {
        uint8_t *out = dst + (size_t)g * nb * xb;
        for (int b = 0; b < nb; b++, out += xb) {
            for (int i = 0; i < 8; i++) {
                const uint8_t *blk = src + (size_t)(8 * g + i) * stride + (size_t)b * bs;
                memcpy(out + 2 * i, blk, 2);                 /* d */
                if (q41) memcpy(out + 16 + 2 * i, blk + 2, 2); /* m */
                const uint8_t *qs = blk + (q41 ? 4 : 2);
                for (int c = 0; c < 4; c++) memcpy(out + hd + 32 * c + 4 * i, qs + 4 * c, 4);
            }
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s, vnni) ((vnni) ? _mm256_dpbusd_epi32((acc), (u), (s)) \
    : _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1))))
#else
#define DPBUSD(acc, u, s, vnni) \
    _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1)))
#endif

/* y[t*ldy + 0..7] = the 8 rows of one group . x[t] for NT (1..8) tokens */
static inline void gemm_x8_tokens(int type, const uint8_t *grp, int nb, const block_q8_0 *xq, const float *xs,
                                  const float *xd, int xstride, float *y, int ldy, const int NT, int vnni) {
    const int q41 = type == T_Q4_1_X8;
    const size_t hd = q41 ? 32 : 16, xb = hd + 128;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[8], corr[8];
    for (int t = 0; t < NT; t++) acc[t] = corr[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = grp + (size_t)b * xb;
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        const __m256 cw = q41 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)))
                              : _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f));
        __m256i w[8];
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + hd + 32 * c));
            w[c] = _mm256_and_si256(v, m4);
            w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        }
        for (int t = 0; t < NT; t++) {
            const block_q8_0 *xb8 = xq + (size_t)t * xstride + b;
            const int32_t *a = (const int32_t *)xb8->qs;
            __m256i s = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                int32_t lo, hi;
                memcpy(&lo, a + c, 4);
                memcpy(&hi, a + 4 + c, 4);
                s = DPBUSD(s, w[c], _mm256_set1_epi32(lo), vnni);
                s = DPBUSD(s, w[c + 4], _mm256_set1_epi32(hi), vnni);
            }
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(xd[(size_t)t * xstride + b])), acc[t]);
            corr[t] = _mm256_fmadd_ps(cw, _mm256_set1_ps(xs[(size_t)t * xstride + b]), corr[t]);
        }
    }
    for (int t = 0; t < NT; t++) {
        float o[8];
        _mm256_storeu_ps(o, _mm256_add_ps(acc[t], corr[t]));
        for (int i = 0; i < 8; i++) y[(size_t)t * ldy + i] = o[i];
    }
}
#endif

/* scalar reference of the same computation (and the path on CPUs without AVX2) */
static void gemm_x8_scalar(int type, const uint8_t *grp, int nb, const block_q8_0 *xq, const float *xs, int xstride,
                           int T, float *y, int ldy) {
    const int q41 = type == T_Q4_1_X8;
    const size_t hd = q41 ? 32 : 16, xb = hd + 128;
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < 8; i++) {
            float acc = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *blk = grp + (size_t)b * xb;
                uint16_t dh, mh = 0;
                memcpy(&dh, blk + 2 * i, 2);
                if (q41) memcpy(&mh, blk + 16 + 2 * i, 2);
                const block_q8_0 *x = xq + (size_t)t * xstride + b;
                int isum = 0;
                for (int c = 0; c < 4; c++)
                    for (int k = 0; k < 4; k++) {
                        const uint8_t byte = blk[hd + 32 * c + 4 * i + k];
                        isum += (byte & 0x0F) * x->qs[4 * c + k] + (byte >> 4) * x->qs[16 + 4 * c + k];
                    }
                const float dw = f16_to_f32(dh);
                acc += dw * f16_to_f32(x->d) * (float)isum + (q41 ? f16_to_f32(mh) : -8.0f * dw) * xs[(size_t)t * xstride + b];
            }
            y[(size_t)t * ldy + i] = acc;
        }
    }
}

void gemm_x8(int type, const uint8_t *grp, int nb, const block_q8_0 *xq, const float *xs, const float *xd, int xstride, int T,
             float *y, int ldy) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (g_simd >= SIMD_AVX2) {
        const int vnni = g_simd == SIMD_AVX512VNNI;
        int t = 0;
        for (; t + 8 <= T; t += 8)
            gemm_x8_tokens(type, grp, nb, xq + (size_t)t * xstride, xs + (size_t)t * xstride, xd + (size_t)t * xstride, xstride, y + (size_t)t * ldy, ldy, 8, vnni);
        for (; t + 4 <= T; t += 4)
            gemm_x8_tokens(type, grp, nb, xq + (size_t)t * xstride, xs + (size_t)t * xstride, xd + (size_t)t * xstride, xstride, y + (size_t)t * ldy, ldy, 4, vnni);
        for (; t < T; t++)
            gemm_x8_tokens(type, grp, nb, xq + (size_t)t * xstride, xs + (size_t)t * xstride, xd + (size_t)t * xstride, xstride, y + (size_t)t * ldy, ldy, 1, vnni);
        return;
    }
#endif
    gemm_x8_scalar(type, grp, nb, xq, xs, xstride, T, y, ldy);
}
