"""What the links' protection costs, measured where it happens, without the noise of whole forward passes:

1. the C mesh's all-to-all (dllama.net._mesh.TcpMesh.exchange, the engine's path) between N in-process nodes on
   socketpairs, one thread each: microseconds per exchange with no tags, AES-256-GMAC tags (the default) and
   AES-256-GCM (--encrypt), 2-4 nodes, for the partial-sum sizes of the default model (dim 576) and the 1B shape
   (dim 2048) in q80; a token costs 2 x n_layers exchanges;
2. the Python links (net/conn.py): microseconds per small frame (a FORWARD / LOGITS) and MB/s for shipped weights.

Modes interleaved in every round, medians.

    python bench/bench_link_crypto.py [--rounds 5] [--exchanges 2000]

`--vs-src DIR` compares instead the exchange of this tree with another tree's (DIR/src, built), 2-4 nodes,
default tags (whatever each tree's default is: HMAC-SHA256 before protocol version 4, AES-256-GMAC since),
interleaved, each measurement in a fresh process:

    python bench/bench_link_crypto.py --vs-src /path/to/other/checkout [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

from dllama.net import _mesh
from dllama.net import messages as M
from dllama.net import protocol as P
from dllama.net.conn import Conn

MODES = ("none", "gmac", "aes-gcm")  # the default tags: AES-256-GMAC
NODES = (2, 3, 4)
SHAPES = {"SmolLM2-135M (dim 576, 30 layers)": (576, 30), "1B shape (dim 2048, 16 layers)": (2048, 16)}


def meshes(n: int, mode: str) -> tuple[list, list[socket.socket]]:
    socks: dict[tuple[int, int], socket.socket] = {}
    for i in range(n):
        for j in range(i + 1, n):
            socks[i, j], socks[j, i] = socket.socketpair()
    keys = {(i, j): os.urandom(32) for i in range(n) for j in range(n) if i != j}  # key of frames i -> j
    out = []
    for i in range(n):
        fds, ks = [], []
        for j in range(n):
            if j == i:
                fds.append(-1)
                ks.append(None)
                continue
            socks[i, j].setblocking(False)
            fds.append(socks[i, j].fileno())
            ks.append(None if mode == "none" else (keys[i, j], keys[j, i], mode == "aes-gcm"))
        out.append(_mesh.TcpMesh(fds, i, M.PARTIAL_PREFIX, M.EXPLAIN_TYPES, 10_000, ks))
    return out, list(socks.values())


def exchange_us(n: int, mode: str, nbytes: int, count: int) -> float:
    ms, socks = meshes(n, mode)  # "gmac": (send, receive, False) keys, the default tag of the tree under test
    data = [os.urandom(nbytes) for _ in range(n)]
    barrier = threading.Barrier(n + 1)

    def node(i: int) -> None:
        barrier.wait()
        for step in range(count):
            ms[i].exchange(data[i], step)

    threads = [threading.Thread(target=node, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    for s in socks:
        s.close()
    return dt / count * 1e6


def conn_pair(mode: str) -> tuple[Conn, Conn]:
    a, b = socket.socketpair()
    ca, cb = Conn(a, "a", 10), Conn(b, "b", 10)
    if mode != "none":
        k = [os.urandom(32) for _ in range(4)]
        ca.start_integrity(k[0], k[1], (k[2], k[3]), encrypt=mode == "aes-gcm")
        cb.start_integrity(k[1], k[0], (k[3], k[2]), encrypt=mode == "aes-gcm")
    return ca, cb


def small_frame_us(mode: str, count: int) -> float:
    """A FORWARD with one Q4 embedding row sent and its 8-byte answer received back, per round trip."""
    ca, cb = conn_pair(mode)
    fwd = M.Forward(0, 1, 2, M.LOGITS_ARGMAX, os.urandom(576 // 32 * 20))
    ans = M.Logits(best=(1.0, 3))

    def echo() -> None:
        for _ in range(count):
            P.recv(cb, M.Forward, max_batch=1, max_seq=1 << 20, row_bytes=lambda t: len(fwd.rows))
            P.send(cb, ans)

    t = threading.Thread(target=echo)
    t.start()
    t0 = time.perf_counter()
    for _ in range(count):
        P.send(ca, fwd)
        P.recv(ca, M.Logits, mode=M.LOGITS_ARGMAX, vocab=(0, 10))
    dt = time.perf_counter() - t0
    t.join()
    ca.close()
    cb.close()
    return dt / count * 1e6


def weights_mb_s(mode: str, total: int = 64 << 20) -> float:
    ca, cb = conn_pair(mode)
    data = os.urandom(8 << 20)
    buf = bytearray(len(data))

    def recv() -> None:
        for _ in range(total // len(data)):
            _, length = P.recv_header(cb, (M.TENSOR,))
            P.recv_exact(cb, length, memoryview(buf))

    t = threading.Thread(target=recv)
    t.start()
    t0 = time.perf_counter()
    for _ in range(total // len(data)):
        ca.sendall(P.header(M.TENSOR, len(data)))
        ca.sendall(data)
    t.join()
    dt = time.perf_counter() - t0
    ca.close()
    cb.close()
    return total / dt / 1e6


def vs_src(other: str, rounds: int, count: int) -> None:
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    trees = {"this tree": here, os.path.abspath(other): os.path.join(other, "src")}
    res: dict[tuple, list[float]] = {}
    for r in range(rounds):
        for name, src in trees.items() if r % 2 == 0 else list(trees.items())[::-1]:
            for shape, (dim, _) in SHAPES.items():
                for n in NODES:
                    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n), str(dim * 34 // 32),
                                          str(count)], env=dict(os.environ, PYTHONPATH=src), stdout=subprocess.PIPE,
                                         text=True, check=True)  # fmt: skip
                    res.setdefault((name, shape, n), []).append(json.loads(out.stdout))
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-links", str(count)],
                                 env=dict(os.environ, PYTHONPATH=src), stdout=subprocess.PIPE, text=True, check=True)
            for what, x in json.loads(out.stdout).items():
                res.setdefault((name, what), []).append(x)
    print(f"C mesh all-to-all, default tags, q80, in-process nodes on socketpairs: us per exchange (and ms per token "
          f"= 2 x layers exchanges), medians of {rounds}")  # fmt: skip
    names = list(trees)
    print(f"{'model':<36} {'nodes':>5} " + " ".join(f"{n[-24:]:>24}" for n in names) + f" {'ratio':>6}"
          + " ".join(f"{'ms/tok ' + n[-10:]:>18}" for n in names) + f" {'diff ms/tok':>12}")  # fmt: skip
    for shape, (_, layers) in SHAPES.items():
        for n in NODES:
            u = [statistics.median(res[name, shape, n]) for name in names]
            tok = [x * 2 * layers / 1e3 for x in u]
            print(f"{shape:<36} {n:>5} " + " ".join(f"{x:>24.1f}" for x in u) + f" {u[0] / u[1]:>6.2f}"
                  + " ".join(f"{x:>18.3f}" for x in tok) + f" {tok[0] - tok[1]:>+12.3f}")  # fmt: skip
    print("\nPython links (net/conn.py), default tags")
    for what in ("FORWARD + LOGITS round trip, us", "weights, MB/s"):
        u = [statistics.median(res[name, what]) for name in names]
        print(f"{what:<42} " + " ".join(f"{x:>24.1f}" for x in u) + f" {u[0] / u[1]:>6.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--exchanges", type=int, default=2000)
    p.add_argument("--vs-src", metavar="DIR", help="compare this tree's exchange with DIR's")
    p.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-links", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child_links:
        return print(json.dumps({"FORWARD + LOGITS round trip, us": small_frame_us("gmac", a.child_links),
                                 "weights, MB/s": weights_mb_s("gmac")}))  # fmt: skip
    if a.child:
        n, nbytes, count = a.child
        return print(json.dumps(exchange_us(n, "gmac", nbytes, count)))
    if a.vs_src:
        return vs_src(a.vs_src, a.rounds, a.exchanges)
    ex: dict[tuple, list[float]] = {}
    small: dict[str, list[float]] = {m: [] for m in MODES}
    bulk: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(a.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            for shape, (dim, _) in SHAPES.items():
                for n in NODES:
                    ex.setdefault((shape, n, mode), []).append(exchange_us(n, mode, dim * 34 // 32, a.exchanges))
            small[mode].append(small_frame_us(mode, a.exchanges))
            bulk[mode].append(weights_mb_s(mode))
    med = statistics.median
    print(f"C mesh all-to-all, q80 partial sums, in-process nodes on socketpairs, medians of {a.rounds} rounds")
    print(f"{'model':<36} {'nodes':>5} {'none us':>8} {'gmac us':>8} {'aes-gcm us':>10} "
          f"{'gmac-none ms/tok':>16} {'gcm-none ms/tok':>15} {'gcm-gmac ms/tok':>15}")  # fmt: skip
    for shape, (_, layers) in SHAPES.items():
        for n in NODES:
            u = {m: med(ex[shape, n, m]) for m in MODES}
            per_tok = 2 * layers / 1e3
            print(f"{shape:<36} {n:>5} {u['none']:>8.1f} {u['gmac']:>8.1f} {u['aes-gcm']:>10.1f} "
                  f"{(u['gmac'] - u['none']) * per_tok:>+16.3f} {(u['aes-gcm'] - u['none']) * per_tok:>+15.3f} "
                  f"{(u['aes-gcm'] - u['gmac']) * per_tok:>+15.3f}")  # fmt: skip
    print("\nPython links (net/conn.py)")
    print(f"{'':<36} {'none':>8} {'gmac':>8} {'aes-gcm':>10}")
    print(f"{'FORWARD + LOGITS round trip, us':<36} " + " ".join(f"{med(small[m]):>8.1f}" for m in MODES[:2])
          + f" {med(small['aes-gcm']):>10.1f}")  # fmt: skip
    print(f"{'weights, MB/s':<36} " + " ".join(f"{med(bulk[m]):>8.0f}" for m in MODES[:2])
          + f" {med(bulk['aes-gcm']):>10.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
