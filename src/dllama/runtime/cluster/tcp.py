"""The root's side of a TCP cluster: connect and authenticate the workers, send each its SETUP and its slice
(all workers at once), then per forward pass send the token embeddings, take part in the all-reduce of every layer
(in C, through the mesh) and gather the workers' slices of the output head (their best logit when greedy)."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from dllama.engine.engine import CommError, Engine, slot_of
from dllama.errors import DllamaError
from dllama.kv_cache import DEFAULT_KV_TYPE
from dllama.model.gguf_model import GGUFModel
from dllama.model.identity import content_hash
from dllama.net import messages as M
from dllama.net import protocol as P
from dllama.net.conn import Conn
from dllama.net.mesh import Counters, Mesh, NodeFailure
from dllama.split.plan import SplitPlan

DATA_TIMEOUT = 60.0  # the first steps (pages of weights still coming in from disk); later ones: Mesh.start_step
READY_TIMEOUT = 600.0  # loading a big slice from disk can take a while


@dataclass(frozen=True)
class Settings:
    max_seq: int
    max_batch: int
    sync: str
    secret: str | None
    check_residual: bool = False
    weight_bytes: tuple[int, ...] = ()  # exact bytes of each node's slice, so a worker can refuse before allocating
    kv_storage: str = "ram"
    kv_type: str = DEFAULT_KV_TYPE
    encrypt: bool = False  # every link AES-256-GCM encrypted


class TcpCluster:
    def __init__(self, conns: list[Conn], plan: SplitPlan, engine: Engine, mesh: Mesh):
        self.conns, self.plan, self.engine, self.mesh = conns, plan, engine, mesh
        self.n_nodes = plan.n_nodes
        self.broken: str | None = None
        self.wait_s = 0.0  # blocked outside the C mesh: sending FORWARD, waiting for the workers' logits
        self.full_logits = np.empty(plan.cfg.vocab_size, dtype=np.float32)  # [vocab]
        self.check_residual = False
        self.lock = threading.Lock()  # held during a step: probe() must not read the links meanwhile
        engine.set_comm(mesh)

    # ---------------- setup ----------------
    @classmethod
    def connect(cls, addresses: list[str], *, plan: SplitPlan, model: GGUFModel, engine: Engine, settings: Settings,
                log) -> TcpCluster:  # fmt: skip
        key = P.key_of(settings.secret)
        if settings.encrypt and not key:
            raise DllamaError("--encrypt needs a cluster secret (--secret or DLLAMA_SECRET): the keys are derived from it")
        conns, hashes = [], []
        try:
            for i, addr in enumerate(addresses, 1):
                conn = Conn(P.connect(addr), f"worker {i} ({addr})", DATA_TIMEOUT)
                conns.append(conn)
                try:
                    hashes.append(P.client_handshake(conn, key, M.ROLE_ROOT, encrypt=settings.encrypt))
                except DllamaError as e:
                    raise DllamaError(f"{conn.name}: {e}") from None
            if settings.encrypt:
                log("every link encrypted (AES-256-GCM, keys derived from the cluster secret per connection)")
            _setup(conns, hashes, plan, model, settings, log)
            cluster = cls(conns, plan, engine, Mesh(0, dict(enumerate(conns, 1)), DATA_TIMEOUT))
            cluster.check_residual = settings.check_residual
            return cluster
        except BaseException:
            for c in conns:
                c.close()
            raise

    # ---------------- per forward pass ----------------
    def step(self, pos: int, T: int, emb_type: int, rows: bytes, want: int) -> np.ndarray | None:
        if self.broken:
            raise DllamaError(f"cluster unavailable: {self.broken}")
        with self.lock:
            try:
                t0 = time.perf_counter()
                self.mesh.start_step(T)
                msg = M.Forward(pos, T, emb_type, want, rows)
                for c in self.conns:
                    P.send(c, msg)
                self.wait_s += time.perf_counter() - t0
                try:
                    self.engine.forward(pos, T)
                except CommError as e:
                    raise self.mesh.failure(e.args) from None
                if self.check_residual:
                    self._compare_residuals()
                out = None if want == M.LOGITS_NONE else self._logits(T, want)
            except (NodeFailure, DllamaError) as err:
                self.broken = str(err)
                self._drop()  # the other workers see the root go and free themselves at once
                raise DllamaError(f"worker failure: {err}") from None
            self.mesh.end_step(time.perf_counter() - t0, T)
            return out

    def _compare_residuals(self) -> None:
        """Debug check: every worker's residual stream after each block must equal the root's, bit for bit."""
        own = self.engine.residual_hashes()
        L = self.plan.cfg.n_layers
        for conn in self.conns:
            got = P.recv(conn, M.Residual, n_layers=L).hashes
            if got != own:
                step = next(i for i in range(2 * L) if got[8 * i : 8 * i + 8] != own[8 * i : 8 * i + 8])
                block = "attention" if step % 2 == 0 else "feed-forward"
                raise DllamaError(f"the residual stream of {conn.name} differs from the root's after the {block} "
                                  f"block of layer {step // 2}")  # fmt: skip

    def probe(self) -> bool:
        """While idle: False (and broken set) if a worker's link has closed or it sent something unasked."""
        if self.broken or not self.lock.acquire(blocking=False):
            return not self.broken
        try:
            for c in self.conns:
                if not c.readable_now():
                    continue
                try:
                    closed = c.sock.recv(1, socket.MSG_PEEK) == b""
                except BlockingIOError:
                    continue
                except OSError:
                    closed = True
                self.broken = f"{c.name} {'disconnected' if closed else 'sent an unexpected message'}"
                self._drop()
                return False
            return True
        finally:
            self.lock.release()

    def _drop(self) -> None:
        for c in self.conns:
            c.close()

    def _logits(self, T: int, want: int) -> np.ndarray:
        out, share = self.full_logits, self.plan.nodes[0]
        if want == M.LOGITS_ARGMAX:
            out.fill(-np.inf)
        if share.vocab_rows:
            out[share.vocab[0] : share.vocab[1]] = self.engine.compute_logits(T - 1)[: share.vocab_rows]
        t0 = time.perf_counter()
        for i, conn in enumerate(self.conns, 1):
            v0, v1 = self.plan.nodes[i].vocab
            got = P.recv(conn, M.Logits, mode=want, vocab=(v0, v1))
            if got.best is not None:
                if v1 > v0:
                    if not np.isfinite(got.best[0]):
                        raise NodeFailure(i, f"{conn.name} sent a non-finite logit ({got.best[0]})")
                    out[got.best[1]] = got.best[0]
            else:
                out[v0:v1] = np.frombuffer(got.values, dtype=np.float32)
                if not np.isfinite(out[v0:v1]).all():
                    raise NodeFailure(i, f"{conn.name} sent NaN or infinite logits")
        self.wait_s += time.perf_counter() - t0
        return out

    def counters(self) -> Counters:
        c = self.mesh.counters()
        c.network_s += self.wait_s
        return c

    def close(self) -> None:
        self.engine.set_comm(None)
        for c in self.conns:
            if not self.broken:
                try:
                    c.timeout = 2.0
                    P.send(c, M.Stop())
                except (DllamaError, OSError):
                    pass
            c.close()


