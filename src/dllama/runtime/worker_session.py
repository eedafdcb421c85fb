"""One root's session on a worker: read SETUP, build the engine and put the slice straight into it (received
tensor by tensor, or read from the worker's own copy of the model file), join the all-to-all mesh, then compute
its part of every layer on command until the root says stop or goes away."""

from __future__ import annotations

import hashlib
import queue
import time

import numpy as np

from dllama.engine.engine import CommError, Engine, embed_rows, slot_of, sync_in_pairs
from dllama.errors import DllamaError
from dllama.model.tensor_view import TensorView
from dllama.model.weight_types import NATIVE, row_bytes
from dllama.net import messages as M
from dllama.net import protocol as P
from dllama.net.conn import Conn
from dllama.net.mesh import Mesh
from dllama.runtime.memory import NodeMemory, buffer_bytes, check_fits, kv_cache_bytes, kv_directory
from dllama.split.plan import Placement

HANDSHAKE_TIMEOUT = 10.0
DATA_TIMEOUT = 60.0
PEER_WAIT = 30.0  # how long to wait for the other workers of a session to connect


class WorkerSession:
    def __init__(self, server, root: Conn):
        self.server, self.root = server, root
        self.peer_queue: queue.Queue = queue.Queue()
        self.setup: M.Setup | None = None
        self.mesh: Mesh | None = None

    @property
    def session_id(self) -> bytes:
        return self.setup.session_id if self.setup else b""

    def log(self, msg: str) -> None:
        self.server.log(msg)

    # ---- setup ----
    def _recv_tensor(self, engine: Engine, p: Placement) -> None:
        """One TENSOR frame, which must be exactly the expected tensor: checked before allocating, then received
        straight into the buffer the engine keeps."""
        _, length = P.recv_header(self.root, (M.TENSOR,))
        if length < M.TENSOR_HEAD.size:
            raise M.ProtocolError("TENSOR too short")
        h = M.TensorHead.decode(bytes(P.recv_exact(self.root, M.TENSOR_HEAD.size)))
        want = (p.layer, slot_of(p), p.expert, p.rows, p.cols)
        if (h.layer, h.slot, h.expert, h.rows, h.cols) != want:
            raise M.ProtocolError(f"unexpected tensor (layer {h.layer}, slot {h.slot}, expert {h.expert}, "
                                  f"{h.rows}x{h.cols}); wanted {p.spec.name} {want}")  # fmt: skip
        allowed = (0,) if p.spec.vector else [int(t) for t in NATIVE]  # vectors F32
        if h.qtype not in allowed or (h.qtype not in (0, 1) and h.cols % 32):
            raise M.ProtocolError(f"tensor type {h.qtype} not allowed for {p.spec.name}")
        nbytes = h.rows * row_bytes(h.qtype, h.cols)
        if length != M.TENSOR_HEAD.size + nbytes:
            raise M.ProtocolError(f"TENSOR {p.spec.name} has {length} bytes, expected {M.TENSOR_HEAD.size + nbytes}")
        data = np.empty(nbytes, dtype=np.uint8)
        P.recv_exact(self.root, nbytes, memoryview(data))
        engine.set(p, TensorView(data, 0, h.qtype, h.rows, h.cols, row_bytes(h.qtype, h.cols)))

    def _load(self, engine: Engine, s: M.Setup) -> None:
        plan, share = s.plan, s.share
        if s.local_weights:
            if s.model_hash != self.server.model_hash:
                raise M.ProtocolError("root asked for local weights but our model file differs")
            model = self.server.local_model()
            if model.config.n_layers != plan.cfg.n_layers or model.config.dim != plan.cfg.dim:
                raise M.ProtocolError("local model does not match the root's model")
            for p in plan.placements(share):
                engine.set(p, plan.view(share, p, model).packed_copy())
            self.log(f"session: node {s.index}, slice read from the local model file")
        else:
            for p in plan.placements(share):
                self._recv_tensor(engine, p)
        engine.ready()

    def _mesh(self, s: M.Setup) -> dict[int, Conn]:
        """Connections to every other node: the root's, ours to lower-indexed workers, theirs to us."""
        links = {0: self.root}
        me, key = s.index, P.session_key(self.server.key, s.session_id)
        for j in range(1, me):
            links[j] = self._connect_peer(j, s.peers[j], key, s)
        expected = set(range(me + 1, len(s.peers)))
        while expected:
            try:
                j, conn = self.peer_queue.get(timeout=PEER_WAIT)
            except queue.Empty:
                raise M.ProtocolError(f"peer workers {sorted(expected)} did not connect within {PEER_WAIT:.0f} s") from None
            if j not in expected:  # an index outside the session, ours, or a duplicate: never trusted
                self.log(f"refused a peer claiming node index {j}")
                conn.close()
                continue
            expected.discard(j)
            links[j] = conn
        return links

    def _connect_peer(self, j: int, address: str, key: bytes, s: M.Setup) -> Conn:
        """A lower-indexed peer may not have read its SETUP yet: retry while it says it knows no such session."""
        last = None
        for _ in range(int(PEER_WAIT / 0.25)):
            conn = Conn(P.connect(address, timeout=HANDSHAKE_TIMEOUT), f"worker {j} ({address})", DATA_TIMEOUT)
            try:
                P.client_handshake(conn, key, M.ROLE_PEER, s.session_id, s.index, encrypt=self.root.encrypted)
                return conn
            except P.RemoteError as e:
                conn.close()
                last = e
                if "no such session" not in str(e):
                    raise
                self.server.stopped.wait(0.25)
        raise M.ProtocolError(f"worker {j} ({address}) never joined the session: {last}")

    def run(self) -> None:
        root = self.root
        _, length = P.recv_header(root, (M.SETUP,))
        raw = bytes(P.recv_exact(root, length))
        s = self.setup = M.Setup.decode(raw)
        plan, share = s.plan, s.share
        # refuse, with the numbers, before allocating anything: the slice's exact bytes come with SETUP
        weights = s.weight_bytes or sum(p.rows * p.cols for p in plan.placements(share))  # else ~1 byte a weight
        kv_dir = kv_directory(s.kv_storage, self.server.kv_dir)
        kv = 0 if kv_dir else kv_cache_bytes(plan.cfg, share.n_kv_heads, s.max_seq, s.kv_type)
        check_fits(NodeMemory(weights, kv,
                              buffer_bytes(plan.cfg, share.n_heads, share.n_kv_heads, share.hidden, share.vocab_rows,
                                           s.max_seq, s.max_batch, self.server.nthreads), kv_type=s.kv_type),
                   f"worker node {s.index}")  # fmt: skip
        self.server.current_session = self  # peers may connect from now on
        engine = Engine(plan.cfg, share, max_seq=s.max_seq, max_batch=s.max_batch, nthreads=self.server.nthreads,
                        sync=s.sync, check_residual=s.check_residual, kv_dir=kv_dir, kv_type=s.kv_type)  # fmt: skip
        self._load(engine, s)
        self.mesh = Mesh(s.index, self._mesh(s), DATA_TIMEOUT)
        engine.set_comm(self.mesh)
        P.send(root, M.Ready(engine.weight_bytes, hashlib.sha256(raw).digest()))
        self.log(f"session: node {s.index} of {plan.n_nodes}: {share.n_heads} q heads, {share.n_kv_heads} kv heads, "
                 f"{share.hidden} ffn rows, {engine.weight_bytes / 1e6:.1f} MB of weights; ready")  # fmt: skip
        try:
            self._serve(engine, s)
        finally:
            engine.set_comm(None)

    def _serve(self, engine: Engine, s: M.Setup) -> None:
        dim = s.config.dim
        while True:
            self.root.timeout = None  # idle: wait for the root as long as it likes (keepalive watches it)
            msg = self._next(s)
            if isinstance(msg, M.Stop):
                self.log("session: root said stop")
                return
            t0 = time.perf_counter()
            self.mesh.start_step(msg.T)  # the same step timeout as the root's, from this node's own steps
            embed_rows(msg.rows, msg.emb_type, dim, engine.x)
            try:
                engine.forward(msg.pos, msg.T)
            except CommError as e:
                failure = self.mesh.failure(e.args)
                # tell the root which peer failed before we leave (or why its own frames were refused), and every
                # peer: in a butterfly (sync_in_pairs) the nodes waiting for us learn who failed, not just that we left
                why = M.Abort(failure.node, str(failure)) if failure.node else M.Error(str(failure))
                for j, conn in sorted(self.mesh.links.items()):
                    if j == 0 or (j != failure.node and sync_in_pairs(len(self.mesh.links) + 1)):
                        try:
                            P.send(conn, why)
                        except (OSError, DllamaError):
                            pass
                raise failure from None
            if s.check_residual:
                P.send(self.root, M.Residual(engine.residual_hashes()))
            if msg.logits != M.LOGITS_NONE:
                self._send_logits(engine, s, msg.T, msg.logits)
            self.mesh.end_step(time.perf_counter() - t0, msg.T)

    def _next(self, s: M.Setup) -> M.Message:
        mtype, length = P.recv_header(self.root, (M.FORWARD, M.STOP))
        self.root.timeout = DATA_TIMEOUT
        payload = bytes(P.recv_exact(self.root, length)) if length else b""
        if mtype == M.STOP:
            return M.Stop.decode(payload)
        dim = s.config.dim
        return M.Forward.decode(payload, max_batch=s.max_batch, max_seq=s.max_seq, row_bytes=lambda t: row_bytes(t, dim))

    def _send_logits(self, engine: Engine, s: M.Setup, T: int, mode: int) -> None:
        """This node's slice of the output head: its best (logit, token id) or all its logits, f32."""
        share = s.share
        if not share.vocab_rows:
            P.send(self.root, M.Logits(best=(float("-inf"), 0)) if mode == M.LOGITS_ARGMAX else M.Logits())
            return
        logits = engine.compute_logits(T - 1)[: share.vocab_rows]
        if mode == M.LOGITS_ARGMAX:
            i = int(np.argmax(logits))
            P.send(self.root, M.Logits(best=(float(logits[i]), share.vocab[0] + i)))
        else:
            P.send(self.root, M.Logits(values=logits.tobytes()))

    def close(self) -> None:
        if self.mesh is not None:
            for j, c in self.mesh.links.items():
                if j != 0:
                    c.close()
        self.root.close()
