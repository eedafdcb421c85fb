/* Shared definitions for the dllama C kernels.
 *
 * Weight blocks follow GGUF exactly so the model file can be used in place (memory-mapped):
 *   Q4_0: fp16 d, 16 bytes; byte j = element j (low nibble) | element j+16 (high nibble); w = (q - 8) * d
 *   Q4_1: fp16 d, fp16 m, 16 bytes, same nibble order;                                 w = q * d + m
 *   Q8_0: fp16 d, 32 int8;                                                              w = q * d
 * Activations feeding a quantized matmul are Q8_0 blocks plus one float per block, s = d * sum(q),
 * which lets Q4_0 (unsigned nibbles, -8 folded into s) and Q4_1 (+m * s) use unsigned x signed dot products.
 */
#ifndef DLLAMA_COMMON_H
#define DLLAMA_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

/* GGML type ids, kept identical so Python can pass gguf's GGMLQuantizationType values straight through */
enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8 };
/* internal layouts (never in files): Q4_0 / Q4_1 / Q8_0 repacked in groups of 8 rows, see repack.c */
enum { T_Q4_0_X8 = 100, T_Q4_1_X8 = 101, T_Q8_0_X8 = 102 };

#define QK 32

/* Decode reads each weight once from DRAM in short streams (a thread's slice of one matrix, ~0.1-0.5 MB on small
 * models), and the hardware prefetcher ramps up anew on each: the matmul kernels read DECODE_PF bytes ahead in
 * software. Measured on Zen 4 (bench_decode_ab.py): +12-40 % decode on SmolLM2 (1 and 2 threads), +22 % on the
 * 1B shape; 1 KiB ahead was slower, 16 KiB no better than 4-8 KiB. Prefetches past a range's end never fault. The
 * row-by-row path (F16, F32 weights) gained nothing: it already reads at the measured bandwidth. */
#define DECODE_PF 4096
#define PREFETCH_AHEAD(p) __builtin_prefetch((const char *)(p) + DECODE_PF, 0, 3)

typedef struct { uint16_t d; uint8_t qs[QK / 2]; } block_q4_0;            /* 18 bytes */
typedef struct { uint16_t d; uint16_t m; uint8_t qs[QK / 2]; } block_q4_1; /* 20 bytes */
typedef struct { uint16_t d; int8_t qs[QK]; } block_q8_0;                  /* 34 bytes */

_Static_assert(sizeof(block_q4_0) == 18, "q4_0 layout");
_Static_assert(sizeof(block_q4_1) == 20, "q4_1 layout");
_Static_assert(sizeof(block_q8_0) == 34, "q8_0 layout");

