"""The sampler against the distribution it promises, with statistics (fixed seeds: the tests are deterministic).

- temperature 0 is the argmax;
- different seeds give different streams, the same seed the same stream;
- the empirical distribution of 20,000 draws matches softmax(logits / T) (chi-square, p > 1e-4);
- top-p never picks outside the nucleus (the fewest most-likely tokens whose mass reaches p) and matches the
  renormalized nucleus distribution;
- distributed exact sampling: a 3-node cluster (F32 weights, f32 sync: logits equal to ~1e-5) samples the same
  tokens as the single node for the same seed.
The expected distributions are computed here with NumPy from the logits, not by the sampler."""

import numpy as np
import pytest
from scipy.stats import chisquare

from dllama.model.gguf_model import GGUFModel
from dllama.runtime.root import Root
from dllama.runtime.session import Session
from dllama.sampling.sampler import Sampler

DRAWS = 20_000
P_MIN = 1e-4  # a correct sampler fails one test in 10,000 seeds; a wrong distribution gives p ~ 0
LOGITS = np.array([2.0, 1.5, 1.2, 0.9, 0.5, 0.3, 0.0, -0.4, -0.8, -1.5, -2.0, -3.0], dtype=np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of most likely tokens whose total probability reaches top_p."""
    order = np.argsort(-p, kind="stable")
    k = 1
    while p[order[:k]].sum() < top_p:
        k += 1
    return order[:k]


def chi2_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit; bins expecting fewer than 5 draws are pooled (the test's validity condition)."""
    exp = probs * counts.sum()
    small = exp < 5
    obs_b, exp_b = list(counts[~small]), list(exp[~small])
    if small.any():
        obs_b.append(counts[small].sum())
        exp_b.append(exp[small].sum())
    return float(chisquare(obs_b, exp_b).pvalue)


def draw(sampler: Sampler, logits: np.ndarray, n: int = DRAWS) -> np.ndarray:
    return np.bincount([sampler(logits) for _ in range(n)], minlength=len(logits))


def test_temperature_zero_is_argmax():
    rng = np.random.default_rng(0)
    for _ in range(200):
        z = rng.normal(size=1000).astype(np.float32)
        assert Sampler(0.0, 0.9, seed=1)(z) == int(np.argmax(z))


def test_seeds_reproduce_and_differ():
    z = np.zeros(1000, dtype=np.float32)  # uniform: a stream of 50 draws practically never repeats by chance
    def stream(seed: int) -> list[int]:
        s = Sampler(1.0, 1.0, seed=seed)
        return [s(z) for _ in range(50)]

    streams = {seed: stream(seed) for seed in range(5)}
    again = stream(3)
    assert again == streams[3]
    assert len({tuple(s) for s in streams.values()}) == 5, "different seeds gave the same stream"
    assert len(set(streams[0])) > 30, "a uniform distribution sampled 50 times gave few distinct tokens"


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_distribution_matches_softmax_over_temperature(temperature):
    counts = draw(Sampler(temperature, 1.0, seed=1234), LOGITS)
    want = softmax(LOGITS / temperature)
    p = chi2_p(counts, want)
    print(f"T={temperature}: chi-square p = {p:.3g}; observed {counts[:4] / DRAWS} expected {want[:4]}")
    assert p > P_MIN, f"T={temperature}: draws do not follow softmax(logits / T) (p = {p:.2e})"


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.5), (0.8, 0.9), (1.3, 0.75)])
def test_top_p_stays_in_the_nucleus_and_matches_it(temperature, top_p):
    counts = draw(Sampler(temperature, top_p, seed=99), LOGITS)
    p = softmax(LOGITS / temperature)
    keep = nucleus(p, top_p)
    outside = np.setdiff1d(np.arange(len(LOGITS)), keep)
    assert counts[outside].sum() == 0, f"picked tokens outside the nucleus {sorted(keep.tolist())}"
    q = p[keep] / p[keep].sum()
    pv = chi2_p(counts[keep], q) if len(keep) > 1 else 1.0
    print(f"T={temperature} top_p={top_p}: nucleus {sorted(keep.tolist())}, chi-square p = {pv:.3g}")
    assert len(keep) > 1, "pick a case with a nucleus of several tokens"
    assert pv > P_MIN, f"draws inside the nucleus do not follow the renormalized distribution (p = {pv:.2e})"


def test_top_p_on_a_full_vocabulary():
    """A real-sized vocabulary, with a nucleus larger than the sampler's 256-candidate shortcut and a small one."""
    rng = np.random.default_rng(7)
    for scale, top_p in [(0.3, 0.9), (4.0, 0.9)]:  # flat logits: thousands of tokens in the nucleus; peaked: few
        z = (rng.normal(size=49152) * scale).astype(np.float32)
        p = softmax(z)
        keep = set(nucleus(p, top_p).tolist())
        s = Sampler(1.0, top_p, seed=5)
        picks = [s(z) for _ in range(2000)]
        assert set(picks) <= keep, f"scale {scale}: {len(set(picks) - keep)} picks outside the nucleus"
        if len(keep) > 256:
            assert len(set(picks)) > 256, "a nucleus of thousands of tokens was sampled from only a few"


@pytest.mark.parametrize("n", [2, 3])
def test_distributed_sampling_matches_single_node(default_f32, workers, n):
    m = GGUFModel(default_f32)
    prompt = [1, 504, 3458, 1533, 253, 1127]
    # an f32 cache: a split adds ~3e-5 of float noise to the logits (the partial sums add up in another order), which
    # sampling with a seed survives; an f16 cache rounds K and V (~5e-4 relative) and turns that noise into ~1e-2,
    # enough to move a draw (tests/test_kv_cache.py covers the default cache)
    quiet = {"log": lambda *a: None, "kv_type": "f32"}
    single = Session(Root(m, nthreads=1, max_seq=128, **quiet))
    results = {}
    ws = workers(n - 1)
    with Root(m, nthreads=1, max_seq=128, workers=[w.address for w in ws], secret="test-secret", sync="f32",
              **quiet) as r:  # fmt: skip
        dist = Session(r)
        for seed in (11, 12):
            ref = list(single.generate(prompt, Sampler(1.0, 0.95, seed=seed), 24))
            single.reset()
            got = list(dist.generate(prompt, Sampler(1.0, 0.95, seed=seed), 24))
            dist.reset()
            results[seed] = (ref, got)
    print(f"{n} nodes: sampled streams {results}")
    for seed, (ref, got) in results.items():
        assert got == ref, f"seed {seed}: {n} nodes sampled {got}, 1 node {ref}"
    assert results[11][0] != results[12][0], "two seeds sampled the same 24 tokens"
