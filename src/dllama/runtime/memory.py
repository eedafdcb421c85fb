"""How much memory a node has and how much it will need.

Available memory honours the cgroup the process runs in (v1 `memory.limit_in_bytes`, v2 `memory.max`, the
tightest of the group and its ancestors) as well as /proc/meminfo, so a node in a container or a cgroup refuses a
slice it cannot hold, with the numbers, instead of being killed. A node's need is counted from what it actually
holds: its slice's bytes in their weight types, the KV cache, the engine's buffers and rope tables, and a fixed
runtime (the interpreter and libraries)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dllama.errors import DllamaError
from dllama.kv_cache import DEFAULT_KV_TYPE, KV_TYPES
from dllama.model.config import ModelConfig
from dllama.model.weight_types import row_bytes
from dllama.runtime.cgroup import group_dirs
from dllama.runtime.cgroup import read as _read

RUNTIME_BYTES = 120 << 20  # the interpreter, NumPy, gguf-py, tokenizers, threads: measured ~45-100 MB RSS
_NO_LIMIT = 1 << 60


def _stat(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if k == key and v.isdigit():
            return int(v)
    return 0


def cgroup_available() -> int | None:
    """Bytes the process's memory cgroup still allows (limit minus non-reclaimable usage), or None without limit."""
    best = None
    for v2, d in group_dirs("memory"):
        if v2:
            limit, usage = _read(f"{d}/memory.max"), _read(f"{d}/memory.current")
            cache = _stat(_read(f"{d}/memory.stat"), "file")
        else:
            limit, usage = _read(f"{d}/memory.limit_in_bytes"), _read(f"{d}/memory.usage_in_bytes")
            cache = _stat(_read(f"{d}/memory.stat"), "total_cache")
        if not limit or not limit.isdigit() or int(limit) >= _NO_LIMIT or not usage or not usage.isdigit():
            continue
        free = int(limit) - max(0, int(usage) - cache)  # page cache is reclaimable
        best = free if best is None else min(best, free)
    return best


def kv_directory(storage: str, directory: str | None) -> str | None:
    """Where the KV cache lives: None (RAM) or the directory of its memory-mapped file ("disk")."""
    if storage == "ram":
        return None
    if storage != "disk":
        raise DllamaError(f"unknown KV cache storage {storage!r} (ram or disk)")
    import tempfile

    d = directory or tempfile.gettempdir()
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise DllamaError(f"--kv-cache-dir {d}: not a writable directory")
    return d


def available_bytes() -> int:
    avail = None
    meminfo = _read("/proc/meminfo")
    if meminfo:
        for line in meminfo.splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 << 30
    cg = cgroup_available()
    return avail if cg is None else max(0, min(avail, cg))


def kv_cache_bytes(cfg: ModelConfig, n_kv_heads: int, max_seq: int, kv_type: str = DEFAULT_KV_TYPE) -> int:
    return 2 * cfg.n_layers * n_kv_heads * max_seq * row_bytes(KV_TYPES[kv_type], cfg.head_dim)


def buffer_bytes(cfg: ModelConfig, n_heads: int, n_kv_heads: int, hidden: int, vocab_rows: int, max_seq: int,
                 max_batch: int, nthreads: int) -> int:  # fmt: skip
    """The engine's scratch buffers (see csrc/graph.c) and rope tables, for this node's share."""
    hd = cfg.head_dim
    maxc = max(cfg.dim, n_heads * hd, hidden)
    floats = max_batch * (3 * cfg.dim + 2 * n_heads * hd + 2 * n_kv_heads * hd + hidden + 3 * maxc // 32)
    floats += nthreads * max_seq + vocab_rows + max_seq * hd  # attention scratch, logits, rope cos + sin
    floats += min(max_batch, 4) * n_heads * -(-max_seq // 256) * (hd + 2)  # attention.c: a partial per 256 positions
    if cfg.moe:
        floats += max_batch * (2 * cfg.n_experts + 2 * cfg.dim)
    return 4 * floats + max_batch * (maxc // 32) * 34


@dataclass(frozen=True)
class NodeMemory:
    """What one node holds, in bytes."""

    weights: int
    kv_cache: int
    buffers: int
    runtime: int = RUNTIME_BYTES
    kv_type: str = ""  # named in the report when known (the cache's size depends on it)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.buffers + self.runtime

    def describe(self) -> str:
        mb = lambda n: f"{n / 1e6:.0f} MB"  # noqa: E731
        kv = f"KV cache {mb(self.kv_cache)}" + (f" {self.kv_type}" if self.kv_type else "")
        return (f"{mb(self.total)} (weights {mb(self.weights)} + {kv} + buffers {mb(self.buffers)} + runtime "
                f"{mb(self.runtime)})")  # fmt: skip


def check_fits(need: NodeMemory, who: str) -> None:
    """Refuse, with the numbers, a share this machine cannot hold (instead of being killed half-way)."""
    avail = available_bytes()
    if need.total > avail:
        raise DllamaError(f"{who} does not fit in memory: it needs {need.describe()}, {avail / 1e6:.0f} MB "
                          "available (more nodes, a smaller --max-seq-len or a smaller weight type would fit)")  # fmt: skip


def cap_seq_len(requested: int, bytes_per_pos: int, reserve: int = 0, fraction: float = 0.6) -> tuple[int, str | None]:
    """Largest max_seq <= requested whose KV cache fits in `fraction` of available memory and beside `reserve`
    (the node's weights and runtime) in 90 % of it."""
    avail = available_bytes()
    limit = int(max(0, min(avail * fraction, avail * 0.9 - reserve))) // max(bytes_per_pos, 1)
    if requested <= limit:
        return requested, None
    capped = max(256, limit // 256 * 256)
    msg = (
        f"note: --max-seq-len capped to {capped} (a {requested}-token KV cache needs "
        f"{requested * bytes_per_pos / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available)"
    )
    return capped, msg
