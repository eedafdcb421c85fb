"""A model file's content hash (sha256), cached by path, size and mtime so it is computed once per file.

Workers that hold the same model file locally report this hash, and the root then tells them to read their
slice from it instead of shipping it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _cache_file(path: str) -> Path:
    st = os.stat(path)
    key = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    root = os.environ.get("DLLAMA_CACHE_DIR") or Path.home() / ".cache" / "dllama"
    return Path(root) / "hashes" / (hashlib.sha256(key.encode()).hexdigest() + ".sha256")


def content_hash(path: str) -> bytes:
    cache = _cache_file(path)
    try:
        digest = bytes.fromhex(cache.read_text().strip())
        if len(digest) == 32:
            return digest
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    digest = h.digest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest.hex())
        os.replace(tmp, cache)
    except OSError:
        pass
    return digest
