/* The weight-type traits table: sizes, layout facts and kernels of every type, defined once and read everywhere
 * (row sizes, activation quantization, repacking, the dot / GEMM / dequant dispatch) instead of switches over
 * the type. Ids are GGML's (Python passes gguf's GGMLQuantizationType values straight through) plus the
 * internal 8-row layouts. A SIMD level this build lacks holds the scalar kernel (never selected at run time:
 * g_simd <= simd_best()). */
#include "common.h"

#if defined(DL_NEON)
#define NEON_OR(f, scalar) f
#else
#define NEON_OR(f, scalar) scalar
#endif
#if defined(DL_AVX2)
#define AVX2_OR(f, scalar) f
#else
#define AVX2_OR(f, scalar) scalar
#endif
#if defined(DL_VNNI)
#define VNNI_OR(f, scalar) f
#else
#define VNNI_OR(f, scalar) scalar
#endif

/* float weights: dots only (no 4-token kernel, no repacking) */
#define FLOAT_TYPE(NAME, BYTES, NEON_DOT)                                                                           \
    {#NAME, 1, BYTES, 0, 0, -1, -1, 0, 1, dequant_##NAME,                                                           \
     {dot_##NAME##_scalar, NEON_OR(NEON_DOT, dot_##NAME##_scalar), AVX2_OR(dot_##NAME##_avx2, dot_##NAME##_scalar),  \
      VNNI_OR(dot_##NAME##_avx2, dot_##NAME##_scalar)},                                                              \
     {NULL, NULL, NULL, NULL},                                                                                      \
     {NULL, NULL, NULL, NULL}}

/* GGUF quant blocks of 32: head = bytes before the quants */
#define QUANT_TYPE(NAME, BYTES, HEAD, X8, KV)                                                                       \
    {#NAME, QK, BYTES, HEAD, 1, X8, -1, 0, KV, dequant_##NAME,                                                      \
     {dot_##NAME##_scalar, NEON_OR(dot_##NAME##_neon, dot_##NAME##_scalar),                                         \
      AVX2_OR(dot_##NAME##_avx2, dot_##NAME##_scalar), VNNI_OR(dot_##NAME##_vnni, dot_##NAME##_scalar)},             \
     {NULL, NULL, AVX2_OR(dot4_##NAME##_avx2, NULL), VNNI_OR(dot4_##NAME##_vnni, NULL)},                            \
     {NULL, NULL, NULL, NULL}}

/* 8-row layouts (repack.c): a block column of a group = 8 heads, then 8 rows' quants; the NEON build runs the
 * scalar kernel */
#define X8_TYPE(NAME, BYTES, HEAD, SRC, XOR)                                                                        \
    {#NAME, QK, BYTES, HEAD, 1, -1, SRC, XOR, 0, NULL,                                                              \
     {NULL, NULL, NULL, NULL},                                                                                      \
     {NULL, NULL, NULL, NULL},                                                                                      \
     {gemm_##NAME##_scalar, gemm_##NAME##_scalar, AVX2_OR(gemm_##NAME##_avx2, gemm_##NAME##_scalar),                \
      VNNI_OR(gemm_##NAME##_vnni, gemm_##NAME##_scalar)}}

const type_traits g_types[T_MAX + 1] = {
    [T_F32] = FLOAT_TYPE(f32, 4, dot_f32_neon),
    [T_F16] = FLOAT_TYPE(f16, 2, dot_f16_scalar),
    [T_Q4_0] = QUANT_TYPE(q4_0, sizeof(block_q4_0), 2, T_Q4_0_X8, 0),
    [T_Q4_1] = QUANT_TYPE(q4_1, sizeof(block_q4_1), 4, T_Q4_1_X8, 0),
    [T_Q8_0] = QUANT_TYPE(q8_0, sizeof(block_q8_0), 2, T_Q8_0_X8, 1),
    [T_Q4_0_X8] = X8_TYPE(q4_0x8, 16 + 8 * 16, 16, T_Q4_0, 0x00),
    [T_Q4_1_X8] = X8_TYPE(q4_1x8, 32 + 8 * 16, 32, T_Q4_1, 0x00),
    [T_Q8_0_X8] = X8_TYPE(q8_0x8, 16 + 8 * 32, 16, T_Q8_0, 0x80),
};
