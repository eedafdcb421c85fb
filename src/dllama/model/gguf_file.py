"""A lazy GGUF reader: the header, the metadata and the tensor table, parsed in one pass over a memory map, every
count and length checked against the bytes left in the file before it is used (a 7 KB file claiming a 2^40-element
array is refused at once). Large arrays (the tokenizer's 49k-entry vocabulary) are skipped over, not decoded: they
are read only when someone asks (`array(key)`), so start-up does not pay for them. Tensor data are zero-copy views.

Format (little-endian): magic "GGUF", u32 version (2 or 3), u64 tensor count, u64 key/value count; each key/value:
string key, u32 type, value (arrays: u32 item type, u64 count, items); each tensor: string name, u32 n_dims, u64 dims
(innermost first), u32 type, u64 offset from the data start; data start = aligned to `general.alignment` (32)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from dllama.errors import DllamaError
from dllama.model.weight_types import weight_type

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
       10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip
_U64 = struct.Struct("<Q")
SMALL_ARRAY = 4096  # arrays up to this many items are decoded with the metadata; longer ones on demand
MAX_DIMS = 4


@dataclass(frozen=True)
class LazyArray:
    item_type: int
    count: int
    offset: int  # of the first item


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: innermost (columns) first
    type: int
    data: np.ndarray  # uint8 view of the tensor's bytes


class GGUFFile:
    def __init__(self, path: str):
        self.path = path
        try:
            self.data = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise DllamaError(f"cannot read GGUF file {path}: {e}") from None
        self.size = self.data.nbytes
        self._buf = memoryview(self.data)
        self.pos = 0
        if self._take(4) != b"GGUF":
            raise DllamaError(f"not a GGUF file (bad magic): {path}")
        (self.version,) = self._unpack("<I")
        if self.version not in (2, 3):
            raise DllamaError(f"GGUF version {self.version} is not supported (2 or 3): {path}")
        n_tensors, n_kv = self._unpack("<QQ")
        # every key/value needs >= 12 bytes, every tensor info >= 28: counts are bounded by the file size
        if n_kv * 12 > self.size or n_tensors * 28 > self.size:
            self._corrupt(f"claims {n_kv} keys and {n_tensors} tensors")
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = self._value(vtype, key)
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or not 1 <= align <= 1 << 16 or align & (align - 1):
            self._corrupt(f"bad general.alignment {align!r}")
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                self._corrupt(f"tensor {name!r} has {n_dims} dimensions")
            dims = self._unpack(f"<{n_dims}Q")
            qtype, offset = self._unpack("<IQ")
            infos.append((name, dims, qtype, offset))
        start = -(-self.pos // align) * align
        self.tensors: list[TensorInfo] = []
        for name, dims, qtype, offset in infos:
            wt = weight_type(qtype)
            n = 1
            for d in dims:
                if not 0 < d < 1 << 40:
                    self._corrupt(f"tensor {name!r} has a dimension of {d}")
                n *= d
            if dims[0] % wt.block:
                self._corrupt(f"tensor {name!r}: {dims[0]} columns are not whole {wt.name} blocks")
            nbytes = n // wt.block * wt.block_bytes
            if start + offset + nbytes > self.size:
                raise DllamaError(f"GGUF file is truncated: tensor '{name}' ends past the end of {path}")
            self.tensors.append(TensorInfo(name, tuple(dims), qtype, self.data[start + offset : start + offset + nbytes]))

    # ---- parsing, bounds-checked ----
    def _corrupt(self, what: str):
        raise DllamaError(f"corrupt GGUF file {self.path}: {what}")

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise DllamaError(f"GGUF file is truncated or corrupt (needs {n} bytes at offset {self.pos}): {self.path}")
        b = bytes(self._buf[self.pos : self.pos + n])
        self.pos += n
        return b

    def _unpack(self, fmt: str):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        if n > self.size - self.pos:
            self._corrupt(f"a string of {n} bytes at offset {self.pos}")
        return self._take(n).decode("utf-8", "replace")

    def _value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])[0]
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            self._corrupt(f"key {key!r} has unknown value type {vtype}")
        itype, count = self._unpack("<IQ")
        first = self.pos
        if itype in _SCALARS:
            size = struct.calcsize(_SCALARS[itype])
            if count * size > self.size - self.pos:
                self._corrupt(f"array {key!r} claims {count} items")
            if count <= SMALL_ARRAY:
                return [self._unpack(_SCALARS[itype])[0] for _ in range(count)]
            self.pos += count * size
            return LazyArray(itype, count, first)
        if itype != _STRING:
            self._corrupt(f"array {key!r} has items of type {itype}")
        if count * 8 > self.size - self.pos:
            self._corrupt(f"array {key!r} claims {count} strings")
        if count <= SMALL_ARRAY:
            return [self._string() for _ in range(count)]
        self.pos = self._skip_strings(count, key)
        return LazyArray(itype, count, first)

    def _skip_strings(self, count: int, key: str) -> int:
        """Offset after `count` strings from self.pos, each length checked (a tight loop: the vocabulary and the
        merges are ~100k strings, skipped at every start)."""
        buf, pos, end, unpack = self._buf, self.pos, self.size, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                self._corrupt(f"array {key!r} runs past the end of the file")
            (n,) = unpack(buf, pos)
            pos += 8 + n
            if pos > end:
                self._corrupt(f"a string of {n} bytes in {key!r}")
        return pos

    def array(self, key: str) -> list:
        """The items of an array field, decoded now (small arrays were already)."""
        v = self.fields.get(key)
        if not isinstance(v, LazyArray):
            return v
        if v.item_type in _NP:
            return np.frombuffer(self.data, dtype=_NP[v.item_type], count=v.count, offset=v.offset).tolist()
        out, pos, buf, unpack = [], v.offset, self._buf, _U64.unpack_from
        append = out.append
        for _ in range(v.count):  # lengths were checked when the array was skipped over
            (n,) = unpack(buf, pos)
            append(str(buf[pos + 8 : pos + 8 + n], "utf-8", "replace"))
            pos += 8 + n
        return out

    def metadata(self) -> dict:
        """Every field but the long arrays (those stay lazy)."""
        return {k: v for k, v in self.fields.items() if not isinstance(v, LazyArray)}
