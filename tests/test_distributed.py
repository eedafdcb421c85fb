"""Tensor parallelism with real worker processes on 127.0.0.1.

Exactness is checked where it is well defined: with F32 weights there is no activation quantization, so
1, 2, 3, 4 nodes (and weighted splits) must give the same logits up to float summation order. With the
default Q4_1 model, activations are quantized to Q8_0 before every matmul; a one-ulp difference in summation
order can flip a rounding and the runs then differ like two noisy runs (measured: max |logit diff| ~3, the top-2
gap shifted by < 1, see NEAR_TIE), so greedy paths agree until the first near-tie. We check argmax agreement
wherever the single node's top-2 gap is above the measured noise, logit bounds from the same measurement, and
free-running agreement on fixed prompts; q80 runs also make every node prove its residual stream equals the
root's after every block (check_residual)."""

import subprocess
import sys
import time

import numpy as np
import pytest

from dllama.model.gguf_model import GGUFModel
from dllama.runtime.root import Root
from dllama.runtime.session import Session
from dllama.sampling.sampler import Sampler
from dllama.tokenizer import Tokenizer

QUIET = {"log": lambda *a: None, "kv_type": "f32"}  # the noise criteria were measured with an f32 cache


def logits_per_position(root: Root, ids: list[int], batch: int = 3) -> np.ndarray:
    """A prompt batch first (matrix x matrix), then one token at a time (decode); logits of every step."""
    out = [root.forward(ids[:batch], 0).copy()]
    out += [root.forward([t], i).copy() for i, t in enumerate(ids[batch:], batch)]
    return np.array(out)


def cluster(model, addrs, secret="test-secret", **kw) -> Root:
    return Root(model, nthreads=1, max_seq=128, workers=addrs, secret=secret, **QUIET, **kw)


@pytest.mark.parametrize("n", [2, 3])
def test_default_model_f32_weights_exact_across_nodes(default_f32, workers, n):
    m = GGUFModel(default_f32)
    ids = Tokenizer.from_gguf(default_f32, reader=m.reader).encode("Once upon a time, the city of Nova")
    ref = logits_per_position(Root(m, nthreads=1, max_seq=128, **QUIET), ids)
    ws = workers(n - 1)
    with cluster(m, [w.address for w in ws], sync="f32") as r:
        got = logits_per_position(r, ids)
    print(f"{n} nodes, f32 weights + f32 sync: max |logit diff| {np.abs(got - ref).max():.2e}")
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("n,weights", [(2, None), (3, None), (4, None), (3, [1, 2, 1]), (4, [3, 1, 1, 2]), (8, None),
                                       (8, [2, 1, 1, 1, 1, 1, 1, 3])])  # 4, 8: the butterfly sum
def test_synthetic_8kv_exact_for_any_node_count_and_weighted_split(tiny8, workers, n, weights):
    m = GGUFModel(tiny8["f32"])
    ids = [5, 300, 17, 256, 99, 1000, 42, 7]
    ref = logits_per_position(Root(m, nthreads=1, max_seq=64, **QUIET), ids)
    ws = workers(n - 1)
    with cluster(m, [w.address for w in ws], sync="f32", split_weights=weights) as r:
        shares = [(x.n_kv_heads, x.hidden) for x in r.plan.nodes]
        got = logits_per_position(r, ids)
    print(
        f"{n} nodes weights {weights}: shares (kv heads, ffn rows) {shares}, max diff {np.abs(got - ref).max():.2e}"
    )
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    if weights:
        assert shares[weights.index(max(weights))][1] > shares[weights.index(min(weights))][1]


@pytest.mark.parametrize("n", [4, 8])  # the butterfly re-quantizes sums of partial sums (graph.c)
def test_synthetic_8kv_q4_q80_close(tiny8, workers, n):
    """q80 sync stays close to one node, and every node proves after every block that its residual stream is the
    root's bit for bit (check_residual): the butterfly's pairs must add in the same order on both sides."""
    m = GGUFModel(tiny8["q4_0"])
    ids = [5, 300, 17, 256, 99, 1000, 42, 7]
    ref = logits_per_position(Root(m, nthreads=1, max_seq=64, **QUIET), ids)
    ws = workers(n - 1)
    with cluster(m, [w.address for w in ws], check_residual=True) as r:
        got = logits_per_position(r, ids)
    corr = min(np.corrcoef(got[i], ref[i])[0, 1] for i in range(len(got)))
    print(f"{n} nodes, q4_0 weights + q80 sync: max |diff| {np.abs(got - ref).max():.3f}, min corr {corr:.5f}")
    assert corr > 0.99


