"""A model split into several GGUF files (`name-00001-of-00003.gguf`): finding all parts from the first."""

from __future__ import annotations

import os
import re

from dllama.errors import DllamaError

SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_parts(first_path: str) -> list[str]:
    """All parts of a split GGUF (`name-00001-of-00003.gguf` -> its 3 sibling paths, in order); a plain file
    is its own single part. A missing part is an error naming it."""
    m = SPLIT_RE.match(os.path.basename(first_path))
    if not m:
        return [first_path]
    folder, count = os.path.dirname(first_path), int(m["count"])
    parts = [os.path.join(folder, f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p for p in parts if not os.path.exists(p)]
    if missing:
        raise DllamaError(f"split GGUF {first_path}: part {missing[0]} is missing ({len(missing)} of {count})")
    return parts
