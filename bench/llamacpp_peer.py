"""The peer: llama.cpp (through llama-cpp-python) on the same GGUF, timed the same way as dllama.

    from llamacpp_peer import ensure_llama_cpp, bench_llamacpp
    ensure_llama_cpp()                        # imports, or builds it from source once (~6-10 min on 2 cores)
    r = bench_llamacpp("m.gguf", threads=2)   # {"decode_tps": ..., "prefill_tps": ..., ...}

    python bench/llamacpp_peer.py MODEL.gguf --threads 2 [--n-decode 128] [--prompt-len 100] [--install]

By default each measurement runs in a fresh subprocess: llama.cpp's OpenMP workers keep spinning after a
call and its model memory stays mapped, which would disturb whatever the caller measures next.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

# The version built and checked on this project's machines (0.3.x API: Llama(flash_attn=...), .eval, .reset).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# Native code for this CPU (AVX-512/VNNI here) but without AMX: the Intel VMs here report AMX in CPUID
# without the kernel granting it, so a GGML_NATIVE=ON build dies with SIGILL in its AMX path.
# OpenMP threads; no curl (no network for model downloads).
_ARCH = "-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS = (
    f"-DGGML_NATIVE=OFF -DCMAKE_C_FLAGS='{_ARCH}' -DCMAKE_CXX_FLAGS='{_ARCH}' "
    "-DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release"
)

# Run in a fresh interpreter: a bad build kills its process (SIGILL), not ours.
_SELF_CHECK = r"""
import math, os, sys, tempfile
import llama_cpp
from dllama.testing.synthetic import SHAPES, write_synthetic_gguf
with tempfile.TemporaryDirectory() as d:
    path = write_synthetic_gguf(os.path.join(d, "check.gguf"), **SHAPES["tiny"], weight_type="q4_0", seed=1)
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=1, verbose=False)
    llm.eval([256, 72])  # BOS, "H": two tokens through every matmul/attention kernel
    logits = llm.eval_logits[-1]
    assert len(logits) == 512 and all(math.isfinite(x) for x in logits), "non-finite logits"
    llm.close()
