"""Decode speed at long contexts: attention alone and the whole model, before vs after the blocked attention
(attention.c), per KV cache type, beside llama.cpp with the same cache type.

    python bench/bench_attention.py [--before-ref main] [--positions 512 2048 4096 8000] [--threads 2]

- before: the C extension of `--before-ref` (default: the main branch), exported with `git archive` into
  bench/out/attn-before-<commit>/ and built there once; it only has an F32 cache.
- after: the extension of this checkout (src/, build it first).
- attention alone: the default model's shape (SmolLM2-135M: 30 layers, 9 query / 3 KV heads, head_dim 64), one
  decode token = one attention call per layer over that layer's own cache (random data, so the 30 caches stream
  from memory as in the model); the per-call cost of the Python binding (pool start, measured at position 0) is
  subtracted. Median of --reps tokens.
- whole model: dllama's Root on the default model, nthreads = --threads, decoding --steps tokens at each position
  (median step). The KV cache is not filled by a prefill (that would take minutes before): the child runs with
  MALLOC_PERTURB_ so glibc writes every page of the calloc'd cache (untouched pages would all read the shared zero
  page from cache). The cost of attention does not depend on the cached values. If the engine takes a `kv_type`
  (Root(kv_type=...)), F16 and Q8_0 are measured too; otherwise their row shows an estimate, marked `~`:
  model(F32, after) - attention(F32, after) + attention(type, after).
- prefill (--prefill N, F32 cache): seconds for the whole model to take an N-token prompt in batches of 64.
- llama.cpp (when `import llama_cpp` works): flash attention, type_k = type_v = the cache type, KV cache filled
  by prefilling up to each position in batches of 512, then --steps single-token decodes (median).

--kv-ab: this checkout only, the cache types of --kv against each other (the first is the baseline), ratios in the
table. Attention alone: interleaved round by round, best of --rounds kept. Whole model: one process holds a Root per
type (caches made resident with MALLOC_PERTURB_) and alternates single decode steps between them, 5 x --steps each
per position (median), so a change of the machine's load hits every type alike:

    python bench/bench_attention.py --kv-ab --kv f32 f16 --positions 512 2048 4096

Each measurement runs in its own subprocess; progress goes to stderr, the table and a JSON line to stdout.
Check `uptime` first: the machine is shared and tok/s fall with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # GGML type ids, as the C kernel and llama.cpp take them


def _log(msg: str) -> None:
    print(f"[bench_attention] {msg}", file=sys.stderr, flush=True)


def build_before(ref: str) -> str:
    """`src` directory of `ref` with its C extension built (cached in bench/out/)."""
    sha = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    dst = os.path.join(HERE, "out", f"attn-before-{sha[:12]}")
    if not os.path.exists(os.path.join(dst, "BUILT")):
        _log(f"building {ref} ({sha[:12]}) in {dst}")
        os.makedirs(dst, exist_ok=True)
        archive = subprocess.run(["git", "-C", ROOT, "archive", sha], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", dst], input=archive, check=True)
        subprocess.run(["nice", "-n", "10", sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=dst,
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        open(os.path.join(dst, "BUILT"), "w").close()
    return os.path.join(dst, "src")


def model_shape() -> dict:
    from dllama.model.default import default_model_path
    from dllama.model.gguf_model import GGUFModel

    cfg = GGUFModel(default_model_path(), verbose=False).config
    return {"n_layers": cfg.n_layers, "nh": cfg.n_heads, "nkv": cfg.n_kv_heads, "hd": cfg.head_dim,
            "context": cfg.context_length}  # fmt: skip


# ---------------------------------------------------------------- children (one measurement each)


def _attn_token(K, q, out, kc, vc, pos, shp, threads, extra, clock) -> float:
    t = clock()
    for layer in range(len(kc)):
        K.attention(
            q, kc[layer], vc[layer], out, 1, pos, shp["nh"], shp["nkv"], shp["hd"], shp["ms"], threads, *extra
        )
    return clock() - t


def ratio(b, x) -> str:
    return f"{b / x:.2f}" if b and x else "-"


def fmt_ms(x) -> str:
    return f"{x:.2f}" if x else "-"


def best(a, b):
    """the smaller of two timings, either of which may be missing (None)"""
    return min(a, b) if a is not None and b is not None else a if b is None else b


def child_attention(kv: str, positions: list[int], threads: int, reps: int) -> dict:
    """Attention alone, all layers of one decode token, per position: {"cpu": ms of CPU time with 1 thread
    (robust to the machine's load), "wall": ms of wall time with `threads` threads}."""
    import numpy as np

    from dllama.engine import _kernels as K

    has_types = "kv_type" in (K.attention.__doc__ or "")
    if kv != "f32" and not has_types:
        return {}
    shp = model_shape()
    nkv, hd = shp["nkv"], shp["hd"]
    res = {}
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, shp["nh"] * hd)).astype(np.float32)
    out = np.zeros_like(q)
    extra = (KV_TYPES[kv],) if has_types else ()
    for P in positions:
        shp["ms"] = P + 1
        caches = []
        for seed in range(2 * shp["n_layers"]):  # every layer its own cache: they stream from memory
            x = np.random.default_rng(seed).standard_normal((nkv, P + 1, hd), dtype=np.float32)
            if has_types:
                from dllama.testing import reference as ref

                x = ref.kv_quantize(x, KV_TYPES[kv])
            caches.append(x)
        kc, vc = caches[0::2], caches[1::2]
        r = {}
        for key, nth, clock in (("cpu", 1, time.thread_time), ("wall", threads, time.perf_counter)):
            _attn_token(K, q, out, kc, vc, P - 1, shp, nth, extra, clock)  # warm-up
            base = statistics.median(
                _attn_token(K, q, out, kc, vc, 0, shp, nth, extra, clock) for _ in range(reps)
            )
            full = statistics.median(
                _attn_token(K, q, out, kc, vc, P - 1, shp, nth, extra, clock) for _ in range(reps)
            )
            # the binding starts its threads on every call: with 2 threads that start-up (in `base`) swings by
            # more than short contexts' attention costs, so a difference inside the noise is not a number
            r[key] = (full - base) * 1e3 if full > 1.1 * base else None
        res[P] = r
    return res


