"""A worker node: waits for a root, proves it, receives its slice of the model, computes its part of every
layer on command, and when the root says stop or goes away frees everything and waits for the next root.

One root at a time; a second root is told the worker is busy. Other workers of the same session connect to
this worker's port too (the all-to-all mesh); they authenticate with the session key the root handed out."""

from __future__ import annotations

import gc
import hashlib
import json
import queue
import socket
import sys
import threading

import numpy as np
from gguf import GGMLQuantizationType as QT

from dllama.engine.node import NodeEngine, kv_cache_bytes
from dllama.errors import DllamaError
from dllama.model.gguf_model import LAYER_TENSORS, NATIVE_TYPES, TensorView, row_bytes
from dllama.net import protocol as P
from dllama.net.conn import Conn
from dllama.net.exchange import Exchange, NodeFailure
from dllama.net.setup import decode_setup
from dllama.runtime.memory import available_bytes

HANDSHAKE_TIMEOUT = 10.0
DATA_TIMEOUT = 60.0


def expected_shapes(plan, share) -> dict[str, tuple[int, int]]:
    cfg = plan.cfg
    hd = cfg.head_dim
    return {
        "attn_norm": (1, cfg.dim),
        "attn_q": (share.n_heads * hd, cfg.dim),
        "attn_k": (share.n_kv_heads * hd, cfg.dim),
        "attn_v": (share.n_kv_heads * hd, cfg.dim),
        "attn_output": (cfg.dim, share.n_heads * hd),
        "ffn_norm": (1, cfg.dim),
        "ffn_gate": (share.hidden, cfg.dim),
        "ffn_up": (share.hidden, cfg.dim),
        "ffn_down": (cfg.dim, share.hidden),
    }


def slice_elements(plan, share) -> int:
    """Weights this node holds (elements), for the memory check before anything is allocated."""
    return sum(r * c for r, c in expected_shapes(plan, share).values()) * plan.cfg.n_layers


