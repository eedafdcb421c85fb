"""`dllama convert HF_DIR OUT.gguf`: a Hugging Face model folder (config.json, safetensors, tokenizer) to GGUF.

The file is laid out exactly as llama.cpp's convert_hf_to_gguf.py lays it out, so llama.cpp, transformers and
dllama read it alike:
- Llama, Mistral, Mixtral -> arch `llama`: q/k rows permuted for llama.cpp's interleaved rope, `vocab_size` and
  `rope.dimension_count` keys, Mixtral experts merged into 3-D `ffn_{gate,up,down}_exps` tensors, a `rope_freqs`
  tensor for Llama 3.1-style rope scaling;
- Qwen2/Qwen2.5 -> `qwen2` (q/k/v biases), Qwen3 -> `qwen3` (q/k norms), Qwen3-MoE -> `qwen3moe`
  (`expert_feed_forward_length`), none of them permuted.
Tensors are streamed one at a time from the memory-mapped safetensors (a merged expert tensor is the largest
thing held in memory). Matrices take the requested type; vectors, norms, biases and the MoE router stay F32.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import MODEL_ARCH, GGUFType, GGUFWriter, Metadata, RopeScalingType, get_tensor_name_map, size_label
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize
from tqdm import tqdm

from dllama.errors import DllamaError
from dllama.model.convert import FILE_TYPES, TARGETS, _info
from dllama.model.hf_safetensors import Checkpoint
from dllama.model.hf_vocab import write_vocab

# Hugging Face class -> GGUF architecture (llama.cpp's registrations of the same classes)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3moe",
}
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# transformers' defaults for what a config.json may omit (head_dim: "computed" = hidden_size / heads)
_DEFAULTS = {
    "LlamaForCausalLM": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048, head_dim="computed"),
    "MistralForCausalLM": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=131072,
                               head_dim="computed"),
    "MixtralForCausalLM": dict(rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=131072),
    "Qwen2ForCausalLM": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "Qwen3ForCausalLM": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, head_dim=128),
    "Qwen3MoeForCausalLM": dict(rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
}
_ARCH_ENUM = {"llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2, "qwen3": MODEL_ARCH.QWEN3,
              "qwen3moe": MODEL_ARCH.QWEN3MOE}
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "added_tokens.json",
                    "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


# ---------------------------------------------------------------------------------------------------------
# config


@dataclass
class Hyper:
    hf_arch: str
    arch: str
    hp: dict  # config.json with transformers' defaults filled in (what llama.cpp sees)
    n_layer: int
    dim: int
    n_head: int
    n_kv: int
    head_dim: int
    ff: int
    vocab: int
    n_expert: int = 0
    n_used: int = 0
    ff_expert: int = 0


def _read_config(folder: Path) -> tuple[str, dict]:
    path = folder / "config.json"
    if not path.is_file():
        raise DllamaError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise DllamaError(f"cannot read {path}: {e}") from None
    archs = raw.get("architectures") or []
    hf_arch = next((a for a in archs if a in ARCHITECTURES), None) or MODEL_TYPES.get(raw.get("model_type"))
    if hf_arch is None:
        named = ", ".join(archs) or raw.get("model_type") or "none given"
        raise DllamaError(
            f"{folder}: unsupported architecture ({named}); supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    # llama.cpp reads the config through transformers' AutoConfig, which fills in what config.json leaves out;
    # we fill in the same defaults for the keys we write (importing transformers costs seconds).
    hp = dict(raw)
    for key, value in _DEFAULTS[hf_arch].items():
        if hp.get(key) is None:
            if value == "computed":  # these classes derive it when absent
                heads, dim = hp.get("num_attention_heads"), hp.get("hidden_size")
                ok = isinstance(heads, int) and isinstance(dim, int) and heads > 0
                value = dim // heads if ok else None
            hp[key] = value
    return hf_arch, hp


def _int(hp: dict, *keys: str, default: int | None = None, folder: Path) -> int:
    for k in keys:
        v = hp.get(k)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise DllamaError(f"{folder}/config.json: {k} must be a positive integer, not {v!r}")
            return v
    if default is not None:
        return default
    raise DllamaError(f"{folder}/config.json: missing {keys[0]}")


def load_hyper(folder: Path) -> Hyper:
    hf_arch, hp = _read_config(folder)
    arch = ARCHITECTURES[hf_arch]
    dim = _int(hp, "hidden_size", folder=folder)
    n_head = _int(hp, "num_attention_heads", folder=folder)
    n_kv = _int(hp, "num_key_value_heads", default=n_head, folder=folder)
    if n_head % n_kv:
        raise DllamaError(f"{folder}/config.json: num_attention_heads {n_head} is not a multiple of "
                          f"num_key_value_heads {n_kv}")
    head_dim = _int(hp, "head_dim", default=dim // n_head, folder=folder)
    h = Hyper(
        hf_arch, arch, hp,
        n_layer=_int(hp, "num_hidden_layers", folder=folder), dim=dim, n_head=n_head, n_kv=n_kv,
        head_dim=head_dim, ff=_int(hp, "intermediate_size", folder=folder),
        vocab=_int(hp, "vocab_size", folder=folder),
    )
    if hf_arch in ("MixtralForCausalLM", "Qwen3MoeForCausalLM"):
        h.n_expert = _int(hp, "num_local_experts", "num_experts", folder=folder)
        h.n_used = _int(hp, "num_experts_per_tok", folder=folder)
        if h.n_used > h.n_expert:
            raise DllamaError(f"{folder}/config.json: num_experts_per_tok {h.n_used} is more than the "
                              f"{h.n_expert} experts")
        if hf_arch == "MixtralForCausalLM":
            h.ff_expert = h.ff
        else:
            h.ff_expert = _int(hp, "moe_intermediate_size", folder=folder)
            if hp.get("mlp_only_layers") or hp.get("decoder_sparse_step", 1) not in (None, 1):
                raise DllamaError(f"{folder}/config.json: dense layers between MoE layers (mlp_only_layers / "
                                  "decoder_sparse_step) are not supported by llama.cpp's qwen3moe")
            if hp.get("norm_topk_prob") is False:
                print("warning: norm_topk_prob is false in config.json, but llama.cpp's qwen3moe always "
                      "renormalizes the chosen experts' weights", file=sys.stderr)
    elif hp.get("num_local_experts") or hp.get("num_experts"):
        raise DllamaError(f"{folder}/config.json: {hf_arch} with experts is not a supported model")
    return h


def _rope(hp: dict) -> dict:
    return dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})


def _write_general(w: GGUFWriter, folder: Path) -> None:
    """general.* as llama.cpp's prepare_metadata writes it: gguf-py's Metadata from the model card, config and
    folder name, and a size label from the parameter count (tensor infos must be added first)."""
    total, shared, expert, count = w.get_total_parameter_count()
    meta = Metadata.load(None, folder, None, total)
    if meta.name is None:
        meta.name = folder.resolve().name
    if meta.size_label is None and total > 0:
        meta.size_label = size_label(total, shared, expert, count)
    w.add_type(GGUFType.MODEL)
    meta.set_gguf_meta_model(w)


def _write_hparams(w: GGUFWriter, h: Hyper) -> None:
    """llama.cpp's TextModel.set_gguf_parameters plus the per-architecture keys."""
    hp = h.hp
    w.add_block_count(h.n_layer)
    if (n_ctx := hp.get("max_position_embeddings")) is not None:
        w.add_context_length(int(n_ctx))
    w.add_embedding_length(h.dim)
    w.add_feed_forward_length(h.ff)
    w.add_head_count(h.n_head)
    w.add_head_count_kv(h.n_kv)
    rope = _rope(hp)
    rope_type, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in (None, "default", "llama3"):  # llama3 is the rope_freqs tensor
        print(f"warning: rope scaling {rope_type!r} is not written to the GGUF", file=sys.stderr)
    theta = rope.get("rope_theta", hp.get("rope_theta"))
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    if (eps := hp.get("rms_norm_eps")) is not None:
        w.add_layer_norm_rms_eps(float(eps))
    if h.n_expert:
        w.add_expert_count(h.n_expert)
        w.add_expert_used_count(h.n_used)
    if hp.get("head_dim") is not None:
        w.add_key_length(h.head_dim)
        w.add_value_length(h.head_dim)
    if h.arch == "llama":
        w.add_vocab_size(h.vocab)
        w.add_rope_dimension_count(h.head_dim)
    if h.arch == "qwen3moe":
        w.add_expert_feed_forward_length(h.ff_expert)


