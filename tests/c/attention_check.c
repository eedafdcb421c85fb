/* attention.c on the scalar path and on the best SIMD path compiled in, against a naive double-precision
 * reference, for every KV cache type, GQA shape, T, position and 1-5 threads; the scratch is allocated at exactly
 * attention_scratch_floats(), so a sanitizer build catches any overrun. Mainly for the NEON path, which the
 * x86 test machines cannot run through pytest:
 *
 *   cd src/dllama/engine/csrc
 *   aarch64-linux-gnu-gcc -O2 -std=c11 -pthread -march=armv8.2-a+dotprod+fp16 -I. ../../../../tests/c/attention_check.c \
 *       attention.c kernels.c pool.c -lm -o /tmp/check && QEMU_LD_PREFIX=/usr/aarch64-linux-gnu qemu-aarch64 /tmp/check
 *   gcc -O1 -g -fsanitize=address,undefined -std=c11 -pthread -march=native -I. ../../../../tests/c/attention_check.c \
 *       attention.c kernels.c pool.c -lm -o /tmp/check && /tmp/check
 *
 * (Debian: apt-get install gcc-aarch64-linux-gnu qemu-user.) Exit status 1 on any error above 1e-5 of max|ref|. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "common.h"

static float frand(unsigned *s) { *s = *s * 1103515245u + 12345u; return ((*s >> 8) & 0xFFFF) / 32768.0f - 1.0f; }

int main(void) {
    const int shapes[3][3] = {{2, 2, 64}, {6, 2, 64}, {18, 1, 32}};
    const int Ts[3] = {1, 3, 17}, poss[4] = {0, 5, 300, 1500}, types[3] = {T_F32, T_F16, T_Q8_0};
    double worst[2][3] = {{0}};
    int fails = 0;
    unsigned seed = 1;
    for (int si = 0; si < 3; si++) for (int ti = 0; ti < 3; ti++) for (int pi = 0; pi < 4; pi++) for (int ki = 0; ki < 3; ki++) for (int th = 1; th <= 5; th += 2) {
        const int nh = shapes[si][0], nkv = shapes[si][1], hd = shapes[si][2], T = Ts[ti], pos = poss[pi], type = types[ki];
        const int ms = pos + T + 2;
        const size_t rb = row_bytes(type, hd), rows = (size_t)nkv * ms;
        float *q = malloc(sizeof(float) * T * nh * hd), *kf = malloc(sizeof(float) * rows * hd), *vf = malloc(sizeof(float) * rows * hd);
        for (int i = 0; i < T * nh * hd; i++) q[i] = 2 * frand(&seed);
        for (size_t i = 0; i < rows * hd; i++) { kf[i] = frand(&seed); vf[i] = frand(&seed); }
        uint8_t *kc = malloc(rows * rb), *vc = malloc(rows * rb);
        for (size_t r = 0; r < rows; r++) { kv_store(type, kc + r * rb, kf + r * hd, hd); kv_store(type, vc + r * rb, vf + r * hd, hd); }
        /* reference on the dequantized cache (and the Q8_0-quantized query for a Q8_0 K cache) */
        float *kd = malloc(sizeof(float) * rows * hd), *vd = malloc(sizeof(float) * rows * hd), *qd = malloc(sizeof(float) * T * nh * hd);
        for (size_t r = 0; r < rows; r++) { dequantize_row(type, kc + r * rb, kd + r * hd, hd); dequantize_row(type, vc + r * rb, vd + r * hd, hd); }
        for (int r = 0; r < T * nh; r++) {
            if (type == T_Q8_0) { block_q8_0 b[8]; quantize_row_q80(q + r * hd, b, NULL, hd); dequantize_row(T_Q8_0, b, qd + r * hd, hd); }
            else memcpy(qd + r * hd, q + r * hd, sizeof(float) * hd);
        }
        double *ref = calloc((size_t)T * nh * hd, sizeof(double)), amax = 0;
        for (int t = 0; t < T; t++) for (int h = 0; h < nh; h++) {
            const int g = h / (nh / nkv), n = pos + t + 1;
            double *sc = malloc(sizeof(double) * n), mx = -1e300, sum = 0;
            for (int s = 0; s < n; s++) { double a = 0; for (int d = 0; d < hd; d++) a += (double)qd[(t * nh + h) * hd + d] * kd[((size_t)g * ms + s) * hd + d]; sc[s] = a / sqrt(hd); mx = sc[s] > mx ? sc[s] : mx; }
            for (int s = 0; s < n; s++) { sc[s] = exp(sc[s] - mx); sum += sc[s]; }
            for (int d = 0; d < hd; d++) { double a = 0; for (int s = 0; s < n; s++) a += sc[s] * vd[((size_t)g * ms + s) * hd + d]; ref[(t * nh + h) * hd + d] = a / sum; if (fabs(a / sum) > amax) amax = fabs(a / sum); }
            free(sc);
        }
        pool *p = pool_create(th);
        float *scratch = malloc(sizeof(float) * attention_scratch_floats(th, ms, hd, nh, T)), *out = malloc(sizeof(float) * T * nh * hd);
        for (int lv = 0; lv < 2; lv++) {
            g_simd = lv ? simd_best() : SIMD_SCALAR;
            attention(p, q, kc, vc, type, out, scratch, T, pos, nh, nkv, hd, ms);
            double e = 0;
            for (int i = 0; i < T * nh * hd; i++) { double d = fabs(out[i] - ref[i]); if (!(d <= e)) e = d; }
            e /= amax;
            if (e > worst[lv][ki] || isnan(e)) worst[lv][ki] = e;
            if (!(e < 1e-5)) { fails++; printf("FAIL %s type %d nh %d T %d pos %d th %d: %g\n", simd_name(g_simd), type, nh, T, pos, th, e); }
        }
        pool_destroy(p);
        free(q); free(kf); free(vf); free(kc); free(vc); free(kd); free(vd); free(qd); free(ref); free(scratch); free(out);
    }
    for (int lv = 0; lv < 2; lv++)
        printf("%s worst err/max|ref|: f32 %.2g f16 %.2g q8_0 %.2g\n", simd_name(lv ? simd_best() : SIMD_SCALAR), worst[lv][0], worst[lv][1], worst[lv][2]);
    printf("%d failures\n", fails);
    return fails != 0;
}