/* ---- fp16 <-> fp32 ---- */
static inline float fp32_from_bits(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
static inline uint32_t fp32_to_bits(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }

static inline float f16_to_f32_soft(uint16_t h) {
    /* exact conversion without F16C (handles subnormals, inf, nan) */
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float exp_scale = 0x1.0p-112f;
    const float normalized = fp32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    const float denormalized = fp32_from_bits((two_w >> 17) | magic_mask) - magic_bias;
    const uint32_t denormalized_cutoff = 1u << 27;
    const uint32_t result = sign | (two_w < denormalized_cutoff ? fp32_to_bits(denormalized) : fp32_to_bits(normalized));
    return fp32_from_bits(result);
}

static inline uint16_t f32_to_f16_soft(float f) {
    /* round-to-nearest-even, same results as F16C _cvtss_sh(x, 0) */
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    float base = (f < 0 ? -f : f) * scale_to_inf;
    base *= scale_to_zero;
    const uint32_t w = fp32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = fp32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = fp32_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

#if defined(__F16C__)
static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
static inline uint16_t f32_to_f16(float f) { return _cvtss_sh(f, 0); }
#else
static inline float f16_to_f32(uint16_t h) { return f16_to_f32_soft(h); }
static inline uint16_t f32_to_f16(float f) { return f32_to_f16_soft(f); }
#endif

/* ---- e^x for 8 lanes (silu, softmax): Cephes expf (range reduction by ln 2 in two parts, degree-5 polynomial),
 * ~1 ulp; x clamped to [-87.3, 88.3] so 2^n stays a normal float ---- */
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 exp8_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* ---- SIMD level: chosen at build time, can be lowered at run time (tests exercise the scalar path) ---- */
enum { SIMD_SCALAR = 0, SIMD_NEON = 1, SIMD_AVX2 = 2, SIMD_AVX512VNNI = 3, SIMD_LEVELS = 4 };
extern int g_simd;           /* active level */
int simd_best(void);         /* best level compiled in */
const char *simd_name(int level);

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define DL_AVX2 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DL_VNNI 1
#endif
#endif
#if defined(__ARM_NEON) && defined(__aarch64__)
#define DL_NEON 1
#endif

/* ---- weight types: one traits table (types.c), read everywhere instead of switches over the type ----
 * Kernels per SIMD level (index SIMD_*): a level this build lacks holds the scalar kernel. */
typedef void (*dequant_fn)(const void *src, float *dst, int n);
/* one weight row (n elements) . one activation row: Q8_0 blocks xq + block sums xs (quant types) or floats xf */
typedef float (*dot_fn)(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n);
/* the same for 4 activation rows `xstride` blocks apart, bit-identical to 4 dot_fn calls */
typedef void (*dot4_fn)(const void *w, const block_q8_0 *xq, const float *xs, int xstride, int n, float *out);
/* x8 layouts: y[t*ldy + 8g + i] = row i of group g . x[t], for ngroups groups `gstride` bytes apart, t < T */
typedef void (*gemm_fn)(const uint8_t *w, size_t gstride, int ngroups, int nb, const block_q8_0 *xq, const float *xs,
                        const float *xd, int xstride, int T, float *y, int ldy);

typedef struct {
    const char *name;  /* NULL: not a type */
    int block_elems;   /* elements per block (1 for the float types) */
    int block_bytes;   /* bytes per block; x8 layouts: one block column of an 8-row group */
    int head_bytes;    /* bytes in front of the quants: d (and m) of a GGUF block, the 8 d (and 8 m) of an x8 block */
    int quant;         /* matmuls take Q8_0-quantized activations */
    int x8_type;       /* GGUF quant types: the 8-row layout they are repacked into, else -1 */
    int src_type;      /* x8 layouts: the GGUF type they come from, else -1 */
    uint8_t x8_xor;    /* repacking flips these bits of every quant byte (Q8_0: q + 128, see repack.c) */
    int kv;            /* usable as the KV cache row type */
    dequant_fn dequant;
    dot_fn dot[SIMD_LEVELS];
    dot4_fn dot4[SIMD_LEVELS]; /* NULL: four dot calls */
    gemm_fn gemm[SIMD_LEVELS];
} type_traits;

#define T_MAX 102
extern const type_traits g_types[T_MAX + 1];
static inline const type_traits *type_traits_of(int type) {
    return type >= 0 && type <= T_MAX && g_types[type].name ? &g_types[type] : NULL;
}

/* bytes of a row of n elements of a GGUF type (0: not a GGUF type) */
static inline size_t row_bytes(int type, int n) {
    const type_traits *t = type_traits_of(type);
    return t && t->src_type < 0 ? (size_t)(n / t->block_elems) * (size_t)t->block_bytes : 0;
}
static inline int type_is_x8(int type) {
    const type_traits *t = type_traits_of(type);
    return t && t->src_type >= 0;
}
static inline int type_is_quant(int type) {
    const type_traits *t = type_traits_of(type);
    return t && t->quant;
}

/* ---- 8-row repacking (repack.c) ---- */
/* src rows (GGUF Q4_0/Q4_1/Q8_0, `stride` bytes apart; rows % 8 == 0) -> dst, rows/8 groups of cols/32 x8-blocks */
void repack_x8(int type, const uint8_t *src, size_t stride, int rows, int cols, uint8_t *dst);
static inline void gemm_x8(int type, const uint8_t *w, size_t gstride, int ngroups, int nb, const block_q8_0 *xq,
                           const float *xs, const float *xd, int xstride, int T, float *y, int ldy) {
    g_types[type].gemm[g_simd](w, gstride, ngroups, nb, xq, xs, xd, xstride, T, y, ldy);
}

/* the kernels the table points to: dequant_<type>, dot_<type>_<level>, dot4_<type>_<level>, gemm_<x8 type>_<level> */
#define DL_DOTS(T)                                                                                                  \
    void dequant_##T(const void *src, float *dst, int n);                                                           \
    float dot_##T##_scalar(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n);           \
    float dot_##T##_neon(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n);             \
    float dot_##T##_avx2(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n);             \
    float dot_##T##_vnni(const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n);             \
    void dot4_##T##_avx2(const void *w, const block_q8_0 *xq, const float *xs, int xstride, int n, float *out);     \
    void dot4_##T##_vnni(const void *w, const block_q8_0 *xq, const float *xs, int xstride, int n, float *out);
DL_DOTS(f32)
DL_DOTS(f16)
DL_DOTS(q4_0)
DL_DOTS(q4_1)
DL_DOTS(q8_0)
#define DL_GEMMS(T)                                                                                                 \
    void gemm_##T##_scalar(const uint8_t *w, size_t gstride, int ngroups, int nb, const block_q8_0 *xq,            \
                           const float *xs, const float *xd, int xstride, int T_, float *y, int ldy);               \
    void gemm_##T##_avx2(const uint8_t *w, size_t gstride, int ngroups, int nb, const block_q8_0 *xq,              \
                         const float *xs, const float *xd, int xstride, int T_, float *y, int ldy);                 \
    void gemm_##T##_vnni(const uint8_t *w, size_t gstride, int ngroups, int nb, const block_q8_0 *xq,              \
                         const float *xs, const float *xd, int xstride, int T_, float *y, int ldy);
