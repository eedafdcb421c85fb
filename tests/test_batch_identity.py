"""A token's result must not depend on how many tokens were computed with it: a prompt run as one batch and the
same tokens run one at a time give bit-identical outputs (else a fixed seed answers differently once the prompt
cache is reused). Exact equality, per weight type, SIMD level, repacking and thread count; the reference is the
single-token (GEMV) path of the same build, the property under test being the identity itself."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize

from dllama.engine import _kernels as K

_BEST = K.simd_info()["best"]
SIMD_LEVELS = sorted({K.SIMD_SCALAR, _BEST} | ({K.SIMD_AVX2} if _BEST > K.SIMD_AVX2 else set()))
ALL_TYPES = [QT.F32, QT.F16, QT.Q4_0, QT.Q4_1, QT.Q8_0]


@pytest.fixture(params=SIMD_LEVELS, ids=lambda v: {0: "scalar", 1: "neon", 2: "avx2", 3: "avx512vnni"}[v])
def simd(request):
    prev = K.set_simd(request.param)
    yield request.param
    K.set_simd(prev)


@pytest.fixture(params=[True, False], ids=["repack", "no-repack"])
def repack(request):
    prev = K.set_repack(request.param)
    yield request.param
    K.set_repack(prev)


def _raw(w: np.ndarray, qtype) -> np.ndarray:
    if qtype == QT.F32:
        return np.ascontiguousarray(w, dtype=np.float32).view(np.uint8).reshape(-1)
    if qtype == QT.F16:
        return w.astype(np.float16).view(np.uint8).reshape(-1)
    return np.ascontiguousarray(quantize(w, qtype)).reshape(-1)


def _mm(raw, qtype, rows, cols, x, nthreads, up=None):
    T = x.shape[0]
    y = np.zeros((T, rows), dtype=np.float32)
    args = (raw, int(qtype), rows, cols, len(raw) // rows, np.ascontiguousarray(x), y, T, nthreads)
    K.matmul(*args, *(() if up is None else (up,)))
    return y


def _check(raw, qtype, rows, cols, x, nthreads, up=None):
    full = _mm(raw, qtype, rows, cols, x, nthreads, up)
    for t in range(x.shape[0]):  # every token alone (the GEMV / decode path)
        one = _mm(raw, qtype, rows, cols, x[t : t + 1], nthreads, up)
        assert np.array_equal(full[t], one[0]), (
            f"token {t} of {x.shape[0]}: max diff {np.abs(full[t] - one[0]).max()}"
        )
    for T in (2, 3, 4, 5, 8, 9, 16, 17, 33):  # every tile size and mix of them, as a batch prefix
        part = _mm(raw, qtype, rows, cols, x[:T], nthreads, up)
        assert np.array_equal(part, full[:T]), f"T={T}: max diff {np.abs(part - full[:T]).max()}"


# 48 rows: three 8-row groups (a 16-row tile + an odd group); 200: many tiles over 2 threads' chunks; 67: the
# GGUF layout (no repack possible); 320 columns: 10 blocks (the 2-block unrolls and their tails)
@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("rows,cols", [(48, 320), (200, 96), (67, 128)])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_matmul_batch_equals_single(simd, repack, qtype, rows, cols, nthreads):
    g = np.random.default_rng(rows + cols)
    w = g.standard_normal((rows, cols)).astype(np.float32)
    w[3] *= 50  # large scales: the Q8_0 +128 correction and the Q4_1 mins carry weight
    x = g.standard_normal((70, cols)).astype(np.float32)
    x[5] *= 1e-3
    _check(_raw(w, qtype), qtype, rows, cols, x, nthreads)


@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("rows", [24, 67, 200])
def test_swiglu_batch_equals_single(simd, repack, qtype, rows):
    cols = 128
    g = np.random.default_rng(rows)
    wg = g.standard_normal((rows, cols)).astype(np.float32)
    wu = g.standard_normal((rows, cols)).astype(np.float32)
    x = g.standard_normal((40, cols)).astype(np.float32)
    _check(_raw(wg, qtype), qtype, rows, cols, x, 2, up=_raw(wu, qtype))


def _forward_three_ways(path, ids, nthreads, kv_type="f32"):
    from dllama.model.gguf_model import GGUFModel
    from dllama.runtime.root import Root

    m = GGUFModel(path, verbose=False)
    r = Root(m, nthreads=nthreads, max_seq=96, kv_type=kv_type, log=lambda *a: None)
    batch = r.forward(ids, 0).copy()
    r2 = Root(m, nthreads=nthreads, max_seq=96, kv_type=kv_type, log=lambda *a: None)
    r2.forward(ids[:-1], 0)
    prefix_single = r2.forward(ids[-1:], len(ids) - 1).copy()
    r3 = Root(m, nthreads=nthreads, max_seq=96, kv_type=kv_type, log=lambda *a: None)
    steps = [r3.forward([t], i).copy() for i, t in enumerate(ids)][-1]
    return batch, prefix_single, steps


def _assert_same(path, ids, nthreads, kv_type="f32"):
    batch, prefix_single, steps = _forward_three_ways(path, ids, nthreads, kv_type)
    assert np.abs(batch).max() > 0
    assert np.array_equal(batch, prefix_single), (
        f"batch vs prefix+single: {np.abs(batch - prefix_single).max()}"
    )
    assert np.array_equal(batch, steps), f"batch vs all-single: {np.abs(batch - steps).max()}"


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
def test_default_model_batch_equals_single(default_model, nthreads, kv_type):
    # 21 tokens: a 16-token tile, a 4 and a 1 in the batch
    ids = [
        1,
        504,
        3458,
        282,
        260,
        2151,
        30,
        1326,
        253,
        2734,
        11,
        1580,
        47,
        9,
        870,
        4219,
        30,
        1326,
        253,
        2,
        17,
    ]
    _assert_same(default_model, ids, nthreads, kv_type)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from dllama.testing.synthetic import SHAPES, write_synthetic_gguf

    d = tmp_path_factory.mktemp("tiny-identity")
    return {wt: write_synthetic_gguf(str(d / f"tiny-{wt}.gguf"), **SHAPES["tiny"], weight_type=wt, seed=5)
            for wt in ("q4_0", "q4_1", "q8_0", "f16", "f32")}  # fmt: skip


@pytest.mark.parametrize("wt", ["q4_0", "q4_1", "q8_0", "f16", "f32"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_synthetic_model_batch_equals_single(simd, tiny_models, wt, nthreads):
    ids = [3, 300, 17, 256, 99, 500, 42, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 200, 201, 202, 203]
    _assert_same(tiny_models[wt], ids, nthreads)
