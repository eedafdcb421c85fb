"""Reading the original Distributed Llama's `.m` / `.t` files: converted to GGUF, checked against the weights and
the tokenizer they were written from (tests/original_writer.py writes them as the original's converter would,
without the reader's code), against llama.cpp's tensor names and metadata, and against dllama's own results on
the source GGUF. Bad files must give one clear DllamaError."""

from __future__ import annotations

import os
import struct
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from dllama.errors import DllamaError
from dllama.model.gguf_model import GGUFModel
from dllama.model.original_format import convert_original, ensure_gguf_from_original, read_header
from dllama.model.original_tokenizer import read_tokenizer
from dllama.runtime.root import Root
from dllama.runtime.session import Session
from dllama.sampling.sampler import Sampler
from dllama.tokenizer import Tokenizer

sys.path.insert(0, os.path.dirname(__file__))
import original_writer as ow  # noqa: E402

# An f32 KV cache: the logits checks below are exact to 1e-4 across a split (float noise ~1e-5); an f16 cache rounds
# K and V to ~5e-4, which turns that noise into ~1e-2 (tests/test_kv_cache.py covers the default cache).
QUIET = {"log": lambda *a: None, "kv_type": "f32"}


def logits_per_position(root: Root, ids: list[int], batch: int = 3) -> np.ndarray:
    out = [root.forward(ids[:batch], 0).copy()]
    out += [root.forward([t], i).copy() for i, t in enumerate(ids[batch:], batch)]
    return np.array(out)


def read_gguf(path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray], dict[str, QT]]:
    r = gguf.GGUFReader(path)
    floats, types = {}, {}
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        qt = QT(int(t.tensor_type))
        a = np.asarray(t.data)
        f = a.astype(np.float32) if qt in (QT.F32, QT.F16) else gguf.quants.dequantize(a, qt)
        floats[t.name], types[t.name] = np.asarray(f, np.float32).reshape(shape), qt
    return r, floats, types


def meta(r: gguf.GGUFReader, key: str):
    f = r.fields.get(key)
    return None if f is None else f.contents()


@pytest.fixture(scope="module")
def smol(tmp_path_factory, default_model):
    """The default model as the original's f32 and q40 `.m` files plus its `.t`, and their GGUF conversions."""
    d = tmp_path_factory.mktemp("orig")
    out = {"dir": d, "t": str(d / "smol.t")}
    ow.write_t_from_gguf(default_model, out["t"])
    for wt in ("f32", "q40"):
        m = str(d / f"dllama_model_smol_{wt}.m")
        out["floats"] = ow.write_m_from_gguf(default_model, m, wt, floats=out.get("floats"))
        out[wt + ".m"] = m
        out[wt] = str(d / f"smol-{wt}.gguf")
        convert_original(m, out[wt], tokenizer_path=out["t"])
    return out


def test_header_of_the_default_model(smol):
    h = read_header(smol["f32.m"])
    assert (h.arch, h.weight_type, h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.head_dim) == (
        "llama", QT.F32, 576, 1536, 30, 9, 3, 64)  # fmt: skip
    assert (h.vocab_size, h.max_seq_len, h.rope_theta, h.norm_eps, h.n_experts) == (49152, 8192, 1e5, 1e-5, 0)
    assert h.header_size == 8 + 8 * 15 and read_header(smol["q40.m"]).weight_type == QT.Q4_0


def test_f32_tensors_equal_the_dequantized_source(smol, default_model):
    src = smol["floats"]
    r, got, types = read_gguf(smol["f32"])
    assert meta(r, "general.architecture") == "llama"
    assert set(got) == set(src) | {"output.weight"}  # the .m always holds the head (tied: the embedding)
    for name, a in got.items():
        ref = src["token_embd.weight"] if name == "output.weight" else src[name]
        assert types[name] == QT.F32 and a.shape == ref.shape, name
        assert np.array_equal(a, ref), name
    rs = gguf.GGUFReader(default_model)
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "context_length", "rope.freq_base", "attention.layer_norm_rms_epsilon",
                "rope.dimension_count", "vocab_size"):  # fmt: skip
        assert meta(r, "llama." + key) == meta(rs, "llama." + key), key