# Noise of the default model (Q4_1 weights, Q8_0 activations) split across nodes vs the single node, measured by
# scripts/measure_noise.py teacher-forced along the single node's greedy path of 6 prompts x 40 tokens (249
# positions): the shift of the top-2 gap (|delta margin|), max |logit diff| per position, correlation per position.
#   q80 2 nodes: delta margin q0.999 0.944, max 0.971; max |diff| median 1.39, max 2.98; corr min 0.9902
#   q80 3 nodes: delta margin q0.999 0.974, max 0.974; max |diff| median 1.51, max 3.08; corr min 0.9914
#   f32 2 nodes: delta margin q0.999 0.486, max 0.490; max |diff| median 0.65, max 1.47; corr min 0.9979
# Allowances = the measured maximum x 1.5 (the gap, the correlation deficit, the median) or x 1.25 (max |diff|): a greedy step
# may only flip where the single node's gap is below NEAR_TIE.
NEAR_TIE = {"q80": 1.5, "f32": 0.75}  # 1.5 x 0.974, 1.5 x 0.490
MAX_DIFF = {"q80": 3.85, "f32": 1.85}  # 1.25 x 3.08, 1.25 x 1.47
MEDIAN_DIFF = {"q80": 2.26, "f32": 0.98}  # 1.5 x the measured median of the per-position max |diff|
MIN_CORR = {"q80": 0.985, "f32": 0.9968}  # 1 - 1.5 x (1 - measured min)


