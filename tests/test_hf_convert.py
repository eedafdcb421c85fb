"""`dllama convert HF_DIR OUT.gguf`: Hugging Face folders (tiny random models saved by transformers) to GGUF.

References: transformers on the original folder (logits, token ids) against transformers loading our GGUF
where it can; otherwise the `safetensors` library's own reading of the originals against gguf-py's reading
of our file, with the rope permutation undone by an independent formula."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors import safe_open
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dllama.model.hf_convert import convert_hf, ensure_gguf_from_hf, hf_cache_path

SRC = str(Path(__file__).resolve().parents[1] / "src")
CORPUS = [
    "Hello world! This is a small corpus for a tiny tokenizer, with numbers 123 4567 and 89.",
    "The quick brown fox jumps over the lazy dog. Don't you think it's great? We'll see.",
    "naïve café — 日本語のテキスト, emojis 🦙🚀 and tabs\tand\nnew lines.",
    "def main():\n    return 42  # code too\n",
    "Numbers 1234567 and 12345678 and 7654321; 'RE you sure? 'M not, 'D you? I'VE SEEN IT, HE'S THERE.",
] * 20
PROBES = [
    "Hello world! 123 4567",
    " leading space and  double  spaces",
    "naïve café — 日本語 🦙",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "I've been 'told he's there",
    "'RE you sure? 'M not 1234567 12345678, I'VE SEEN",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# ---------------------------------------------------------------------------------------------------------
# tiny tokenizers


def byte_level_tokenizer(folder: Path, split: str, bos: bool) -> int:
    """A byte-level BPE like Llama 3 / Qwen2 (split regex + ByteLevel), with chat specials; returns its size."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|im_end|>", "add_bos_token": bos, "chat_template": CHAT_TEMPLATE,
    }))
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def sentencepiece_bpe_tokenizer(folder: Path) -> int:
    """A SentencePiece-style BPE in tokenizer.json (Llama 2 / Mistral / TinyLlama): <unk> <s> </s>, 256 byte
    pieces, then merges; Metaspace pre-tokenizer, byte fallback, adds <s>."""
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    base.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=360, show_progress=False))
    trained = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
    }))
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


# ---------------------------------------------------------------------------------------------------------
# tiny models

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def make_model(folder: Path, kind: str, vocab: int, dtype=None, shard: bool = False, **over) -> Path:
    torch.manual_seed(0)
    cfgs = {
        "llama": lambda: transformers.LlamaConfig(**{**COMMON, "rope_theta": 50000.0, **over}),
        "mistral": lambda: transformers.MistralConfig(**{**COMMON, "sliding_window": 64, **over}),
        "mixtral": lambda: transformers.MixtralConfig(**{**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2,
                                                         **over}),
        "qwen2": lambda: transformers.Qwen2Config(**{**COMMON, "tie_word_embeddings": True, **over}),
        "qwen3": lambda: transformers.Qwen3Config(**{**COMMON, "head_dim": 128, **over}),
        "qwen3moe": lambda: transformers.Qwen3MoeConfig(**{**COMMON, "head_dim": 32, "num_experts": 4,
                                                           "num_experts_per_tok": 2, "moe_intermediate_size": 768,
                                                           "norm_topk_prob": True, **over}),
    }
    cfg = cfgs[kind]()
    cfg.vocab_size = vocab
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms and biases away from their 1/0 init, so a swapped one shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(folder), safe_serialization=True, **({"max_shard_size": "60KB"} if shard else {}))
    return folder


def hf_logits(folder: Path, ids: list[int], **kw) -> np.ndarray:
    m = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


def gguf_fields(path: Path) -> dict:
    r = GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items()}


def check_tokenizer(folder: Path, gguf: Path) -> None:
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    got = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for text in PROBES:
        assert got(text).input_ids == ref(text).input_ids, text
    assert got.decode(ref(PROBES[2]).input_ids, skip_special_tokens=True) == ref.decode(
        ref(PROBES[2]).input_ids, skip_special_tokens=True)