def _setup(conns: list[Conn], hashes: list[bytes], plan: SplitPlan, model: GGUFModel, s: Settings, log) -> None:
    zero = b"\0" * 32
    model_hash = content_hash(model.path) if any(h != zero for h in hashes) else zero
    session_id = os.urandom(16)
    peers = ("root", *(c.name.split("(")[-1].rstrip(")") for c in conns))
    sent = []
    for i, conn in enumerate(conns, 1):
        local = hashes[i - 1] == model_hash != zero
        setup = M.Setup(plan.cfg, plan.split_weights, plan.nodes, i, s.max_seq, s.max_batch, s.sync, peers, session_id,
                        local, model_hash, s.check_residual, s.weight_bytes[i] if s.weight_bytes else 0,
                        s.kv_storage, s.kv_type)  # fmt: skip
        raw = setup.encode()
        conn.sendall(P.header(M.SETUP, len(raw)) + raw)
        sent.append((hashlib.sha256(raw).digest(), local))
    _ship_weights([(c, i) for i, c in enumerate(conns, 1) if not sent[i - 1][1]], plan, model, log)
    for i, conn in enumerate(conns, 1):
        conn.timeout = READY_TIMEOUT
        try:
            ready = P.recv(conn, M.Ready)
        except DllamaError as e:
            raise DllamaError(f"{conn.name}: {e}") from None
        conn.timeout = DATA_TIMEOUT
        if ready.plan_id != sent[i - 1][0]:
            raise DllamaError(f"{conn.name} built a different plan than the root sent")
        how = "read from its local model file" if sent[i - 1][1] else "shipped"
        log(f"{conn.name}: ready, {ready.weight_bytes / 1e6:.1f} MB of weights ({how})")


def _ship_weights(targets: list[tuple[Conn, int]], plan: SplitPlan, model: GGUFModel, log) -> None:
    """Each worker gets only its slice, tensor by tensor in placement order; all workers are fed at once."""
    if not targets:
        return
    jobs = [(conn, plan.nodes[i]) for conn, i in targets]
    total = sum(plan.node_bytes(share, model) for _, share in jobs)
    from tqdm import tqdm  # only when shipping weights: ~17 ms of every start otherwise

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"sending weights to {len(jobs)} worker(s)",
               file=sys.stderr, disable=None)  # fmt: skip
    lock = threading.Lock()
    errors: list[str] = []

    def ship(conn: Conn, share) -> None:
        try:
            for p in plan.placements(share):
                v = plan.view(share, p, model)
                head = M.TensorHead(p.layer, slot_of(p), p.expert, v.type, v.rows, v.cols).encode()
                conn.sendall(P.header(M.TENSOR, len(head) + v.nbytes) + head)
                conn.sendall(v.contiguous())
                model.release(v)  # the root holds none of a worker's slice
                with lock:
                    bar.update(v.nbytes)
        except (DllamaError, OSError) as e:
            errors.append(f"{conn.name}: sending weights failed: {P.peer_explanation(conn) or e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=ship, args=job, daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    if errors:
        raise DllamaError(errors[0])
    dt = time.perf_counter() - t0
    log(f"weights sent: {total / 1e6:.1f} MB in {dt:.2f} s ({total / 1e6 / max(dt, 1e-9):.0f} MB/s)")
