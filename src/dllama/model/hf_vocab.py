"""Tokenizer metadata of a Hugging Face model folder, written the way llama.cpp's convert_hf_to_gguf.py writes it.

Three vocabulary kinds, chosen in llama.cpp's order:
- `tokenizer.model` (SentencePiece protobuf): `tokenizer.ggml.model = "llama"` with the model's own scores and
  piece types (we parse the protobuf ourselves: the `sentencepiece` package is not a dependency);
- `tokenizer.json` holding a SentencePiece-style BPE (byte fallback) or Unigram (llama arch only): "llama" too;
- any other `tokenizer.json` BPE: byte-level "gpt2" with tokens, token types, merges and `tokenizer.ggml.pre`
  (the pre-tokenizer name llama.cpp picks from a hash of how a fixed text is tokenized).
Special token ids, add_bos/add_eos and the chat template come from `gguf.SpecialVocab` (gguf-py's own helper).
"""

from __future__ import annotations

import json
import re
import sys
from hashlib import sha256
from pathlib import Path

from gguf import GGUFWriter, SpecialVocab, TokenType

from dllama.errors import DllamaError

# llama.cpp hashes the token ids of this text to recognise a pre-tokenizer (convert_hf_to_gguf.py,
# get_vocab_base_pre); the string must stay byte-identical to theirs.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)

# The hashes of the vocabularies of the architectures we convert, copied from llama.cpp's table.
KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# A fine-tune or a hand-made tokenizer often tokenizes the check text differently (other vocab) while
# splitting words exactly like its family; recognise the family by its split regex instead.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _looks_special(token: str) -> bool:
    # llama.cpp's does_token_look_special: some models mark control tokens as not special
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DllamaError(f"cannot read {path}: {e}") from None