DL_GEMMS(q4_0x8)
DL_GEMMS(q4_1x8)
DL_GEMMS(q8_0x8)


/* ---- kernels (kernels.c) ---- */
void quantize_row_q80(const float *x, block_q8_0 *y, float *s, int n); /* s: per-block d*sum(q), may be NULL */
static inline void dequantize_row(int type, const void *src, float *dst, int n) { g_types[type].dequant(src, dst, n); }
void accumulate_q80(float *dst, const block_q8_0 *src, int n); /* dst += dequant(src) */

/* one weight row (n elements) dot one activation row */
static inline float vec_dot(int type, const void *w, const block_q8_0 *xq, const float *xs, const float *xf, int n) {
    return g_types[type].dot[g_simd](w, xq, xs, xf, n);
}
/* 4 activation rows (xstride blocks apart) at once, quantized weight types only; bit-identical to 4 vec_dot */
static inline void vec_dot4(int type, const void *w, const block_q8_0 *xq, const float *xs, int xstride, int n,
                            float *out) {
    const type_traits *t = &g_types[type];
    if (t->dot4[g_simd]) {
        t->dot4[g_simd](w, xq, xs, xstride, n, out);
        return;
    }
    for (int i = 0; i < 4; i++) out[i] = t->dot[g_simd](w, xq + (size_t)i * xstride, xs + (size_t)i * xstride, NULL, n);
}
float dot_f32(const float *a, const float *b, int n);
void axpy_f32(float *y, float a, const float *x, int n); /* y += a * x */

void rmsnorm(float *out, const float *x, const float *w, int n, float eps);
void rope_rows(float *x, int n_heads, int head_dim, const float *cos_t, const float *sin_t);
void silu_mul(float *g, const float *u, int n); /* g = silu(g) * u */

/* ---- thread pool (pool.c) ---- */
/* work is cut into chunks that threads claim dynamically: a descheduled thread never holds the others up */
typedef void (*chunk_fn)(void *arg, int chunk, int ith);
typedef struct pool pool;
pool *pool_create(int nthreads);
void pool_destroy(pool *p);
void pool_run(pool *p, chunk_fn fn, void *arg, int nchunks); /* fn(arg, c, thread) for c in [0, nchunks) */
int pool_size(const pool *p);

/* ---- parallel ops (ops.c) ---- */
typedef struct {
    const uint8_t *data; /* first row */
    size_t stride;       /* bytes between rows: a column slice of a bigger matrix keeps its parent's stride */
    int type, rows, cols;
} tensor;

typedef struct {
    const block_q8_0 *xq; /* [T][cols/32] quantized activations (quantized weight types) */
    const float *xs;      /* [T][cols/32] per-block d*sum(q) */
    const float *xd;      /* [T][cols/32] per-block scale d as float (spares the kernels an fp16 conversion) */
    const float *xf;      /* [T][cols] float activations (float weight types) */
    int T, cols;
} act;

void act_prepare(act *a, const float *x, int T, int cols, block_q8_0 *qbuf, float *sbuf, float *dbuf, int need_quant);
/* y[t*ldy + r] = W[r] . x[t] for every job; rows of all jobs split across the pool */
void matmul(pool *p, const act *a, int njobs, const tensor *w, float *const *y, const int *ldy);
/* the same, then epi(ctx, job, r0, r1) on the thread that computed rows [r0, r1) of a job, right after them (its
 * outputs are in cache); every chunk's rows start at a multiple of `unit` (a multiple of 16, or 1) */
typedef void (*rows_fn)(void *ctx, int job, int r0, int r1);
void matmul_epi(pool *p, const act *a, int njobs, const tensor *w, float *const *y, const int *ldy, int unit, rows_fn epi,
                void *ctx);
/* gate/up pair fused with silu: g[t*ldh + r] = silu(Wg[r].x[t]) * (Wu[r].x[t]) */
void matmul_swiglu(pool *p, const act *a, const tensor *wg, const tensor *wu, float *g, int ldh);

/* ---- attention (attention.c) ----
 * KV cache of one layer: [n_kv_heads][max_seq][row], a row = one head at one position, row_bytes(kv_type, head_dim)
 * bytes of T_F32, T_F16 or T_Q8_0 (head_dim % 32 == 0). q, out: [T][n_heads][head_dim]; row t sees positions
 * 0..pos+t. scratch: attention_scratch_floats(pool_size(p), max_seq, head_dim, n_heads, T_max) floats, valid for
 * any T <= T_max. */
void kv_store(int kv_type, uint8_t *dst, const float *src, int head_dim); /* write one cache row */
size_t attention_scratch_floats(int nthreads, int max_seq, int head_dim, int n_heads, int T);
void attention(pool *p, const float *q, const uint8_t *kc, const uint8_t *vc, int kv_type, float *out, float *scratch,
               int T, int pos, int n_heads, int n_kv_heads, int head_dim, int max_seq);


#endif
