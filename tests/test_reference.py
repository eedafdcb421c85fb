"""The forward pass against an independent reference: Hugging Face transformers loading the same GGUF
(dequantized to float32), on the real default model.

- An F32 copy of the model (float activations, no quantization anywhere) must match transformers to ~1e-4.
- The original Q4_1 file quantizes activations to Q8_0 before each matmul (as the original system and
  llama.cpp do); its logits differ from the float reference by up to ~1.5, so greedy paths can part at
  near-ties. We check high correlation, >= 16 agreeing greedy tokens on fixed prompts, and, teacher-forced
  along the reference's greedy path, the same argmax wherever the reference's top-2 margin is clear.
"""

import os

import numpy as np
import pytest
import torch  # noqa: E402  (installed by .ci/run: the reference must run, never skip)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoModelForCausalLM  # noqa: E402

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
NEAR_TIE = 1.5  # measured max |logit diff| vs transformers ~1.1-1.3: a smaller top-2 gap may flip
CLEAR_MARGIN = (
    0.5  # logit gap above which Q8_0 activation noise (measured max |diff| ~1.5, typical << 0.5) can't flip
)


@pytest.fixture(scope="module")
def hf():
    d, n = os.path.split(default_model_path())
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=n, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours():
    m = GGUFModel(default_model_path())
    tok = Tokenizer.from_gguf(default_model_path(), reader=m.reader)
    return Session(Root(m, nthreads=2, max_seq=256)), tok


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
    root = Root(m, nthreads=2, max_seq=64)
    batch = root.forward(ids, 0).copy()
    steps = our_logits(root, ids)
    np.testing.assert_allclose(steps, ref, atol=2e-3, rtol=0)
    np.testing.assert_allclose(batch, ref[-1], atol=2e-3, rtol=0)


def test_q41_logits_close_to_transformers(hf, ours):
    session, tok = ours
    for prompt in ["The capital of France is", "def fibonacci(n):"]:
        ids = tok.encode(prompt)
        ref, got = hf_logits(hf, ids), our_logits(session.root, ids)
        diff = np.abs(got - ref).max()
        corr = min(np.corrcoef(got[i], ref[i])[0, 1] for i in range(len(ids)))
        print(f"{prompt!r}: max |logit diff| {diff:.3f}, min correlation {corr:.5f}")
        assert corr > 0.995
        assert diff < 3.0
        assert (got.argmax(axis=1) == ref.argmax(axis=1)).mean() >= 0.8


def test_greedy_agrees_with_transformers(hf, ours):
    """Greedy decoding agrees with transformers except where transformers itself faces a near-tie (top-2 margin
    within the Q8_0 activation noise); the agreement length of every prompt is printed for the report."""
    session, tok = ours
    lengths, unexplained = [], []
    for prompt in GREEDY_PROMPTS:
        ids = tok.encode(prompt)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)  # fmt: skip
        ref = out.sequences[0, len(ids) :].tolist()
        session.reset()
        got = list(session.generate(ids, Sampler(0), 40, stop_ids=tok.stop_ids))
        agree = next(
            (i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got))
        )
        lengths.append(agree)
        if agree < min(len(ref), len(got)):
            top2 = np.sort(out.scores[agree][0].numpy())[-2:]
            if top2[1] - top2[0] > NEAR_TIE:
                unexplained.append((prompt, agree, float(top2[1] - top2[0])))
        print(f"{prompt!r}: greedy agrees with transformers for {agree} of 40 tokens: {tok.decode(got)!r}")
    assert not unexplained, f"diverged where transformers had a clear winner: {unexplained}"
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
    clear = (top2[:, 1] - top2[:, 0]) > CLEAR_MARGIN
    assert clear.sum() >= len(path) // 2
    assert np.array_equal(got.argmax(axis=1)[clear], ref.argmax(axis=1)[clear])