def _auto_tokenizer(folder: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad tokenizer folder
        raise DllamaError(f"cannot load the tokenizer in {folder}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# SentencePiece protobuf (tokenizer.model): ModelProto.pieces = field 1, each {1: piece, 2: score, 3: type}


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    import struct

    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 1:
            val, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            val, i = buf[i : i + n], i + n
        elif wire == 5:
            val = struct.unpack("<f", buf[i : i + 4])[0]
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, val


def read_sentencepiece_model(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece; type uses SentencePiece's numbering (1 normal ... 6 byte)."""
    try:
        buf = path.read_bytes()
        pieces = []
        for field, wire, val in _fields(buf):
            if field != 1 or wire != 2:
                continue
            piece, score, ptype = "", 0.0, 1
            for f, _w, v in _fields(val):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = float(v)
                elif f == 3:
                    ptype = int(v)
            pieces.append((piece, score, ptype))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DllamaError(f"cannot read SentencePiece model {path}: {e}") from None
    if not pieces:
        raise DllamaError(f"{path}: no pieces in this SentencePiece model")
    return pieces


def _sentencepiece_vocab(folder: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """llama.cpp's _create_vocab_sentencepiece: pieces, then added_tokens.json, then tokenizer_config's
    added_tokens_decoder, padded with [PADi] to the model's vocab_size."""
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i, (piece, score, ptype) in enumerate(read_sentencepiece_model(folder / "tokenizer.model")):
        if i >= vocab_size:
            _warn(f"tokenizer.model has more pieces than vocab_size {vocab_size}; ignoring from id {i}")
            break
        # llama.cpp keeps unknown/control/unused/byte and maps everything else (user-defined too) to normal
        tokens[i], scores[i] = piece.encode("utf-8"), score
        types[i] = ptype if ptype in (2, 3, 5, 6) else int(TokenType.NORMAL)
    added_file = folder / "added_tokens.json"
    if added_file.is_file():
        for text, tid in _load_json(added_file).items():
            if tid < vocab_size:
                tokens[tid], scores[tid], types[tid] = text.encode("utf-8"), -1000.0, int(TokenType.USER_DEFINED)
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        for tid_s, data in _load_json(config_file).get("added_tokens_decoder", {}).items():
            tid, text = int(tid_s), data["content"]
            if tid >= vocab_size:
                continue
            if data.get("special") or _looks_special(text):
                types[tid] = int(TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")  # llama.cpp pre-normalizes user-defined spaces
                types[tid] = int(TokenType.USER_DEFINED)
            tokens[tid], scores[tid] = text.encode("utf-8"), -1000.0
    return tokens, scores, types


# ---------------------------------------------------------------------------------------------------------
# tokenizer.json holding a SentencePiece-style vocabulary (byte fallback BPE, or Unigram)


def _is_spm_json(tok_json: dict) -> bool:
    model = tok_json.get("model", {})
    if model.get("type") == "Unigram":
        return bool(model.get("byte_fallback"))
    # llama.cpp's LlamaHfVocab test: BPE with byte fallback and a Sequence decoder (Llama 3 has neither)
    return (
        model.get("type") == "BPE"
        and bool(model.get("byte_fallback"))
        and (tok_json.get("decoder") or {}).get("type") == "Sequence"
    )


def _hf_spm_vocab(folder: Path, tok_json: dict, vocab_size: int):
    """llama.cpp's LlamaHfVocab (base vocabulary in id order, then added tokens), plus real scores: llama.cpp
    writes -1000 for every BPE piece, which leaves its SentencePiece tokenizer no merge order; we score each
    piece by the rank of the merge that makes it (earlier merge = higher score), as SentencePiece itself does.
    Unigram pieces keep their own log-probabilities."""
    tok = _auto_tokenizer(folder)
    vocab = tok.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    base = tok.vocab_size
    special_ids = set(tok.all_special_ids)
    model = tok_json["model"]
    if model["type"] == "Unigram":
        piece_score = {p: float(s) for p, s in model["vocab"]}
    else:
        piece_score = {}
        for rank, merge in enumerate(model.get("merges", [])):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            piece_score.setdefault(left + right, -float(rank))
    added = sorted((i, t) for t, i in tok.get_added_vocab().items() if i >= base)
    tokens, scores, types = [], [], []
    for i in range(base):
        text = reverse[i]
        tokens.append(text.encode("utf-8"))
        scores.append(piece_score.get(text, -1e9 if len(text) > 1 else 0.0))
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(int(TokenType.BYTE))
        else:
            types.append(int(TokenType.CONTROL) if i in special_ids else int(TokenType.NORMAL))
    for i, text in added:
        if i != len(tokens):
            raise DllamaError(f"{folder}: added token {text!r} has id {i}, expected {len(tokens)}")
        tokens.append(text.encode("utf-8"))
        scores.append(-1000.0)
        types.append(int(TokenType.CONTROL) if i in special_ids else int(TokenType.USER_DEFINED))
    if len(tokens) > vocab_size:
        raise DllamaError(f"{folder}: the tokenizer has {len(tokens)} tokens, more than vocab_size {vocab_size}")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    return tokens, scores, types


# ---------------------------------------------------------------------------------------------------------
# byte-level BPE ("gpt2")


def pre_tokenizer_name(tok, tok_json: dict) -> str:
    """llama.cpp's tokenizer.ggml.pre: from the hash table, else from the split regex, else "default"."""
    chkhsh = sha256(str(tok.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh in KNOWN_PRE:
        return KNOWN_PRE[chkhsh]
    pre = tok_json.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split":
            regex = (p.get("pattern") or {}).get("Regex")
            if regex in _SPLIT_PRE:
                return _SPLIT_PRE[regex]
    _warn(f"unrecognised BPE pre-tokenizer (hash {chkhsh[:16]}...); writing tokenizer.ggml.pre = 'default'")
    return "default"


def _gpt2_vocab(folder: Path, tok_json: dict, vocab_size: int) -> tuple[list[str], list[int], str]:
    """llama.cpp's get_vocab_base: every id below vocab_size, holes as [PADi]; added tokens are control when
    special (or looking special), else user-defined with their normal form."""
    tok = _auto_tokenizer(folder)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise DllamaError(
            f"{folder}: the tokenizer has token id {max(vocab.values())}, beyond config.json vocab_size {vocab_size}"
        )
    pre = pre_tokenizer_name(tok, tok_json)
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        text = reverse[i]
        if text in added:
            if not decoder[i].normalized:
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            if decoder[i].special or _looks_special(text):
                types.append(int(TokenType.CONTROL))
            else:
                text = text.replace("\u2581", " ")
                types.append(int(TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(text)
    return tokens, types, pre


def write_vocab(writer: GGUFWriter, folder: Path, arch: str, vocab_size: int) -> str:
    """Add the tokenizer metadata; returns the tokenizer kind written ("llama" or "gpt2")."""
    tok_json_path = folder / "tokenizer.json"
    tok_json = _load_json(tok_json_path) if tok_json_path.is_file() else None
    if arch == "llama":
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file() and (aps := _load_json(cfg_path).get("add_prefix_space")) is not None:
            writer.add_add_space_prefix(aps)
    if (folder / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece_vocab(folder, vocab_size)
        kind = "llama"
    elif tok_json is None:
        raise DllamaError(f"{folder}: no tokenizer.json or tokenizer.model")
    elif arch == "llama" and _is_spm_json(tok_json):
        tokens, scores, types = _hf_spm_vocab(folder, tok_json, vocab_size)
        kind = "llama"
    elif (tok_json.get("model") or {}).get("type") == "BPE":
        tokens, types, pre = _gpt2_vocab(folder, tok_json, vocab_size)
        kind = "gpt2"
    else:
        raise DllamaError(f"{folder}: unsupported tokenizer type {tok_json.get('model', {}).get('type')!r}")
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre if kind == "gpt2" else "default")
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    with_merges = kind == "gpt2"  # a "llama" vocabulary carries its merge order in the scores
    special = SpecialVocab(folder, load_merges=with_merges, n_vocab=len(tokens))
    if kind == "gpt2" and not special.merges:
        raise DllamaError(f"{folder}: the BPE tokenizer has no merges")
    if arch == "llama" and vocab_size == 49152:
        special.add_special_token["bos"] = False  # llama.cpp: granite/SmolLM-size llama vocabularies add no BOS
    special.add_to_gguf(writer, quiet=True)
    return kind
