"""Tokenizer rebuilt from a GGUF file's metadata.

A GGUF carries no `tokenizer.json`, only llama.cpp's vocabulary keys. transformers knows how to turn
those into a fast `tokenizers.Tokenizer`, but its converter ignores `tokenizer.ggml.pre`, the name of the
pre-tokenizer (how text is cut into words before BPE): SmolLM2's "smollm" splits every digit apart, for
one. So for byte-level BPE vocabularies we replace the converted pre-tokenizer with llama.cpp's regexes
for that name, and llama.cpp is the reference for the ids. Importing transformers and converting costs
seconds, so the converted tokenizer and the few facts we need are cached as one JSON file; a cache hit
only touches `tokenizers`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from dllama.errors import DllamaError

__all__ = ["Tokenizer", "StreamDecoder", "cache_path"]

_FORMAT_VERSION = 3  # bump whenever the conversion or the cached facts change
_CONTROL = 3  # llama.cpp token_type for control tokens
_STOP_NAMES = frozenset(
    {"<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<end_of_turn>", "<|eom_id|>"}
)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# llama.cpp's BPE pre-tokenizers (src/llama-vocab.cpp, llm_tokenizer_bpe), as regex lists applied in turn:
# each regex cuts every piece left by the previous ones into its matches and the text between them, which
# is what `tokenizers`' Split(behavior="isolated") does. The regexes are llama.cpp's own spelling (its
# rewrites of (?i:...) and of \p{Lu}-style classes included), so Oniguruma matches what llama.cpp matches.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_RE = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_LLM = [
    "[\r\n]",
    # (escaped: code points that editors normalize to NFC)
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
]
_PRE_TYPES: list[tuple[tuple[str, ...], list[str], bool]] = [  # (names, regexes, ignore_merges)
    (("default",), [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"], False),
    (
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        [_LLAMA3_RE],
        True,
    ),
    (("dbrx", "smaug-bpe", "chatglm-bpe"), [_LLAMA3_RE], False),
    (("glm4",), [_LLAMA3_RE], True),
    (("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"), [_QWEN2_RE], False),
    (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        [r"\p{N}", _GPT2_RE],
        False,
    ),
    (
        (
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "mpt",
            "olmo",
            "jais",
            "exaone4",
            "roberta-bpe",
            "jina-v1-en",
            "jina-v2-code",
            "trillion",
            "granite-docling",
            "mellum",
        ),
        [_GPT2_RE],
        False,
    ),
    (("tekken",), [_TEKKEN_RE], True),
    (("deepseek-llm",), _DEEPSEEK_LLM, False),
]
_PRE_BY_NAME = {name: (regexes, ignore) for names, regexes, ignore in _PRE_TYPES for name in names}


def llamacpp_pre_tokenizer(pre: str | None) -> tuple[dict, bool] | None:
    """(`tokenizers` pre-tokenizer JSON, ignore_merges) for a byte-level BPE vocabulary whose
    `tokenizer.ggml.pre` is `pre`, as llama.cpp pre-tokenizes it; None for a name we do not know."""
    found = _PRE_BY_NAME.get(pre or "default")  # llama.cpp uses "default" when the key is missing
    if found is None:
        return None
    regexes, ignore_merges = found
    steps = [
        {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in regexes
    ]
    steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False})
    return {"type": "Sequence", "pretokenizers": steps}, ignore_merges


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible mapping: byte-level BPE spells every byte as a printable character."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def cache_path(path: str | os.PathLike) -> Path:
    """Where the converted tokenizer of the GGUF at `path` is cached (the file may not exist yet)."""
    st = os.stat(path)
    key = f"{st.st_size}:{st.st_mtime_ns}:{os.path.abspath(path)}:{_FORMAT_VERSION}"
    root = os.environ.get("DLLAMA_CACHE_DIR") or Path.home() / ".cache" / "dllama"
    return Path(root) / "tokenizers" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def _read_facts(reader: Any) -> dict:
    """The special-token facts the engine needs, straight from the GGUF metadata."""

    def get(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    model, tokens = get("tokenizer.ggml.model"), get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise ValueError("GGUF file has no tokenizer metadata (tokenizer.ggml.model / tokens)")
    types = get("tokenizer.ggml.token_type") or []
    n = len(tokens)

    def token_id(key):
        v = get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < n else None

    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    stops = {i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None}
    stops.update(i for i, t in enumerate(tokens) if t in _STOP_NAMES)
    stops.update(int(i) for i in get("tokenizer.ggml.eos_token_ids") or [] if 0 <= int(i) < n)  # every end id
    add_bos = get("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp adds BOS to a sentencepiece vocab that does not say otherwise
        add_bos = model == "llama"
    if model == "gemma4":  # mirror transformers: its chat template writes <bos> itself
        add_bos = False
    return {
        "model": model,
        "pre": get("tokenizer.ggml.pre"),
        "vocab_size": n,
        "bos_id": bos,
        "eos_id": eos,
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "add_bos": bool(add_bos),
        "stop_ids": sorted(stops),
        "special_ids": [i for i, t in enumerate(types) if t == _CONTROL],
        "chat_template": get("tokenizer.chat_template"),
    }


def _gguf_tokenizer(reader: Any) -> tuple[str, dict, dict]:
    """What transformers' get_gguf_tokenizer returns, read with gguf-py: transformers' own GGUF reader imports
    torch, which is not a dependency of ours (a CPU-only user should not need it to tokenize)."""
    from transformers.integrations.gguf import gguf_tokenizer_mapping as gm

    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    grouped = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in gm.GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    for name, key in gm._SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return reader.fields["general.architecture"].contents(), tokenizer, config


def _convert(
    path: str, vocab_size: int, reader: Any = None, pre_tokenizer: tuple[dict, bool] | None = None
) -> str:
    """`tokenizer.json` text of the fast tokenizer transformers builds for this GGUF, with `pre_tokenizer`
    (from `llamacpp_pre_tokenizer`) in place of transformers' one if given."""
    try:
        from transformers.integrations.gguf import (
            convert_gguf_tokenizer,
            gguf_tokenizer_mapping,  # noqa: F401  (layout check)
        )
    except ImportError:  # older transformers layout: go through the public (slower) entry point
        from transformers import AutoTokenizer

        p = Path(path)
        backend = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name).backend_tokenizer
    else:
        # The same two calls AutoTokenizer(gguf_file=...) makes, without building a model config (which
        # fails for architectures transformers cannot load) and about 10x faster.
        if reader is None:
            from gguf import GGUFReader

            reader = GGUFReader(path, "r")
        architecture, tok_dict, tok_config = _gguf_tokenizer(reader)
        backend, _ = convert_gguf_tokenizer(architecture, tok_dict)
        # AutoTokenizer then registers the file's bos/eos/unk/pad as special added tokens even when the
        # file does not mark them as control; do the same so such a token written in text stays whole.
        have = {t.content for t in backend.get_added_tokens_decoder().values()}
        extra = []
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = tok_config.get(name)
            if token and token not in have:
                have.add(token)
                extra.append(AddedToken(token, normalized=False, special=True))
        if extra:
            backend.add_special_tokens(extra)
    # transformers' tokenizer classes register their default specials ("<s>", "<|endoftext|>", ...) even
    # when the file's vocab lacks them, giving ids past the embedding table; such text must stay text.
    data = json.loads(backend.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab_size]
    if pre_tokenizer is not None and data["model"].get("type") == "BPE":
        data["pre_tokenizer"], data["model"]["ignore_merges"] = pre_tokenizer
    return json.dumps(data, ensure_ascii=False)