def roundtrip_logits(folder: Path, gguf: Path, vocab: int) -> None:
    ids = [(7 * i + 3) % vocab for i in range(12)]
    ref = hf_logits(folder, ids)
    got = hf_logits(gguf.parent, ids, gguf_file=gguf.name)
    assert ref.shape == got.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hfconv")


# ---------------------------------------------------------------------------------------------------------
# architectures transformers reads back from GGUF: logits and token ids must match the original folder


def test_llama_sharded_logits_and_tokenizer(tmp):
    folder = tmp / "llama"
    n = byte_level_tokenizer(folder, LLAMA3_SPLIT, bos=True)
    make_model(folder, "llama", n + 3, shard=True)  # 3 ids past the tokenizer: [PAD] holes
    assert (folder / "model.safetensors.index.json").is_file()
    out = tmp / "out" / "llama.gguf"
    info = convert_hf(folder, out, "f32")
    assert info["arch"] == "llama" and info["tokenizer"] == "gpt2"
    f = gguf_fields(out)
    cfg = json.loads((folder / "config.json").read_text())
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == cfg["num_hidden_layers"] == 2
    assert f["llama.embedding_length"] == 64 and f["llama.feed_forward_length"] == 128
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.dimension_count"] == 16 and f["llama.vocab_size"] == n + 3
    assert f["llama.rope.freq_base"] == pytest.approx(50000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["llama.context_length"] == 256
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert len(f["tokenizer.ggml.tokens"]) == n + 3 and f["tokenizer.ggml.tokens"][-1] == f"[PAD{n + 2}]"
    roundtrip_logits(folder, out, n)
    check_tokenizer(folder, out)


def test_qwen2_bf16_tied_logits_and_tokenizer(tmp):
    folder = tmp / "qwen2"
    n = byte_level_tokenizer(folder, QWEN2_SPLIT, bos=False)
    make_model(folder, "qwen2", n, dtype=torch.bfloat16)
    with safe_open(str(folder / "model.safetensors"), "pt") as st:
        assert st.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert "lm_head.weight" not in st.keys()
    out = tmp / "out" / "qwen2.gguf"
    convert_hf(folder, out, "f32")
    r = GGUFReader(str(out))
    names = {t.name for t in r.tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    f = gguf_fields(out)
    assert f["general.architecture"] == "qwen2" and f["tokenizer.ggml.pre"] == "qwen2"
    assert "qwen2.rope.dimension_count" not in f
    roundtrip_logits(folder, out, n)
    check_tokenizer(folder, out)


def test_qwen3_logits(tmp):
    folder = tmp / "qwen3"
    n = byte_level_tokenizer(folder, QWEN2_SPLIT, bos=False)
    make_model(folder, "qwen3", n)  # head_dim 128 != hidden / heads = 16
    out = tmp / "out" / "qwen3.gguf"
    convert_hf(folder, out, "f32")
    f = gguf_fields(out)
    assert f["general.architecture"] == "qwen3"
    assert f["qwen3.attention.key_length"] == 128 and f["qwen3.attention.value_length"] == 128
    names = {t.name for t in GGUFReader(str(out)).tensors}
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names
    roundtrip_logits(folder, out, n)


def test_qwen3moe_logits(tmp):
    folder = tmp / "qwen3moe"
    n = byte_level_tokenizer(folder, QWEN2_SPLIT, bos=False)
    make_model(folder, "qwen3moe", n)  # transformers' GGUF loader ignores expert_feed_forward_length: its default
    out = tmp / "out" / "qwen3moe.gguf"
    convert_hf(folder, out, "f32")
    f = gguf_fields(out)
    assert f["general.architecture"] == "qwen3moe"
    assert f["qwen3moe.expert_count"] == 4 and f["qwen3moe.expert_used_count"] == 2
    assert f["qwen3moe.expert_feed_forward_length"] == 768
    r = GGUFReader(str(out))
    t = {t.name: t for t in r.tensors}
    assert list(reversed(t["blk.0.ffn_gate_exps.weight"].shape.tolist())) == [4, 768, 64]
    assert list(reversed(t["blk.0.ffn_down_exps.weight"].shape.tolist())) == [4, 64, 768]
    assert QT(t["blk.0.ffn_gate_inp.weight"].tensor_type) == QT.F32
    roundtrip_logits(folder, out, n)


def test_mistral_sentencepiece_bpe_logits_and_tokenizer(tmp):
    folder = tmp / "mistral-tiny"  # a GGUF named exactly "mistral" sends transformers down a path gguf-py lacks
    n = sentencepiece_bpe_tokenizer(folder)
    make_model(folder, "mistral", n)
    out = tmp / "out" / "mistral.gguf"
    info = convert_hf(folder, out, "f32")
    assert info["tokenizer"] == "llama"
    f = gguf_fields(out)
    assert f["general.architecture"] == "llama" and f["tokenizer.ggml.model"] == "llama"
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2
    assert f["tokenizer.ggml.unknown_token_id"] == 0 and f["tokenizer.ggml.add_bos_token"] is True
    types = f["tokenizer.ggml.token_type"]
    assert types[1] == 3 and types[3] == 6 and types[3 + 255] == 6 and types[300] == 1  # control, byte, normal
    scores = f["tokenizer.ggml.scores"]
    assert scores[n - 1] < scores[260]  # later merge, lower score (SentencePiece's order)
    assert not any(k.startswith("llama.attention.sliding_window") for k in f)  # llama.cpp writes none
    roundtrip_logits(folder, out, n)
    check_tokenizer(folder, out)


# ---------------------------------------------------------------------------------------------------------
# Mixtral (transformers reads no experts from a `llama` GGUF): every tensor against the safetensors originals


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's rope permutation, written independently: GGUF row (h, i, j) = HF row (h, j, i)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(0, 2, 1, *range(3, w.ndim + 2)
                                                                            ).reshape(w.shape)


def gguf_tensor(r: GGUFReader, name: str) -> np.ndarray:
    t = next(t for t in r.tensors if t.name == name)
    shape = tuple(reversed(t.shape.tolist()))
    qt = QT(t.tensor_type)
    if qt == QT.F32:
        return np.array(t.data, dtype=np.float32).reshape(shape)
    if qt == QT.F16:
        return np.array(t.data).view(np.float16).astype(np.float32).reshape(shape)
    return dequantize(np.array(t.data), qt).reshape(shape)


def test_mixtral_tensors_and_metadata(tmp):
    folder = tmp / "mixtral"
    n = sentencepiece_bpe_tokenizer(folder)
    make_model(folder, "mixtral", n)
    out = tmp / "out" / "mixtral.gguf"
    convert_hf(folder, out, "f32")
    cfg = json.loads((folder / "config.json").read_text())
    f = gguf_fields(out)
    assert f["general.architecture"] == "llama"
    assert f["llama.expert_count"] == cfg["num_local_experts"] == 4
    assert f["llama.expert_used_count"] == cfg["num_experts_per_tok"] == 2
    assert f["llama.block_count"] == cfg["num_hidden_layers"]
    assert f["llama.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    r = GGUFReader(str(out))
    assert all(QT(t.tensor_type) == QT.F32 for t in r.tensors)
    seen = set()
    with safe_open(str(folder / "model.safetensors"), "pt") as st:
        hf = {k: st.get_tensor(k).float().numpy() for k in st.keys()}
    for name, want in {"token_embd.weight": hf["model.embed_tokens.weight"], "output.weight": hf["lm_head.weight"],
                       "output_norm.weight": hf["model.norm.weight"]}.items():
        np.testing.assert_array_equal(gguf_tensor(r, name), want)
        seen.add(name)
    for i in range(2):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        pairs = {
            "attn_norm": p + "input_layernorm.weight", "ffn_norm": p + "post_attention_layernorm.weight",
            "attn_v": p + "self_attn.v_proj.weight", "attn_output": p + "self_attn.o_proj.weight",
            "ffn_gate_inp": p + "block_sparse_moe.gate.weight",
        }
        for g, h in pairs.items():
            np.testing.assert_array_equal(gguf_tensor(r, b + g + ".weight"), hf[h])
            seen.add(b + g + ".weight")
        np.testing.assert_array_equal(unpermute(gguf_tensor(r, b + "attn_q.weight"), 4),
                                      hf[p + "self_attn.q_proj.weight"])
        np.testing.assert_array_equal(unpermute(gguf_tensor(r, b + "attn_k.weight"), 2),
                                      hf[p + "self_attn.k_proj.weight"])
        seen |= {b + "attn_q.weight", b + "attn_k.weight"}
        for g, w in (("ffn_gate_exps", "w1"), ("ffn_down_exps", "w2"), ("ffn_up_exps", "w3")):
            got = gguf_tensor(r, f"{b}{g}.weight")
            assert got.shape[0] == 4
            for e in range(4):
                np.testing.assert_array_equal(got[e], hf[f"{p}block_sparse_moe.experts.{e}.{w}.weight"])
            seen.add(f"{b}{g}.weight")
    assert seen == {t.name for t in r.tensors}


def test_unpermute_is_the_inverse_of_hf_rotate_half():
    # independent check of the helper: HF rotate-half pairs (j, j + d/2) become adjacent rows (2j, 2j + 1)
    n_head, d = 2, 8
    w = np.arange(n_head * d)[:, None].astype(np.float32)
    from dllama.model.hf_convert import permute

    p = permute(w, n_head)
    assert p[:4, 0].tolist() == [0, 4, 1, 5] and p[8:12, 0].tolist() == [8, 12, 9, 13]
    np.testing.assert_array_equal(unpermute(p, n_head), w)


# ---------------------------------------------------------------------------------------------------------
# quantized targets


def test_q80_q40_types_and_values(tmp):
    folder = tmp / "llama_q"
    n = byte_level_tokenizer(folder, LLAMA3_SPLIT, bos=True)
    make_model(folder, "llama", n, intermediate_size=80)  # ffn_down rows of 80: not whole 32-blocks
    with safe_open(str(folder / "model.safetensors"), "pt") as st:
        hf = {k: st.get_tensor(k).float().numpy() for k in st.keys()}
    for target, qt, tol in (("q80", QT.Q8_0, 0.01), ("q40", QT.Q4_0, 0.15)):
        out = tmp / "out" / f"llama-{target}.gguf"
        convert_hf(folder, out, target)
        r = GGUFReader(str(out))
        types = {t.name: QT(t.tensor_type) for t in r.tensors}
        assert types["blk.0.attn_q.weight"] == qt and types["token_embd.weight"] == qt
        assert types["blk.0.ffn_gate.weight"] == qt
        assert types["blk.0.ffn_down.weight"] == QT.F16
        assert types["blk.0.attn_norm.weight"] == QT.F32 and types["output_norm.weight"] == QT.F32
        got = unpermute(gguf_tensor(r, "blk.1.attn_q.weight"), 4)
        want = hf["model.layers.1.self_attn.q_proj.weight"]
        assert np.abs(got - want).max() < tol * np.abs(want).max()
        assert np.abs(got - want).max() > 0  # really quantized
        np.testing.assert_allclose(gguf_tensor(r, "blk.1.ffn_down.weight"), hf["model.layers.1.mlp.down_proj.weight"],
                                   atol=1e-3)
        np.testing.assert_array_equal(gguf_tensor(r, "blk.1.attn_norm.weight"),
                                      hf["model.layers.1.input_layernorm.weight"])


# ---------------------------------------------------------------------------------------------------------
# cache for `--model HF_DIR`


def test_cache_is_reused_until_an_input_changes(tmp, capsys):
    folder = tmp / "llama"  # made by the first test
    if not (folder / "config.json").is_file():
        n = byte_level_tokenizer(folder, LLAMA3_SPLIT, bos=True)
        make_model(folder, "llama", n + 3, shard=True)
    path = ensure_gguf_from_hf(folder, "q80")
    assert path == hf_cache_path(folder, "q80") == folder / ".dllama" / "model-q80.gguf"
    assert "converting" in capsys.readouterr().err
    mtime = path.stat().st_mtime_ns
    assert ensure_gguf_from_hf(folder, "q80") == path and path.stat().st_mtime_ns == mtime
    assert "converting" not in capsys.readouterr().err
    cfg = folder / "config.json"
    os.utime(cfg, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    ensure_gguf_from_hf(folder, "q80")
    assert "converting" in capsys.readouterr().err and path.stat().st_mtime_ns != mtime


# ---------------------------------------------------------------------------------------------------------
# bad input: one clear line, non-zero exit, via the CLI


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "dllama", "convert", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for s in needles:
        assert s in lines[0], lines[0]


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".dllama"))
    return dst


def edit_config(folder: Path, **kv) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(kv)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_bad_inputs(tmp):
    empty = tmp / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli(empty, tmp / "x.gguf", "--type", "f16"), "no config.json")

    src = tmp / "mixtral"
    if not (src / "config.json").is_file():
        n = sentencepiece_bpe_tokenizer(src)
        make_model(src, "mixtral", n)
    gpt2 = copy_folder(src, tmp / "bad_arch")
    edit_config(gpt2, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    assert_one_line_error(run_cli(gpt2, tmp / "x.gguf", "--type", "f16"), "unsupported architecture", "GPT2LMHeadModel")

    shape = copy_folder(src, tmp / "bad_shape")
    edit_config(shape, intermediate_size=96)
    assert_one_line_error(run_cli(shape, tmp / "x.gguf", "--type", "f16"), "shape", "config.json")

    used = copy_folder(src, tmp / "bad_used")
    edit_config(used, num_experts_per_tok=5)
    assert_one_line_error(run_cli(used, tmp / "x.gguf", "--type", "f16"), "num_experts_per_tok")

    count = copy_folder(src, tmp / "bad_count")
    edit_config(count, num_local_experts=6)
    assert_one_line_error(run_cli(count, tmp / "x.gguf", "--type", "q80"), "block_sparse_moe.gate.weight", "[6, 64]")

    missing = copy_folder(src, tmp / "bad_missing")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(missing / "model.safetensors"))
    del weights["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(weights, str(missing / "model.safetensors"), metadata={"format": "pt"})
    res = run_cli(missing, tmp / "x.gguf", "--type", "q80")
    assert_one_line_error(res, "expert tensor model.layers.1.block_sparse_moe.experts.3.w2.weight is missing")
    assert not any(p.name.startswith("x.gguf") for p in tmp.iterdir())  # nothing half-written left behind


def test_cli_converts_a_folder(tmp, capsys):
    from dllama.cli.main import main

    src = tmp / "qwen2"
    if not (src / "config.json").is_file():
        n = byte_level_tokenizer(src, QWEN2_SPLIT, bos=False)
        make_model(src, "qwen2", n)
    out = tmp / "cli" / "q.gguf"
    assert main(["convert", str(src), str(out), "--type", "q80"]) == 0  # in-process: transformers is loaded
    assert "wrote" in capsys.readouterr().err and out.is_file()
    assert gguf_fields(out)["general.architecture"] == "qwen2"
    assert main(["convert", str(src / "model.safetensors"), str(out), "--tokenizer", "t.t", "--type", "f16"]) == 1
    assert "only applies to a .m model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# a SentencePiece tokenizer.model (TinyLlama / Llama 2 folders), and Llama 3.1 rope scaling


def test_sentencepiece_model_vocab(tmp):
    import sentencepiece as spm

    folder = tmp / "tinyllama"
    folder.mkdir()
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, user_defined_symbols=["<tool>"],
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    n = sp.vocab_size()
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "0": {"content": "<unk>", "special": True}, "1": {"content": "<s>", "special": True},
        "2": {"content": "</s>", "special": True}}}))
    make_model(folder, "llama", n + 2, bos_token_id=1, eos_token_id=2)
    out = tmp / "out" / "tinyllama.gguf"
    assert convert_hf(folder, out, "f16")["tokenizer"] == "llama"
    f = gguf_fields(out)
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == n + 2 and tokens[n:] == [f"[PAD{n}]", f"[PAD{n + 1}]"] and types[n:] == [5, 5]
    # tokenizer_config's added_tokens_decoder overrides the first three, as in llama.cpp: control, score -1000
    assert types[:3] == [3, 3, 3] and scores[:3] == [-1000.0] * 3 and tokens[:3] == ["<unk>", "<s>", "</s>"]
    for i in range(3, n):
        assert tokens[i] == sp.id_to_piece(i)
        assert scores[i] == pytest.approx(sp.get_score(i))
        want = 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1  # llama.cpp's map
        assert types[i] == want, (i, tokens[i])
    assert types[sp.piece_to_id("<tool>")] == 1  # sentencepiece user-defined: normal, as in llama.cpp
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2


