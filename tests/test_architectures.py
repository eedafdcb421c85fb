"""Every architecture the engine runs (Llama, Mixtral-style MoE, Qwen2, Qwen3, Qwen3-MoE), on random-weight models
written from the architecture descriptions: single node against the NumPy reference model (which reads the GGUF
with gguf-py alone and shares no code with the engine), then split across 2, 3 and 4 nodes (uneven weights too)
with f32 sync, which must give the single node's logits. Hugging Face transformers as the reference on the same
architectures is in tests/test_hf_convert.py."""

import numpy as np
import pytest

from dllama.model.gguf_model import GGUFModel
from dllama.runtime.root import Root
from dllama.testing import reference as ref
from dllama.testing.synthetic import write_synthetic_gguf

QUIET = {"log": lambda *a: None}
BASE = dict(dim=128, hidden_dim=256, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=32, vocab_size=512)
ARCHS = {
    "llama": dict(arch="llama"),
    "mixtral": dict(arch="llama", n_experts=4, n_active_experts=2),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "qwen3moe": dict(arch="qwen3moe", n_experts=6, n_active_experts=2, expert_hidden_dim=64),
}
IDS = [5, 300, 17, 256, 99, 100, 42, 7]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("archs")
    return {(name, wt): write_synthetic_gguf(str(d / f"{name}-{wt}.gguf"), **BASE, **kw, weight_type=wt, seed=1)
            for name, kw in ARCHS.items() for wt in ("f32", "q8_0")}  # fmt: skip


def per_position(root: Root, ids: list[int], batch: int = 3) -> np.ndarray:
    """A prompt batch (matrix x matrix), then one token at a time over the KV cache."""
    return np.array([root.forward(ids[:batch], 0).copy()] + [root.forward([t], i).copy() for i, t in enumerate(ids[batch:], batch)])


@pytest.mark.parametrize("name", ARCHS)
def test_single_node_matches_numpy_reference(models, name):
    path = models[(name, "f32")]
    m = GGUFModel(path)
    assert m.config.arch == ARCHS[name]["arch"] and m.config.n_experts == ARCHS[name].get("n_experts", 0)
    expect = ref.forward(path, IDS)[2:]
    got = per_position(Root(m, nthreads=2, max_seq=32, kv_type="f32", **QUIET), IDS)
    print(f"{name}: max |logit diff| vs NumPy reference {np.abs(got - expect).max():.2e}")
    np.testing.assert_allclose(got, expect, atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_quantized_weights_correlate_with_reference(models, name):
    expect = ref.forward(models[(name, "q8_0")], IDS)[2:]  # the same Q8_0 weights, float activations
    got = per_position(Root(GGUFModel(models[(name, "q8_0")]), nthreads=2, max_seq=32, kv_type="f32", **QUIET), IDS)
    corr = min(np.corrcoef(got[i], expect[i])[0, 1] for i in range(len(got)))
    print(f"{name} q8_0: min correlation {corr:.5f}")
    assert corr > 0.99


@pytest.mark.parametrize("name,n,weights", [(n, 2, None) for n in ARCHS] + [(n, 3, [1, 2, 1]) for n in ARCHS]
                         + [("qwen3moe", 4, None), ("mixtral", 4, [3, 1, 1, 2])])  # fmt: skip
def test_split_across_nodes_gives_the_single_node_logits(models, workers, name, n, weights):
    m = GGUFModel(models[(name, "f32")])
    expect = per_position(Root(m, nthreads=1, max_seq=32, **QUIET), IDS)
    ws = workers(n - 1)
    with Root(m, nthreads=1, max_seq=32, workers=[w.address for w in ws], secret="test-secret", sync="f32",
              split_weights=weights, **QUIET) as r:  # fmt: skip
        shares = [(s.n_kv_heads, s.hidden) for s in r.plan.nodes]
        got = per_position(r, IDS)
    print(f"{name} on {n} nodes {weights}: shares {shares}, max diff {np.abs(got - expect).max():.2e}")
    np.testing.assert_allclose(got, expect, atol=1e-4, rtol=1e-4)
