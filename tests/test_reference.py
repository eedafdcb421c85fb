"""The forward pass against an independent reference: Hugging Face transformers loading the same GGUF
(dequantized to float32), on the real default model.

- An F32 copy of the model (float activations, no quantization anywhere) must match transformers to ~1e-4.
- The original Q4_1 file quantizes activations to Q8_0 before each matmul (as the original system and
  llama.cpp do); its logits differ from the float reference by up to ~2 (the top-2 gap moves by < 0.6), so
  greedy paths can part at near-ties. Bounds from that measurement (NEAR_TIE and below): correlation and |diff|,
  greedy agreement that may only end at a near-tie, and, teacher-forced along the reference's greedy path, the
  same argmax wherever the reference's top-2 gap is above the noise.
"""

import os

import numpy as np
import pytest
import torch  # noqa: E402  (installed by .ci/run: the reference must run, never skip)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoModelForCausalLM  # noqa: E402

from dllama.kv_cache import DEFAULT_KV_TYPE  # noqa: E402
from dllama.model.convert import convert  # noqa: E402
from dllama.model.default import default_model_path  # noqa: E402
from dllama.model.gguf_model import GGUFModel  # noqa: E402
from dllama.runtime.root import Root  # noqa: E402
from dllama.runtime.session import Session  # noqa: E402
from dllama.sampling.sampler import Sampler  # noqa: E402
from dllama.tokenizer import Tokenizer  # noqa: E402

GREEDY_PROMPTS = [
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "The capital of France is",
    "My favourite food is",
]
# Noise of the Q4_1 model (Q8_0 activations) vs transformers, measured by `scripts/measure_noise.py --vs
# transformers`, teacher-forced along dllama's greedy path of 6 prompts x 40 tokens (249 positions):
#   shift of the top-2 gap: q0.999 0.552, max 0.571; max |logit diff| per position: median 0.699, max 2.11;
#   correlation per position: min 0.99655.
# Allowances: the gap and the correlation deficit x 1.5, max |diff| x 1.25, the median x 1.5.
NEAR_TIE = 0.86  # 1.5 x 0.571: a smaller top-2 gap may flip; a larger one flipping is an unexplained divergence
MAX_DIFF, MEDIAN_DIFF, MIN_CORR = 2.64, 1.05, 0.9948


@pytest.fixture(scope="module")
def hf():
    d, n = os.path.split(default_model_path())
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=n, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours():
    # f32 cache: the bounds above were measured with it (an f16 cache adds up to ~1 logit of its own noise on this
    # model: tests/test_kv_cache.py); greedy agreement is also checked with the default cache, below
    m = GGUFModel(default_model_path())
    tok = Tokenizer.from_gguf(default_model_path(), reader=m.reader)
    return Session(Root(m, nthreads=2, max_seq=256, kv_type="f32")), tok


@pytest.fixture(scope="module")
def ours_default_cache(ours):
    m, tok = ours[0].root.model, ours[1]
    return Session(Root(m, nthreads=2, max_seq=256, kv_type=DEFAULT_KV_TYPE)), tok


_hf_greedy: dict = {}


def hf_greedy(hf, ids: list[int]):
    """transformers' 40-token greedy continuation and its logits per step (computed once per prompt)."""
    key = tuple(ids)
    if key not in _hf_greedy:
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)  # fmt: skip
        _hf_greedy[key] = out.sequences[0, len(ids) :].tolist(), [s[0].numpy() for s in out.scores]
    return _hf_greedy[key]


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def our_logits(root, ids):
    """Logits at every position, one decode step at a time (exercises the KV cache)."""
    return np.array([root.forward([t], i).copy() for i, t in enumerate(ids)])


def test_f32_copy_matches_transformers_exactly(hf, tmp_path):
    path = str(tmp_path / "smol-f32.gguf")
    convert(default_model_path(), path, "f32")
    m = GGUFModel(path)
    ids = Tokenizer.from_gguf(path, reader=m.reader).encode("The capital of France is")
    ref = hf_logits(hf, ids)
    # prompt as one batch (matrix x matrix path) and then token by token (decode path)
    root = Root(m, nthreads=2, max_seq=64, kv_type="f32")
    batch = root.forward(ids, 0).copy()
    steps = our_logits(root, ids)
    np.testing.assert_allclose(steps, ref, atol=2e-3, rtol=0)
    np.testing.assert_allclose(batch, ref[-1], atol=2e-3, rtol=0)


def test_q41_logits_close_to_transformers(hf, ours):
    session, tok = ours
    for prompt in ["The capital of France is", "def fibonacci(n):"]:
        ids = tok.encode(prompt)
        ref, got = hf_logits(hf, ids), our_logits(session.root, ids)
        diff = np.abs(got - ref).max(axis=1)
        corr = min(np.corrcoef(got[i], ref[i])[0, 1] for i in range(len(ids)))
        print(f"{prompt!r}: max |logit diff| {diff.max():.3f} (median {np.median(diff):.3f}), min corr {corr:.5f}")
        assert corr >= MIN_CORR, f"unexplained divergence: correlation {corr:.5f}"
        assert diff.max() <= MAX_DIFF, f"unexplained divergence: max |logit diff| {diff.max():.3f}"
        assert np.median(diff) <= MEDIAN_DIFF, f"unexplained divergence: median |diff| {np.median(diff):.3f}"
        assert (got.argmax(axis=1) == ref.argmax(axis=1)).mean() >= 0.8


@pytest.mark.parametrize("cache", ["f32", "default"])
def test_greedy_agrees_with_transformers(hf, request, cache):
    """Greedy decoding agrees with transformers except where transformers itself faces a near-tie (top-2 margin
    within the Q8_0 activation noise), with an f32 and with the default (f16) KV cache; the agreement length of
    every prompt is printed for the report."""
    session, tok = request.getfixturevalue("ours" if cache == "f32" else "ours_default_cache")
    lengths, unexplained = [], []
    for prompt in GREEDY_PROMPTS:
        ids = tok.encode(prompt)
        ref, ref_scores = hf_greedy(hf, ids)
        session.reset()
        got = list(session.generate(ids, Sampler(0), 40, stop_ids=tok.stop_ids))
        agree = next(
            (i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got))
        )
        lengths.append(agree)
        if agree < min(len(ref), len(got)):
            scores = ref_scores[agree]  # transformers' logits at the step where the two part
            gap = float(scores[ref[agree]] - scores[got[agree]])
            if gap > NEAR_TIE:
                unexplained.append((prompt, agree, round(gap, 3)))
        print(f"{cache} cache, {prompt!r}: greedy agrees with transformers for {agree} of 40 tokens: {tok.decode(got)!r}")
    assert not unexplained, f"unexplained divergence (transformers' gap above the noise {NEAR_TIE}): {unexplained}"
    assert sum(n >= 16 for n in lengths) >= len(lengths) // 2, lengths


@pytest.mark.parametrize("prompt", ["The capital of France is", "In machine learning, a neural network"])
def test_teacher_forced_argmax_agrees_where_reference_is_clear(hf, ours, prompt):
    session, tok = ours
    ids = tok.encode(prompt)
    with torch.no_grad():
        path = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0].tolist()
    ref = hf_logits(hf, path[:-1])
    got = our_logits(session.root, path[:-1])
    top2 = np.sort(ref, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    clear = gap > NEAR_TIE
    assert clear.sum() >= len(path) // 2
    bad = [(i, round(float(gap[i]), 3)) for i in np.flatnonzero(clear & (got.argmax(axis=1) != ref.argmax(axis=1)))]
    assert not bad, f"unexplained divergence: another argmax where transformers' gap was clear: {bad}"
