"""The root's links to its workers: connect and authenticate, ship each worker its slice (all workers at
once), then per forward pass send the token embeddings and take part in the all-reduce of every layer.

Per token the root sends each worker one FORWARD (pos, T, the T embedding rows in the model's own type: a few
hundred bytes) and, per sync, its Q80 partial sum; nothing else crosses the network: the output head is on
the root, so no logits are gathered."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time

import numpy as np
from tqdm import tqdm

from dllama.errors import DllamaError
from dllama.model.gguf_model import LAYER_TENSORS
from dllama.net import protocol as P
from dllama.net.conn import Conn
from dllama.net.exchange import Exchange, NodeFailure
from dllama.net.setup import encode_setup

DATA_TIMEOUT = 60.0
READY_TIMEOUT = 600.0  # loading a big slice from disk can take a while


class ClusterLinks:
    def __init__(self, root, conns: list[Conn], addresses: list[str], buffer_type: str):
        self.root, self.conns, self.addresses = root, conns, addresses
        self.buffer_type = buffer_type
        self.broken: str | None = None
        self.exchange: Exchange | None = None
        self.full_logits: np.ndarray | None = None

    # ---------------- setup ----------------
    @classmethod
    def connect(cls, root, addresses: list[str], *, buffer_type: str, secret: str | None) -> ClusterLinks:
        key = P.key_of(secret)
        conns, hashes = [], []
        try:
            for i, addr in enumerate(addresses, 1):
                name = f"worker {i} ({addr})"
                sock = P.connect(addr)
                try:
                    hashes.append(P.client_handshake(sock, key, P.ROLE_ROOT))
                except DllamaError as e:
                    sock.close()
                    raise DllamaError(f"{name}: {e}") from None
                except OSError as e:
                    sock.close()
                    raise DllamaError(f"{name}: handshake failed ({e})") from None
                conns.append(Conn(sock, name, DATA_TIMEOUT))
            links = cls(root, conns, addresses, buffer_type)
            links._setup(hashes)
            return links
        except BaseException:
            for c in conns:
                c.close()
            raise

    def _setup(self, hashes: list[bytes]) -> None:
        root = self.root
        plan = root.plan
        model_hash = b"\0" * 32
        if any(h != b"\0" * 32 for h in hashes):
            from dllama.model.identity import content_hash

            model_hash = content_hash(root.model.path)
        session_id, session_key = os.urandom(16), os.urandom(32)
        peers = ["root"] + self.addresses
        raws = []
        for i, conn in enumerate(self.conns, 1):
            local = hashes[i - 1] == model_hash and model_hash != b"\0" * 32
            msg = encode_setup(plan, i, max_seq=root.max_seq, max_batch=root.max_batch, buffer_type=self.buffer_type,
                               peers=peers, session_id=session_id, session_key=session_key, local_weights=local,
                               model_hash=model_hash)  # fmt: skip
            raw = json.dumps(msg, separators=(",", ":")).encode()
            P.send(conn, P.SETUP, raw)
            raws.append((raw, local))
        self._ship_weights([(c, i) for i, c in enumerate(self.conns, 1) if not raws[i - 1][1]])
        for i, conn in enumerate(self.conns, 1):
            conn.timeout = READY_TIMEOUT
            try:
                ready = P.recv_json(conn, P.READY)
            except DllamaError as e:
                raise DllamaError(f"{conn.name}: {e}") from None
            conn.timeout = DATA_TIMEOUT
            if ready.get("plan_id") != hashlib.sha256(raws[i - 1][0]).hexdigest():
                raise DllamaError(f"{conn.name} built a different plan than the root sent")
            how = "read from its local model file" if raws[i - 1][1] else "shipped"
            root.log(
                f"{conn.name}: ready, {float(ready.get('weight_bytes', 0)) / 1e6:.1f} MB of weights ({how})"
            )
        self.exchange = Exchange(
            root.engine, 0, dict(enumerate(self.conns, 1)), self.buffer_type, DATA_TIMEOUT
        )

    def _ship_weights(self, targets: list[tuple[Conn, int]]) -> None:
        """Each worker gets only its slice; all workers are fed at once, one thread each."""
        if not targets:
            return
        root, plan = self.root, self.root.plan
        jobs = {}
        for conn, i in targets:
            share = plan.nodes[i]
            views = [
                (layer, slot, plan.slice(share, name, root.model.layer(layer, name)))
                for layer in range(root.cfg.n_layers)
                for slot, name in enumerate(LAYER_TENSORS)
            ]
            if share.vocab_rows:  # its rows of the output head, and the final norm
                views += [(-1, 0, root.model.output_norm), (-1, 1, root.model.output.row_slice(*share.vocab))]
            jobs[i] = (conn, views)
        total = sum(v.nbytes for _, views in jobs.values() for *_, v in views)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"sending weights to {len(jobs)} worker(s)",
                   file=sys.stderr, disable=None)  # fmt: skip
        lock = threading.Lock()
        errors: list[str] = []

        def ship(conn: Conn, views) -> None:
            try:
                for layer, slot, v in views:
                    data = v.contiguous()
                    conn.sendall(P.header(P.TENSOR, P.TENSOR_S.size + v.nbytes))
                    conn.sendall(P.TENSOR_S.pack(layer, slot, v.type, v.rows, v.cols))
                    conn.sendall(data)
                    with lock:
                        bar.update(v.nbytes)
            except (DllamaError, OSError) as e:
                errors.append(f"{conn.name}: sending weights failed: {e}")

        t0 = time.perf_counter()
        threads = [threading.Thread(target=ship, args=job, daemon=True) for job in jobs.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bar.close()
        if errors:
            raise DllamaError(errors[0])
        dt = time.perf_counter() - t0
        root.log(f"weights sent: {total / 1e6:.1f} MB in {dt:.2f} s ({total / 1e6 / max(dt, 1e-9):.0f} MB/s)")

    # ---------------- per token ----------------
    def forward(self, tokens: list[int], pos: int, logits: str = "full"):
        """Runs all layers over the cluster (the root's engine.x[:T] holds the embeddings on entry), then the
        output head on every node; returns the vocab-sized logits (see Root.forward) or None."""
        if self.broken:
            raise DllamaError(f"cluster unavailable: {self.broken}")
        root, ex = self.root, self.exchange
        mode = {"none": P.LOGITS_NONE, "argmax": P.LOGITS_ARGMAX, "full": P.LOGITS_FULL}[logits]
        T = len(tokens)
        emb = root.model.embedding
        rb = emb.row_bytes
        payload = bytearray(P.FORWARD_S.pack(pos, T, emb.type, mode))
        for t in tokens:
            start = emb.offset + int(t) * emb.stride
            payload += emb.base[start : start + rb].tobytes()
        net = 0.0
        sent0, recv0 = ex.bytes_sent, ex.bytes_recv
        received = 0
        try:
            t0 = time.perf_counter()
            for c in self.conns:
                c.sendall(P.header(P.FORWARD, len(payload)) + payload)
            net += time.perf_counter() - t0
            net += ex.forward(pos, T)
            out = None
            if mode != P.LOGITS_NONE:
                out = self._logits(T, mode)
                t0 = time.perf_counter()
                received = self._gather_logits(out, mode)
                net += time.perf_counter() - t0
        except NodeFailure as err:
            self.broken = str(err)
            raise DllamaError(f"worker failure: {err}") from None
        except DllamaError as err:
            self.broken = str(err)
            raise DllamaError(f"worker failure: {err}") from None
        root.network_s += net
        root.bytes_sent += (P.HEADER.size + len(payload)) * len(self.conns) + ex.bytes_sent - sent0
        root.bytes_recv += ex.bytes_recv - recv0 + received
        return out

    def _logits(self, T: int, mode: int) -> np.ndarray:
        root = self.root
        share = root.plan.nodes[0]
        if self.full_logits is None:
            self.full_logits = np.empty(root.cfg.vocab_size, dtype=np.float32)  # [vocab]
        if mode == P.LOGITS_ARGMAX:
            self.full_logits.fill(-np.inf)
        if share.vocab_rows:
            self.full_logits[share.vocab[0] : share.vocab[1]] = root.engine.compute_logits(T - 1)[
                : share.vocab_rows
            ]
        return self.full_logits

    def _gather_logits(self, out: np.ndarray, mode: int) -> int:
        received = 0
        for i, conn in enumerate(self.conns, 1):
            v0, v1 = self.root.plan.nodes[i].vocab
            size = P.ARGMAX_S.size if mode == P.LOGITS_ARGMAX else 4 * (v1 - v0)
            _, data = P.recv(conn, (P.LOGITS,), size)
            if len(data) != size:
                raise P.ProtocolError(f"{conn.name} sent {len(data)} bytes of logits, expected {size}")
            received += P.HEADER.size + size
            if mode == P.LOGITS_ARGMAX:
                value, idx = P.ARGMAX_S.unpack(data)
                if v0 <= idx < v1:
                    out[idx] = value
                elif v1 > v0:
                    raise P.ProtocolError(f"{conn.name} sent a token id outside its slice")
            else:
                out[v0:v1] = np.frombuffer(data, dtype=np.float32)
        return received

    def close(self) -> None:
        for c in self.conns:
            if not self.broken:
                try:
                    c.timeout = 2.0
                    P.send(c, P.STOP)
                except (DllamaError, OSError):
                    pass
            c.close()
