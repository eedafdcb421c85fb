"""The blocked online-softmax attention (attention.c) against the NumPy reference, for every KV cache type, every
SIMD path compiled in, GQA group sizes, prompt and decode shapes, short and long contexts, 1 and 2 threads.

The reference dequantizes the very cache bytes the kernel reads (and, for a Q8_0 K cache, quantizes the query the
same way), so all three types must agree to float32 rounding: measured worst error / max|out| is ~3e-6 for every
type and path; the tests allow 1e-5. The information lost by storing the cache in F16 or Q8_0 is checked
separately against the float32 result."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from dllama.engine import _kernels as K
from dllama.testing import reference as ref

_BEST = K.simd_info()["best"]
SIMD_LEVELS = sorted({K.SIMD_SCALAR, _BEST} | ({K.SIMD_AVX2} if _BEST > K.SIMD_AVX2 else set()))
SIMD_IDS = {0: "scalar", 1: "neon", 2: "avx2", 3: "avx512vnni"}
KV_IDS = {QT.F32: "f32", QT.F16: "f16", QT.Q8_0: "q8_0"}
# (n_heads, n_kv_heads, head_dim): no GQA, SmolLM2's group of 3, and a group larger than one tile (16 queries)
SHAPES = [(2, 2, 64), (6, 2, 64), (18, 1, 32)]


@pytest.fixture(params=SIMD_LEVELS, ids=lambda v: SIMD_IDS[v])
def simd(request):
    prev = K.set_simd(request.param)
    yield request.param
    K.set_simd(prev)


_cases: dict = {}


def case(kv_type, shape, T, pos):
    """Inputs, cache bytes and reference output, built once per combination (shared by SIMD levels and threads)."""
    key = (kv_type, shape, T, pos)
    if key not in _cases:
        nh, nkv, hd = shape
        max_seq = pos + T + 3  # a few unused positions at the end: the kernel must not read them
        rng = np.random.default_rng(hash(key) % 2**32)
        # q scaled by 2: peaked softmax, so outputs are O(1) and the rescaling of early blocks matters
        q = (rng.standard_normal((T, nh * hd)) * 2).astype(np.float32)
        kc = rng.standard_normal((nkv, max_seq, hd)).astype(np.float32)
        vc = rng.standard_normal((nkv, max_seq, hd)).astype(np.float32)
        kc[:, pos + T :] = vc[:, pos + T :] = 3e4  # poison past the causal horizon (fits F16)
        kb, vb = ref.kv_quantize(kc, kv_type), ref.kv_quantize(vc, kv_type)
        expect = ref.attention(q, kb, vb, T, pos, nh, nkv, hd, kv_type)
        _cases[key] = (q, kc, vc, kb, vb, expect, max_seq)
    return _cases[key]


def run(q, kc, vc, T, pos, shape, max_seq, threads, kv_type):
    nh, nkv, hd = shape
    out = np.full_like(q, np.nan)
    K.attention(q, kc, vc, out, T, pos, nh, nkv, hd, max_seq, threads, int(kv_type))
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pos", [0, 5, 300, 1500])
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}q{s[1]}kv{s[2]}")
@pytest.mark.parametrize("kv_type", ref.KV_TYPES, ids=lambda t: KV_IDS[t])
def test_attention_matches_reference(simd, kv_type, shape, T, pos, threads):
    q, _, _, kb, vb, expect, max_seq = case(kv_type, shape, T, pos)
    out = run(q, kb, vb, T, pos, shape, max_seq, threads, kv_type)
    scale = np.abs(expect).max()
    assert scale > 0.05
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("kv_type", [QT.F16, QT.Q8_0], ids=lambda t: KV_IDS[t])
def test_kv_store_writes_the_reference_bytes(simd, kv_type):
    """Float caches handed to the binding are written with kv_store (the engine's path): the result must be
    identical, bit for bit, to the one from the reference's F16 / Q8_0 bytes."""
    shape, T, pos = (6, 2, 64), 3, 300
    q, kc, vc, kb, vb, _, max_seq = case(kv_type, shape, T, pos)
    a = run(q, kc, vc, T, pos, shape, max_seq, 2, kv_type)
    b = run(q, kb, vb, T, pos, shape, max_seq, 2, kv_type)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("kv_type,bound", [(QT.F16, 2e-3), (QT.Q8_0, 3e-2)], ids=["f16", "q8_0"])
def test_cache_quantization_loss(kv_type, bound):
    """What storing the cache in F16 / Q8_0 costs against an F32 cache (max error / max|out|, measured:
    f16 ~4e-4, q8_0 ~1e-2)."""
    shape, T, pos = (6, 2, 64), 3, 1500
    q, kc, vc, _, _, _, max_seq = case(QT.F32, shape, T, pos)
    exact = run(q, kc, vc, T, pos, shape, max_seq, 2, QT.F32)
    lossy = run(q, kc, vc, T, pos, shape, max_seq, 2, kv_type)
    err = np.abs(lossy - exact).max() / np.abs(exact).max()
    assert 0 < err < bound


def test_long_decode_split_across_threads_equals_one_thread():
    """Decode at 8k positions with 4 threads spreads the positions' ranges over threads, folded afterwards: the
    very bytes of one thread."""
    shape, T, pos = (9, 3, 64), 1, 8000
    q, _, _, kb, vb, expect, max_seq = case(QT.Q8_0, shape, T, pos)
    one = run(q, kb, vb, T, pos, shape, max_seq, 1, QT.Q8_0)
    four = run(q, kb, vb, T, pos, shape, max_seq, 4, QT.Q8_0)
    np.testing.assert_allclose(one, expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())
    assert np.array_equal(four, one)


# (T, pos): rows on both sides of a range boundary (256), a small batch whose ranges are spread over threads, and
# decode at a long context
@pytest.mark.parametrize("T,pos", [(12, 250), (3, 1020), (1, 1500)])
@pytest.mark.parametrize("shape", [(6, 2, 64), (18, 1, 32)], ids=lambda s: f"{s[0]}q{s[1]}kv{s[2]}")
@pytest.mark.parametrize("kv_type", ref.KV_TYPES, ids=lambda t: KV_IDS[t])
def test_a_row_does_not_depend_on_its_batch_or_the_threads(simd, kv_type, shape, T, pos):
    """Each query's output is a function of its own context only: computed in a batch, alone (as a decode step
    after the prompt cache served the rest), with 1, 2 or 3 threads, the bytes are the same. Otherwise a seeded
    answer could change when part of a prompt is served from the cache."""
    q, _, _, kb, vb, _, max_seq = case(kv_type, shape, T, pos)
    batch = run(q, kb, vb, T, pos, shape, max_seq, 1, kv_type)
    for threads in (1, 2, 3):
        assert np.array_equal(run(q, kb, vb, T, pos, shape, max_seq, threads, kv_type), batch), threads
        for t in range(T):
            alone = run(q[t : t + 1], kb, vb, 1, pos + t, shape, max_seq, threads, kv_type)
            assert np.array_equal(alone[0], batch[t]), (threads, t)


@pytest.mark.parametrize(
    "kv_type,hd,msg",
    [(QT.Q4_0, 64, "not F32, F16 or Q8_0"), (QT.Q8_0, 48, "head_dim % 32 == 0")],
    ids=["q4_0-cache", "q8_0-hd48"],
)
def test_bad_cache_type_is_a_clear_error(kv_type, hd, msg):
    q = np.zeros((1, 2 * hd), dtype=np.float32)
    c = np.zeros((1, 4, hd), dtype=np.float32)
    with pytest.raises(ValueError, match=msg):
        K.attention(q, c, c, np.zeros_like(q), 1, 0, 2, 1, hd, 4, 1, int(kv_type))


def test_wrong_cache_size_is_rejected():
    q = np.zeros((1, 128), dtype=np.float32)
    with pytest.raises(ValueError, match="bad sizes"):
        K.attention(
            q, np.zeros(100, np.uint8), np.zeros(100, np.uint8), np.zeros_like(q), 1, 0, 2, 1, 64, 4, 1, 8
        )


@pytest.mark.parametrize("pos", [0, 300])
@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("hd", [40, 6], ids=["hd40", "hd6"])
@pytest.mark.parametrize("kv_type", [QT.F32, QT.F16], ids=lambda t: KV_IDS[t])
def test_head_dims_off_the_vector_width(simd, kv_type, hd, T, pos):
    """head_dim % 32 != 0 (generic value loop) and % 8 != 0 (generic score loop too)."""
    shape = (6, 2, hd)
    q, _, _, kb, vb, expect, max_seq = case(kv_type, shape, T, pos)
    out = run(q, kb, vb, T, pos, shape, max_seq, 2, kv_type)
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())
