"""The split plan: every tensor is tiled exactly once, any node count up to n_kv_heads, weighted splits."""

import pytest

from dllama.errors import DllamaError
from dllama.model.config import ModelConfig
from dllama.split.plan import SplitPlan


def cfg(**kw) -> ModelConfig:
    base = dict(arch="llama", dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                vocab_size=49152, context_length=2048, rope_base=5e5, norm_eps=1e-5, tied_output=False)  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def cost(c: ModelConfig, n) -> int:
    """Weights a node reads per token in the layers (elements); the root's head runs after them, alone."""
    attn = c.n_layers * n.n_kv_heads * c.dim * c.head_dim * (2 * c.group + 2)
    return attn + c.n_layers * 3 * c.dim * n.hidden


@pytest.mark.parametrize("n", range(1, 9))
def test_plan_tiles_every_dimension(n):
    c = cfg()
    p = SplitPlan.make(c, n)
    assert p.n_nodes == n
    assert [x.kv_heads for x in p.nodes] == [
        (a, b)
        for a, b in zip(
            [0] + [x.kv_heads[1] for x in p.nodes][:-1], [x.kv_heads[1] for x in p.nodes], strict=True
        )
    ]
    assert p.nodes[-1].kv_heads[1] == c.n_kv_heads and p.nodes[-1].ffn[1] == c.hidden_dim
    assert all(x.n_kv_heads >= 1 and x.hidden % 32 == 0 for x in p.nodes)
    assert all(x.heads == (x.kv_heads[0] * c.group, x.kv_heads[1] * c.group) for x in p.nodes)
    assert [x.vocab for x in p.nodes] == [
        (a, b)
        for a, b in zip([0] + [x.vocab[1] for x in p.nodes][:-1], [x.vocab[1] for x in p.nodes], strict=True)
    ]
    assert p.nodes[-1].vocab[1] == c.vocab_size and all(x.vocab[0] % 8 == 0 for x in p.nodes)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 8])
def test_equal_weights_balance_layer_work(n):
    c = cfg()
    p = SplitPlan.make(c, n)
    costs = [cost(c, x) for x in p.nodes]
    assert max(costs) / min(costs) < 1.15, costs


def test_weighted_split_gives_faster_nodes_more():
    c = cfg()
    p = SplitPlan.make(c, 3, [1, 2, 1])
    costs = [cost(c, x) for x in p.nodes]
    assert costs[1] > 1.6 * costs[2]
    assert abs(costs[1] / sum(costs) - 0.5) < 0.08


def test_uneven_kv_heads_for_non_dividing_node_counts():
    c = cfg(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152)
    p = SplitPlan.make(c, 2)
    assert sorted(x.n_kv_heads for x in p.nodes) == [1, 2]
    assert sum(x.hidden for x in p.nodes) == 1536


def test_plan_errors():
    c = cfg(n_kv_heads=2, n_heads=4)
    with pytest.raises(DllamaError, match="at most 2 nodes"):
        SplitPlan.make(c, 3)
    with pytest.raises(DllamaError, match="weights"):
        SplitPlan.make(c, 2, [1, 0])
    with pytest.raises(DllamaError, match="weights"):
        SplitPlan.make(c, 2, [1, 1, 1])