class WorkerSession:
    def __init__(self, server: WorkerServer, root: Conn):
        self.server, self.root = server, root
        self.peer_queue: queue.Queue = queue.Queue()
        self.session_id = b""
        self.session_key = b""
        self.tensors: dict[tuple[int, str], TensorView] = {}
        self._links: dict[int, Conn] = {}

    def log(self, msg: str) -> None:
        self.server.log(msg)

    # ---- setup ----
    def _recv_tensor(self, layer: int, slot: int, name: str, rows: int, cols: int) -> TensorView:
        """One TENSOR frame, which must be exactly the expected tensor: checked before allocating."""
        mtype, length = P.parse_header(P.recv_exact(self.root, P.HEADER.size), (P.TENSOR,))
        if mtype != P.TENSOR:  # the root sent ERROR / ABORT instead
            raise P.RemoteError(P.decode_error(mtype, bytes(P.recv_exact(self.root, length))))
        if length < P.TENSOR_S.size:
            raise P.ProtocolError("TENSOR too short")
        lay, sl, qtype, r, c = P.TENSOR_S.unpack(P.recv_exact(self.root, P.TENSOR_S.size))
        if (lay, sl) != (layer, slot) or (r, c) != (rows, cols):
            raise P.ProtocolError(f"unexpected tensor (layer {lay}, slot {sl}, {r}x{c}); wanted {name}")
        allowed = {QT.F32} if rows == 1 and name.endswith("norm") else NATIVE_TYPES
        if qtype not in [int(t) for t in allowed] or (qtype not in (QT.F32, QT.F16) and cols % 32):
            raise P.ProtocolError(f"tensor type {qtype} not allowed for {name}")
        nbytes = rows * row_bytes(qtype, cols)
        if length != P.TENSOR_S.size + nbytes:
            raise P.ProtocolError(f"TENSOR {name} has {length} bytes, expected {P.TENSOR_S.size + nbytes}")
        data = np.empty(nbytes, dtype=np.uint8)
        P.recv_exact(self.root, nbytes, memoryview(data))
        return TensorView(data, 0, qtype, rows, cols, row_bytes(qtype, cols))

    def _receive_weights(self, plan, share) -> None:
        shapes = expected_shapes(plan, share)
        self.tensors = {
            (layer, name): self._recv_tensor(layer, slot, name, *shapes[name])
            for layer in range(plan.cfg.n_layers)
            for slot, name in enumerate(LAYER_TENSORS)
        }
        if share.vocab_rows:  # the final norm and this node's rows of the output head
            self.tensors[(-1, "output_norm")] = self._recv_tensor(-1, 0, "output_norm", 1, plan.cfg.dim)
            self.tensors[(-1, "output")] = self._recv_tensor(-1, 1, "output", share.vocab_rows, plan.cfg.dim)

    def _load_local(self, plan, share) -> None:
        model = self.server.local_model()
        if model.config.n_layers != plan.cfg.n_layers or model.config.dim != plan.cfg.dim:
            raise P.ProtocolError("local model does not match the root's model")
        self.tensors = {
            (layer, name): plan.slice(share, name, model.layer(layer, name)).packed_copy()
            for layer in range(plan.cfg.n_layers)
            for name in LAYER_TENSORS
        }
        if share.vocab_rows:
            self.tensors[(-1, "output_norm")] = model.output_norm
            self.tensors[(-1, "output")] = model.output.row_slice(*share.vocab).packed_copy()

    def _mesh(self, s: dict) -> dict[int, Conn]:
        """Connections to every other node: the root's, ours to lower-indexed workers, theirs to us."""
        links = {0: self.root}
        me = s["index"]
        for j in range(1, me):
            sock = P.connect(s["peers"][j], timeout=HANDSHAKE_TIMEOUT)
            P.client_handshake(sock, self.session_key, P.ROLE_PEER, self.session_id, me)
            links[j] = Conn(sock, f"worker {j} ({s['peers'][j]})", DATA_TIMEOUT)
        for _ in range(me + 1, len(s["peers"])):
            try:
                j, sock = self.peer_queue.get(timeout=30)
            except queue.Empty:
                raise P.ProtocolError("peer workers did not connect within 30 s") from None
            links[j] = Conn(sock, f"worker {j}", DATA_TIMEOUT)
        return links

    def run(self) -> None:
        root = self.root
        raw = P.recv(root, (P.SETUP,))[1]
        try:
            s = decode_setup(json.loads(raw))
        except (ValueError, UnicodeDecodeError):
            raise P.ProtocolError("malformed SETUP") from None
        plan, share = s["plan"], s["share"]
        self.session_id, self.session_key = s["session_id"], s["session_key"]
        # ~1 byte per weight (Q8_0; 4-bit slices need about half) plus the KV cache
        need = slice_elements(plan, share) + kv_cache_bytes(plan.cfg, share, s["max_seq"])
        if need > available_bytes():
            raise DllamaError(
                f"not enough memory on this worker: its slice needs ~{need / 2**30:.1f} GiB, "
                f"{available_bytes() / 2**30:.1f} GiB available"
            )
        self.server.current_session = self  # peers may connect from now on
        if s["local_weights"]:
            if s["model_hash"] != self.server.model_hash:
                raise P.ProtocolError("root asked for local weights but our model file differs")
            self._load_local(plan, share)
            self.log(f"session: node {s['index']}, slice read from the local model file")
        else:
            self._receive_weights(plan, share)
        engine = NodeEngine(
            plan.cfg, share, lambda layer, name: self.tensors[(layer, name)],
            self.tensors.get((-1, "output")), self.tensors.get((-1, "output_norm")),
            max_seq=s["max_seq"], max_batch=s["max_batch"], nthreads=self.server.nthreads,
        )  # fmt: skip
        self.tensors = {}  # the engine holds what it needs (repacked copies or references)
        links = self._links = self._mesh(s)
        ex = Exchange(engine, s["index"], links, s["buffer_type"], timeout=DATA_TIMEOUT)
        plan_id = hashlib.sha256(raw).hexdigest()
        P.send_json(root, P.READY, {"weight_bytes": engine.weight_bytes, "plan_id": plan_id})
        self.log(
            f"session: node {s['index']} of {plan.n_nodes}: {share.n_heads} q heads, {share.n_kv_heads} kv heads, "
            f"{share.hidden} ffn rows, {engine.weight_bytes / 1e6:.1f} MB of weights; ready"
        )
        self._serve(engine, ex, s)

    def _serve(self, engine: NodeEngine, ex: Exchange, s: dict) -> None:
        cfg = s["plan"].cfg
        max_emb = s["max_batch"] * cfg.dim * 4
        buf = np.empty(P.FORWARD_S.size + max_emb, dtype=np.uint8)
        view = memoryview(buf)
        while True:
            self.root.timeout = None  # idle: wait for the root as long as it likes (keepalive watches it)
            mtype, length = P.parse_header(P.recv_exact(self.root, P.HEADER.size), (P.FORWARD, P.STOP))
            self.root.timeout = DATA_TIMEOUT
            if mtype == P.STOP:
                self.log("session: root said stop")
                return
            if mtype != P.FORWARD:
                raise P.RemoteError(P.decode_error(mtype, bytes(P.recv_exact(self.root, length))))
            if length < P.FORWARD_S.size or length > len(buf):
                raise P.ProtocolError(f"FORWARD of {length} bytes")
            P.recv_exact(self.root, length, view)
            pos, T, etype, mode = P.FORWARD_S.unpack_from(buf)
            native = [int(t) for t in NATIVE_TYPES]
            modes = (P.LOGITS_NONE, P.LOGITS_ARGMAX, P.LOGITS_FULL)
            if (
                not (1 <= T <= s["max_batch"] and pos + T <= s["max_seq"])
                or etype not in native
                or mode not in modes
            ):
                raise P.ProtocolError(f"bad FORWARD (pos {pos}, T {T}, type {etype}, logits {mode})")
            rb = row_bytes(etype, cfg.dim)
            if length != P.FORWARD_S.size + T * rb:
                raise P.ProtocolError("FORWARD payload size does not match T rows")
            emb = TensorView(buf, P.FORWARD_S.size, etype, T, cfg.dim, rb)
            engine.x[:T] = emb.dequantize_rows(range(T))
            try:
                ex.forward(pos, T)
            except NodeFailure as e:
                if e.node != 0:  # tell the root which peer failed before we leave
                    try:
                        P.send_json(self.root, P.ABORT, {"failed_node": e.node, "reason": str(e)})
                    except (OSError, DllamaError):
                        pass
                raise
            if mode != P.LOGITS_NONE:
                self._send_logits(engine, s["share"], T, mode)

    def _send_logits(self, engine: NodeEngine, share, T: int, mode: int) -> None:
        """This node's slice of the output head: its best (logit, token id) or all its logits, f32."""
        if mode == P.LOGITS_ARGMAX:
            if share.vocab_rows:
                logits = engine.compute_logits(T - 1)
                i = int(np.argmax(logits[: share.vocab_rows]))
                P.send(self.root, P.LOGITS, P.ARGMAX_S.pack(float(logits[i]), share.vocab[0] + i))
            else:
                P.send(self.root, P.LOGITS, P.ARGMAX_S.pack(float("-inf"), 0))
        else:
            data = (
                engine.compute_logits(T - 1)[: share.vocab_rows]
                if share.vocab_rows
                else np.zeros(0, np.float32)
            )
            P.send(self.root, P.LOGITS, data.tobytes())

    def close(self) -> None:
        for c in self._links.values():
            c.close()
        self.root.close()
        self.tensors = {}


