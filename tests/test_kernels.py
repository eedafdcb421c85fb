"""Every C kernel against its NumPy reference, on the SIMD path this machine compiled and on the scalar path."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from dllama.engine import _kernels as K
from dllama.testing import reference as ref

_BEST = K.simd_info()["best"]
# scalar, plain AVX2 (when the build also has VNNI) and the best compiled path
SIMD_LEVELS = sorted({K.SIMD_SCALAR, _BEST} | ({K.SIMD_AVX2} if _BEST > K.SIMD_AVX2 else set()))


@pytest.fixture(params=SIMD_LEVELS, ids=lambda v: {0: "scalar", 1: "neon", 2: "avx2", 3: "avx512vnni"}[v])
def simd(request):
    prev = K.set_simd(request.param)
    yield request.param
    K.set_simd(prev)


def test_simd_path_is_the_best_compiled():
    info = K.simd_info()
    assert info["level"] == info["best"]


def rng(seed=0):
    return np.random.default_rng(seed)


def quant_weights(w: np.ndarray, qtype) -> np.ndarray:
    """Weights quantized by gguf-py (independent of our code) as raw bytes."""
    if qtype == QT.F32:
        return np.ascontiguousarray(w, dtype=np.float32).view(np.uint8).reshape(-1)
    if qtype == QT.F16:
        return w.astype(np.float16).view(np.uint8).reshape(-1)
    return np.ascontiguousarray(quantize(w, qtype)).reshape(-1)


def test_quantize_q80_bit_exact_with_reference(simd):
    x = rng(1).standard_normal(32 * 64).astype(np.float32) * 3
    x[:32] = 0  # an all-zero block
    x[32:64] = 1e-3
    x[64:96] = np.arange(32) - 15.5  # exact halves once scaled (d = 1): round half to even
    x[64] = 127.0
    dst = np.empty(64 * 34, dtype=np.uint8)
    K.quantize_q80(x, dst)
    assert np.array_equal(dst, ref.quantize_q80(x))
    # layout compatible with GGUF Q8_0: gguf-py dequantizes our bytes back to x within half a step, plus
    # the fp16 rounding of the scale (relative 2^-11, times |q| <= 127)
    back = dequantize(dst.reshape(64, 34), QT.Q8_0).reshape(-1)
    step = np.repeat(np.abs(x.reshape(-1, 32)).max(axis=1) / 127, 32)
    assert np.all(np.abs(back - x) <= step * (0.5 + 127 * 2.0**-11) + 1e-12)


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.Q4_0, QT.Q4_1, QT.Q8_0])
def test_dequantize_matches_gguf(qtype):
    w = rng(2).standard_normal((4, 96)).astype(np.float32)
    raw = quant_weights(w, qtype)
    expect = ref.dequant(raw, qtype, 4, 96)
    for r in range(4):
        out = np.empty(96, dtype=np.float32)
        nb = len(raw) // 4
        K.dequantize(raw[r * nb : (r + 1) * nb], int(qtype), out)
        np.testing.assert_array_equal(out, expect[r])


def test_accumulate_q80():
    x = rng(3).standard_normal(256).astype(np.float32)
    q = ref.quantize_q80(x)
    acc = np.ones(256, dtype=np.float32)
    K.accumulate_q80(acc, q)
    np.testing.assert_allclose(acc, 1 + ref.dequant(q, QT.Q8_0, 1, 256)[0], rtol=1e-6, atol=1e-6)


@pytest.fixture(params=[True, False], ids=["repack", "no-repack"])
def repack(request):
    prev = K.set_repack(request.param)
    yield request.param
    K.set_repack(prev)


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.Q4_0, QT.Q4_1, QT.Q8_0])
@pytest.mark.parametrize("T", [1, 5, 9])
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("rows", [64, 67, 72])
def test_matmul_matches_reference(simd, repack, qtype, T, nthreads, rows):
    # 64 rows: Q4_0/Q4_1/Q8_0 take the repacked GEMV/GEMM path (16-row AVX-512 tiles); 72 rows: 4 tiles + an odd
    # 8-row group; 67 rows: the GGUF layout (chunk tails); T=9: an 8-token GEMM tile + a tail; 10 blocks exercises
    # the 2-block unroll
    cols = 320
    w = rng(4).standard_normal((rows, cols)).astype(np.float32)
    x = rng(5).standard_normal((T, cols)).astype(np.float32)
    raw = quant_weights(w, qtype)
    y = np.zeros((T, rows), dtype=np.float32)
    K.matmul(raw, int(qtype), rows, cols, len(raw) // rows, x, y, T, nthreads)
    np.testing.assert_allclose(y, ref.matmul(raw, qtype, rows, cols, x), rtol=2e-4, atol=2e-4)


QUANT_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q8_0]


@pytest.mark.parametrize("qtype", QUANT_TYPES)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 7, 8, 15, 16, 17, 33, 64, 70])
@pytest.mark.parametrize("rows,cols", [(16, 96), (24, 320), (200, 64)])
def test_gemm_tiles_match_reference(simd, repack, qtype, T, rows, cols):
    # every token-tile size (8, 4, 2, 1 and their sums up to 70), 16-row tiles with and without an odd 8-row
    # group, 1..10 blocks per row; 2 threads so chunk boundaries fall inside the matrix
    w = rng(20).standard_normal((rows, cols)).astype(np.float32)
    w[3] *= 50  # one row with large scales: the Q8_0 +128 offset correction must cancel exactly enough
    x = rng(21).standard_normal((T, cols)).astype(np.float32)
    raw = quant_weights(w, qtype)
    y = np.zeros((T, rows), dtype=np.float32)
    K.matmul(raw, int(qtype), rows, cols, len(raw) // rows, x, y, T, 2)
    expect = ref.matmul(raw, qtype, rows, cols, x)
    np.testing.assert_allclose(y, expect, rtol=2e-4, atol=2e-4 * float(np.abs(expect).max()))


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, *QUANT_TYPES])
@pytest.mark.parametrize("T", [1, 9, 70])
@pytest.mark.parametrize("rows", [24, 67, 200])
def test_matmul_swiglu_matches_reference(simd, repack, qtype, T, rows):
    cols = 128
    wg = rng(22).standard_normal((rows, cols)).astype(np.float32)
    wu = rng(23).standard_normal((rows, cols)).astype(np.float32)
    x = rng(24).standard_normal((T, cols)).astype(np.float32)
    rg, ru = quant_weights(wg, qtype), quant_weights(wu, qtype)
    y = np.zeros((T, rows), dtype=np.float32)
    K.matmul(rg, int(qtype), rows, cols, len(rg) // rows, x, y, T, 2, ru)
    g, u = ref.matmul(rg, qtype, rows, cols, x), ref.matmul(ru, qtype, rows, cols, x)
    expect = ref.silu_mul(g.reshape(-1), u.reshape(-1)).reshape(T, rows)
    np.testing.assert_allclose(y, expect, rtol=2e-4, atol=2e-4 * float(np.abs(expect).max()))


def test_matmul_column_slice_uses_parent_stride():
    rows, cols = 16, 256
    w = rng(6).standard_normal((rows, cols)).astype(np.float32)
    raw = quant_weights(w, QT.Q4_0).reshape(rows, -1)
    x = rng(7).standard_normal(64).astype(np.float32)
    y = np.zeros(rows, dtype=np.float32)
    # columns [64, 128) = blocks 2..3 of each row: offset 2 blocks, stride = full row
    K.matmul(raw.reshape(-1)[2 * 18 :], int(QT.Q4_0), rows, 64, raw.shape[1], x, y, 1, 2)
    expect = ref.matmul(np.ascontiguousarray(raw[:, 36:72]), QT.Q4_0, rows, 64, x)[0]
    np.testing.assert_allclose(y, expect, rtol=2e-4, atol=2e-4)


def test_rmsnorm(simd):
    x = rng(8).standard_normal(576).astype(np.float32)
    w = rng(9).standard_normal(576).astype(np.float32)
    out = np.empty_like(x)
    K.rmsnorm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, ref.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)


def test_rope():
    nh, hd = 3, 64
    x = rng(10).standard_normal(nh * hd).astype(np.float32)
    ang = 7 * 10000.0 ** (-np.arange(hd // 2) * 2 / hd)
    c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    expect = ref.rope(x, nh, hd, c, s)
    K.rope(x, nh, hd, c, s)
    np.testing.assert_allclose(x, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T,pos", [(1, 0), (1, 40), (6, 0), (4, 17)])
def test_attention_gqa_causal(simd, T, pos):
    nh, nkv, hd, max_seq = 6, 2, 32, 64
    q = rng(11).standard_normal((T, nh * hd)).astype(np.float32)
    kc = rng(12).standard_normal((nkv, max_seq, hd)).astype(np.float32)
    vc = rng(13).standard_normal((nkv, max_seq, hd)).astype(np.float32)
    out = np.zeros_like(q)
    K.attention(q, kc, vc, out, T, pos, nh, nkv, hd, max_seq, 2)
    np.testing.assert_allclose(out, ref.attention(q, kc, vc, T, pos, nh, nkv, hd), rtol=1e-4, atol=1e-5)


def test_silu_mul(simd):
    g = rng(14).standard_normal(100).astype(np.float32) * 4
    g[:6] = [-200.0, -88.0, -30.0, 30.0, 88.0, 200.0]  # exp's clamped range, both signs
    u = rng(15).standard_normal(100).astype(np.float32)
    expect = ref.silu_mul(g, u)
    K.silu_mul(g, u)
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-6)


def test_bad_sizes_raise_value_error():
    with pytest.raises(ValueError):
        K.quantize_q80(np.zeros(33, dtype=np.float32), np.zeros(100, dtype=np.uint8))
    with pytest.raises(ValueError):
        K.matmul(np.zeros(10, dtype=np.uint8), int(QT.Q4_0), 4, 64, 36, np.zeros(64, np.float32),
                 np.zeros(4, np.float32), 1, 1)  # fmt: skip


def test_engine_forward_matches_numpy_reference_model(tiny8):
    """The whole C forward pass (prompt batch, then decode steps over the KV cache) against the float64 NumPy
    model in testing/reference.py, on F32 weights (no activation quantization)."""
    from dllama.model.gguf_model import GGUFModel
    from dllama.runtime.root import Root

    m = GGUFModel(tiny8["f32"])
    ids = [5, 300, 17, 256, 99, 1000, 42]
    expect = ref.forward(tiny8["f32"], ids)  # [T, vocab]
    root = Root(m, nthreads=2, max_seq=32, kv_type="f32", log=lambda *a: None)
    got = [root.forward(ids[:3], 0).copy()] + [root.forward([t], i).copy() for i, t in enumerate(ids[3:], 3)]
    np.testing.assert_allclose(np.array(got), expect[2:], rtol=1e-4, atol=1e-4)
