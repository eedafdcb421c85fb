import hashlib

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from dllama.testing.synthetic import (
    BOS_ID,
    EOS_ID,
    MERGES,
    SHAPES,
    bytes_to_unicode,
    main,
    quantize,
    write_synthetic_gguf,
)


def _read(path):
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def _weights(t) -> np.ndarray:
    """Dequantized tensor in [out, in] (numpy) order."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in t.shape[::-1]))


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize(
    "weight_type,qtype",
    [("q4_0", QT.Q4_0), ("q4_1", QT.Q4_1), ("q8_0", QT.Q8_0), ("f16", QT.F16), ("f32", QT.F32)],
)
def test_tiny_metadata_types_and_shapes(tmp_path, weight_type, qtype):
    s = SHAPES["tiny"]
    path = write_synthetic_gguf(tmp_path / "m.gguf", **s, weight_type=weight_type, name="t")
    assert path == str(tmp_path / "m.gguf") and not (tmp_path / "m.gguf.tmp").exists()
    f, t = _read(path)
    assert f["general.architecture"] == "llama" and f["general.name"] == "t"
    dim, hid, nl, nh, nkv, vocab = (
        s[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")
    )
    hd = dim // nh
    assert f["llama.block_count"] == nl
    assert f["llama.context_length"] == 2048
    assert f["llama.embedding_length"] == dim
    assert f["llama.feed_forward_length"] == hid
    assert f["llama.attention.head_count"] == nh
    assert f["llama.attention.head_count_kv"] == nkv
    assert f["llama.rope.dimension_count"] == hd
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["llama.vocab_size"] == vocab
    assert "llama.attention.key_length" not in f  # head_dim is the default dim / n_heads

    expected = {
        "token_embd.weight": (vocab, dim),
        "output_norm.weight": (dim,),
        "output.weight": (vocab, dim),
    }
    for i in range(nl):
        expected |= {
            f"blk.{i}.attn_norm.weight": (dim,),
            f"blk.{i}.ffn_norm.weight": (dim,),
            f"blk.{i}.attn_q.weight": (nh * hd, dim),
            f"blk.{i}.attn_k.weight": (nkv * hd, dim),
            f"blk.{i}.attn_v.weight": (nkv * hd, dim),
            f"blk.{i}.attn_output.weight": (dim, nh * hd),
            f"blk.{i}.ffn_gate.weight": (hid, dim),
            f"blk.{i}.ffn_up.weight": (hid, dim),
            f"blk.{i}.ffn_down.weight": (dim, hid),
        }
    assert set(t) == set(expected)
    for name, shape in expected.items():
        assert tuple(int(n) for n in t[name].shape[::-1]) == shape, name  # GGUF ne order is [in, out]
        assert t[name].tensor_type == (QT.F32 if len(shape) == 1 else qtype), name
        assert np.isfinite(_weights(t[name])).all()


def test_head_dim_rope_and_tied(tmp_path):
    path = write_synthetic_gguf(
        tmp_path / "m.gguf",
        dim=128,
        hidden_dim=256,
        n_layers=1,
        n_heads=4,
        n_kv_heads=1,
        head_dim=64,
        vocab_size=300,
        rope_base=500000.0,
        norm_eps=1e-6,
        context_length=512,
        tied=True,
    )
    f, t = _read(path)
    assert f["llama.attention.key_length"] == f["llama.attention.value_length"] == 64
    assert f["llama.rope.dimension_count"] == 64
    assert f["llama.rope.freq_base"] == pytest.approx(500000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert f["llama.context_length"] == 512
    assert "output.weight" not in t
    assert tuple(t["blk.0.attn_q.weight"].shape[::-1]) == (256, 128)
    assert tuple(t["blk.0.attn_k.weight"].shape[::-1]) == (64, 128)
    assert tuple(t["blk.0.attn_output.weight"].shape[::-1]) == (128, 256)


def test_tokenizer(tmp_path):
    f, _ = _read(write_synthetic_gguf(tmp_path / "m.gguf", **SHAPES["tiny"]))
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "default"
    assert len(tokens) == len(types) == SHAPES["tiny"]["vocab_size"] == len(set(tokens))
    b2u = bytes_to_unicode()
    assert len(set(b2u.values())) == 256 and b2u[ord(" ")] == "Ġ" and b2u[ord("\n")] == "Ċ"
    assert tokens[:256] == [b2u[b] for b in range(256)]
    assert (tokens[BOS_ID], tokens[EOS_ID]) == ("<s>", "</s>")
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (BOS_ID, EOS_ID)
    assert types[BOS_ID] == types[EOS_ID] == gguf.TokenType.CONTROL
    assert sum(ty != gguf.TokenType.NORMAL for ty in types) == 2
    merges = f["tokenizer.ggml.merges"]
    assert merges == MERGES
    for m in merges:  # every merge combines known tokens into a known token
        a, b = m.split(" ")
        assert a in tokens and b in tokens and a + b in tokens
    assert tokens[-1] == f"<unused_{len(tokens) - 258 - len(MERGES) - 1}>"


@pytest.mark.parametrize("weight_type", ["q4_0", "q8_0", "f16"])
def test_weight_statistics(tmp_path, weight_type):
    s = SHAPES["tiny-8kv"]
    _, t = _read(write_synthetic_gguf(tmp_path / "m.gguf", **s, weight_type=weight_type, seed=3))
    res = 1 / np.sqrt(2 * s["n_layers"])
    for name, tensor in t.items():
        w = _weights(tensor).astype(np.float64)
        if name.endswith("norm.weight"):
            assert abs(w.mean() - 1) < 0.02 and 0.03 < w.std() < 0.07, name
            continue
        fan_in = w.shape[1]
        want = (res if name.endswith(("attn_output.weight", "ffn_down.weight")) else 1.0) / np.sqrt(fan_in)
        assert abs(w.std() / want - 1) < 0.05, (name, w.std(), want)
        assert abs(w.mean()) < 0.05 * want, name
        # iid normal: no duplicated rows, uncorrelated neighbours, gaussian kurtosis
        z = w / w.std()
        assert abs(np.mean(z[:, 1:] * z[:, :-1])) < 0.05, name
        assert abs(np.mean(z**4) - 3) < 0.3, name
    a, b = _weights(t["blk.0.attn_q.weight"]), _weights(t["blk.1.attn_q.weight"])
    assert not np.allclose(a, b)


def _forward_logits(path, ids):
    """Minimal NumPy llama forward (no RoPE: enough to see that activations stay sane through the layers)."""
    f, t = _read(path)
    w = {k: _weights(v).astype(np.float32) for k, v in t.items()}
    nl, nh, nkv = (
        f[f"llama.{k}"] for k in ("block_count", "attention.head_count", "attention.head_count_kv")
    )
    eps = f["llama.attention.layer_norm_rms_epsilon"]

    def norm(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

    x = w["token_embd.weight"][ids]
    n, rms = len(ids), []
    for i in range(nl):
        p = f"blk.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q, k, v = (h @ w[p + f"attn_{c}.weight"].T for c in "qkv")
        hd = q.shape[1] // nh
        q, k, v = (a.reshape(n, -1, hd).transpose(1, 0, 2) for a in (q, k, v))
        k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((n, n), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        o = (s / s.sum(-1, keepdims=True)) @ v
        x = x + o.transpose(1, 0, 2).reshape(n, -1) @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
        rms.append(float(np.sqrt(np.mean(x * x))))
    out = w.get("output.weight", w["token_embd.weight"])
    return norm(x, w["output_norm.weight"]) @ out.T, rms


@pytest.mark.parametrize("tied", [False, True])
def test_logits_finite_and_not_degenerate(tmp_path, tied):
    path = write_synthetic_gguf(tmp_path / "m.gguf", **SHAPES["tiny-8kv"], tied=tied)
    ids = np.random.default_rng(0).integers(0, 1024, 24)
    logits, rms = _forward_logits(path, ids)
    assert np.isfinite(logits).all()
    assert 0.5 < logits.std() < 3, logits.std()
    assert len(set(logits.argmax(-1).tolist())) > 12  # predictions depend on the input
    assert max(rms) < 10 * rms[0] and min(rms) > 0.01  # residual stream neither explodes nor vanishes


def test_deterministic_bytes(tmp_path):
    kw = dict(SHAPES["tiny"], weight_type="q4_0", seed=7)
    a = write_synthetic_gguf(tmp_path / "a.gguf", **kw, threads=1)
    b = write_synthetic_gguf(tmp_path / "b.gguf", **kw, threads=3)
    c = write_synthetic_gguf(tmp_path / "c.gguf", **(kw | {"seed": 8}))
    assert _sha(a) == _sha(b) != _sha(c)
    # tying only drops output.weight: all other tensors are the same
    _, ta = _read(a)
    _, td = _read(write_synthetic_gguf(tmp_path / "d.gguf", **kw, tied=True))
    assert all(np.array_equal(ta[n].data, td[n].data) for n in td)


def test_multi_task_tensors_are_deterministic(tmp_path):
    # vocab 8192 x 256 spans several generation tasks, exercising the chunked path under threads
    kw = dict(dim=256, hidden_dim=256, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=8192, seed=1)
    a = write_synthetic_gguf(tmp_path / "a.gguf", **kw, threads=1)
    b = write_synthetic_gguf(tmp_path / "b.gguf", **kw, threads=2)
    assert _sha(a) == _sha(b)
    _, t = _read(a)
    w = _weights(t["token_embd.weight"])
    half = w.shape[0] // 2
    assert not np.allclose(w[:half], w[half:])  # distinct task streams
    assert abs(w.std() * 16 - 1) < 0.02


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0])
def test_quantizer_bit_exact_with_gguf(qtype):
    x = np.random.default_rng(5).standard_normal((64, 512)).astype(np.float32)
    x[0, :32] = 0  # all-zero block
    x[1, :32] = 1  # all-equal block
    x[2, :32] = -0.0
    x[3, :32], x[3, 7], x[3, 20] = 0.5, -2, 2  # |max| tie: the first one wins
    x[4, :32], x[4, 3], x[4, 9] = 0.5, 2, -2
    x[5, :32] = np.linspace(-127, 127, 32)  # q8: scale exactly 1, so k + 0.5 values hit round-half-away
    x[5, 1:31:3] = np.array([2.5, -2.5, 0.5, -0.5, 0.49999997, -0.49999997, 126.5, -126.5, 3.5, 4.5])
    x[6] *= 1e-30
    x[7] *= 1e4
    assert np.array_equal(quantize(x, qtype), gguf.quants.quantize(x, qtype))


def test_quantizer_float_types_and_errors():
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    assert np.array_equal(quantize(x, QT.F16), x.astype(np.float16))
    assert np.array_equal(quantize(x, QT.F32), x)
    with pytest.raises(ValueError):
        quantize(x[:, :40], QT.Q4_0)


def test_argument_errors(tmp_path):
    base = dict(SHAPES["tiny"])
    with pytest.raises(ValueError):
        write_synthetic_gguf(tmp_path / "m.gguf", **base, weight_type="q5_k")
    with pytest.raises(ValueError):
        write_synthetic_gguf(tmp_path / "m.gguf", **(base | {"hidden_dim": 200}))  # not a multiple of 32
    with pytest.raises(ValueError):
        write_synthetic_gguf(tmp_path / "m.gguf", **(base | {"n_kv_heads": 3}))
    with pytest.raises(ValueError):
        write_synthetic_gguf(tmp_path / "m.gguf", **(base | {"vocab_size": 100}))
    assert not list(tmp_path.iterdir())
    # float weights have no block constraint
    write_synthetic_gguf(tmp_path / "m.gguf", **(base | {"hidden_dim": 200}), weight_type="f16")


def test_cli(tmp_path, capsys):
    main([str(tmp_path / "m.gguf"), "--shape", "tiny", "--weight-type", "q8_0", "--seed", "2", "--tied"])
    f, t = _read(str(tmp_path / "m.gguf"))
    assert f["general.name"] == "synthetic-tiny" and "output.weight" not in t
    assert t["blk.0.attn_q.weight"].tensor_type == QT.Q8_0
    assert "wrote" in capsys.readouterr().err
