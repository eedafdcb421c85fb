"""An emulated home cluster on one machine: N nodes, each a network namespace with its own CPU budget (a cgroup:
half a core by default, CFS quota 5 ms per 10 ms period), all on one switch (a Linux bridge in its own namespace)
through veth links limited to 1 Gbit/s in each direction with tbf. One node alone with the same budget is the
baseline, so the ratio is the speed-up a cluster of equal small machines would give (the original on Raspberry Pi 5:
2.26 -> 2.92 -> 4.56 tok/s on 1, 2, 4 nodes, i.e. 1.29x / 2.02x; on 8 Raspberry Pi 4B, Llama 2 7B: 1.65x / 2.66x /
2.23x on 2 / 4 / 8 nodes; our goals 1.8x / 3.2x). N nodes x budget must fit the machine (2 cores: N <= 4 at half a
core, N <= 8 with --quota-us 2500). Every node runs with --nthreads 1. Needs root and iproute2.

For each model and N: decode tok/s (greedy, after a warm-up), the root's split of the token time into compute and
sync wait (blocked on the partial-sum exchange and the workers' logits), and per node, during the decode only, the
CPU used (cores) and the time throttled by the quota. Setups run interleaved, several rounds, medians.

    sudo python bench/bench_home_cluster.py [--rounds 3] [--n-decode 64] [--nodes 1 2 4] [--models 1b 8kv-24l]

`--vs-src DIR` also runs every multi-node setup with another checkout's code (DIR/src, built), interleaved with
this tree's in the same rounds: before/after numbers of one change under the same conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from bandwidth import measure_bandwidth  # noqa: E402
from models import MODELS, synthetic_1b  # noqa: E402

# the original Distributed Llama on Raspberry Pi 5 (seed tables): tok/s on 1, 2, 4 nodes
ORIGINAL_PI5 = {1: 2.26, 2: 2.92, 4: 4.56}
# and on Raspberry Pi 4B, Llama 2 7B (its report): ms per token on 1, 2, 4, 8 nodes; 8 nodes were slower than 4
ORIGINAL_PI4_MS = {1: 1312.50, 2: 793.69, 4: 494.00, 8: 588.19}
GOALS = {2: 1.8, 4: 3.2}
SECRET = "home-cluster-bench"
PORT = 9990
# 8 KV heads (so up to 8 nodes), more and narrower layers than the 1B shape: more exchanges per byte of weights
SHAPE_8KV_24L = dict(dim=1024, hidden_dim=4096, n_layers=24, n_heads=16, n_kv_heads=8, vocab_size=32000,
                     rope_base=500000.0)  # fmt: skip
PROMPT = [256, *b"Once upon a time, in a small house by the sea, there lived an old fisherman who"]


def synthetic_8kv_24l() -> str:
    from dllama.testing.synthetic import write_synthetic_gguf

    path = os.path.join(MODELS, "synth-8kv-24l-q4_0.gguf")
    if not os.path.exists(path):
        os.makedirs(MODELS, exist_ok=True)
        print("writing the 8-KV-head 24-layer synthetic model ...", file=sys.stderr)
        write_synthetic_gguf(path, **SHAPE_8KV_24L, weight_type="q4_0", seed=0)
    return path


def synthetic_tiny_8kv() -> str:
    """Almost no compute (dim 256, 4 layers): the token time is the cost of the 8 exchanges and the logits."""
    from dllama.testing.synthetic import SHAPES, write_synthetic_gguf

    path = os.path.join(MODELS, "synth-tiny-8kv-q4_0.gguf")
    if not os.path.exists(path):
        os.makedirs(MODELS, exist_ok=True)
        write_synthetic_gguf(path, **SHAPES["tiny-8kv"], weight_type="q4_0", seed=0)
    return path


MODEL_MAKERS = {"1b": synthetic_1b, "8kv-24l": synthetic_8kv_24l, "tiny-8kv": synthetic_tiny_8kv}
DEFAULT_MODELS = ["1b", "8kv-24l"]


# ---------------------------------------------------------------- the root node (runs inside its namespace/cgroup)
def node_root(a) -> None:
    """Load, warm up, then handshake with the orchestrator around the timed decode (it reads the cgroups' counters
    exactly at those points), and print one JSON line."""
    import numpy as np

    from dllama.model.gguf_model import GGUFModel
    from dllama.runtime.root import Root

    def mark(what: str) -> None:
        print(what, flush=True)
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("orchestrator gone")

    t = time.perf_counter()
    root = Root(GGUFModel(a.model, verbose=False), nthreads=1, max_seq=len(PROMPT) + a.n_decode + 16,
                workers=a.workers or None, secret=SECRET if a.workers else None, sync=a.buffer_float_type,
                log=lambda *x: None)  # fmt: skip
    load_s = time.perf_counter() - t
    logits = None
    for i in range(0, len(PROMPT), root.max_batch):  # warm-up: pages in the weights, wakes everything up
        last = i + root.max_batch >= len(PROMPT)
        logits = root.run(PROMPT[i : i + root.max_batch], i, "argmax" if last else "none").logits
    pos = len(PROMPT)
    for _ in range(4):
        logits = root.run([int(logits.argmax())], pos, "argmax").logits
        pos += 1
    tokens = [int(logits.argmax())]
    steps = []
    mark("DECODE-START")
    t0 = time.perf_counter()
    for _ in range(a.n_decode):
        r = root.run([tokens[-1]], pos, "argmax")
        tokens.append(int(r.logits.argmax()))
        pos += 1
        steps.append((r.step.total_s, r.step.compute_s, r.step.network_s, r.step.sent, r.step.recv))
    decode_s = time.perf_counter() - t0
    mark("DECODE-END")
    s = np.array(steps)
    print(json.dumps({
        "nodes": root.n_nodes, "n_layers": root.cfg.n_layers, "n_decode": a.n_decode, "decode_s": decode_s, "decode_tps": a.n_decode / decode_s,
        "ms_median": float(np.median(s[:, 0]) * 1e3), "compute_ms": float(s[:, 1].mean() * 1e3),
        "sync_ms": float(s[:, 2].mean() * 1e3), "sent_per_token": float(s[:, 3].mean()),
        "recv_per_token": float(s[:, 4].mean()), "load_s": load_s, "tokens": tokens,
    }), flush=True)  # fmt: skip
    root.close()


# ---------------------------------------------------------------- the orchestrator (root namespace)
class HomeCluster:
    """max_nodes namespaces on a 1 Gbit/s star, one CPU cgroup each; a run uses nodes 0..n-1 (0 = the root)."""

    def __init__(self, max_nodes: int, quota_us: int, period_us: int, burst_us: int, rate: str | None,
                 pin: bool = False):  # fmt: skip
        from cgroups import CpuCgroup
        from netns import Star

        self.star = None
        self.cgroups: list = []
        self.procs: list[subprocess.Popen] = []
        self.pin = pin
        try:
            self.star = Star(max_nodes, tag=f"dlh{os.getpid() % 10000}", rate=rate)
            for i in range(max_nodes):
                self.cgroups.append(CpuCgroup(quota_us, period_us, burst_us=burst_us, tag=f"dlhome{i}"))
        except BaseException:
            self.close()
            raise

    def _on_node(self, i: int, argv: list[str], src: str | None = None, **kw) -> subprocess.Popen:
        pin = ["taskset", "-c", str(i % os.cpu_count())] if self.pin else []  # node i on core i mod cores
        env = dict(os.environ, PYTHONPATH=src) if src else None  # another checkout's code (--vs-src)
        p = subprocess.Popen([*self.cgroups[i].prefix(), *self.star.prefix(i), *pin, *argv], env=env, **kw)
        self.procs.append(p)
        return p

    def run(self, model: str, n: int, n_decode: int, buffer_type: str, src: str | None = None) -> dict:
        workers = []
        for i in range(1, n):
            log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty worker must never block on its log
            w = self._on_node(i, [sys.executable, "-m", "dllama", "worker", "--host", self.star.addrs[i], "--port",
                                  str(PORT), "--nthreads", "1", "--secret", SECRET],
                              src, stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
            workers.append(w)
            line = w.stdout.readline()
            if not line.startswith("listening on"):
                w.wait(timeout=10)
                log.seek(0)
                raise RuntimeError(f"worker {i} did not start: {line}{log.read()}")
        cmd = [sys.executable, os.path.abspath(__file__), "--node-root", model, "--n-decode", str(n_decode),
               "--buffer-float-type", buffer_type, "--workers", *[f"{self.star.addrs[i]}:{PORT}" for i in range(1, n)]]  # fmt: skip
        root = self._on_node(0, cmd, src, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            snaps = []
            for marker in ("DECODE-START", "DECODE-END"):
                line = root.stdout.readline().strip()
                if line != marker:
                    raise RuntimeError(f"root node: expected {marker}, got {line!r} (exit {root.poll()})")
                snaps.append(([cg.stat() for cg in self.cgroups[:n]], os.getloadavg()[0]))
                root.stdin.write("go\n")
                root.stdin.flush()
            out = json.loads(root.stdout.readline())
            if root.wait(timeout=60) != 0:
                raise RuntimeError(f"root node exited with {root.returncode}")
        finally:
            self._stop([root, *workers])
        (before, load0), (after, load1) = snaps
        d = out["decode_s"]
        out["load_avg"] = (load0 + load1) / 2
        pairs = list(zip(before, after, strict=True))
        out["node_cores"] = [(b["usage_s"] - a["usage_s"]) / d for a, b in pairs]
        out["node_cpu_ms"] = [1e3 * (b["usage_s"] - a["usage_s"]) / n_decode for a, b in pairs]
        out["node_throttled_ms"] = [1e3 * (b["throttled_s"] - a["throttled_s"]) / n_decode for a, b in pairs]
        out["node_throttled_share"] = [(b["throttled"] - a["throttled"]) / max(1.0, b["periods"] - a["periods"])
                                       for a, b in pairs]  # fmt: skip
        return out

    def _stop(self, procs) -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p in self.procs:
                self.procs.remove(p)

    def close(self) -> None:
        self._stop(list(self.procs))  # a cgroup can only be removed once its processes are gone
        for cg in self.cgroups:
            cg.close()
        self.cgroups = []
        if self.star:
            self.star.close()
            self.star = None


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n-decode", type=int, default=64)
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODEL_MAKERS))
    p.add_argument("--quota-us", type=int, default=5000, help="CPU per period for each node (5000 = 0.5 core)")
    p.add_argument("--period-us", type=int, default=10000)
    p.add_argument("--burst-us", type=int, default=0, help="CFS burst: unused quota a node may save up (0 = none)")
    p.add_argument("--rate", default="1gbit", help="tbf rate of each link, each direction ('none': no limit)")
    p.add_argument("--buffer-float-type", default="q80", choices=["q80", "f32"])
    p.add_argument("--pin", action="store_true", help="pin node i to core i mod cores (taskset)")
    p.add_argument("--json", help="also write all results (every round) to this file")
    p.add_argument("--vs-src", metavar="DIR", help="also run the multi-node setups with DIR/src's code, interleaved")
    p.add_argument("--node-root", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--workers", nargs="*", default=[], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.node_root:
        a.model = a.node_root
        return node_root(a)
    if os.geteuid() != 0:
        sys.exit("bench_home_cluster.py needs root (network namespaces, cgroups)")
    if min(a.quota_us, a.period_us) < 1000:
        sys.exit("--quota-us and --period-us must be >= 1000 (the kernel's minimum)")
    cores = os.cpu_count() * a.period_us / a.quota_us
    if max(a.nodes) > cores + 1e-9:
        sys.exit(f"{max(a.nodes)} nodes x {a.quota_us / a.period_us:g} core exceed the {os.cpu_count()} cores here")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: a background job starts with it ignored
        signal.signal(sig, _interrupt)
    paths = {m: MODEL_MAKERS[m]() for m in a.models}
    other = os.path.join(os.path.abspath(a.vs_src), "src") if a.vs_src else None
    setups = [(m, n, None) for m in a.models for n in a.nodes]
    if other:
        setups += [(m, n, other) for m in a.models for n in a.nodes if n > 1]
    results: dict = {s: [] for s in setups}
    print(f"load before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    # every emulated node streams its weights through the one memory bus of this machine: measured before and after
    bw_threads = sorted({1} | {min(n, os.cpu_count() or 1) for n in a.nodes})
    bw_runs = [{t: measure_bandwidth(t) for t in bw_threads}]
    rate = None if a.rate == "none" else a.rate
    cluster = HomeCluster(max(a.nodes), a.quota_us, a.period_us, a.burst_us, rate, a.pin)
    try:
        for r in range(a.rounds):
            for m, n, src in setups if r % 2 == 0 else setups[::-1]:
                t = time.perf_counter()
                out = cluster.run(paths[m], n, a.n_decode, a.buffer_float_type, src)
                results[(m, n, src)].append(out)
                print(f"round {r + 1}: {m} x{n}{' (' + src + ')' if src else ''}: {out['decode_tps']:.2f} tok/s, compute {out['compute_ms']:.1f} ms, "
                      f"sync {out['sync_ms']:.1f} ms, load {out['load_avg']:.1f} ({time.perf_counter() - t:.0f} s)",
                      file=sys.stderr)  # fmt: skip
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        cluster.close()
    bw_runs.append({t: measure_bandwidth(t) for t in bw_threads})
    a.bandwidth = {t: statistics.mean(r[t] for r in bw_runs) for t in bw_threads}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({f"{m} x{n}{' ' + src if src else ''}": v for (m, n, src), v in results.items()}, f)
    report({(m, n): v for (m, n, src), v in results.items() if src is None}, a)
    if other:
        print(f"\nthe same with {other} (1 node: this tree's)")
        report({(m, n): v for (m, n, src), v in results.items() if src == other or n == 1}, a)


def report(results: dict, a) -> None:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    budget = a.quota_us / a.period_us
    burst = (f", burst {a.burst_us} us" if a.burst_us else "") + (", node i pinned to core i mod cores" if a.pin else "")
    print(f"\nhome cluster: each node {budget:g} core (CFS {a.quota_us}/{a.period_us} us{burst}), --nthreads 1, links "
          f"{a.rate} (tbf, both ways) via a bridge; decode {a.n_decode} tokens, sync {a.buffer_float_type}, "
          f"medians of {a.rounds} rounds")  # fmt: skip
    bw = a.bandwidth
    print("memory read bandwidth (bandwidth.py, before and after the runs): "
          + ", ".join(f"{t} thread{'s' if t > 1 else ''} {v:.1f} GB/s" for t, v in bw.items()))
    head = (f"{'model':<8} {'N':>2} {'tok/s':>6} {'x 1':>5} {'bound':>5} {'mem':>5} {'goal':>5} {'Pi 5':>5} {'Pi 4':>5} {'ms/tok':>7} "
            f"{'compute':>8} {'sync':>6} {'over/x':>6} {'root kB s/r':>12}  per node: CPU ms (cores) / throttled ms, "
            f"per token")  # fmt: skip
    print(head)
    for m in a.models:
        base = med([o["decode_tps"] for o in results[(m, 1)]]) if (m, 1) in results else None
        base_ms = med([o["ms_median"] for o in results[(m, 1)]]) if (m, 1) in results else None
        base_cpu = med([o["node_cpu_ms"][0] for o in results[(m, 1)]]) if (m, 1) in results else None
        for n in a.nodes:
            rs = results[(m, n)]
            tps = med([o["decode_tps"] for o in rs])
            ratio = f"{tps / base:5.2f}" if base else "    -"
            ms = med([o["ms_median"] for o in rs])
            # what each of the 2L exchanges per token costs beyond a perfect 1/N split of the one-node time
            over = f"{1e3 * (ms - base_ms / n) / (2 * rs[0]['n_layers']):>6.0f}" if base_ms and n > 1 else "     -"
            goal = f"{GOALS[n]:5.1f}" if n in GOALS else "    -"
            # the most these nodes' CPU time per token allows: each node within its budget, all within the machine
            cpu = [med([o["node_cpu_ms"][i] for o in rs]) for i in range(n)]
            floor_ms = max(max(cpu) / budget, sum(cpu) / (os.cpu_count() or 1))
            bound = f"{base_cpu / budget / floor_ms:5.2f}" if base_cpu else "    -"
            # if decoding only streamed weights: one node reads at the 1-thread rate for `budget` of the time; N
            # nodes read at most N x that, and never more than the machine's bus gives min(N, cores) threads
            r1 = bw[1]
            mem = min(bw[min(n, os.cpu_count() or 1)], n * budget * r1) / (budget * r1)
            pi = f"{ORIGINAL_PI5[n] / ORIGINAL_PI5[1]:5.2f}" if n in ORIGINAL_PI5 else "    -"
            pi += f" {ORIGINAL_PI4_MS[1] / ORIGINAL_PI4_MS[n]:5.2f}" if n in ORIGINAL_PI4_MS else "     -"
            nodes = " ".join(f"{med([o['node_cpu_ms'][i] for o in rs]):.1f}({med([o['node_cores'][i] for o in rs]):.2f})"
                             f"/{med([o['node_throttled_ms'][i] for o in rs]):.1f}" for i in range(n))  # fmt: skip
            print(f"{m:<8} {n:>2} {tps:>6.2f} {ratio} {bound} {mem:5.2f} {goal} {pi} {ms:>7.1f} "
                  f"{med([o['compute_ms'] for o in rs]):>8.1f} {med([o['sync_ms'] for o in rs]):>6.1f} {over} "
                  f"{med([o['sent_per_token'] for o in rs]) / 1e3:>5.1f}/{med([o['recv_per_token'] for o in rs]) / 1e3:<6.1f}"
                  f"  {nodes}")  # fmt: skip
    print("(ms/tok, compute, sync: the root's median / mean ms per token; over/x: us per exchange beyond a perfect "
          "split of the one-node time;\n bound: the speed-up the nodes' CPU ms per token would allow at best, each node "
          f"at its {budget:g} core and all of them on the machine's {os.cpu_count()} cores;\n mem: an estimate of "
          "the speed-up the machine's memory bus allows if decoding were purely memory-bound: the emulated nodes share "
          "one bus, real machines each have their own)")
    loads = [o["load_avg"] for rs in results.values() for o in rs]
    print(f"load average during the runs: {min(loads):.1f} .. {max(loads):.1f}")


if __name__ == "__main__":
    main()
