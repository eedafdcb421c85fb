"""Tensor parallelism with real worker processes on 127.0.0.1.

Exactness is checked where it is well defined: with F32 weights there is no activation quantization, so
1, 2, 3, 4 nodes (and weighted splits) must give the same logits up to float summation order. With the
default Q4_1 model, activations are quantized to Q8_0 before every matmul; a one-ulp difference in summation
order can flip a rounding and the runs then differ like two noisy runs (max |logit diff| ~1), so greedy paths
agree until the first near-tie. We check argmax agreement wherever the single node's top-2 margin is clear,
and free-running agreement on fixed prompts, printing the measured numbers."""

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

QUIET = {"log": lambda *a: None}


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


@pytest.mark.parametrize("n,weights", [(2, None), (3, None), (4, None), (3, [1, 2, 1]), (4, [3, 1, 1, 2])])
def test_synthetic_8kv_exact_for_any_node_count_and_weighted_split(tiny8, workers, n, weights):
    m = GGUFModel(tiny8["f32"])
    ids = [5, 300, 17, 256, 99, 1000, 42, 7]
    ref = logits_per_position(Root(m, nthreads=1, max_seq=64, **QUIET), ids)
    ws = workers(n - 1)
    with cluster(m, [w.address for w in ws], sync="f32", weights=weights) as r:
        shares = [(x.n_kv_heads, x.hidden) for x in r.plan.nodes]
        got = logits_per_position(r, ids)
    print(
        f"{n} nodes weights {weights}: shares (kv heads, ffn rows) {shares}, max diff {np.abs(got - ref).max():.2e}"
    )
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    if weights:
        assert shares[weights.index(max(weights))][1] > shares[weights.index(min(weights))][1]


def test_synthetic_8kv_q4_q80_close(tiny8, workers):
    m = GGUFModel(tiny8["q4_0"])
    ids = [5, 300, 17, 256, 99, 1000, 42, 7]
    ref = logits_per_position(Root(m, nthreads=1, max_seq=64, **QUIET), ids)
    ws = workers(3)
    with cluster(m, [w.address for w in ws]) as r:
        got = logits_per_position(r, ids)
    corr = min(np.corrcoef(got[i], ref[i])[0, 1] for i in range(len(got)))
    print(f"4 nodes, q4_0 weights + q80 sync: max |diff| {np.abs(got - ref).max():.3f}, min corr {corr:.5f}")
    assert corr > 0.99


@pytest.mark.parametrize("n,buffer_type", [(2, "f32"), (3, "f32"), (2, "q80"), (3, "q80")])
def test_default_model_argmax_agrees_where_clear(default_model, workers, n, buffer_type):
    m = GGUFModel(default_model)
    tok = Tokenizer.from_gguf(default_model, reader=m.reader)
    single = Session(Root(m, nthreads=1, max_seq=128, **QUIET))
    path = [*tok.encode("Once upon a time"), *single.generate(tok.encode("Once upon a time"), Sampler(0), 40)]
    ref = logits_per_position(single.root, path)
    ws = workers(n - 1)
    with cluster(m, [w.address for w in ws], sync=buffer_type) as r:
        got = logits_per_position(r, path)
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1.5
    same = got.argmax(axis=1) == ref.argmax(axis=1)
    print(f"{n} nodes {buffer_type}: max |logit diff| {np.abs(got - ref).max():.3f}; argmax equal at "
          f"{same.sum()}/{len(same)} positions, at all {clear.sum()} clear ones: {same[clear].all()}")  # fmt: skip
    assert clear.sum() >= len(path) // 3
    assert same[clear].all()
    assert same.mean() >= 0.8


PROMPTS = [
    "The three primary colors are",
    "Water boils at",
    "Once upon a time",
    "def fibonacci(n):",
    "The capital of France is",
    "My favourite food is",
]
NOISE = {"f32": 1.5, "q80": 3.0}  # measured max |logit diff| vs the single node: ~1.2 (f32), ~2.4 (q80)


def greedy_with_margins(root: Root, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    logits = root.forward(ids, 0)
    out, margins = [], []
    for i in range(n):
        top2 = np.sort(logits)[-2:]
        out.append(int(logits.argmax()))
        margins.append(float(top2[1] - top2[0]))
        logits = root.forward([out[-1]], len(ids) + i)
    return out, margins


@pytest.mark.parametrize("n,buffer_type", [(2, "f32"), (3, "f32"), (2, "q80"), (3, "q80")])
def test_default_model_greedy_agrees_with_single_node(default_model, workers, n, buffer_type):
    """Greedy output equals the single node's until the single node itself faces a near-tie (top-2 margin
    within the activation-quantization noise); the raw agreement lengths are printed for the report."""
    m = GGUFModel(default_model)
    tok = Tokenizer.from_gguf(default_model, reader=m.reader)
    single = Root(m, nthreads=1, max_seq=128, **QUIET)
    ws = workers(n - 1)
    agree_all, unexplained = [], []
    with cluster(m, [w.address for w in ws], sync=buffer_type) as r:
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            ref, margins = greedy_with_margins(single, ids, 40)
            got, _ = greedy_with_margins(r, ids, 40)
            agree = next((i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), 40)
            agree_all.append(agree)
            if agree < 40 and margins[agree] > NOISE[buffer_type]:
                unexplained.append((prompt, agree, margins[agree]))
    print(
        f"{n} nodes {buffer_type}: greedy agreement with 1 node over {len(PROMPTS)} prompts: {agree_all} tokens"
    )
    assert not unexplained, f"diverged where the single node had a clear winner: {unexplained}"
    assert max(agree_all) >= (32 if buffer_type == "f32" else 16)


# per generated token at 3 nodes, computed by hand (see tests/test_traffic.py for the arithmetic):
# root sends 2 * (636 + 60 * (12 + S)), receives 2 * (60 * (12 + S) + 16), S = 612 (q80) or 2304 (f32)
PRODUCT_COUNTED = {"q80": (76152, 74912), "f32": (279192, 277952)}


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
    r = Root(m, nthreads=1, max_seq=64, workers=[w.address], secret="test-secret", log=logs.append)
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