def test_f32_logits_equal_the_source_f32_gguf_on_1_and_2_nodes(smol, default_f32, workers):
    ref_model, got_model = GGUFModel(default_f32), GGUFModel(smol["f32"])
    ids = Tokenizer.from_gguf(default_f32).encode("Once upon a time, the city of Nova")
    ref = logits_per_position(Root(ref_model, nthreads=1, max_seq=64, **QUIET), ids)
    one = logits_per_position(Root(got_model, nthreads=1, max_seq=64, **QUIET), ids)
    (w,) = workers(1)
    with Root(got_model, nthreads=1, max_seq=64, workers=[w.address], secret=w.secret, sync="f32",
              **QUIET) as r:  # fmt: skip
        two = logits_per_position(r, ids)
    print(
        f"converted f32: 1 node max diff {np.abs(one - ref).max():.2e}, 2 nodes {np.abs(two - ref).max():.2e}"
    )
    np.testing.assert_allclose(one, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(two, ref, atol=1e-4, rtol=0)


def test_synthetic_8kv_logits_on_1_and_2_nodes(tmp_path, workers):
    from dllama.testing.synthetic import SHAPES, write_synthetic_gguf

    src = write_synthetic_gguf(str(tmp_path / "tiny8.gguf"), **SHAPES["tiny-8kv"], weight_type="f32", seed=5)
    ow.write_m_from_gguf(src, tmp_path / "tiny8.m", "f32")
    ow.write_t_from_gguf(src, tmp_path / "tiny8.t")
    out = str(tmp_path / "tiny8-conv.gguf")
    convert_original(tmp_path / "tiny8.m", out, tokenizer_path=tmp_path / "tiny8.t")
    ids = [5, 300, 17, 256, 99, 1000, 42, 7]
    ref = logits_per_position(Root(GGUFModel(src), nthreads=1, max_seq=64, **QUIET), ids)
    m = GGUFModel(out)
    one = logits_per_position(Root(m, nthreads=1, max_seq=64, **QUIET), ids)
    (w,) = workers(1)
    with Root(
        m, nthreads=1, max_seq=64, workers=[w.address], secret=w.secret, sync="f32", **QUIET
    ) as r:
        two = logits_per_position(r, ids)
    print(f"tiny-8kv: 1 node max diff {np.abs(one - ref).max():.2e}, 2 nodes {np.abs(two - ref).max():.2e}")
    np.testing.assert_allclose(one, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(two, ref, atol=1e-4, rtol=0)


def _q40_reference_gguf(source_gguf: str, floats: dict, path: str) -> str:
    """The same weights the q40 `.m` holds, written straight to GGUF: f32 embedding and norms, Q4_0 matrices
    and a Q4_0 head quantized from the embedding (by the original's quantizer, which differs from gguf's on
    ties: about 0.06% of these blocks)."""
    rs = gguf.GGUFReader(source_gguf)
    w = gguf.GGUFWriter(path, "llama")
    for key, field in rs.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    tensors = dict(floats)
    tensors.setdefault("output.weight", floats["token_embd.weight"])
    for name, a in tensors.items():
        if a.ndim == 2 and name != "token_embd.weight":
            blocks = np.frombuffer(ow.tensor_bytes(a, "q40"), np.uint8).reshape(a.shape[0], -1)
            w.add_tensor(name, blocks, raw_dtype=QT.Q4_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_q40_same_blocks_and_same_greedy_text_as_a_q4_0_gguf(smol, default_model):
    ref_path = _q40_reference_gguf(default_model, smol["floats"], str(smol["dir"] / "ref-q40.gguf"))
    _, _, types = read_gguf(smol["q40"])
    rr, rg = gguf.GGUFReader(ref_path), gguf.GGUFReader(smol["q40"])
    ref_bytes = {t.name: np.asarray(t.data) for t in rr.tensors}
    for t in rg.tensors:  # Q40 blocks copied as they are: byte-identical to GGUF Q4_0
        assert np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8),
                              ref_bytes[t.name].reshape(-1).view(np.uint8)), t.name  # fmt: skip
    assert types["blk.0.attn_q.weight"] == QT.Q4_0 and types["token_embd.weight"] == QT.F32
    texts = []
    for path in (ref_path, smol["q40"]):
        m = GGUFModel(path)
        tok = Tokenizer.from_gguf(path, reader=m.reader)
        s = Session(Root(m, nthreads=1, max_seq=128, **QUIET))
        texts.append(tok.decode(list(s.generate(tok.encode("The capital of France is"), Sampler(0), 24))))
    print("greedy:", repr(texts[1]))
    assert texts[0] == texts[1] and len(texts[1]) > 20


STRINGS = [
    "Hello world",
    "  leading spaces\tand\ttabs\n\n\nnewlines  ",
    "12345 678.9 1,000,000 3.14159",
    "héllo wörld — “quotes” 日本語 한국어 😀🚀",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<repo_name>x<file_sep>y<|endoftext|>",
    "don't I'll we've THEY'RE",
    "def f(x):\n    return x**2  # comment",
    "",
]


def test_tokenizer_ids_template_and_specials_carried(smol, default_model):
    ref = Tokenizer.from_gguf(default_model)
    got = Tokenizer.from_gguf(smol["f32"])
    for s in STRINGS:
        assert got.encode(s) == ref.encode(s), s
        assert got.decode(got.encode(s)) == ref.decode(ref.encode(s)), s
    assert got.chat_template == ref.chat_template and got.chat_template
    assert (got.bos_id, got.eos_id, got.add_bos) == (ref.bos_id, ref.eos_id, ref.add_bos)
    assert got.stop_ids == ref.stop_ids and got.special_ids == ref.special_ids
    msgs = [{"role": "user", "content": "Hi"}]
    assert got.apply_chat_template(msgs) == ref.apply_chat_template(msgs)
    # merges rebuilt from the ranks are the model's own merges, in order; the pre-tokenizer is recognised
    r, rs = gguf.GGUFReader(smol["f32"]), gguf.GGUFReader(default_model)
    for key in ("merges", "pre", "token_type", "tokens"):
        assert meta(r, "tokenizer.ggml." + key) == meta(rs, "tokenizer.ggml." + key), key


def tiny_llama_m(path, vocab_size: int, dim: int = 32) -> str:
    """A one-layer llama `.m` to carry a tokenizer."""
    params = ow.params_for(ow.LLAMA, dim=dim, hidden_dim=dim, n_layers=1, n_heads=1, n_kv_heads=1,
                           vocab_size=vocab_size, max_seq_len=64, weight_type="f32")  # fmt: skip
    sq = np.ones((dim, dim), np.float32)
    L = dict(q=sq, k=sq, v=sq, o=sq, w1=sq, w2=sq, w3=sq, att_norm=sq[0], ffn_norm=sq[0])
    emb = np.ones((vocab_size, dim), np.float32)
    ow.write_m(path, params, [L], emb, sq[0], emb)
    return str(path)


def test_several_eos_ids_become_stop_tokens(tmp_path, default_model):
    ow.write_t_from_gguf(default_model, tmp_path / "two-eos.t", eos_ids=[2, 5])
    t = read_tokenizer(tmp_path / "two-eos.t")
    assert t.eos_ids == [2, 5] and t.bos_id == 1 and t.add_bos is False
    out = str(tmp_path / "two-eos.gguf")
    convert_original(
        tiny_llama_m(tmp_path / "tiny.m", len(t.tokens)), out, tokenizer_path=tmp_path / "two-eos.t"
    )
    r = gguf.GGUFReader(out)
    assert meta(r, "tokenizer.ggml.eos_token_id") == 2 and meta(r, "tokenizer.ggml.eot_token_id") == 5
    assert list(meta(r, "tokenizer.ggml.eos_token_ids")) == [2, 5]
    assert {2, 5} <= Tokenizer.from_gguf(out).stop_ids


def test_sentencepiece_vocabulary(tmp_path):
    pieces = (
        ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581t", "he", "\u2581the", "a"]
    )
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0]
    ow.write_t_sentencepiece(tmp_path / "spm.t", pieces, scores)
    params = ow.params_for(ow.LLAMA, dim=64, hidden_dim=96, n_layers=1, n_heads=2, n_kv_heads=2,
                           vocab_size=len(pieces), max_seq_len=256, weight_type="f32")  # fmt: skip
    g = np.random.default_rng(0)
    L = {k: g.standard_normal(s).astype(np.float32) for k, s in
         dict(q=(64, 64), k=(64, 64), v=(64, 64), o=(64, 64), w1=(96, 64), w2=(64, 96), w3=(96, 64),
              att_norm=(64,), ffn_norm=(64,)).items()}  # fmt: skip
    emb = g.standard_normal((len(pieces), 64)).astype(np.float32)
    ow.write_m(tmp_path / "spm.m", params, [L], emb, np.ones(64, np.float32), emb)
    convert_original(tmp_path / "spm.m", tmp_path / "spm.gguf", tokenizer_path=tmp_path / "spm.t")
    r = gguf.GGUFReader(tmp_path / "spm.gguf")
    assert meta(r, "tokenizer.ggml.model") == "llama"
    assert meta(r, "tokenizer.ggml.tokens") == pieces
    assert np.allclose(meta(r, "tokenizer.ggml.scores"), scores)
    types = meta(r, "tokenizer.ggml.token_type")
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert set(types[3:259]) == {gguf.TokenType.BYTE} and set(types[259:]) == {gguf.TokenType.NORMAL}
    assert (meta(r, "tokenizer.ggml.bos_token_id"), meta(r, "tokenizer.ggml.eos_token_id")) == (1, 2)


