"""dllama measured exactly like llama.cpp in llamacpp_peer.py: same prompt tokens, prefill timed on its own,
then n_decode greedy steps (one forward + argmax each); in a fresh subprocess by default."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _bench_inprocess(path: str, threads: int, n_decode: int, prompt_tokens: list[int], workers=None,
                     secret=None, buffer_type="q80") -> dict:  # fmt: skip
    import inspect

    import numpy as np

    from dllama.model.gguf_model import GGUFModel
    from dllama.runtime.root import Root

    # the sync format's keyword, so the same harness also drives builds from before it was renamed (--vs-src)
    sync_kw = "sync" if "sync" in inspect.signature(Root).parameters else "buffer_type"
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    root = Root(GGUFModel(path, verbose=False), nthreads=threads, max_seq=len(prompt_tokens) + n_decode + 16,
                workers=workers, secret=secret, log=lambda *a: None, **{sync_kw: buffer_type})  # fmt: skip
    load_s = time.perf_counter() - t

    def run(ids, pos, want):
        """(logits, network s, bytes sent, bytes received); older builds (--vs-src) have only forward()."""
        if hasattr(root, "run"):
            r = root.run(ids, pos, want)
            return r.logits, r.step.network_s, r.step.sent, r.step.recv
        return root.forward(ids, pos, want), 0.0, 0, 0

    def prefill(ids):  # greedy, like the llama.cpp side: only the argmax of the last position is needed
        logits = None
        for i in range(0, len(ids), root.max_batch):
            last = i + root.max_batch >= len(ids)
            logits = run(ids[i : i + root.max_batch], i, "argmax" if last else "none")[0]
        return logits

    logits = prefill(prompt_tokens)  # warm-up: pages in the weights, wakes the threads
    pos = len(prompt_tokens)
    for _ in range(4):
        logits = root.forward([int(logits.argmax())], pos, "argmax")
        pos += 1

    t = time.perf_counter()
    logits = prefill(prompt_tokens)
    prefill_s = time.perf_counter() - t
    tokens, steps, pos = [int(logits.argmax())], [], len(prompt_tokens)
    net = sent = recv = 0.0
    t0 = time.perf_counter()
    for _ in range(n_decode):
        ts = time.perf_counter()
        logits, dn, ds, dr = run([tokens[-1]], pos, "argmax")
        tokens.append(int(logits.argmax()))
        pos += 1
        steps.append(time.perf_counter() - ts)
        net, sent, recv = net + dn, sent + ds, recv + dr
    decode_s = time.perf_counter() - t0
    out = {
        "engine": "dllama", "threads": threads, "nodes": root.n_nodes, "n_prompt": len(prompt_tokens),
        "n_decode": n_decode, "prefill_s": prefill_s, "prefill_tps": len(prompt_tokens) / prefill_s,
        "decode_s": decode_s, "decode_tps": n_decode / decode_s, "decode_ms_median": float(np.median(steps) * 1e3),
        "decode_tps_median": float(1 / np.median(steps)), "network_share": net / decode_s,
        "root_sent_per_token": sent / n_decode, "root_recv_per_token": recv / n_decode,
        "loadavg_before": load_before, "load_s": load_s, "tokens": tokens,
    }  # fmt: skip
    root.close()
    return out


def bench_dllama(path, threads: int, n_decode: int = 128, prompt_tokens: list[int] | None = None, *,
                 workers=None, secret=None, buffer_type="q80", subprocess_isolated: bool = True,
                 prefix: list[str] | None = None) -> dict:  # fmt: skip
    from llamacpp_peer import default_prompt_tokens

    prompt_tokens = list(prompt_tokens) if prompt_tokens is not None else default_prompt_tokens()
    if not subprocess_isolated:
        return _bench_inprocess(str(path), threads, n_decode, prompt_tokens, workers, secret, buffer_type)
    cmd = [*(prefix or []), sys.executable, os.path.abspath(__file__), str(path), "--threads", str(threads), "--n-decode",
           str(n_decode), "--prompt-json", json.dumps(prompt_tokens), "--buffer-float-type", buffer_type]  # fmt: skip
    if workers:
        cmd += ["--workers", *workers]
    env = dict(os.environ, **({"DLLAMA_SECRET": secret} if secret else {}))
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"dllama benchmark failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-decode", type=int, default=128)
    p.add_argument("--prompt-json", required=True)
    p.add_argument("--workers", nargs="*")
    p.add_argument("--buffer-float-type", default="q80")
    a = p.parse_args()
    r = _bench_inprocess(a.model, a.threads, a.n_decode, json.loads(a.prompt_json), a.workers,
                         os.environ.get("DLLAMA_SECRET"), a.buffer_float_type)  # fmt: skip
    print(json.dumps(r))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
