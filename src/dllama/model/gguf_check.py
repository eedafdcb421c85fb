"""Load-time checks of a GGUF file beyond what the bounds-checked header walk (gguf_file.GGUFFile) does: tensors
that overlap one another (a lying type or shape inside the file), tokenizer metadata of the wrong type or with ids
outside the vocabulary (which the tokenizer would index with), and NaN / inf in small tensors (norms, biases,
rope factors) that would poison every token. Each problem is one DllamaError line."""

from __future__ import annotations

import numpy as np

from dllama.errors import DllamaError
from dllama.model.gguf_file import GGUFFile, LazyArray

_STRING = 8
_SPECIAL_IDS = ("bos", "eos", "eot", "eom", "unknown", "separator", "padding", "mask", "cls")


def check_layout(f: GGUFFile) -> None:
    """No two tensors share bytes (GGUFFile already checked each one ends inside the file)."""
    base = f.data.ctypes.data
    spans = sorted((t.data.ctypes.data - base, t.data.nbytes, t.name) for t in f.tensors)
    end, last = 0, None
    for start, n, name in spans:
        if start < end:
            raise DllamaError(f"corrupt GGUF file {f.path}: tensors '{last}' and '{name}' overlap (wrong type or "
                              "shape?)")  # fmt: skip
        end, last = start + n, name


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_tokenizer_metadata(f: GGUFFile) -> None:
    """The tokenizer keys a file has must have the types and ranges the tokenizer relies on. Long arrays stay
    lazy: their item type and count are checked without decoding them."""
    fields, path = f.fields, f.path

    def bad(key, what):
        raise DllamaError(f"model {path}: metadata '{key}' {what}")

    def array_of(key, kinds: tuple[int, ...], pytypes) -> int | None:
        """Length of array field `key` (None if absent) after checking its items' type."""
        v = fields.get(key)
        if v is None:
            return None
        if isinstance(v, LazyArray):
            if v.item_type not in kinds:
                bad(key, "has items of the wrong type")
            return v.count
        if not isinstance(v, list) or not all(isinstance(x, pytypes) and not isinstance(x, bool) for x in v):
            bad(key, "is not an array of the right type")
        return len(v)

    model = fields.get("tokenizer.ggml.model")
    n = array_of("tokenizer.ggml.tokens", (_STRING,), str)
    if model is None and n is None:
        return  # no tokenizer at all: the tokenizer says so if one is needed
    if not isinstance(model, str):
        bad("tokenizer.ggml.model", "is missing or not a string")
    if not n:
        bad("tokenizer.ggml.tokens", "is missing or empty")
    ints, floats = (0, 1, 2, 3, 4, 5, 10, 11), (6, 12)
    for key, kinds, py in (("tokenizer.ggml.token_type", ints, int), ("tokenizer.ggml.scores", floats, float)):
        m = array_of(key, kinds, py)
        if m is not None and m != n:
            bad(key, f"has {m} entries for {n} tokens")
    array_of("tokenizer.ggml.merges", (_STRING,), str)
    for name in _SPECIAL_IDS:
        key = f"tokenizer.ggml.{name}_token_id"
        v = fields.get(key)
        if v is not None and (not _is_int(v) or not 0 <= v < n):
            bad(key, f"= {v!r} is not a token id in [0, {n})")
    ids = fields.get("tokenizer.ggml.eos_token_ids")
    if ids is not None and (not isinstance(ids, list) or not all(_is_int(i) and 0 <= i < n for i in ids)):
        bad("tokenizer.ggml.eos_token_ids", f"holds values that are not token ids in [0, {n})")
    for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"):
        if key in fields and not isinstance(fields[key], bool):
            bad(key, "is not a boolean")
    if "tokenizer.chat_template" in fields and not isinstance(fields["tokenizer.chat_template"], str):
        bad("tokenizer.chat_template", "is not a string")


def check_small_tensors_finite(tensors: dict, max_elements: int = 1 << 16) -> None:
    """NaN / inf in a norm, bias or other small tensor would silently poison every token: cheap to check at load
    (the big matrices are not read here: that would touch the whole file)."""
    for name, t in tensors.items():
        if t.rows * t.cols > max_elements or t.type not in (0, 1):  # F32 / F16 vectors and small tables
            continue
        if not np.isfinite(t.to_float()).all():
            raise DllamaError(f"tensor '{name}' holds NaN or infinite values (corrupt model file?)")