def child_model(kv: str, positions: list[int], threads: int, steps: int) -> dict:
    """ms per decode token of the whole model (median), per position."""
    import inspect

    from dllama.model.default import default_model_path
    from dllama.model.gguf_model import GGUFModel
    from dllama.runtime.root import Root

    kw = {}
    if "kv_type" in inspect.signature(Root.__init__).parameters:
        kw["kv_type"] = kv
    elif kv != "f32":
        return {}
    max_seq = max(positions) + steps + 8
    root = Root(GGUFModel(default_model_path(), verbose=False), nthreads=threads, max_seq=max_seq,
                log=lambda *a: None, **kw)  # fmt: skip
    res = {}
    for P in positions:
        root.forward([1], P, "argmax")  # warm-up
        times = []
        for i in range(steps):
            t = time.perf_counter()
            root.forward([1], P + i, "argmax")
            times.append(time.perf_counter() - t)
        res[P] = statistics.median(times) * 1e3
    root.close()
    return res


def child_model_ab(kvs: list[str], positions: list[int], threads: int, steps: int) -> dict:
    """ms per decode token (median) of the whole model for every type of `kvs`, steps interleaved across types."""
    from dllama.model.default import default_model_path
    from dllama.model.gguf_model import GGUFModel
    from dllama.runtime.root import Root

    m = GGUFModel(default_model_path(), verbose=False)
    roots = {kv: Root(m, nthreads=threads, max_seq=max(positions) + 16, kv_type=kv, log=lambda *a: None) for kv in kvs}
    res = {}
    for P in positions:
        times = {kv: [] for kv in kvs}
        for r in roots.values():
            r.forward([1], P, "argmax")  # warm-up
        for i in range(5 * steps):
            order = kvs if i % 2 == 0 else kvs[::-1]
            for kv in order:
                t = time.perf_counter()
                roots[kv].forward([1], P + i % 8, "argmax")
                times[kv].append(time.perf_counter() - t)
        res[P] = {kv: statistics.median(v) * 1e3 for kv, v in times.items()}
    for r in roots.values():
        r.close()
    return res


def child_prefill(kv: str, positions: list[int], threads: int, steps: int) -> dict:
    """Whole model: seconds to prefill a prompt of positions[0] tokens (batches of Root.max_batch)."""
    import inspect

    from dllama.model.default import default_model_path
    from dllama.model.gguf_model import GGUFModel
    from dllama.runtime.root import Root

    kw = {"kv_type": kv} if "kv_type" in inspect.signature(Root.__init__).parameters else {}
    if kv != "f32" and not kw:
        return {}
    n = positions[0]
    root = Root(GGUFModel(default_model_path(), verbose=False), nthreads=threads, max_seq=n + 8,
                log=lambda *a: None, **kw)  # fmt: skip
    ids = [1 + (i * 7919) % 20000 for i in range(n)]
    root.forward(ids[: root.max_batch], 0, "argmax")  # warm-up
    t = time.perf_counter()
    for i in range(0, n, root.max_batch):
        root.forward(ids[i : i + root.max_batch], i, "argmax" if i + root.max_batch >= n else "none")
    s = time.perf_counter() - t
    root.close()
    return {n: s}


