"""Read the original Distributed Llama's tokenizer file (`.t`) and rebuild GGUF tokenizer metadata from it.

The `.t` file keeps only raw token bytes, one float score per token, bos/eos ids, add_bos and the chat template.
Byte-level BPE vocabularies (Llama 3, Qwen, SmolLM...) are stored with score = -id: their merges are rebuilt
the standard way (as transformers' TikTokenConverter and llama.cpp's tiktoken path do): a token's merge is the
last step of running BPE on its bytes with only lower-ranked tokens allowed; tokens that BPE cannot reach and
look like `<...>` were added tokens (specials). SentencePiece vocabularies keep their real scores.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field

import gguf
import numpy as np

from dllama.errors import DllamaError
from dllama.tokenizer.tokenizer import bytes_to_unicode

TOKENIZER_MAGIC = 0x567124
OLD_TOKENIZER_MAGIC = 0x567123
# header keys (the original's tokenizer.hpp)
_VERSION, _VOCAB_SIZE, _MAX_TOKEN_LENGTH, _BOS_ID = 0, 1, 2, 3
_EOS_ID, _PAD_ID, _CHAT_EOS_ID, _CHAT_TEMPLATE, _CHAT_STOP, _N_EOS, _ADD_BOS = 4, 5, 6, 7, 8, 9, 10

# Added tokens a Hugging Face tokenizer marks as not special: llama.cpp writes them as USER_DEFINED.
_NOT_SPECIAL = {"<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"}
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


@dataclass
class OriginalTokenizer:
    tokens: list[bytes]
    scores: list[float]
    bos_id: int | None
    eos_ids: list[int]
    add_bos: bool
    chat_template: str | None
    max_token_length: int = 0
    path: str = ""
    header: dict[int, int] = field(default_factory=dict)

    @property
    def byte_level(self) -> bool:
        """Byte-level BPE files store score = -id for every token (the original's HF converter)."""
        s = np.asarray(self.scores, dtype=np.float64)
        return bool(np.array_equal(s, -np.arange(len(s), dtype=np.float64)))


def _err(path: str, msg: str) -> DllamaError:
    return DllamaError(f"tokenizer file {path}: {msg}")


def read_tokenizer(path: str | os.PathLike) -> OriginalTokenizer:
    """Parse a `.t` file; every malformed input raises one clear DllamaError."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DllamaError(f"cannot read tokenizer file {path}: {e.strerror}") from None
    if len(data) < 8:
        raise _err(path, f"truncated ({len(data)} bytes): not a Distributed Llama tokenizer")
    magic, header_size = struct.unpack_from("<ii", data, 0)
    if magic == OLD_TOKENIZER_MAGIC:
        raise _err(path, "old tokenizer format (magic 0x567123): regenerate it with the original's "
                         "converter/convert-tokenizer-hf.py")  # fmt: skip
    if magic != TOKENIZER_MAGIC:
        raise _err(path, f"not a Distributed Llama tokenizer (magic 0x{magic & 0xFFFFFFFF:X}, "
                         f"expected 0x{TOKENIZER_MAGIC:X})")  # fmt: skip
    if header_size < 8 or (header_size - 8) % 8:
        raise _err(path, f"bad header size {header_size}")
    if len(data) < header_size:
        raise _err(path, f"truncated in its header ({len(data)} of {header_size} bytes)")
    pairs = struct.unpack_from(f"<{(header_size - 8) // 4}i", data, 8)
    header = dict(zip(pairs[0::2], pairs[1::2], strict=True))
    pos = header_size
    version, vocab_size, bos_id = -1, 0, None
    eos_ids: list[int] = []
    template_len, n_eos, add_bos, max_len = 0, 0, True, 0
    for key, value in zip(pairs[0::2], pairs[1::2], strict=True):
        if key == _VERSION:
            version = value
        elif key == _VOCAB_SIZE:
            vocab_size = value
        elif key == _MAX_TOKEN_LENGTH:
            max_len = value
        elif key == _BOS_ID:
            bos_id = value
        elif key in (_EOS_ID, _CHAT_EOS_ID):  # legacy single eos ids
            eos_ids.append(value)
        elif key == _CHAT_TEMPLATE:
            template_len = value
        elif key == _CHAT_STOP:  # legacy stop string: its bytes follow the header, skipped like the original
            pos += value
        elif key == _PAD_ID:
            pass
        elif key == _N_EOS:
            n_eos = value
        elif key == _ADD_BOS:
            add_bos = value == 1
        else:
            raise _err(path, f"unknown header key {key}")
    if version != 1:
        raise _err(path, f"tokenizer version {version} is not supported (expected 1): regenerate it")
    if vocab_size <= 0:
        raise _err(path, f"bad vocabulary size {vocab_size}")

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise _err(path, f"truncated while reading {what} (offset {pos}, file has {len(data)} bytes)")
        out = data[pos : pos + n]
        pos += n
        return out

    template = None
    if template_len > 0:
        raw = take(template_len, "the chat template")
        try:
            template = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _err(path, "the chat template is not valid UTF-8") from None
    eos_ids += list(struct.unpack(f"<{n_eos}i", take(4 * n_eos, "the eos token ids"))) if n_eos > 0 else []
    tokens: list[bytes] = []
    scores: list[float] = []
    for i in range(vocab_size):
        score, length = struct.unpack("<fI", take(8, f"token {i}"))
        tokens.append(take(length, f"token {i}"))
        scores.append(score)
    if pos != len(data):
        raise _err(path, f"{len(data) - pos} unexpected bytes after the {vocab_size} tokens")
    for name, tid in [("bos", bos_id), *(("eos", e) for e in eos_ids)]:
        if tid is not None and not 0 <= tid < vocab_size:
            raise _err(path, f"{name} id {tid} is outside the vocabulary ({vocab_size} tokens)")
    return OriginalTokenizer(tokens, scores, bos_id, eos_ids, add_bos, template, max_len, path, header)


# ---------------------------------------------------------------------------------------------------------
# GGUF metadata


def _bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """BPE on `token`'s bytes using only merges whose result ranks below max_rank (lowest rank first)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def _looks_special(text: str) -> bool:
    return len(text) > 2 and text[0] == "<" and text[-1] == ">" and not any(c.isspace() for c in text)


def _pre_tokenizer(tokens: list[bytes]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` (the regex that cuts text into words before BPE) for the vocabulary
    families the original supports; the `.t` file does not record it, so recognise the family by its specials.
    llama.cpp identifies it by hashing a tokenizer's output, which needs the Hugging Face files we do not have."""
    have = set(tokens)
    if b"<|begin_of_text|>" in have and b"<|start_header_id|>" in have:
        return "llama-bpe"  # Llama 3.x, DeepSeek-R1-Distill-Llama
    if b"<|im_start|>" in have and b"<|endoftext|>" in have and len(tokens) >= 151643:
        return "qwen2"  # Qwen2/2.5/3
    if tokens[:1] == [b"<|endoftext|>"] and b"<repo_name>" in have and len(tokens) == 49152:
        return "smollm"  # SmolLM / SmolLM2 (digits split one by one)
    return "default"


def _spm_pieces(tokens: list[bytes]) -> bool:
    """SentencePiece vocabularies that went through the original's byte-level path (LlamaTokenizerFast:
    Llama 2, TinyLlama, Mistral) still hold `<0x00>`..`<0xFF>` pieces as text and '▁' for spaces."""
    have = set(tokens)
    return all(f"<0x{b:02X}>".encode() in have for b in range(256))


def _byte_level_meta(tok: OriginalTokenizer) -> dict:
    b2u = bytes_to_unicode()
    ranks: dict[bytes, int] = {}
    for i, t in enumerate(tok.tokens):
        ranks.setdefault(t, i)
    special_ids = {i for i in [tok.bos_id, *tok.eos_ids] if i is not None}
    names, types, merges = [], [], []
    for i, t in enumerate(tok.tokens):
        spelled = "".join(b2u[b] for b in t)
        ttype = gguf.TokenType.NORMAL
        if len(t) > 1:
            parts = _bpe_parts(t, ranks, i) if ranks[t] == i else []
            if len(parts) == 2:
                merges.append("".join(b2u[b] for b in parts[0]) + " " + "".join(b2u[b] for b in parts[1]))
            else:
                # BPE cannot produce it: an added token (kept whole in text) or an unused normal one
                try:
                    text = t.decode("utf-8")
                except UnicodeDecodeError:
                    text = None
                if text is not None and (_looks_special(text) or i in special_ids):
                    spelled = text  # added tokens are spelled as plain text in GGUF, like llama.cpp does
                    ttype = gguf.TokenType.USER_DEFINED if text in _NOT_SPECIAL else gguf.TokenType.CONTROL
        if i in special_ids and ttype == gguf.TokenType.NORMAL:
            ttype = gguf.TokenType.CONTROL
        names.append(spelled)
        types.append(int(ttype))
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer(tok.tokens),
        "tokenizer.ggml.tokens": names,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }


def _sentencepiece_meta(tok: OriginalTokenizer) -> dict:
    # The HF converter turned `<0xNN>` pieces into single raw bytes, the older llama2 one kept the text:
    # find the run of 256 single-byte tokens 0x00..0xFF, if any.
    byte_start = None
    for i in range(len(tok.tokens) - 255):
        if tok.tokens[i] == b"\x00" and all(tok.tokens[i + b] == bytes([b]) for b in range(256)):
            byte_start = i
            break
    special_ids = {i for i in [tok.bos_id, *tok.eos_ids] if i is not None}
    names, types = [], []
    unk_id = None
    for i, t in enumerate(tok.tokens):
        if byte_start is not None and byte_start <= i < byte_start + 256:
            names.append(f"<0x{i - byte_start:02X}>")
            types.append(int(gguf.TokenType.BYTE))
            continue
        m = _BYTE_PIECE.fullmatch(t)
        if m:
            names.append(f"<0x{m.group(1).decode().upper()}>")
            types.append(int(gguf.TokenType.BYTE))
            continue
        text = t.decode("utf-8", errors="replace")
        names.append(text.replace(" ", "\u2581"))  # the original turned '▁' into spaces
        if text == "<unk>":
            unk_id = i
            types.append(int(gguf.TokenType.UNKNOWN))
        elif i in special_ids or (tok.scores[i] == 0.0 and _looks_special(text)):
            types.append(int(gguf.TokenType.CONTROL))
        else:
            types.append(int(gguf.TokenType.NORMAL))
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": names,
        "tokenizer.ggml.scores": [float(s) for s in tok.scores],
        "tokenizer.ggml.token_type": types,
    }
    if unk_id is not None:
        meta["tokenizer.ggml.unknown_token_id"] = unk_id
    return meta


def gguf_tokenizer_metadata(tok: OriginalTokenizer, vocab_size: int | None = None) -> dict:
    """GGUF `tokenizer.*` keys (llama.cpp names) for this vocabulary.

    All eos ids are kept: the first is `tokenizer.ggml.eos_token_id`; when there are more, the second is also
    `tokenizer.ggml.eot_token_id` (llama.cpp's end-of-turn, e.g. Llama 3's <|eot_id|>) and the whole list is
    `tokenizer.ggml.eos_token_ids` (an array; llama.cpp ignores unknown keys).
    """
    byte_level = tok.byte_level and not _spm_pieces(tok.tokens)
    meta = _byte_level_meta(tok) if byte_level else _sentencepiece_meta(tok)
    n = len(tok.tokens)
    if vocab_size is not None and vocab_size > n:  # llama.cpp pads the vocabulary to the embedding rows
        meta["tokenizer.ggml.tokens"] += [f"[PAD{i}]" for i in range(n, vocab_size)]
        meta["tokenizer.ggml.token_type"] += [int(gguf.TokenType.UNUSED)] * (vocab_size - n)
        if "tokenizer.ggml.scores" in meta:
            meta["tokenizer.ggml.scores"] += [-1000.0] * (vocab_size - n)
    if tok.bos_id is not None and tok.bos_id >= 0:
        meta["tokenizer.ggml.bos_token_id"] = tok.bos_id
    if tok.eos_ids:
        meta["tokenizer.ggml.eos_token_id"] = tok.eos_ids[0]
        if len(tok.eos_ids) > 1:
            meta["tokenizer.ggml.eot_token_id"] = tok.eos_ids[1]
            meta["tokenizer.ggml.eos_token_ids"] = list(tok.eos_ids)
    meta["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = False
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def add_tokenizer_metadata(
    writer: gguf.GGUFWriter, tok: OriginalTokenizer, vocab_size: int | None = None
) -> None:
    """Write the tokenizer keys with gguf's typed helpers (so arrays get the element types llama.cpp wants)."""
    meta = gguf_tokenizer_metadata(tok, vocab_size)
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in meta:
        writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.scores" in meta:
        writer.add_token_scores(meta["tokenizer.ggml.scores"])
    if "tokenizer.ggml.merges" in meta:
        writer.add_token_merges(meta["tokenizer.ggml.merges"])
    if "tokenizer.ggml.bos_token_id" in meta:
        writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    if "tokenizer.ggml.eos_token_id" in meta:
        writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    if "tokenizer.ggml.eot_token_id" in meta:
        writer.add_eot_token_id(meta["tokenizer.ggml.eot_token_id"])
        writer.add_array("tokenizer.ggml.eos_token_ids", meta["tokenizer.ggml.eos_token_ids"])
    if "tokenizer.ggml.unknown_token_id" in meta:
        writer.add_unk_token_id(meta["tokenizer.ggml.unknown_token_id"])
    writer.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    writer.add_add_eos_token(False)
    if "tokenizer.chat_template" in meta:
        writer.add_chat_template(meta["tokenizer.chat_template"])