def test_sentencepiece_vocabulary_through_the_fast_tokenizer_path(tmp_path):
    """Llama 2 / TinyLlama / Mistral ship LlamaTokenizerFast: the original wrote their pieces through the
    byte-level path (score = -id, `<0xNN>` and '▁' kept as text); they must come back as a llama vocabulary."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581t", "he", "\u2581the"]
    ow.write_t_fast(tmp_path / "fast.t", pieces, 1, [2])
    params = ow.params_for(ow.LLAMA, dim=32, hidden_dim=32, n_layers=1, n_heads=1, n_kv_heads=1,
                           vocab_size=len(pieces), max_seq_len=64, weight_type="f32")  # fmt: skip
    L = {k: np.ones(s, np.float32) for k, s in dict(q=(32, 32), k=(32, 32), v=(32, 32), o=(32, 32), w1=(32, 32),
         w2=(32, 32), w3=(32, 32), att_norm=(32,), ffn_norm=(32,)).items()}  # fmt: skip
    emb = np.ones((len(pieces), 32), np.float32)
    ow.write_m(tmp_path / "fast.m", params, [L], emb, np.ones(32, np.float32), emb)
    convert_original(tmp_path / "fast.m", tmp_path / "fast.gguf", tokenizer_path=tmp_path / "fast.t")
    r = gguf.GGUFReader(tmp_path / "fast.gguf")
    assert meta(r, "tokenizer.ggml.model") == "llama" and meta(r, "tokenizer.ggml.tokens") == pieces
    types = meta(r, "tokenizer.ggml.token_type")
    assert set(types[3:259]) == {gguf.TokenType.BYTE} and types[0] == gguf.TokenType.UNKNOWN


@pytest.mark.parametrize("weight_type", ["f32", "q80"])
@pytest.mark.parametrize("moe", [False, True])
def test_qwen3_and_qwen3_moe_tensors_and_metadata_as_llama_cpp_expects(tmp_path, moe, weight_type):
    params, ref = ow.write_qwen3_m(tmp_path / "q.m", moe=moe, weight_type=weight_type)
    out = str(tmp_path / "q.gguf")
    convert_original(tmp_path / "q.m", out)
    r, got, types = read_gguf(out)
    arch = "qwen3moe" if moe else "qwen3"
    assert meta(r, "general.architecture") == arch
    assert set(got) == set(ref)
    for name, a in ref.items():
        expect = a
        if (
            weight_type == "q80"
            and a.ndim >= 2
            and name != "token_embd.weight"
            and "ffn_gate_inp" not in name
        ):
            blocks = np.frombuffer(ow.tensor_bytes(a, "q80"), np.uint8).reshape(-1, 34)
            expect = gguf.quants.dequantize(blocks, QT.Q8_0).reshape(a.shape)
            assert types[name] == QT.Q8_0, name
        assert got[name].shape == a.shape, name
        assert np.array_equal(got[name], expect), name
    # GGUF dims are innermost first: llama.cpp's ffn_gate_exps is {n_embd, n_ff_exp, n_expert}
    shapes = {t.name: [int(s) for s in t.shape] for t in r.tensors}
    assert shapes["blk.0.attn_q_norm.weight"] == [32] and shapes["blk.0.attn_q.weight"] == [64, 128]
    p = arch + "."
    expect_meta = {"block_count": 2, "embedding_length": 64, "feed_forward_length": 96, "attention.head_count": 4,
                   "attention.head_count_kv": 2, "attention.key_length": 32, "attention.value_length": 32,
                   "rope.freq_base": 1e6, "context_length": 512}  # fmt: skip
    if moe:
        assert shapes["blk.1.ffn_gate_exps.weight"] == [64, 64, 4]
        assert shapes["blk.1.ffn_down_exps.weight"] == [64, 64, 4]
        assert shapes["blk.1.ffn_gate_inp.weight"] == [64, 4]
        expect_meta.update({"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 64})
    for k, v in expect_meta.items():
        assert meta(r, p + k) == v, k
    assert meta(r, p + "attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)


def test_llama31_rope_scaling_becomes_rope_freqs_like_transformers(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    params = ow.params_for(ow.LLAMA, dim=256, hidden_dim=96, n_layers=1, n_heads=2, n_kv_heads=1,
                           vocab_size=40, max_seq_len=131072, weight_type="f32", rope_theta=500000,
                           rope_scaling=scaling)  # fmt: skip
    g = np.random.default_rng(1)
    L = {k: g.standard_normal(s).astype(np.float32) for k, s in
         dict(q=(256, 256), k=(128, 256), v=(128, 256), o=(256, 256), w1=(96, 256), w2=(256, 96),
              w3=(96, 256), att_norm=(256,), ffn_norm=(256,)).items()}  # fmt: skip
    emb = g.standard_normal((40, 256)).astype(np.float32)
    ow.write_m(tmp_path / "l31.m", params, [L], emb, np.ones(256, np.float32), emb)
    assert read_header(tmp_path / "l31.m").rope_type == 2
    convert_original(tmp_path / "l31.m", tmp_path / "l31.gguf")
    _, got, _ = read_gguf(tmp_path / "l31.gguf")
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500000.0, rope_scaling=scaling,
                      max_position_embeddings=131072)  # fmt: skip
    try:
        inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    except TypeError:
        inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, device="cpu")
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2, dtype=np.float64) / 128)
    np.testing.assert_allclose(base / got["rope_freqs.weight"], inv_freq.numpy(), rtol=1e-5)
    assert got["rope_freqs.weight"].min() == 1.0 and got["rope_freqs.weight"].max() == 8.0


def test_ensure_gguf_converts_once_then_reuses(tmp_path, smol, monkeypatch, capsys):
    monkeypatch.setenv("DLLAMA_CACHE_DIR", str(tmp_path / "cache"))
    p1 = ensure_gguf_from_original(smol["q40.m"], smol["t"])
    first = capsys.readouterr().err
    assert p1.startswith(str(tmp_path / "cache" / "converted")) and first.count("\n") == 1
    mtime = os.stat(p1).st_mtime_ns
    assert ensure_gguf_from_original(smol["q40.m"], smol["t"]) == p1 and os.stat(p1).st_mtime_ns == mtime
    assert capsys.readouterr().err == ""
    assert os.listdir(tmp_path / "cache" / "converted") == [os.path.basename(p1)]  # no temporary left
    assert open(p1, "rb").read() == open(smol["q40"], "rb").read()  # the same conversion


# ---------------------------------------------------------------------------------------------------------
# Bad files: one clear error each


def _copy_with(src, dst, data: bytes | None = None, cut: int | None = None, tail: bytes = b"") -> str:
    b = open(src, "rb").read()
    if data is not None:
        b = data + b[len(data) :]
    if cut is not None:
        b = b[:cut]
    open(dst, "wb").write(b + tail)
    return str(dst)


@pytest.fixture(scope="module")
def small_m(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    params, _ = ow.write_qwen3_m(d / "ok.m", moe=False, weight_type="q40")
    ow.write_t_sentencepiece(d / "ok.t", ["<unk>", "<s>", "</s>", "a"], [0.0, 0.0, 0.0, -1.0])
    return d


def test_truncated_model_file(small_m, tmp_path):
    size = os.path.getsize(small_m / "ok.m")
    bad = _copy_with(small_m / "ok.m", tmp_path / "cut.m", cut=size - 1000)
    with pytest.raises(DllamaError, match=r"1000 bytes missing: truncated"):
        convert_original(bad, tmp_path / "x.gguf")
    with pytest.raises(DllamaError, match="truncated"):
        read_header(_copy_with(small_m / "ok.m", tmp_path / "cut2.m", cut=20))
    assert not (tmp_path / "x.gguf").exists()


def test_sizes_do_not_add_up(small_m, tmp_path):
    with pytest.raises(DllamaError, match=r"sizes do not add up.*12 extra bytes"):
        read_header(_copy_with(small_m / "ok.m", tmp_path / "long.m", tail=b"\0" * 12))
    raw = open(small_m / "ok.m", "rb").read()
    hs = struct.unpack_from("<i", raw, 4)[0]
    pairs = list(struct.unpack_from(f"<{(hs - 8) // 4}i", raw, 8))
    pairs[pairs[0::2].index(4) * 2 + 1] += 1  # one more layer than the file holds
    bad = _copy_with(
        small_m / "ok.m", tmp_path / "layers.m", data=raw[:8] + struct.pack(f"<{len(pairs)}i", *pairs)
    )
    with pytest.raises(DllamaError, match="sizes do not add up"):
        read_header(bad)


def test_old_and_unknown_magic(small_m, tmp_path):
    for magic in (0xABCD00, 0xABCD01):
        bad = _copy_with(small_m / "ok.m", tmp_path / "old.m", data=struct.pack("<i", magic))
        with pytest.raises(DllamaError, match="old Distributed Llama model format.*reconvert"):
            read_header(bad)
    with pytest.raises(DllamaError, match="unknown magic"):
        read_header(_copy_with(small_m / "ok.m", tmp_path / "junk.m", data=b"JUNK"))


def test_tokenizer_wrong_magic_and_truncated(small_m, tmp_path):
    bad = _copy_with(small_m / "ok.t", tmp_path / "bad.t", data=struct.pack("<i", 0x123456))
    with pytest.raises(DllamaError, match=r"not a Distributed Llama tokenizer \(magic 0x123456"):
        convert_original(small_m / "ok.m", tmp_path / "x.gguf", tokenizer_path=bad)
    size = os.path.getsize(small_m / "ok.t")
    with pytest.raises(DllamaError, match="truncated while reading token 3"):
        read_tokenizer(_copy_with(small_m / "ok.t", tmp_path / "cut.t", cut=size - 1))
    with pytest.raises(DllamaError, match="old tokenizer format"):
        read_tokenizer(_copy_with(small_m / "ok.t", tmp_path / "old.t", data=struct.pack("<i", 0x567123)))
    assert read_tokenizer(small_m / "ok.t").tokens == [b"<unk>", b"<s>", b"</s>", b"a"]


def test_target_type_requantizes_matrices(tmp_path):
    _, ref = ow.write_qwen3_m(tmp_path / "q.m", moe=True, weight_type="f32")
    convert_original(tmp_path / "q.m", tmp_path / "q80.gguf", target="q80")
    r, got, types = read_gguf(tmp_path / "q80.gguf")
    for name, a in ref.items():
        if a.ndim == 1:
            assert types[name] == QT.F32 and np.array_equal(got[name], a), name
        else:
            expect = gguf.quants.dequantize(gguf.quants.quantize(a, QT.Q8_0), QT.Q8_0).reshape(a.shape)
            assert types[name] == QT.Q8_0 and np.array_equal(got[name], expect), name
    assert meta(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    with pytest.raises(DllamaError, match="unknown --type"):
        convert_original(tmp_path / "q.m", tmp_path / "x.gguf", target="q5")


def test_llama_with_half_split_rope_is_permuted_to_interleaved(tmp_path):
    """rope type 1 ("falcon") on a llama file means q/k rows are in Hugging Face order: GGUF llama wants them
    permuted the way the original's convert-hf.py (and llama.cpp's converter) permute()."""

    def permute(w, n_heads):  # convert-hf.py's permute, in NumPy
        return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    params = ow.params_for(ow.LLAMA, dim=64, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=8,
                           max_seq_len=64, weight_type="f32")  # fmt: skip
    params["rope_type"] = 1
    g = np.random.default_rng(2)
    L = {k: g.standard_normal(s).astype(np.float32) for k, s in dict(q=(64, 64), k=(32, 64), v=(32, 64),
         o=(64, 64), w1=(64, 64), w2=(64, 64), w3=(64, 64), att_norm=(64,), ffn_norm=(64,)).items()}  # fmt: skip
    emb = g.standard_normal((8, 64)).astype(np.float32)
    ow.write_m(tmp_path / "f.m", params, [L], emb, np.ones(64, np.float32), emb)
    convert_original(tmp_path / "f.m", tmp_path / "f.gguf")
    _, got, _ = read_gguf(tmp_path / "f.gguf")
    assert np.array_equal(got["blk.0.attn_q.weight"], permute(L["q"], 4))
    assert np.array_equal(got["blk.0.attn_k.weight"], permute(L["k"], 2))
    assert np.array_equal(got["blk.0.attn_v.weight"], L["v"])