def _llama3_rope_factors(h: Hyper) -> np.ndarray | None:
    """llama.cpp's generate_extra_tensors for Llama 3.1+ rope scaling: per-frequency divisors."""
    rope = _rope(h.hp)
    if str(rope.get("rope_type", rope.get("type", ""))).lower() != "llama3":
        return None
    base = float(rope.get("rope_theta", h.hp.get("rope_theta", 10000.0)))
    old_ctx = rope.get("original_max_position_embeddings", h.hp.get("original_max_position_embeddings", 8192))
    return llama3_rope_divisors(base, h.head_dim, rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0),
                                rope.get("high_freq_factor", 4.0), old_ctx)  # fmt: skip


def llama3_rope_divisors(base: float, dim: int, factor: float, low: float, high: float,
                         old_ctx: float) -> np.ndarray:  # fmt: skip
    """Llama 3.1 rope scaling as llama.cpp's converters write it (`rope_freqs.weight`): one divisor per frequency
    pair, 1 for high frequencies, `factor` for low ones, smoothly in between. Shared by every converter."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# tensor plan


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's rotate-half rope rows -> interleaved (GGML NORM rope) rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class Planned:
    name: str
    shape: tuple[int, ...]  # numpy order (rows last-but-one, row length last)
    load: Callable[[], np.ndarray] | None  # the whole tensor, or
    parts: tuple[Callable[[], np.ndarray], ...] = ()  # experts encoded one at a time, then stacked


def _plan(h: Hyper, ck: Checkpoint, folder: Path) -> list[Planned]:
    """Every GGUF tensor with its expected shape and how to build it, after checking the checkpoint's names
    and shapes against config.json (nothing is read but the headers)."""
    names = {n for n in ck.tensors if not n.endswith(_IGNORED_SUFFIXES)}
    used: set[str] = set()
    tmap = get_tensor_name_map(_ARCH_ENUM[h.arch], h.n_layer)
    out: list[Planned] = []

    def gguf_name(hf: str) -> str:
        n = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if n is None:
            raise DllamaError(f"{folder}: cannot map tensor {hf!r} for arch {h.arch}")
        return n

    def check(hf: str, shape: tuple[int, ...]) -> None:
        got = ck.tensors[hf].shape
        if tuple(got) != tuple(shape):
            raise DllamaError(f"{folder}: tensor {hf} has shape {list(got)}, but config.json implies {list(shape)}")

    def simple(hf: str, shape: tuple[int, ...], perm_heads: int = 0, required: bool = True) -> None:
        if hf not in names:
            if required:
                raise DllamaError(f"{folder}: tensor {hf} is missing from the safetensors files")
            return
        check(hf, shape)
        used.add(hf)

        def load(hf=hf, perm_heads=perm_heads):
            x = ck.load(hf)
            return permute(x, perm_heads) if perm_heads else x

        out.append(Planned(gguf_name(hf), shape, load))

    def stacked(gg: str, parts: list[str], shape: tuple[int, ...]) -> None:
        for p in parts:
            if p not in names:
                raise DllamaError(f"{folder}: expert tensor {p} is missing from the safetensors files")
            check(p, shape)
            used.add(p)
        out.append(Planned(gg, (len(parts), *shape), None, tuple(lambda p=p: ck.load(p) for p in parts)))

    D, hd, V = h.dim, h.head_dim, h.vocab
    permuted = h.arch == "llama"
    simple("model.embed_tokens.weight", (V, D))
    if (factors := _llama3_rope_factors(h)) is not None:
        out.append(Planned("rope_freqs.weight", factors.shape, lambda f=factors: f))
    bias = h.arch == "qwen2" or bool(h.hp.get("attention_bias"))
    for i in range(h.n_layer):
        p = f"model.layers.{i}."
        simple(p + "input_layernorm.weight", (D,))
        simple(p + "self_attn.q_proj.weight", (h.n_head * hd, D), h.n_head if permuted else 0)
        simple(p + "self_attn.k_proj.weight", (h.n_kv * hd, D), h.n_kv if permuted else 0)
        simple(p + "self_attn.v_proj.weight", (h.n_kv * hd, D))
        simple(p + "self_attn.o_proj.weight", (D, h.n_head * hd))
        if bias:
            simple(p + "self_attn.q_proj.bias", (h.n_head * hd,), h.n_head if permuted else 0)
            simple(p + "self_attn.k_proj.bias", (h.n_kv * hd,), h.n_kv if permuted else 0)
            simple(p + "self_attn.v_proj.bias", (h.n_kv * hd,))
            simple(p + "self_attn.o_proj.bias", (D,), required=False)
        if h.arch in ("qwen3", "qwen3moe"):
            simple(p + "self_attn.q_norm.weight", (hd,))
            simple(p + "self_attn.k_norm.weight", (hd,))
        simple(p + "post_attention_layernorm.weight", (D,))
        E, F = h.n_expert, h.ff_expert
        if h.hf_arch == "MixtralForCausalLM":
            simple(p + "block_sparse_moe.gate.weight", (E, D))
            x = p + "block_sparse_moe.experts.{}.{}.weight"
            for w, gg, shape in (("w1", "ffn_gate_exps", (F, D)), ("w3", "ffn_up_exps", (F, D)),
                                 ("w2", "ffn_down_exps", (D, F))):
                stacked(f"blk.{i}.{gg}.weight", [x.format(e, w) for e in range(E)], shape)
        elif h.arch == "qwen3moe":
            simple(p + "mlp.gate.weight", (E, D))
            fused = p + "mlp.experts.gate_up_proj"
            if fused in names:  # transformers' fused layout: [E, 2F, D] (gate rows first) and [E, D, F]
                check(fused, (E, 2 * F, D))
                used.add(fused)
                out.append(Planned(f"blk.{i}.ffn_gate_exps.weight", (E, F, D),
                                   lambda n=fused, F=F: ck.load(n)[:, :F, :]))
                out.append(Planned(f"blk.{i}.ffn_up_exps.weight", (E, F, D),
                                   lambda n=fused, F=F: ck.load(n)[:, F:, :]))
                down = p + "mlp.experts.down_proj"
                if down not in names:
                    raise DllamaError(f"{folder}: expert tensor {down} is missing from the safetensors files")
                check(down, (E, D, F))
                used.add(down)
                out.append(Planned(f"blk.{i}.ffn_down_exps.weight", (E, D, F), lambda n=down: ck.load(n)))
            else:
                x = p + "mlp.experts.{}.{}.weight"
                for w, gg, shape in (("gate_proj", "ffn_gate_exps", (F, D)), ("up_proj", "ffn_up_exps", (F, D)),
                                     ("down_proj", "ffn_down_exps", (D, F))):
                    stacked(f"blk.{i}.{gg}.weight", [x.format(e, w) for e in range(E)], shape)
        else:
            simple(p + "mlp.gate_proj.weight", (h.ff, D))
            simple(p + "mlp.up_proj.weight", (h.ff, D))
            simple(p + "mlp.down_proj.weight", (D, h.ff))
    simple("model.norm.weight", (D,))
    simple("lm_head.weight", (V, D), required=not h.hp.get("tie_word_embeddings", False))
    extra = sorted(names - used)
    if extra:
        kind = "expert " if any(".experts." in n for n in extra) else ""
        raise DllamaError(f"{folder}: unexpected {kind}tensor(s) for {h.hf_arch} with this config.json: "
                          f"{', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    return out


def _out_type(name: str, shape: tuple[int, ...], target: QT) -> QT:
    # llama.cpp: 1-D tensors, norms and the MoE router stay F32
    if len(shape) == 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return QT.F32
    if target in (QT.F32, QT.F16):
        return target
    return target if shape[-1] % 32 == 0 else QT.F16  # rows that do not fill whole blocks


def _encode(x: np.ndarray, qtype: QT) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == QT.F32:
        return x
    if qtype == QT.F16:
        return x.astype(np.float16)
    return quantize(x, qtype)


# ---------------------------------------------------------------------------------------------------------
# public API


def convert_hf(src_dir: str | os.PathLike, out_path: str | os.PathLike, target: str) -> dict:
    """Write the Hugging Face model in `src_dir` as a GGUF at `out_path` with matrices of type `target`."""
    if target not in TARGETS:
        raise DllamaError(f"unknown --type {target!r} (choose from {', '.join(TARGETS)})")
    folder = Path(src_dir)
    if not folder.is_dir():
        raise DllamaError(f"model folder not found: {folder}")
    h = load_hyper(folder)
    ck = Checkpoint(folder)
    plan = _plan(h, ck, folder)
    qtarget = TARGETS[target]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.partial")  # two converting processes never collide
    writer = GGUFWriter(str(tmp), h.arch)
    try:
        types = []
        for t in plan:
            qt = _out_type(t.name, t.shape, qtarget)
            types.append(qt)
            writer.add_tensor_info(t.name, *_info(t.shape, qt), raw_dtype=qt)
        _write_general(writer, folder)
        _write_hparams(writer, h)
        writer.add_file_type(FILE_TYPES[qtarget])
        writer.add_quantization_version(2)
        kind = write_vocab(writer, folder, h.arch, h.vocab)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, qt in tqdm(list(zip(plan, types, strict=True)), desc=f"converting to {target}", unit="tensor",
                          file=sys.stderr):
            # one f32 expert at a time: a merged expert tensor is held only in its (smaller) output type
            data = np.stack([_encode(part(), qt) for part in t.parts]) if t.parts else _encode(t.load(), qt)
            if data.shape != _info(t.shape, qt)[0]:  # a safety net: the plan checked every source shape
                raise DllamaError(f"tensor {t.name}: built shape {data.shape}, expected {t.shape}")
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"tensors": len(plan), "bytes": os.path.getsize(out_path), "arch": h.arch, "tokenizer": kind}


def _cache_root() -> Path:
    return Path(os.environ.get("DLLAMA_CACHE_DIR") or Path.home() / ".cache" / "dllama")


def hf_cache_path(src_dir: str | os.PathLike, target: str = "f16") -> Path:
    """Where `--model HF_DIR` keeps its one-time conversion: `<dir>/.dllama/model-<type>.gguf`, or under the
    dllama cache directory when the model folder is read-only."""
    folder = Path(src_dir).resolve()
    beside = folder / ".dllama"
    if os.access(folder, os.W_OK) or (beside.is_dir() and os.access(beside, os.W_OK)):
        return beside / f"model-{target}.gguf"
    import hashlib

    key = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    return _cache_root() / "hf" / f"{folder.name}-{key}" / f"model-{target}.gguf"


def _inputs(folder: Path) -> list[Path]:
    files = [folder / "config.json", *folder.glob("model*.safetensors"), folder / "model.safetensors.index.json"]
    files += [folder / n for n in _TOKENIZER_FILES]
    return [f for f in files if f.is_file()]


def ensure_gguf_from_hf(src_dir: str | os.PathLike, target: str = "f16") -> Path:
    """The GGUF of the Hugging Face folder `src_dir`, converted once and reused while newer than every input."""
    folder = Path(src_dir)
    if not (folder / "config.json").is_file():
        raise DllamaError(f"{folder}: no config.json (not a Hugging Face model folder)")
    out = hf_cache_path(folder, target)
    newest = max(f.stat().st_mtime for f in _inputs(folder))
    if out.is_file() and out.stat().st_mtime > newest:
        return out
    print(f"converting {folder} to {out} ({target}), once; later runs reuse it", file=sys.stderr)
    convert_hf(folder, out, target)
    return out