def child_llamacpp(kv: str, positions: list[int], threads: int, steps: int) -> dict:
    """llama.cpp: ms per decode token (median) at each position, cache type kv for K and V, flash attention."""
    import llama_cpp

    from dllama.model.default import default_model_path

    n_ctx = max(positions) + steps + 16
    llm = llama_cpp.Llama(model_path=default_model_path(), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, flash_attn=True, type_k=KV_TYPES[kv], type_v=KV_TYPES[kv],
                          verbose=False)  # fmt: skip
    tok = [1 + (i * 7919) % 20000 for i in range(n_ctx)]  # any token ids; the cost does not depend on them
    res, filled = {}, 0
    for P in positions:
        while filled < P:  # fill the cache up to P
            n = min(512, P - filled)
            llm.eval(tok[filled : filled + n])
            filled += n
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            llm.eval([tok[filled]])
            times.append(time.perf_counter() - t)
            filled += 1
        res[P] = statistics.median(times) * 1e3
    llm.close()
    return res


# ---------------------------------------------------------------- driver


def run_child(kind: str, src: str, kv: str, a, positions: list[int] | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=src)
    if kind in ("model", "model-ab"):
        env["MALLOC_PERTURB_"] = "165"  # glibc then writes every calloc'd page (see the module docstring)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--kv", *kv.split(), "--threads", str(a.threads),
           "--steps", str(a.steps), "--reps", str(a.reps), "--positions", *map(str, positions or a.positions)]  # fmt: skip
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} child ({kv}, {src}) failed with exit {r.returncode}")
    return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before-ref", default="main")
    p.add_argument("--before-src", help="a src/ directory with a built extension to use as `before` instead")
    p.add_argument("--positions", type=int, nargs="+", default=[512, 2048, 4096, 8000])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=16, help="decode steps per position (whole model, llama.cpp)")
    p.add_argument("--reps", type=int, default=9, help="tokens per position (attention alone)")
    p.add_argument(
        "--rounds", type=int, default=2, help="before/after alternations of the whole model (best kept)"
    )
    p.add_argument("--kv", nargs="+", default=list(KV_TYPES), choices=list(KV_TYPES))
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument(
        "--prefill", type=int, default=2048, help="also time a prompt of this many tokens (0: skip)"
    )
    p.add_argument("--kv-ab", action="store_true", help="compare the --kv types of this checkout, interleaved")
    p.add_argument("--child", choices=["attn", "model", "model-ab", "llamacpp", "prefill"])
    a = p.parse_args()
    if a.child:
        fn = {
            "attn": child_attention,
            "model": child_model,
            "model-ab": child_model_ab,
            "llamacpp": child_llamacpp,
            "prefill": child_prefill,
        }[a.child]
        extra = a.reps if a.child == "attn" else a.steps
        print(json.dumps(fn(a.kv if a.child == "model-ab" else a.kv[0], a.positions, a.threads, extra)))
        return

    if a.kv_ab:
        return kv_ab(a)
    before_src, after_src = a.before_src or build_before(a.before_ref), os.path.join(ROOT, "src")
    try:
        import llama_cpp  # noqa: F401

        have_llama = not a.no_llamacpp
    except ImportError:
        have_llama = False
        _log("llama_cpp is not importable: no llama.cpp column")
    load0 = os.getloadavg()
    R: dict = {}
    for kv in a.kv:
        for tag, src in (("before", before_src), ("after", after_src)):
            _log(f"attention alone, {kv}, {tag}")
            R[("attn", tag, kv)] = run_child("attn", src, kv, a)
        for rnd in range(0 if a.no_model else a.rounds):
            for tag, src in (("before", before_src), ("after", after_src)):
                _log(f"whole model, {kv}, {tag}, round {rnd + 1}")
                got = run_child("model", src, kv, a)
                old = R.setdefault(("model", tag, kv), {})
                for P, ms in got.items():
                    old[P] = min(ms, old.get(P, ms))
        for rnd in range(a.rounds if a.prefill and kv == "f32" else 0):
            for tag, src in (("before", before_src), ("after", after_src)):
                _log(f"prefill of {a.prefill} tokens, {kv}, {tag}, round {rnd + 1}")
                got = run_child("prefill", src, kv, a, positions=[a.prefill])
                old = R.setdefault(("prefill", tag, kv), {})
                for P, sec in got.items():
                    old[P] = min(sec, old.get(P, sec))
        if have_llama:
            _log(f"llama.cpp, {kv}")
            try:
                R[("llama", "", kv)] = run_child("llamacpp", after_src, kv, a)
            except RuntimeError as e:  # e.g. a cache type this llama.cpp build rejects: say so, keep the rest
                _log(f"llama.cpp with a {kv} cache failed: {e}")
    load1 = os.getloadavg()

    def tps(t):
        return f"{1e3 / t:.1f}" if t else "-"

    print(
        f"\ndecode tok/s, {a.threads} thread(s); load average {load0[0]:.1f} at start, {load1[0]:.1f} at end"
    )
    print("attn cpu: attention alone, all layers of one token, 1 thread, CPU ms (robust to load);")
    print(f"attn wall: the same with {a.threads} threads, wall ms; model / llama.cpp: tok/s (median step)")
    cols = ["kv", "pos", "cpu before", "cpu after", "x", "wall before", "wall after", "x", "model before",
            "model after", "x", "llama.cpp"]  # fmt: skip
    table, rows = [cols], []
    for kv in a.kv:
        for P in a.positions:
            ab, aa = R[("attn", "before", kv)].get(P, {}), R[("attn", "after", kv)].get(P, {})
            mb = R.get(("model", "before", kv), {}).get(P)
            ma = R.get(("model", "after", kv), {}).get(P)
            est = ""
            if ma is None and not a.no_model and aa and "f32" in a.kv:
                mf, af = (
                    R[("model", "after", "f32")].get(P),
                    R[("attn", "after", "f32")].get(P, {}).get("wall"),
                )
                if mf and af and aa.get("wall"):
                    ma, est = mf - af + aa["wall"], "~"
            ll = R.get(("llama", "", kv), {}).get(P)
            table.append([kv, str(P), fmt_ms(ab.get("cpu")), fmt_ms(aa.get("cpu")),
                          ratio(ab.get("cpu"), aa.get("cpu")), fmt_ms(ab.get("wall")),
                          fmt_ms(aa.get("wall")), ratio(ab.get("wall"), aa.get("wall")), tps(mb),
                          est + tps(ma), ratio(mb, ma), tps(ll)])  # fmt: skip
            rows.append({"kv": kv, "pos": P, "attn_before": ab, "attn_after": aa, "model_ms_before": mb,
                         "model_ms_after": ma, "model_after_estimated": bool(est), "llamacpp_ms": ll})  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    for n, r in enumerate(table):
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if n == 0:
            print("-+-".join("-" * w for w in widths))
    pre = {}
    if ("prefill", "after", "f32") in R:
        b, f = R[("prefill", "before", "f32")][a.prefill], R[("prefill", "after", "f32")][a.prefill]
        pre = {"tokens": a.prefill, "before_tps": a.prefill / b, "after_tps": a.prefill / f}
        print(f"\nprefill of {a.prefill} tokens (f32 cache, whole model): before {pre['before_tps']:.1f} tok/s, "
              f"after {pre['after_tps']:.1f} tok/s, x{b / f:.2f}")  # fmt: skip
    print(json.dumps({"threads": a.threads, "load": [load0[0], load1[0]], "rows": rows, "prefill": pre}))


