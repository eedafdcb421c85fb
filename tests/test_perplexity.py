"""`dllama perplexity` against an independent reference: Hugging Face transformers on the same weights (the
default model converted to F32), with llama.cpp's chunking rule written out again here: the text tokenized once,
cut into chunks of N tokens (the tail dropped), each chunk's first token replaced by BOS when the vocabulary adds
one, and only the tokens after the first N/2 + 1 of each chunk scored.

The text (tests/data/river_town.txt) is plain English written for these tests (~1,700 words, ~1,800 tokens)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoModelForCausalLM  # noqa: E402

from dllama.errors import DllamaError  # noqa: E402
from dllama.runtime.perplexity import evaluate, make_plan, perplexity  # noqa: E402
from dllama.service import Runtime, RuntimeConfig  # noqa: E402

TEXT = Path(__file__).parent / "data" / "river_town.txt"
CTX = 128
CHUNKS = 4  # 4 x 63 = 252 scored tokens: enough to compare, quick on 2 shared cores


def reference_ppl(
    model, tokens: list[int], n_ctx: int, n_chunks: int, bos: int | None
) -> tuple[float, float]:
    """llama.cpp's perplexity (and its +/-) from transformers' logits, one forward pass per chunk."""
    nll = []
    for c in range(n_chunks):
        ids = list(tokens[c * n_ctx : (c + 1) * n_ctx])
        if bos is not None:
            ids[0] = bos
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1).numpy()
        nll += [-logp[j, ids[j + 1]] for j in range(n_ctx // 2, n_ctx - 1)]
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    return ppl, ppl * nll.std() / math.sqrt(len(nll) - 1)


@pytest.fixture(scope="module")
def hf(default_f32):
    d, n = os.path.split(default_f32)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=n, dtype=torch.float32).eval()


def ours(model: str, *, bos_override: bool = False, chunks: int = CHUNKS, **cfg):
    """(perplexity estimate, text tokens, bos used) from a real Runtime (local workers when asked)."""
    with Runtime(RuntimeConfig(model=model, nthreads=2, max_seq=CTX, kv_type="f32", **cfg)) as rt:
        tok = rt.tokenizer
        tokens = tok.encode(TEXT.read_text(encoding="utf-8"))
        bos = tok.bos_id if (tok.add_bos or bos_override) else None
        plan = make_plan(tokens, CTX, bos, chunks)
        return perplexity(rt.root.run, plan, batch=32), tokens, bos


@pytest.fixture(scope="module")
def q41_one_node(default_model):
    return ours(default_model, sync="f32")


@pytest.fixture(scope="module")
def f32_one_node(default_f32):
    return ours(default_f32, sync="f32")


def test_text_is_long_enough():
    assert len(TEXT.read_text(encoding="utf-8").split()) >= 1500


def test_f32_matches_transformers(hf, f32_one_node):
    est, tokens, bos = f32_one_node
    assert (
        bos is None
    )  # SmolLM2's GGUF says add_bos_token = false: llama.cpp neither adds nor substitutes BOS
    ref, ref_err = reference_ppl(hf, tokens, CTX, CHUNKS, None)
    assert est.count == CHUNKS * (CTX - CTX // 2 - 1)
    assert est.ppl == pytest.approx(ref, rel=1e-3), (est.ppl, ref)
    assert est.err == pytest.approx(ref_err, rel=1e-2), (est.err, ref_err)


def test_bos_substitution_matches_transformers(hf, default_f32):
    """The BOS rule of vocabularies that add one (Llama, Mistral ...), exercised on the default model's weights."""
    est, tokens, bos = ours(default_f32, bos_override=True, chunks=3)
    assert bos is not None
    ref, _ = reference_ppl(hf, tokens, CTX, 3, bos)
    without, _ = reference_ppl(hf, tokens, CTX, 3, None)
    assert est.ppl == pytest.approx(ref, rel=1e-3), (est.ppl, ref)
    assert abs(ref - without) > 2e-3 * ref  # the substitution changes the value: the check above has teeth


def test_q41_within_one_percent_of_transformers(hf, q41_one_node):
    est, tokens, _ = q41_one_node
    ref, _ = reference_ppl(hf, tokens, CTX, CHUNKS, None)
    assert est.ppl == pytest.approx(ref, rel=1e-2), (est.ppl, ref)


def test_two_nodes_give_the_same_value(default_f32, f32_one_node):
    """Float weights and f32 sync: the split changes only the order of float additions."""
    one = f32_one_node[0]
    two, _, _ = ours(default_f32, sync="f32", local_workers=1)
    assert two.count == one.count
    assert two.ppl == pytest.approx(one.ppl, rel=1e-5), (two.ppl, one.ppl)


def test_running_values_and_chunk_count(default_model):
    with Runtime(RuntimeConfig(model=default_model, nthreads=2, max_seq=64)) as rt:
        tokens = rt.tokenizer.encode(TEXT.read_text(encoding="utf-8"))
        plan = make_plan(tokens, 32, None, 3)
        seen = list(evaluate(rt.root.run, plan, batch=8))
    assert len(tokens) // 32 > 3 and plan.n_chunks == 3
    assert [(i, e.count) for i, e in seen] == [(1, 15), (2, 30), (3, 45)]
    assert (
        make_plan(tokens, 32, None).n_chunks == len(tokens) // 32
    )  # the tail that does not fill a chunk is dropped


def test_text_too_short_is_a_clear_error():
    with pytest.raises(DllamaError, match="needs at least 256"):
        make_plan(list(range(255)), 128, None)


def dllama(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dllama", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def test_cli_prints_the_value(q41_one_node):
    # the cache type of the in-process run it must equal (q41_one_node: f32)
    r = dllama("perplexity", "--file", str(TEXT), "--ctx", str(CTX), "--chunks", str(CHUNKS), "--nthreads", "2",
               "--buffer-float-type", "f32", "--kv-cache-type", "f32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"perplexity: (\d+\.\d{4}) \+/- (\d+\.\d{5})\n", r.stdout)
    assert m, r.stdout
    assert "chunk" in r.stderr and "ppl" in r.stderr  # the progress bar with the running value
    est = q41_one_node[0]  # the same chunks in-process
    assert float(m.group(1)) == pytest.approx(est.ppl, abs=1e-4)
    assert float(m.group(2)) == pytest.approx(est.err, abs=1e-5)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--file", "/nonexistent/text.txt"], "file not found"),
        (["--file", str(TEXT), "--ctx", "4096"], "needs at least 8192"),
        (["--file", str(TEXT), "--ctx", "256", "--max-seq-len", "128"], "smaller than --ctx"),
        (["--file", str(TEXT), "--ctx", "0"], "positive integer"),
    ],
)
def test_cli_errors(args, needle):
    r = dllama("perplexity", "--nthreads", "1", *args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and needle in errors[0], r.stderr