class WorkerServer:
    def __init__(self, host: str, port: int, *, nthreads: int = 1, secret: str | None = None,
                 model_path: str | None = None, log=None):  # fmt: skip
        self.host, self.port, self.nthreads = host, port, nthreads
        self.key = P.key_of(secret)
        self.log = log or (lambda m: print(f"[worker] {m}", file=sys.stderr, flush=True))
        self.lock = threading.Lock()
        self.busy = False
        self.current_session: WorkerSession | None = None
        self.model_path = model_path
        self.model_hash = b"\0" * 32
        self._model = None
        if model_path:
            from dllama.model.identity import content_hash

            self.model_hash = content_hash(model_path)
            self.local_model()  # fail now, not when a root arrives
        self.sock: socket.socket | None = None
        self.stopped = threading.Event()

    def local_model(self):
        if self._model is None:
            from dllama.model.gguf_model import GGUFModel

            self._model = GGUFModel(self.model_path, verbose=False)
        return self._model

    def bind(self) -> int:
        self.sock = socket.create_server((self.host, self.port), reuse_port=False, backlog=16)
        self.port = self.sock.getsockname()[1]
        return self.port

    def serve_forever(self) -> None:
        if self.sock is None:
            self.bind()
        while not self.stopped.is_set():
            try:
                sock, addr = self.sock.accept()
            except OSError:
                if self.stopped.is_set():
                    return
                raise
            threading.Thread(target=self._handle, args=(sock, addr), daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()
        if self.sock:
            self.sock.close()

    def _claim(self) -> str | None:
        """Called once a root has authenticated: take the worker, or say why not."""
        with self.lock:
            if self.busy:
                return "worker is busy serving another root"
            self.busy = True
            return None

    def _handle(self, sock: socket.socket, addr) -> None:
        try:
            self._handle_connection(sock, addr)
        except Exception as e:  # noqa: BLE001 - a bug must not leave the worker claimed or a socket open
            self.log(f"internal error on a connection from {addr[0]}: {type(e).__name__}: {e}")
            sock.close()

    def _handle_connection(self, sock: socket.socket, addr) -> None:
        who = f"{addr[0]}:{addr[1]}"
        claimed = False

        def claim() -> str | None:
            nonlocal claimed
            reason = self._claim()
            claimed = reason is None
            return reason

        try:
            P.tune(sock)
            sock.settimeout(HANDSHAKE_TIMEOUT)
            role, nonce, session_id, index = P.server_read_hello(sock)
            if role == P.ROLE_PEER:
                s = self.current_session
                if s is None or session_id != s.session_id or not 1 <= index < 1 << 10:
                    P.send_error(sock, "no such session")
                    raise P.ProtocolError("peer for an unknown session")
                P.server_authenticate(sock, s.session_key, P.ROLE_PEER, nonce, b"\0" * 32)
                s.peer_queue.put((index, sock))
                return
            P.server_authenticate(sock, self.key, P.ROLE_ROOT, nonce, self.model_hash, refuse=claim)
        except (DllamaError, OSError) as e:
            self.log(f"rejected connection from {who}: {e}")
            sock.close()
            if claimed:  # authenticated, then lost before the session began
                with self.lock:
                    self.busy = False
            return
        self.log(f"root {who} connected")
        session = WorkerSession(self, Conn(sock, f"root ({who})", DATA_TIMEOUT))
        try:
            session.run()
        except NodeFailure as e:
            self.log(f"session ended: {e}")
        except (DllamaError, OSError) as e:
            self.log(f"session ended: {e}")
            if not isinstance(e, P.PeerClosed):
                P.send_error(sock, str(e))
        except Exception as e:  # noqa: BLE001 - report, then clean up like any other failed session
            self.log(f"session ended by an internal error: {type(e).__name__}: {e}")
            P.send_error(sock, f"internal error on the worker: {type(e).__name__}")
        finally:
            session.close()
            self.current_session = None
            del session
            gc.collect()  # give the slice's memory back before the next root
            with self.lock:
                self.busy = False
            self.log("waiting for a root")
