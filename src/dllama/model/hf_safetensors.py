"""Memory-mapped reading of a Hugging Face safetensors checkpoint (single file or sharded), one tensor at a time.

We read the format ourselves rather than through `safetensors.safe_open(framework="numpy")` because NumPy has
no bfloat16 (most checkpoints are bf16) and we want no torch: the header is 8 bytes of length plus JSON, the
data is raw little-endian arrays, so `np.memmap` gives a zero-copy view that we widen to float32 per tensor.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllama.errors import DllamaError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 by shifting into the high half
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(path: Path) -> list[TensorRef]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise DllamaError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise DllamaError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise DllamaError(f"cannot read safetensors file {path}: {e}") from None
    size = os.path.getsize(path)
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise DllamaError(f"{path}: malformed header entry for tensor {name!r}") from None
        if dtype not in _DTYPES:
            raise DllamaError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if b - a != nbytes or 8 + n + b > size:
            raise DllamaError(f"{path}: tensor {name!r} data range does not match its shape {list(shape)}")
        refs.append(TensorRef(name, path, dtype, shape, 8 + n + a, 8 + n + b))
    return refs


class Checkpoint:
    """All tensors of a model folder: `model.safetensors`, or the shards listed in `model.safetensors.index.json`."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DllamaError(f"cannot read {index}: {e}") from None
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(p.name for p in folder.glob("model*.safetensors"))
        if not files:
            raise DllamaError(f"{folder}: no model.safetensors (or model.safetensors.index.json) found")
        self.tensors: dict[str, TensorRef] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise DllamaError(f"{folder}: shard {name} listed in the index is missing")
            for ref in _read_header(path):
                self.tensors[ref.name] = ref
        if weight_map is not None and set(weight_map) != set(self.tensors):
            missing = sorted(set(weight_map) - set(self.tensors))
            raise DllamaError(f"{folder}: tensors listed in the index are missing from the shards: {missing[:5]}")
        self._maps: dict[Path, np.memmap] = {}
        self.files = [folder / name for name in files]

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32 (a fresh array; the file stays mapped, not read whole)."""
        ref = self.tensors[name]
        mm = self._maps.get(ref.file)
        if mm is None:
            mm = self._maps[ref.file] = np.memmap(ref.file, dtype=np.uint8, mode="r")
        raw = mm[ref.start : ref.end]
        if ref.dtype == "BF16":
            out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.view(np.dtype(_DTYPES[ref.dtype]).newbyteorder("<")).astype(np.float32)
        return out.reshape(ref.shape)