def kv_ab(a) -> None:
    """Cache types against the first of --kv, this checkout, interleaved by round (best of --rounds kept)."""
    src, load0, R = os.path.join(ROOT, "src"), os.getloadavg(), {}
    for rnd in range(a.rounds):
        for kv in a.kv:
            _log(f"round {rnd + 1}: attention alone, {kv} cache")
            for P, val in run_child("attn", src, kv, a).items():
                old = R.setdefault(("attn", kv, P), val)
                R[("attn", kv, P)] = {k: best(val[k], old[k]) for k in val}
    if not a.no_model:
        _log(f"whole model, {' / '.join(a.kv)} caches interleaved step by step")
        for P, by_kv in run_child("model-ab", src, " ".join(a.kv), a).items():
            for kv, ms in by_kv.items():
                R[("model", kv, P)] = ms
    base = a.kv[0]
    print(f"\n{a.threads} thread(s), attention: best of {a.rounds} interleaved rounds; load average {load0[0]:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end; x = {base} time / this type's time (> 1: faster than {base})")
    print("attn cpu: attention alone, all layers of one decode token, 1 thread, CPU ms; attn wall: the same with "
          f"{a.threads} threads, wall ms; model: whole-model decode tok/s (median step)")
    table = [["pos", "kv", "attn cpu", "x", "attn wall", "x", "model tok/s", "x"]]
    rows = []
    for P in a.positions:
        for kv in a.kv:
            at, ab = R[("attn", kv, P)], R[("attn", base, P)]
            mt, mb = R.get(("model", kv, P)), R.get(("model", base, P))
            table.append([str(P), kv, fmt_ms(at["cpu"]), ratio(ab["cpu"], at["cpu"]), fmt_ms(at["wall"]),
                          ratio(ab["wall"], at["wall"]), f"{1e3 / mt:.1f}" if mt else "-",
                          f"{mb / mt:.2f}" if mt else "-"])  # fmt: skip
            rows.append({"pos": P, "kv": kv, "attn": at, "model_ms": mt})
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for n, r in enumerate(table):
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if n == 0:
            print("-+-".join("-" * w for w in widths))
    print(json.dumps({"threads": a.threads, "rows": rows}))


if __name__ == "__main__":
    main()