print("ok", llama_cpp.__version__)
"""
_checked = False


def _self_check() -> str | None:
    """None if llama_cpp imports and evaluates 2 tokens of a tiny synthetic model, else why not."""
    r = subprocess.run(
        [sys.executable, "-c", _SELF_CHECK], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if r.returncode == 0 and r.stdout.strip().splitlines()[-1].startswith("ok "):
        return None
    how = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
    return f"{how}: {r.stdout[-2000:]}"


def _log(msg: str) -> None:
    print(f"[llamacpp_peer] {msg}", file=sys.stderr, flush=True)


def ensure_llama_cpp(install: bool = True):
    """Return the `llama_cpp` module, building llama-cpp-python from source with pip if it is missing.

    The build compiles llama.cpp for this CPU: it runs under `nice -n 19` so other work keeps the cores.
    Before returning, a subprocess checks the build really runs (a tiny synthetic model, 2 tokens); a
    build that imports but crashes (e.g. an old AMX-enabled one) is rebuilt once when `install` is set.
    """
    global _checked
    try:
        mod = importlib.import_module("llama_cpp")
    except ImportError:
        if not install:
            raise
        mod = None
    broken = False
    if mod is not None and not _checked:
        why = _self_check()
        if why is None:
            _checked = True
        elif not install:
            raise RuntimeError(f"llama_cpp is installed but does not run ({why})")
        else:
            _log(f"the installed llama_cpp does not run ({why.splitlines()[0]}); rebuilding it")
            mod, broken = None, True
    if mod is not None:
        return mod
    env = dict(
        os.environ,
        CMAKE_ARGS=CMAKE_ARGS,
        FORCE_CMAKE="1",
        CMAKE_BUILD_PARALLEL_LEVEL=str(len(os.sched_getaffinity(0))),
    )
    cmd = [
        "nice",
        "-n",
        "19",
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-cache-dir",
        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
    ]
    if broken:  # rebuild only llama-cpp-python, leave its (working) dependencies alone
        cmd[-1:-1] = ["--force-reinstall", "--no-deps"]
    _log(
        f"building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} from source (several minutes): {' '.join(cmd)}"
    )
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip install llama-cpp-python failed:\n{r.stdout[-4000:]}")
    _log(f"built in {time.perf_counter() - t:.0f} s")
    why = _self_check()
    if why is not None:
        raise RuntimeError(f"the freshly built llama_cpp does not run ({why})")
    _checked = True
    importlib.invalidate_caches()
    return importlib.import_module("llama_cpp")


def default_prompt_tokens(n: int = 100, vocab_size: int = 256, seed: int = 0) -> list[int]:
    """`n` deterministic token ids: BOS (256 in synthetic models) then ids below `vocab_size`.

    With the synthetic GGUFs (ids < 256 are bytes) any ids are valid; pass the real tokenization of a text
    for a real model.
    """
    import numpy as np

    ids = np.random.default_rng(seed).integers(0, vocab_size, n - 1)
    return [256] + ids.tolist()


def _bench_inprocess(path: str, threads: int, n_decode: int, prompt_tokens: list[int], n_ctx: int) -> dict:
    import numpy as np

    llama_cpp = ensure_llama_cpp(install=False)
    load_before = os.getloadavg()[0]
    n_batch = max(512, len(prompt_tokens))  # the whole prompt in one batch, as dllama's prefill does
    t = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=True,
        verbose=False,
    )
    load_s = time.perf_counter() - t
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).argmax())

    # Warm-up on the same path: pages in the mmapped weights and starts the thread pool, so neither the
    # timed prefill nor the first decode steps pay one-time costs. reset() makes the next eval start at 0.
    llm.eval(prompt_tokens)
    for _ in range(4):
        llm.eval([next_token()])
    llm.reset()

    t = time.perf_counter()
    llm.eval(prompt_tokens)
    prefill_s = time.perf_counter() - t

    tokens, steps = [next_token()], []
    t0 = time.perf_counter()
    for _ in range(n_decode):  # greedy, one token per llama_decode call
        ts = time.perf_counter()
        llm.eval([tokens[-1]])
        tokens.append(next_token())
        steps.append(time.perf_counter() - ts)
    decode_s = time.perf_counter() - t0
    llm.close()
    return {
        "engine": "llama.cpp",
        "version": llama_cpp.__version__,
        "threads": threads,
        "n_prompt": len(prompt_tokens),
        "n_decode": n_decode,
        "prefill_s": prefill_s,
        "prefill_tps": len(prompt_tokens) / prefill_s,
        "decode_s": decode_s,
        "decode_tps": n_decode / decode_s,
        "decode_ms_median": float(np.median(steps) * 1e3),
        # Robust to the other work on a shared machine, which stalls llama.cpp's OpenMP barriers for
        # hundreds of ms at a time and ruins the mean; compare both with dllama's.
        "decode_tps_median": float(1 / np.median(steps)),
        "loadavg_before": load_before,
        "load_s": load_s,
        "tokens": tokens,  # greedy continuation (first = argmax after the prompt), for cross-checks
    }


def bench_llamacpp(
    path,
    threads: int,
    n_decode: int = 128,
    prompt_tokens: list[int] | None = None,
    *,
    n_ctx: int | None = None,
    subprocess_isolated: bool = True,
) -> dict:
    """Time prefill of `prompt_tokens` (default: 100 tokens) and `n_decode` greedy decode steps, separately.

    Returns a dict with decode_tps, prefill_tps, prefill_s, decode_s, decode_ms_median, decode_tps_median,
    load_s, loadavg_before, version, tokens. Flash attention on, f16 KV cache, n_threads = n_threads_batch = `threads`.
    """
    path = str(path)
    prompt_tokens = list(prompt_tokens) if prompt_tokens is not None else default_prompt_tokens()
    n_ctx = n_ctx or max(512, -(-(len(prompt_tokens) + n_decode + 8) // 256) * 256)
    if not subprocess_isolated:
        return _bench_inprocess(path, threads, n_decode, prompt_tokens, n_ctx)
    ensure_llama_cpp()
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        path,
        "--threads",
        str(threads),
        "--n-decode",
        str(n_decode),
        "--n-ctx",
        str(n_ctx),
        "--prompt-json",
        json.dumps(prompt_tokens),
        "--in-process",
    ]
    _log(
        f"llama.cpp: {os.path.basename(path)}, {threads} thread(s), {len(prompt_tokens)} + {n_decode} tokens"
    )
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp benchmark failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Benchmark llama.cpp (llama-cpp-python) on a GGUF.")
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--n-decode", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--prompt-json", help="token ids as a JSON list (overrides --prompt-len)")
    ap.add_argument("--n-ctx", type=int, default=None)
    ap.add_argument("--install", action="store_true", help="build llama-cpp-python if it is missing")
    ap.add_argument(
        "--in-process", action="store_true", help="measure in this process (used by the isolated mode)"
    )
    a = ap.parse_args(argv)
    if a.install:
        ensure_llama_cpp()
    prompt = json.loads(a.prompt_json) if a.prompt_json else default_prompt_tokens(a.prompt_len)
    r = bench_llamacpp(
        a.model, a.threads, a.n_decode, prompt, n_ctx=a.n_ctx, subprocess_isolated=not a.in_process
    )
    print(json.dumps(r))


if __name__ == "__main__":
    main()
