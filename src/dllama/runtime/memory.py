"""How much memory this machine can give us (KV cache sizing)."""

from __future__ import annotations

import os


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def cap_seq_len(requested: int, bytes_per_pos: int, fraction: float = 0.6) -> tuple[int, str | None]:
    """Largest max_seq <= requested whose KV cache fits in `fraction` of available memory."""
    avail = available_bytes()
    limit = int(avail * fraction) // max(bytes_per_pos, 1)
    if requested <= limit:
        return requested, None
    capped = max(256, limit // 256 * 256)
    msg = (
        f"note: --max-seq-len capped to {capped} (a {requested}-token KV cache needs "
        f"{requested * bytes_per_pos / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available)"
    )
    return capped, msg