def _write_atomic(path: Path, text: str) -> None:
    # Several processes (workers on one host) may convert the same file at once: never expose a partial file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class Tokenizer:
    """Encode/decode for a GGUF model, matching transformers' `AutoTokenizer(gguf_file=...)` ids."""

    def __init__(self, backend: _Backend, facts: dict):
        self._backend = backend
        self._model: str = facts["model"]
        self.vocab_size: int = facts["vocab_size"]
        self.bos_id: int | None = facts["bos_id"]
        self.eos_id: int | None = facts["eos_id"]
        self.bos_token: str | None = facts["bos_token"]
        self.eos_token: str | None = facts["eos_token"]
        self.add_bos: bool = facts["add_bos"]
        self.stop_ids: frozenset[int] = frozenset(facts["stop_ids"])
        self.special_ids: frozenset[int] = frozenset(facts["special_ids"])
        self.chat_template: str | None = facts["chat_template"]
        self._added_ids: frozenset[int] | None = None
        self._byte_dec: dict[str, int] | None = None
        self._plain_backends: tuple[_Backend, _Backend] | None = None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, *, reader: Any = None) -> Tokenizer:
        """Load from a GGUF file; `reader` may be an already-open `gguf.GGUFReader` of it (saves ~2 s cold)."""
        path = os.fspath(path)
        cache = cache_path(path)
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
            if data["version"] == _FORMAT_VERSION:
                return cls(_Backend.from_str(data["tokenizer"]), data["facts"])
        except Exception:  # missing or unreadable cache entry: rebuild it
            pass
        if reader is None:
            import gguf

            reader = gguf.GGUFReader(path)
        try:
            facts = _read_facts(reader)
            pre = None
            if facts["model"] == "gpt2":  # byte-level BPE: the only kind with a llama.cpp pre-tokenizer regex
                pre = llamacpp_pre_tokenizer(facts["pre"])
            tokenizer_json = _convert(path, facts["vocab_size"], reader, pre)
        except (ValueError, KeyError, TypeError, IndexError) as e:  # metadata transformers cannot convert
            raise DllamaError(f"cannot build the tokenizer of {os.path.basename(path)}: {e}") from None
        try:
            _write_atomic(
                cache, json.dumps({"version": _FORMAT_VERSION, "facts": facts, "tokenizer": tokenizer_json})
            )
        except OSError:  # a read-only cache only costs speed
            pass
        return cls(_Backend.from_str(tokenizer_json), facts)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in it are parsed. BOS is added once if asked."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with special tokens written in it kept as ordinary text (llama.cpp's
        `tokenize(special=False)`): for untrusted text such as a chat message. No BOS."""
        return self._plain(True).encode(text, add_special_tokens=False).ids

    def _plain(self, first: bool) -> _Backend:
        """A copy of the backend without its special added tokens (user-defined ones stay: llama.cpp parses
        those even with special=False); `tokenizers` has no per-call switch to skip added-token matching.
        `first=False` gives the variant for text that does not start the input: a sentencepiece Metaspace
        with prepend_scheme "first" adds its "▁" only there."""
        if self._plain_backends is None:
            data = json.loads(self._backend.to_str())
            data["added_tokens"] = [t for t in data["added_tokens"] if not t["special"]]
            first_json = json.dumps(data)

            def never(node):
                if isinstance(node, dict):
                    if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                        node["prepend_scheme"] = "never"
                    for v in node.values():
                        never(v)
                elif isinstance(node, list):
                    for v in node:
                        never(v)

            never(data["pre_tokenizer"])
            later_json = json.dumps(data)
            first_b = _Backend.from_str(first_json)
            self._plain_backends = (
                first_b,
                first_b if later_json == first_json else _Backend.from_str(later_json),
            )
        return self._plain_backends[0 if first else 1]

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """Token ids of the rendered conversation where only the template's own text can produce special
        tokens: `<|im_end|>` typed in a message stays text, so a user cannot forge turns.

        The template is rendered with each message's text replaced by a random sentinel, which locates the
        message text in the real rendering. Special tokens are matched in the template's text only; each run
        of text between them (template text and message text together, as a plain encode would see it) is
        encoded without special-token parsing. So a conversation without special-token text in its messages
        gets exactly the ids of `encode(apply_chat_template(...))`. BOS as in `encode`.
        """
        from .chat_template import _plain as plain_data

        msgs = plain_data(list(messages))
        tag = secrets.token_hex(16)
        contents: list[str] = []

        def sentinel(text: str) -> str:
            contents.append(text)
            return f"\ue000{tag}:{len(contents) - 1}\ue001"

        for m in msgs:
            if not isinstance(m, dict):
                continue
            c = m.get("content")
            if isinstance(c, str):
                m["content"] = sentinel(c)
            elif isinstance(c, list):  # OpenAI-style content parts
                for part in c:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        part["text"] = sentinel(part["text"])
        marked = self.apply_chat_template(msgs, add_generation_prompt, **extra)
        # pieces alternate: template text, message index, template text, ...
        pieces = re.split(f"\ue000{tag}:(\\d+)\ue001", marked)
        scaffold, which = pieces[0::2], [int(i) for i in pieces[1::2]]
        if any(tag in p.lower() for p in scaffold):  # e.g. `| upper` on the content: we cannot find it
            raise ValueError("chat template alters message text beyond recognition; cannot encode it safely")
        # Templates may transform the text (e.g. `| trim`): use the form the real rendering contains.
        real = self.apply_chat_template(messages, add_generation_prompt, **extra)
        for fix in (lambda t: t, str.strip):
            texts = [fix(contents[i]) for i in which]
            if "".join(x for pair in zip(scaffold, texts + [""], strict=True) for x in pair) == real:
                break
        else:  # an unusual transformation: keep the message text as given (still safe)
            texts = [contents[i] for i in which]

        special = self._special_added_ids()
        ids: list[int] = []
        run: list[str] = []  # text since the last special token

        def flush() -> None:
            text = "".join(run)
            if text:
                ids.extend(self._plain(not ids).encode(text, add_special_tokens=False).ids)
            run.clear()

        for k, piece in enumerate(scaffold):
            if piece:
                enc = self._backend.encode(piece, add_special_tokens=False)
                pos = 0
                for tid, (start, end) in zip(enc.ids, enc.offsets, strict=True):
                    if tid in special:
                        run.append(piece[pos:start])
                        flush()
                        ids.append(tid)
                        pos = end
                run.append(piece[pos:])
            if k < len(texts):
                run.append(texts[k])
        flush()
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def _special_added_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special)

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token contributes to the output (may be part of a UTF-8 character)."""
        tok = self._backend.id_to_token(token_id)
        if tok is None:
            raise ValueError(f"token id {token_id} out of range")
        if self._added_ids is None:
            self._added_ids = frozenset(self._backend.get_added_tokens_decoder())
        if token_id in self._added_ids:  # special/user tokens are stored as plain text
            return tok.encode()
        if self._model == "gpt2":
            if self._byte_dec is None:
                self._byte_dec = _byte_decoder()
            return bytes(self._byte_dec[c] for c in tok)
        m = _BYTE_TOKEN.fullmatch(tok)
        return bytes([int(m.group(1), 16)]) if m else tok.replace("\u2581", " ").encode()

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        from .chat_template import render_chat

        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **extra,
        )


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns only newly completed text.

    Decodes a short window of recent ids rather than the whole history. The window starts at the
    tokens emitted in the previous step so that context-dependent decoders (sentencepiece's leading-space
    strip, byte fallback) see the same neighbours as a full decode. Text ending in U+FFFD is an
    incomplete UTF-8 character and is held back until more bytes arrive (or `flush`).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._backend = tokenizer._backend
        self._skip = skip_special
        self._ids: list[int] = []  # ids[:read] were emitted in the previous step: context only
        self._read = 0

    def _pending(self) -> tuple[str, str]:
        """(decoded context, decoded context + pending ids)."""
        context = self._backend.decode(self._ids[: self._read], skip_special_tokens=self._skip)
        return context, self._backend.decode(self._ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        before, text = self._pending()
        # No growth means the token decoded to nothing (e.g. a skipped special): keep the old context,
        # otherwise a following sentencepiece "▁word" would lose its space to the decoder's strip.
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._read :]  # what was just emitted becomes the next context
        self._read = len(self._ids)
        return text[len(before) :]

    def flush(self) -> str:
        """Emit whatever is held back (possibly with U+FFFD) and start over."""
        before, text = self._pending()
        self._ids, self._read = [], 0
        return text[len(before) :] if len(text) > len(before) else ""
