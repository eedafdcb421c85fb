"""Long-run network fuzzing of a live `dllama worker` process (127.0.0.1 only).

Unauthenticated cases: connections that send random bytes, mutated HELLO / AUTH frames, random headers; the worker
must close each of them. Authenticated cases (we know the cluster secret, so this exercises the decoders behind
the handshake, with valid integrity tags on mutated payloads): mutated SETUP payloads, a valid SETUP for a tiny
model followed by mutated TENSOR frames, or the whole slice and then mutated FORWARD / STOP frames.

Checks: 0 crashes (the process stays up), 0 hangs (every connection is closed by the worker within a bound once we
stop sending), flat memory (VmRSS sampled), and at the end a good root gets correct results from the same worker.

    python scripts/fuzz_network.py --unauth 100000 --auth 20000
    python scripts/fuzz_network.py --unauth 5000 --auth 1000      # quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dllama.engine.engine import slot_of
from dllama.model.gguf_model import GGUFModel
from dllama.net import messages as M
from dllama.net import protocol as P
from dllama.net.conn import Conn
from dllama.runtime.root import Root
from dllama.split.plan import SplitPlan
from dllama.testing.synthetic import SHAPES, write_synthetic_gguf

SECRET = "fuzz-secret"
HANG_S = 15.0  # the worker's handshake deadline is 10 s; a connection still open after this is a hang


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            del b[i : i + rng.randint(1, 8)]
        elif op == 2:
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del b[i:]
        else:
            b[i : i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80"])
    return bytes(b)


def frame(mtype: int, payload: bytes) -> bytes:
    return P.header(mtype, len(payload)) + payload


class Worker:
    def __init__(self):
        env = dict(os.environ)
        env.pop("DLLAMA_SECRET", None)
        args = [sys.executable, "-m", "dllama", "worker", "--host", "127.0.0.1", "--port", "0", "--nthreads", "1",
                "--secret", SECRET]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        m = re.match(r"listening on (\S+)", self.proc.stdout.readline())
        if not m:
            raise SystemExit("worker did not start")
        self.address = m.group(1)
        self.port = int(self.address.rsplit(":", 1)[1])

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def alive(self) -> bool:
        return self.proc.poll() is None


def drain_until_closed(sock: socket.socket) -> bool:
    """True when the worker closed the connection within HANG_S."""
    sock.settimeout(HANG_S)
    end = time.monotonic() + HANG_S
    try:
        while time.monotonic() < end:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def unauth_case(port: int, seed: int) -> str:
    rng = random.Random(seed)
    hello = frame(M.HELLO, M.Hello(M.VERSION, rng.choice([1, 2, 0, 3]), rng.randbytes(16), rng.randbytes(16),
                                   rng.randrange(1 << 16)).encode())  # fmt: skip
    kind = rng.randrange(5)
    if kind == 0:
        data = rng.randbytes(rng.randint(0, 300))
    elif kind == 1:
        data = mutate(rng, hello)
    elif kind == 2:
        data = hello + mutate(rng, frame(M.AUTH, rng.randbytes(32)))
    elif kind == 3:
        data = P.header(rng.randrange(256), rng.randrange(1 << 32)) + rng.randbytes(rng.randint(0, 64))
    else:
        data = hello + frame(M.AUTH, rng.randbytes(32)) + rng.randbytes(rng.randint(0, 64))
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=HANG_S)
    except OSError as e:
        return f"connect: {e}"
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            return "ok"  # the worker closed first
        return "ok" if drain_until_closed(s) else "hang"
    finally:
        s.close()


class AuthFuzzer:
    """Sequential authenticated sessions (a worker serves one root at a time)."""

    def __init__(self, port: int, model: GGUFModel):
        self.port, self.model = port, model
        self.plan = SplitPlan.make(model.config, 2)
        self.share = self.plan.nodes[1]
        self.tensors = []
        for p in self.plan.placements(self.share):
            v = self.plan.view(self.share, p, model)
            head = M.TensorHead(p.layer, slot_of(p), p.expert, v.type, v.rows, v.cols).encode()
            self.tensors.append(head + bytes(v.contiguous()))

    def setup(self, rng: random.Random) -> bytes:
        s = M.Setup(self.plan.cfg, self.plan.split_weights, self.plan.nodes, 1, 32, 4, "q80", ("root", "127.0.0.1:1"),
                    rng.randbytes(16), False, bytes(32))  # fmt: skip
        return s.encode()

    def connect(self) -> Conn | None:
        for _ in range(200):
            c = Conn(socket.create_connection(("127.0.0.1", self.port), timeout=HANG_S), "worker", timeout=HANG_S)
            try:
                P.client_handshake(c, P.key_of(SECRET), M.ROLE_ROOT)
                return c
            except (P.RemoteError, P.PeerClosed):  # busy (the last session is being torn down), or at the
                c.close()  # cap on connections in the handshake while the unauthenticated ones drain
                time.sleep(0.01)
        return None

    def case(self, seed: int) -> str:
        rng = random.Random(seed)
        c = self.connect()
        if c is None:
            return "busy forever"
        try:
            kind = rng.randrange(4)
            setup = self.setup(rng)
            if kind == 0:
                obj = json.loads(setup)
                target = obj if rng.random() < 0.5 else obj["config"]
                key = rng.choice(sorted(target))
                target[key] = rng.choice([None, -1, 0, 1 << 62, "x", [1, 2], {"a": 1}, 1e308, True, [[0] * 6] * 3])
                c.sendall(frame(M.SETUP, json.dumps(obj).encode()))
            elif kind == 1:
                c.sendall(frame(M.SETUP, mutate(rng, setup)))
            else:
                c.sendall(frame(M.SETUP, setup))
                n = rng.randrange(len(self.tensors)) if kind == 2 else len(self.tensors)
                for t in self.tensors[:n]:
                    c.sendall(frame(M.TENSOR, t))
                if kind == 2:
                    c.sendall(frame(M.TENSOR, mutate(rng, self.tensors[n])))
                else:
                    c.timeout = HANG_S
                    P.recv(c, M.Ready)
                    dim = self.plan.cfg.dim
                    fwd = M.Forward(rng.randrange(8), 1, 0, rng.randrange(3), rng.randbytes(4 * dim)).encode()
                    c.sendall(frame(rng.choice([M.FORWARD, M.FORWARD, M.STOP, M.SETUP]), mutate(rng, fwd)))
            c.sock.shutdown(socket.SHUT_WR)
            c.sock.setblocking(True)
            return "ok" if drain_until_closed(c.sock) else "hang"
        except (OSError, P.PeerClosed, P.RemoteError, M.ProtocolError):
            return "ok"  # the worker refused and closed: what we want
        finally:
            c.close()


def good_root_works(address: str, model: GGUFModel) -> bool:
    from dllama.errors import DllamaError

    ids = [1, 2, 3, 4, 5]
    ref = Root(model, nthreads=1, max_seq=32, log=lambda *a: None).forward(ids, 0).copy()
    for _ in range(100):  # the last fuzz session may still be tearing down
        try:
            r = Root(model, nthreads=1, max_seq=32, workers=[address], secret=SECRET, sync="f32", log=lambda *a: None)
        except DllamaError as e:
            if "busy" not in str(e):
                raise
            time.sleep(0.1)
            continue
        with r:
            got = r.forward(ids, 0)
            return bool(np.corrcoef(got, ref)[0, 1] > 0.999 and got.argmax() == ref.argmax())
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unauth", type=int, default=100_000)
    ap.add_argument("--auth", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=8, help="parallel unauthenticated connections")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp()
    model = GGUFModel(write_synthetic_gguf(os.path.join(tmp, "tiny.gguf"), **SHAPES["tiny"], seed=2), verbose=False)
    w = Worker()
    rss = [w.rss_mb()]
    results: dict[str, int] = {}
    lock = threading.Lock()
    t0 = time.time()
    try:
        with ThreadPoolExecutor(args.threads) as ex:
            for i, r in enumerate(ex.map(lambda k: unauth_case(w.port, args.seed * 10**9 + k), range(args.unauth))):
                with lock:
                    results[f"unauth {r}"] = results.get(f"unauth {r}", 0) + 1
                if i % 2000 == 0:
                    rss.append(w.rss_mb())
                    if not w.alive():
                        break
        t1 = time.time()
        fz = AuthFuzzer(w.port, model)
        for i in range(args.auth):
            if not w.alive():
                break
            r = fz.case(args.seed * 10**9 + 500_000_000 + i)
            results[f"auth {r}"] = results.get(f"auth {r}", 0) + 1
            if i % 500 == 0:
                rss.append(w.rss_mb())
        t2 = time.time()
        alive = w.alive()
        rss.append(w.rss_mb() if alive else 0.0)
        good = alive and good_root_works(w.address, model)
    finally:
        if w.alive():
            w.proc.terminate()
            w.proc.wait(10)
    print(f"unauthenticated: {args.unauth} cases in {t1 - t0:.0f} s; authenticated: {args.auth} cases in {t2 - t1:.0f} s")
    print("outcomes:", ", ".join(f"{k}: {v}" for k, v in sorted(results.items())))
    print(f"worker VmRSS MB: start {rss[0]:.1f}, max {max(rss):.1f}, end {rss[-1]:.1f} (samples {len(rss)})")
    print(f"worker alive: {alive}; good root afterwards: {good}")
    hangs = sum(v for k, v in results.items() if not k.endswith(" ok"))
    warm = rss[min(3, len(rss) - 1)]
    flat = rss[-1] < warm + 64  # after warm-up (first sessions build engines), no steady growth
    ok = alive and good and hangs == 0 and flat
    print("PASS" if ok else f"FAIL (hangs/other {hangs}, memory flat {flat})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
