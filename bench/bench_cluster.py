"""Distributed speed on one machine: the 1B-shape synthetic model (Q4_0) on
  1 node x 2 threads | 2 nodes x 1 thread (loopback) | 4 nodes x 1 thread (loopback) |
  2 nodes x 1 thread in two network namespaces over a veth pair limited to 1 Gbit/s (needs root).
The nodes share this machine's 2 cores, so more nodes cannot be faster here; the goals are 2 nodes >= 0.95 x and
4 nodes >= 0.8 x the 1-node speed, and root bytes per token well under the original's (77.8 kB sent + 167.9 kB
received at 2 nodes). Setups run interleaved, several rounds, medians.

    python bench/bench_cluster.py [--rounds 3] [--buffer-float-type q80]

The cost of `--encrypt` (every link AES-256-GCM): 2 and 3 local nodes, with and without, interleaved, on the
default model and the 1B-shape model; per-token time difference of the medians:

    python bench/bench_cluster.py --encrypt-ab [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import dllama_peer  # noqa: E402
from dllama_peer import bench_dllama  # noqa: E402
from llamacpp_peer import default_prompt_tokens  # noqa: E402
from models import synthetic_1b  # noqa: E402

ORIGINAL = {  # the original C++ system on this machine kind (shared/notes/measurements.md)
    "1 node x 2 thr": "19.9 tok/s",
    "2 nodes loopback": "20.7 tok/s, net 6.5 %, 77.8 / 167.9 kB",
    "4 nodes loopback": "6.9 tok/s, net 82 %, 233.5 / 356.4 kB",
    "2 nodes veth 1 Gbit/s": "19.1 tok/s, net 7.9 %",
}


def veth_worker(net, secret: str):
    p = subprocess.Popen([*net.prefix(net.ns_b), sys.executable, "-m", "dllama", "worker", "--host", net.addr_b,
                          "--port", "9990", "--nthreads", "1", "--secret", secret],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    assert p.stdout.readline().startswith("listening on")
    return p


def encrypted_root_child(model: str, workers: list[str], n_decode: int, prompt: list[int]) -> None:
    """In a fresh process: dllama_peer's measurement with a root that encrypts every link."""
    import dllama.runtime.root as R

    R.Root = functools.partial(R.Root, encrypt=True)  # dllama_peer builds its Root from this module
    print(json.dumps(dllama_peer._bench_inprocess(model, 1, n_decode, prompt, workers, os.environ["DLLAMA_SECRET"])))