@pytest.mark.parametrize("n,buffer_type", [(2, "f32"), (3, "f32"), (2, "q80"), (3, "q80")])
def test_default_model_argmax_agrees_where_clear(default_model, workers, n, buffer_type):
    """Teacher-forced along the single node's greedy path: the same argmax at every position where the single
    node's top-2 gap exceeds the measured noise, and logits within the measured bounds."""
    m = GGUFModel(default_model)
    tok = Tokenizer.from_gguf(default_model, reader=m.reader)
    single = Session(Root(m, nthreads=1, max_seq=128, **QUIET))
    path = [*tok.encode("Once upon a time"), *single.generate(tok.encode("Once upon a time"), Sampler(0), 40)]
    ref = logits_per_position(single.root, path)
    ws = workers(n - 1)
    with cluster(m, [w.address for w in ws], sync=buffer_type, check_residual=buffer_type == "q80") as r:
        got = logits_per_position(r, path)
    top2 = np.sort(ref, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    clear = gap > NEAR_TIE[buffer_type]
    same = got.argmax(axis=1) == ref.argmax(axis=1)
    diff = np.abs(got - ref).max(axis=1)
    corr = np.array([np.corrcoef(got[i], ref[i])[0, 1] for i in range(len(got))])
    print(f"{n} nodes {buffer_type}: max |logit diff| {diff.max():.3f} (median {np.median(diff):.3f}), min corr "
          f"{corr.min():.5f}; argmax equal at {same.sum()}/{len(same)} positions, {clear.sum()} clear")  # fmt: skip
    bad = [(i, round(float(gap[i]), 3)) for i in np.flatnonzero(clear & ~same)]
    assert not bad, f"unexplained divergence: another argmax where the single node's gap was clear: {bad}"
    assert clear.sum() >= len(path) // 3
    assert diff.max() <= MAX_DIFF[buffer_type], f"unexplained divergence: max |logit diff| {diff.max():.3f}"
    assert np.median(diff) <= MEDIAN_DIFF[buffer_type], f"unexplained divergence: median {np.median(diff):.3f}"
    assert corr.min() >= MIN_CORR[buffer_type], f"unexplained divergence: correlation {corr.min():.5f}"


PROMPTS = [
    "The three primary colors are",
    "Water boils at",
    "Once upon a time",
    "def fibonacci(n):",
    "The capital of France is",
    "My favourite food is",
]


def greedy_with_logits(root: Root, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    logits = root.forward(ids, 0)
    out, seen = [], []
    for i in range(n):
        seen.append(logits.copy())
        out.append(int(logits.argmax()))
        logits = root.forward([out[-1]], len(ids) + i)
    return out, seen


@pytest.mark.parametrize("n,buffer_type", [(2, "f32"), (3, "f32"), (2, "q80"), (3, "q80")])
def test_default_model_greedy_agrees_with_single_node(default_model, workers, n, buffer_type):
    """Greedy output equals the single node's until the single node itself faces a near-tie: where the two part,
    the single node's logit gap between its token and the cluster's must be within the measured noise
    (NEAR_TIE). The raw agreement lengths are printed for the report."""
    m = GGUFModel(default_model)
    tok = Tokenizer.from_gguf(default_model, reader=m.reader)
    single = Root(m, nthreads=1, max_seq=128, **QUIET)
    ws = workers(n - 1)
    agree_all, unexplained = [], []
    # no residual check here (test_default_model_argmax_agrees_where_clear has it): this test must catch what a
    # consistent bug does to the output by itself, through the measured-noise criterion
    with cluster(m, [w.address for w in ws], sync=buffer_type) as r:
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            ref, ref_logits = greedy_with_logits(single, ids, 40)
            got, _ = greedy_with_logits(r, ids, 40)
            agree = next((i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), 40)
            agree_all.append(agree)
            if agree < 40:
                gap = float(ref_logits[agree][ref[agree]] - ref_logits[agree][got[agree]])
                if gap > NEAR_TIE[buffer_type]:
                    unexplained.append((prompt, agree, round(gap, 3)))
    print(
        f"{n} nodes {buffer_type}: greedy agreement with 1 node over {len(PROMPTS)} prompts: {agree_all} tokens"
    )
    assert not unexplained, (
        f"unexplained divergence (the single node's gap above the measured noise {NEAR_TIE[buffer_type]}): "
        f"{unexplained}"
    )
    assert max(agree_all) >= (32 if buffer_type == "f32" else 16)


# per generated token at 3 nodes, computed by hand (see tests/test_traffic.py for the arithmetic):
# root sends 2 * (652 + 60 * (12 + S + 16)), receives 2 * (60 * (12 + S + 16) + 32), S = 612 (q80) or 2304 (f32),
# every frame carrying a 16-byte integrity tag
PRODUCT_COUNTED = {"q80": (78104, 76864), "f32": (281144, 279904)}


@pytest.mark.parametrize("buffer_type", ["q80", "f32"])
def test_bytes_per_token_match_the_formula(default_model, workers, buffer_type):
    """The root's own socket counters (Conn + the C mesh) against literal numbers; tests/test_traffic.py checks
    the same links with the kernel's counters, independently of the product."""
    m = GGUFModel(default_model)
    ws = workers(2)
    with cluster(m, [w.address for w in ws], sync=buffer_type) as r:
        s = Session(r)
        list(s.generate([1, 2, 3, 4], Sampler(0), 6))
        steps = s.stats.gen
    sent, recv = PRODUCT_COUNTED[buffer_type]
    assert [st.sent for st in steps] == [sent] * len(steps)
    assert [st.recv for st in steps] == [recv] * len(steps)
    print(f"3 nodes {buffer_type}: root sent {steps[0].sent} B, received {steps[0].recv} B per token")


def test_worker_with_local_model_receives_nothing(default_model, workers):
    m = GGUFModel(default_model)
    (w,) = workers(1, extra=["--model", default_model])
    logs = []
    # the cache type of cluster() below (QUIET): the comparison is about where the slice came from
    r = Root(m, nthreads=1, max_seq=64, workers=[w.address], secret="test-secret", kv_type=QUIET["kv_type"],
             log=logs.append)  # fmt: skip
    with r:
        got = r.forward([1, 2, 3], 0).copy()
    assert any("read from its local model file" in line for line in logs), logs
    assert not any("weights sent" in line for line in logs)
    log = w.stop()
    assert "slice read from the local model file" in log
    with cluster(m, [workers(1)[0].address], sync="q80") as r2:  # shipped slice: same result
        np.testing.assert_allclose(r2.forward([1, 2, 3], 0), got, atol=1e-5)


@pytest.mark.parametrize("n,victim", [(2, 1), (3, 2)])
def test_killed_worker_is_reported_within_5s(default_model, workers, n, victim):
    ws = workers(n - 1)
    cmd = [sys.executable, "-m", "dllama", "inference", "--prompt", "Once upon a time", "--steps", "100000",
           "--max-seq-len", "4096", "--temperature", "0", "--nthreads", "1", "--secret", "test-secret",
           "--workers", *[w.address for w in ws]]  # fmt: skip
    root = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert root.stdout.read(len("Once upon a time,")) == "Once upon a time,"  # generating now
        ws[victim - 1].kill()
        t0 = time.monotonic()
        root.wait(timeout=15)
        elapsed = time.monotonic() - t0
    finally:
        if root.poll() is None:
            root.kill()
    err = root.stderr.read()
    print(f"root exited {elapsed:.2f} s after worker {victim} was killed: {err.strip().splitlines()[-1]}")
    assert root.returncode != 0
    assert elapsed < 5
    assert f"worker {victim}" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    # the surviving workers return to a clean state and serve the next root
    for i, w in enumerate(ws, 1):
        if i != victim:
            with cluster(GGUFModel(default_model), [w.address]) as r:
                assert np.isfinite(r.forward([1, 2], 0)).all()
