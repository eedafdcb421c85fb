"""The engine against Hugging Face transformers on the same weights, for every architecture: tiny random models
made with `transformers` (Llama, Mistral, Mixtral, Qwen2, Qwen3, Qwen3-MoE), saved with save_pretrained, converted by
`dllama convert`; the engine's logits on the converted file must match transformers on the ORIGINAL folder (f32:
to 1e-3, as a prompt batch and token by token; q80 / q40: correlation >= 0.99), and a split across nodes must not
change them. Models and tokenizers come from tests/test_hf_convert.py."""

import numpy as np
import pytest
from test_hf_convert import (
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    byte_level_tokenizer,
    hf_logits,
    make_model,
    sentencepiece_bpe_tokenizer,
)

from dllama.model.gguf_model import GGUFModel
from dllama.model.hf_convert import convert_hf
from dllama.runtime.root import Root
from dllama.testing import reference as ref

QUIET = {"log": lambda *a: None}
KINDS = {
    "llama": lambda f: byte_level_tokenizer(f, LLAMA3_SPLIT, bos=True),
    "mistral": sentencepiece_bpe_tokenizer,
    "mixtral": sentencepiece_bpe_tokenizer,
    "qwen2": lambda f: byte_level_tokenizer(f, QWEN2_SPLIT, bos=False),
    "qwen3": lambda f: byte_level_tokenizer(f, QWEN2_SPLIT, bos=False),
    "qwen3moe": lambda f: byte_level_tokenizer(f, QWEN2_SPLIT, bos=False),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf-engine")
    out = {}
    for kind, tok in KINDS.items():
        folder = d / f"{kind}-tiny"
        n = tok(folder)
        make_model(folder, kind, n)
        out[kind] = (folder, n, {t: convert_hf(folder, d / f"{kind}-{t}.gguf", t) and str(d / f"{kind}-{t}.gguf")
                                 for t in ("f32", "q80", "q40")})  # fmt: skip
    return out


def ours(path: str, ids: list[int], **kw) -> np.ndarray:
    """Logits at every position: a prompt batch of 4, then one token at a time over the KV cache."""
    with Root(GGUFModel(path, verbose=False), nthreads=2, max_seq=64, kv_type="f32", **QUIET, **kw) as r:
        return np.array([r.forward(ids[: i + 1], 0).copy() if i < 4 else r.forward([ids[i]], i).copy()
                         for i in range(3, len(ids))])  # fmt: skip


def ids_for(n: int) -> list[int]:
    return [(7 * i + 3) % n for i in range(12)]


@pytest.mark.parametrize("kind", KINDS)
def test_f32_matches_transformers_on_the_original_folder(folders, kind):
    folder, n, files = folders[kind]
    ids = ids_for(n)
    ref = hf_logits(folder, ids)[3:]
    got = ours(files["f32"], ids)
    print(f"{kind}: max |logit diff| vs transformers {np.abs(got - ref).max():.2e}")
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wtype", ["q80", "q40"])
def test_quantized_correlates_with_the_same_weights(folders, kind, wtype):
    """Against the same quantized weights in float (the NumPy reference reads the file with gguf-py alone), so only
    the engine's Q8_0 activations differ; the distance to the float original folder (4-bit weights on a dim-64
    model) is printed, and bounded loosely."""
    folder, n, files = folders[kind]
    ids = ids_for(n)
    same = ref.forward(files[wtype], ids)[3:]
    got = ours(files[wtype], ids)
    corr = min(np.corrcoef(got[i], same[i])[0, 1] for i in range(len(got)))
    hf = hf_logits(folder, ids)[3:]
    corr_hf = min(np.corrcoef(got[i], hf[i])[0, 1] for i in range(len(got)))
    print(f"{kind} {wtype}: min correlation {corr:.5f} with the same weights, {corr_hf:.5f} with the float folder")
    assert corr >= 0.99
    assert corr_hf >= (0.99 if wtype == "q80" else 0.95)


@pytest.mark.parametrize("kind,n_nodes", [("qwen3moe", 2), ("mixtral", 2), ("qwen2", 2)])
def test_split_matches_transformers(folders, workers, kind, n_nodes):
    folder, n, files = folders[kind]
    ids = ids_for(n)
    ref = hf_logits(folder, ids)[3:]
    ws = workers(n_nodes - 1)
    got = ours(files["f32"], ids, workers=[w.address for w in ws], secret="test-secret", sync="f32")
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
