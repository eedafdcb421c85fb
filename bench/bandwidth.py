"""Memory read bandwidth with 1..N threads: the roofline for token generation, which streams every weight
once per token.

Each thread reduces its share of a 2 GiB array with a NumPy ufunc reduction (which releases the GIL).
The kernel is `np.maximum.reduce` over an int32 view: it is SIMD and as fast as a `-O3 -march=native`
C/OpenMP sum loop on this machine, whereas numpy's int64/float32 `add.reduce` is compute-bound a bit
below the memory rate (~30 and ~22 GB/s against ~37 GB/s here).

    python bench/bandwidth.py [--threads 1 2] [--gib 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_buf: np.ndarray | None = None


def _buffer(nbytes: int) -> np.ndarray:
    """One buffer reused across calls, so measuring several thread counts allocates 2 GiB once."""
    global _buf
    if _buf is None or _buf.nbytes != nbytes:
        _buf = None
        # Filled, not zeros: untouched calloc pages all map the shared zero page and read from cache.
        _buf = np.ones(nbytes // 4, dtype=np.int32)
    return _buf


def measure_bandwidth(threads: int, size_gib: float = 2.0, repeats: int = 5) -> float:
    """Median-of-`repeats` read bandwidth in GB/s (1e9 bytes/s) with `threads` threads over `size_gib` GiB (the
    median, not the best: on these VMs single runs occasionally report implausible bursts)."""
    a = _buffer(int(size_gib * 2**30) // 64 * 64)
    parts = np.array_split(a, threads)
    runs = []
    with ThreadPoolExecutor(threads) as pool:
        list(
            pool.map(np.maximum.reduce, parts)
        )  # warm-up: threads started, TLB and prefetchers in steady state
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.maximum.reduce, parts))
            runs.append(a.nbytes / (time.perf_counter() - t) / 1e9)
    return float(np.median(runs))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, 2, len(os.sched_getaffinity(0))}))
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    print(f"{'threads':>7}  {'GB/s':>6}")
    for th in a.threads:
        print(f"{th:>7}  {measure_bandwidth(th, a.gib, a.repeats):6.1f}", flush=True)
    print(
        f"load average: {os.getloadavg()[0]:.2f} (other work on the machine lowers these numbers)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