def test_llama3_rope_factors(tmp):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder = tmp / "llama31"
    n = byte_level_tokenizer(folder, LLAMA3_SPLIT, bos=True)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    make_model(folder, "llama", n, rope_parameters=scaling, max_position_embeddings=1024)
    out = tmp / "out" / "llama31.gguf"
    convert_hf(folder, out, "f32")
    r = GGUFReader(str(out))
    got = gguf_tensor(r, "rope_freqs.weight")
    cfg = transformers.AutoConfig.from_pretrained(str(folder))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    np.testing.assert_allclose(got, (plain / scaled).numpy(), rtol=1e-5)  # llama.cpp divides by the factor
    assert got.min() == pytest.approx(1.0) and got.max() == pytest.approx(8.0)
    assert gguf_fields(out)["llama.rope.freq_base"] == pytest.approx(500000.0)


def test_qwen3moe_fused_expert_layout_gives_the_same_file(tmp):
    """transformers can also store experts fused ([E, 2F, D] gate_up and [E, D, F] down): same GGUF tensors."""
    from safetensors.torch import load_file, save_file

    src = tmp / "qwen3moe"
    if not (src / "config.json").is_file():
        n = byte_level_tokenizer(src, QWEN2_SPLIT, bos=False)
        make_model(src, "qwen3moe", n)
    fused = copy_folder(src, tmp / "qwen3moe_fused")
    w = load_file(str(fused / "model.safetensors"))
    for i in range(2):
        x = f"model.layers.{i}.mlp.experts."
        gate = torch.stack([w.pop(f"{x}{e}.gate_proj.weight") for e in range(4)])
        up = torch.stack([w.pop(f"{x}{e}.up_proj.weight") for e in range(4)])
        w[x + "gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        w[x + "down_proj"] = torch.stack([w.pop(f"{x}{e}.down_proj.weight") for e in range(4)]).contiguous()
    save_file(w, str(fused / "model.safetensors"), metadata={"format": "pt"})
    a, b = tmp / "out" / "moe-a.gguf", tmp / "out" / "moe-b.gguf"
    convert_hf(src, a, "q80")
    convert_hf(fused, b, "q80")
    ra, rb = GGUFReader(str(a)), GGUFReader(str(b))
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    for ta, tb in zip(ra.tensors, rb.tensors, strict=True):
        assert ta.tensor_type == tb.tensor_type and np.array_equal(np.array(ta.data), np.array(tb.data)), ta.name