def run_encrypted(model: str, lw, n_decode: int, prompt: list[int]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", model, "--n-decode", str(n_decode),
           "--prompt-json", json.dumps(prompt), "--child-workers", *lw.addresses]  # fmt: skip
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, DLLAMA_SECRET=lw.secret))
    if r.returncode != 0:
        raise RuntimeError(f"encrypted benchmark failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def encrypt_ab(rounds: int) -> None:
    """2 and 3 local nodes x {plain, --encrypt} x {default model, 1B shape}, interleaved."""
    from dllama.model.default import default_model_path
    from dllama.runtime.local_workers import LocalWorkers

    models = {"SmolLM2-135M Q4_1": (default_model_path(), 128), "1B-shape Q4_0": (synthetic_1b(), 48)}
    prompt = default_prompt_tokens(32)
    setups = [(m, n, enc) for m in models for n in (2, 3) for enc in (False, True)]
    results: dict[tuple, list[dict]] = {s: [] for s in setups}
    for r in range(rounds):
        for s in setups if r % 2 == 0 else setups[::-1]:
            m, n, enc = s
            path, n_decode = models[m]
            print(f"round {r + 1}: {m}, {n} nodes, {'encrypted' if enc else 'plain'}", file=sys.stderr)
            lw = LocalWorkers(n - 1, nthreads=1, encrypt=enc)
            try:
                if enc:
                    out = run_encrypted(path, lw, n_decode, prompt)
                else:
                    out = bench_dllama(path, 1, n_decode, prompt, workers=lw.addresses, secret=lw.secret)
            finally:
                lw.close()
            results[s].append(out)
    print(f"\n--encrypt cost: decode, 1 thread per node on loopback, median step times, medians of {rounds} rounds")
    print(f"{'model':<20} {'nodes':>5} {'plain ms/tok':>12} {'encrypted':>10} {'cost ms/tok':>11} {'cost %':>7} "
          f"{'same tokens':>11}")  # fmt: skip
    for m in models:
        for n in (2, 3):
            ms = {}
            for enc in (False, True):
                ms[enc] = statistics.median(o["decode_ms_median"] for o in results[(m, n, enc)])
            same = all(o["tokens"] == results[(m, n, False)][0]["tokens"] for enc in (False, True)
                       for o in results[(m, n, enc)])  # fmt: skip
            d = ms[True] - ms[False]
            print(f"{m:<20} {n:>5} {ms[False]:>12.2f} {ms[True]:>10.2f} {d:>+11.3f} {100 * d / ms[False]:>+6.1f}% "
                  f"{str(same):>11}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n-decode", type=int, default=128)
    p.add_argument("--buffer-float-type", default="q80", choices=["q80", "f32"])
    p.add_argument("--encrypt-ab", action="store_true", help="measure the cost of --encrypt instead")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-workers", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--prompt-json", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return encrypted_root_child(a.child, a.child_workers, a.n_decode, json.loads(a.prompt_json))
    if a.encrypt_ab:
        return encrypt_ab(a.rounds)
    from dllama.runtime.local_workers import LocalWorkers

    path = synthetic_1b()
    prompt = default_prompt_tokens(32)
    bt = a.buffer_float_type
    setups = ["1 node x 2 thr", "2 nodes loopback", "4 nodes loopback"]
    net = None
    if os.geteuid() == 0:
        from netns import VethPair

        net = VethPair(tag="dlbench", rate="1gbit")
        setups.append("2 nodes veth 1 Gbit/s")
    else:
        print("not root: skipping the veth setup (needs network namespaces)", file=sys.stderr)
    results = {s: [] for s in setups}
    try:
        for r in range(a.rounds):
            for s in setups if r % 2 == 0 else setups[::-1]:
                print(f"round {r + 1}: {s}", file=sys.stderr)
                if s == "1 node x 2 thr":
                    out = bench_dllama(path, 2, a.n_decode, prompt)
                elif s.endswith("loopback"):
                    k = int(s[0]) - 1
                    lw = LocalWorkers(k, nthreads=1)
                    try:
                        out = bench_dllama(path, 1, a.n_decode, prompt, workers=lw.addresses, secret=lw.secret,
                                           buffer_type=bt)  # fmt: skip
                    finally:
                        lw.close()
                else:
                    w = veth_worker(net, "bench")
                    try:
                        out = bench_dllama(path, 1, a.n_decode, prompt, workers=[f"{net.addr_b}:9990"],
                                           secret="bench", buffer_type=bt, prefix=net.prefix(net.ns_a))  # fmt: skip
                    finally:
                        w.terminate()
                        w.wait()
                results[s].append(out)
    finally:
        if net:
            net.close()
    base = statistics.median(o["decode_tps"] for o in results["1 node x 2 thr"])
    print(f"\n1B-shape Q4_0, decode {a.n_decode} tokens, sync {bt}, medians of {a.rounds} rounds")
    print(
        f"{'setup':<24} {'tok/s':>7} {'x 1 node':>8} {'network':>8} {'root sent':>10} {'root recv':>10}   original"
    )
    for s in setups:
        med = lambda k, s=s: statistics.median(o[k] for o in results[s])  # noqa: E731
        print(
            f"{s:<24} {med('decode_tps'):>7.1f} {med('decode_tps') / base:>8.2f} {100 * med('network_share'):>7.1f}% "
            f"{med('root_sent_per_token') / 1e3:>8.1f}kB {med('root_recv_per_token') / 1e3:>8.1f}kB   {ORIGINAL[s]}"
        )


if __name__ == "__main__":
    main()
