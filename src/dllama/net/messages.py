"""Every message of the dllama protocol, once: a dataclass per type with `encode()` and `decode(payload)`, and the
limits both ends check (a payload is length-checked against its type's limit before a byte of it is allocated, see
protocol.recv). Payloads are fixed structs, raw tensor bytes or one small validated JSON object (SETUP); nothing is
ever unpickled. The partial-sum frames of the all-reduce are written by the C mesh from `PARTIAL_PREFIX`."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass
from typing import ClassVar

from dllama.arch import ARCHITECTURES
from dllama.errors import DllamaError
from dllama.kv_cache import DEFAULT_KV_TYPE, KV_TYPES
from dllama.model.config import ModelConfig
from dllama.model.weight_types import NATIVE
from dllama.split.plan import NodeShare, SplitPlan

VERSION = 5  # 3: HELLO carries flags (FLAG_ENCRYPT); 4: default frame tag AES-256-GMAC (was HMAC-SHA256);
#             5: 4, 8, 16, ... nodes sum their partial sums in a butterfly of pairwise swaps (was all-to-all)
MAGIC = b"DL"
HEADER = struct.Struct("<2sBBI")  # magic, type, flags (0), payload length

HELLO, CHALLENGE, AUTH, AUTH_OK, ERROR, SETUP, TENSOR, READY, FORWARD, PARTIAL, STOP, ABORT, LOGITS, RESIDUAL = range(1, 15)
NAMES = {HELLO: "HELLO", CHALLENGE: "CHALLENGE", AUTH: "AUTH", AUTH_OK: "AUTH_OK", ERROR: "ERROR", SETUP: "SETUP",
         TENSOR: "TENSOR", READY: "READY", FORWARD: "FORWARD", PARTIAL: "PARTIAL", STOP: "STOP", ABORT: "ABORT",
         LOGITS: "LOGITS", RESIDUAL: "RESIDUAL"}  # fmt: skip
ROLE_ROOT, ROLE_PEER = 1, 2
FLAG_ENCRYPT = 1  # HELLO: every later frame of this link is AES-256-GCM encrypted
LOGITS_NONE, LOGITS_ARGMAX, LOGITS_FULL = 0, 1, 2  # nothing / (best logit, its id) / the f32 logits slice
MAX_TEXT = 4096
MAX_NODES = 64

# the C mesh frames partial sums with this prefix (magic, type, flags), then u32 length, u32 step, payload
PARTIAL_PREFIX = HEADER.pack(MAGIC, PARTIAL, 0, 0)[:4]
PARTIAL_HEAD = HEADER.size + 4
EXPLAIN_TYPES = bytes([ERROR, ABORT])  # what a peer sends instead of a partial sum when it gives up


def printable(text: str, limit: int = 500) -> str:
    """Peer-supplied text made safe for a log line: no control characters (terminal escapes, forged lines)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:limit])


class ProtocolError(DllamaError):
    """The peer broke the protocol (bad magic, type, size, authentication, ...)."""


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)


def _int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


class Message:
    TYPE: ClassVar[int]
    LIMIT: ClassVar[int]  # payload bytes

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, payload: bytes):
        raise NotImplementedError


class _Struct(Message):
    S: ClassVar[struct.Struct]

    def encode(self) -> bytes:
        return self.S.pack(*dataclasses.astuple(self))

    @classmethod
    def decode(cls, payload: bytes):
        _check(len(payload) == cls.S.size, f"malformed {NAMES[cls.TYPE]}")
        return cls(*cls.S.unpack(payload))


@dataclass(frozen=True)
class Hello(_Struct):
    TYPE, S = HELLO, struct.Struct("<HB16s16sHB")
    LIMIT = S.size
    version: int
    role: int
    nonce: bytes
    session_id: bytes = b"\0" * 16  # peers: the session they belong to
    index: int = 0  # peers: their node index
    flags: int = 0  # FLAG_ENCRYPT; bound into both proofs and the link's keys, so a relay cannot change it


@dataclass(frozen=True)
class Challenge(_Struct):
    TYPE, S = CHALLENGE, struct.Struct("<H16s")
    LIMIT = S.size
    version: int
    nonce: bytes


@dataclass(frozen=True)
class Auth(_Struct):
    TYPE, S = AUTH, struct.Struct("<32s")
    LIMIT = S.size
    proof: bytes


@dataclass(frozen=True)
class AuthOk(_Struct):
    """The server's proof, then (only now that the client proved the secret) its local model's sha256."""

    TYPE, S = AUTH_OK, struct.Struct("<32s32s")
    LIMIT = S.size
    proof: bytes
    model_hash: bytes = b"\0" * 32


@dataclass(frozen=True)
class Error(Message):
    TYPE, LIMIT = ERROR, MAX_TEXT
    text: str

    def encode(self) -> bytes:
        return self.text.encode()[:MAX_TEXT]

    @classmethod
    def decode(cls, payload: bytes):
        return cls(printable(payload.decode("utf-8", "replace")))


@dataclass(frozen=True)
class Abort(Message):
    """A worker gives up because another node failed: which one, and why."""

    TYPE, LIMIT = ABORT, 2 + MAX_TEXT
    failed_node: int
    reason: str

    def encode(self) -> bytes:
        return struct.pack("<H", self.failed_node) + self.reason.encode()[:MAX_TEXT]

    @classmethod
    def decode(cls, payload: bytes):
        _check(len(payload) >= 2, "malformed ABORT")
        return cls(struct.unpack_from("<H", payload)[0], printable(payload[2:].decode("utf-8", "replace")))


def as_abort(mtype: int, payload: bytes) -> Abort | None:
    """An ABORT frame's content (None for ERROR or a malformed ABORT)."""
    try:
        return Abort.decode(payload) if mtype == ABORT else None
    except ProtocolError:
        return None


def explanation(mtype: int, payload: bytes) -> str:
    """The text of an ERROR or ABORT frame."""
    if mtype == ABORT:
        try:
            a = Abort.decode(payload)
            return f"node {a.failed_node} failed: {a.reason}"
        except ProtocolError:
            return "malformed ABORT"
    return Error.decode(payload).text


@dataclass(frozen=True)
class Stop(Message):
    TYPE, LIMIT = STOP, 0

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: bytes):
        _check(not payload, "malformed STOP")
        return cls()


@dataclass(frozen=True)
class Ready(_Struct):
    TYPE, S = READY, struct.Struct("<Q32s")
    LIMIT = S.size
    weight_bytes: int
    plan_id: bytes  # sha256 of the SETUP payload the worker built its slice from


TENSOR_HEAD = struct.Struct("<iiiiii")  # layer (-1 outside the blocks), slot, expert (-1), type, rows, cols


@dataclass(frozen=True)
class TensorHead:
    """The head of a TENSOR frame (its raw bytes follow): sent and checked before any byte of data is taken."""

    layer: int
    slot: int
    expert: int
    qtype: int
    rows: int
    cols: int

    def encode(self) -> bytes:
        return TENSOR_HEAD.pack(self.layer, self.slot, self.expert, self.qtype, self.rows, self.cols)

    @classmethod
    def decode(cls, raw: bytes) -> TensorHead:
        _check(len(raw) == TENSOR_HEAD.size, "malformed TENSOR")
        return cls(*TENSOR_HEAD.unpack(raw))


FORWARD_HEAD = struct.Struct("<IIii")  # pos, T, embedding type, logits wanted (LOGITS_*); T embedding rows follow


@dataclass(frozen=True)
class Forward(Message):
    TYPE, LIMIT = FORWARD, FORWARD_HEAD.size + (1 << 30)
    pos: int
    T: int
    emb_type: int
    logits: int
    rows: bytes

    def encode(self) -> bytes:
        return FORWARD_HEAD.pack(self.pos, self.T, self.emb_type, self.logits) + self.rows

    @classmethod
    def decode(cls, payload: bytes, *, max_batch: int, max_seq: int, row_bytes) -> Forward:
        _check(len(payload) >= FORWARD_HEAD.size, "FORWARD too short")
        pos, T, etype, mode = FORWARD_HEAD.unpack_from(payload)
        ok = 1 <= T <= max_batch and pos + T <= max_seq and etype in [int(t) for t in NATIVE] and mode in (0, 1, 2)
        _check(ok, f"bad FORWARD (pos {pos}, T {T}, type {etype}, logits {mode})")
        _check(len(payload) == FORWARD_HEAD.size + T * row_bytes(etype), "FORWARD payload does not match T rows")
        return cls(pos, T, etype, mode, payload[FORWARD_HEAD.size :])


ARGMAX = struct.Struct("<fI")


@dataclass(frozen=True)
class Logits(Message):
    """A worker's slice of the output head: its best (logit, token id), or all its f32 logits."""

    TYPE, LIMIT = LOGITS, 4 << 22
    best: tuple[float, int] | None = None
    values: bytes = b""

    def encode(self) -> bytes:
        return ARGMAX.pack(*self.best) if self.best is not None else self.values

    @classmethod
    def decode(cls, payload: bytes, *, mode: int, vocab: tuple[int, int]) -> Logits:
        v0, v1 = vocab
        if mode == LOGITS_ARGMAX:
            _check(len(payload) == ARGMAX.size, f"LOGITS of {len(payload)} bytes, expected {ARGMAX.size}")
            value, idx = ARGMAX.unpack(payload)
            _check(v1 == v0 or v0 <= idx < v1, "LOGITS: a token id outside the sender's slice")
            return cls(best=(value, idx))
        _check(len(payload) == 4 * (v1 - v0), f"LOGITS of {len(payload)} bytes, expected {4 * (v1 - v0)}")
        return cls(values=payload)


CONFIG_LIMITS = {
    "dim": (32, 1 << 16), "hidden_dim": (0, 1 << 20), "n_layers": (1, 1 << 10), "n_heads": (1, 1 << 10),
    "n_kv_heads": (1, 1 << 10), "head_dim": (2, 1 << 12), "vocab_size": (1, 1 << 22), "context_length": (1, 1 << 24),
    "sliding_window": (0, 1 << 24), "n_experts": (0, 4096), "n_active_experts": (0, 64),
    "expert_hidden_dim": (0, 1 << 20),
}  # fmt: skip
CONFIG_FLOATS = ("rope_base", "norm_eps", "rope_linear_scale")
CONFIG_BOOLS = ("tied_output", "rope_neox", "attn_bias", "qk_norm", "norm_topk")


def _config(c) -> ModelConfig:
    _check(isinstance(c, dict), "SETUP: missing config")
    ints = {}
    for k, (lo, hi) in CONFIG_LIMITS.items():
        _check(_int(c.get(k), lo, hi), f"SETUP: bad {k}")
        ints[k] = c[k]
    for k in CONFIG_FLOATS:
        v = c.get(k)
        _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0, f"SETUP: bad {k}")
    for k in CONFIG_BOOLS:
        _check(isinstance(c.get(k), bool), f"SETUP: bad {k}")
    _check(isinstance(c.get("arch"), str) and c["arch"] in ARCHITECTURES, "SETUP: unknown architecture")
    ff = c.get("rope_freq_factors")
    _check(ff is None or (isinstance(ff, list) and len(ff) == ints["head_dim"] // 2
                          and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in ff)),
           "SETUP: bad rope_freq_factors")  # fmt: skip
    cfg = ModelConfig(arch=c["arch"], name=str(c.get("name", ""))[:200],
                      rope_freq_factors=tuple(float(v) for v in ff) if ff is not None else None,
                      **ints, **{k: float(c[k]) for k in CONFIG_FLOATS}, **{k: c[k] for k in CONFIG_BOOLS})  # fmt: skip
    ok = (cfg.n_heads % cfg.n_kv_heads == 0 and cfg.dim % 32 == 0 and cfg.hidden_dim % 32 == 0
          and cfg.head_dim % 2 == 0 and cfg.expert_hidden_dim % 32 == 0
          and (cfg.n_experts == 0) == (cfg.n_active_experts == 0) and cfg.n_active_experts <= cfg.n_experts
          and (cfg.hidden_dim > 0) != cfg.moe)  # fmt: skip
    _check(ok, "SETUP: inconsistent model shape")
    try:
        ARCHITECTURES[cfg.arch].check(cfg)
    except DllamaError as e:
        raise ProtocolError(f"SETUP: {e}") from None
    return cfg


@dataclass(frozen=True)
class Setup(Message):
    """What a worker needs to build its slice: the model config, the split plan, its index, session facts."""

    TYPE, LIMIT = SETUP, 1 << 20
    config: ModelConfig
    split_weights: tuple[float, ...]
    nodes: tuple[NodeShare, ...]
    index: int
    max_seq: int
    max_batch: int
    sync: str
    peers: tuple[str, ...]  # "host:port" of every node, root first (root's entry unused)
    session_id: bytes
    local_weights: bool
    model_hash: bytes
    check_residual: bool = False  # debug: report a hash of the residual stream after every forward
    weight_bytes: int = 0  # bytes of this node's slice (as the root will send or it will read them)
    kv_storage: str = "ram"  # "disk": the KV cache in a memory-mapped file (the worker's --kv-cache-dir)
    kv_type: str = DEFAULT_KV_TYPE  # type of the cached K and V rows: f32, f16 or q8_0

    @property
    def plan(self) -> SplitPlan:
        return SplitPlan(self.config, self.split_weights, self.nodes)

    @property
    def share(self) -> NodeShare:
        return self.nodes[self.index]

    def encode(self) -> bytes:
        obj = {
            "config": dataclasses.asdict(self.config), "split_weights": list(self.split_weights),
            "nodes": [[*n.kv_heads, *n.ffn, *n.vocab] for n in self.nodes], "index": self.index,
            "max_seq": self.max_seq, "max_batch": self.max_batch, "sync": self.sync, "peers": list(self.peers),
            "session_id": self.session_id.hex(), "local_weights": self.local_weights, "model_hash": self.model_hash.hex(),
            "check_residual": self.check_residual, "weight_bytes": self.weight_bytes, "kv_storage": self.kv_storage,
            "kv_type": self.kv_type,
        }  # fmt: skip
        return json.dumps(obj, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Setup:
        """A worker trusts nothing in it: every number is type- and range-checked before it sizes anything."""
        try:
            obj = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ProtocolError("malformed SETUP") from None
        _check(isinstance(obj, dict), "SETUP: not a JSON object")
        cfg = _config(obj.get("config"))
        raw = obj.get("nodes")
        _check(isinstance(raw, list) and 2 <= len(raw) <= min(cfg.n_kv_heads, MAX_NODES), "SETUP: bad node list")
        rows = cfg.expert_hidden_dim if cfg.moe else cfg.hidden_dim
        nodes, kv_at, ffn_at, vocab_at = [], 0, 0, 0
        for i, n in enumerate(raw):
            _check(isinstance(n, list) and len(n) == 6 and all(_int(v, 0, 1 << 24) for v in n), "SETUP: bad node share")
            k0, k1, f0, f1, v0, v1 = n
            _check(k0 == kv_at and k1 > k0 and f0 == ffn_at and f1 >= f0 and f1 % 32 == 0 and v0 == vocab_at
                   and v1 >= v0, "SETUP: node shares do not tile the model")  # fmt: skip
            nodes.append(NodeShare(i, (k0, k1), (k0 * cfg.group, k1 * cfg.group), (f0, f1), (v0, v1)))
            kv_at, ffn_at, vocab_at = k1, f1, v1
        _check((kv_at, ffn_at, vocab_at) == (cfg.n_kv_heads, rows, cfg.vocab_size), "SETUP: node shares do not cover the model")
        weights = obj.get("split_weights")
        _check(isinstance(weights, list) and len(weights) == len(nodes)
               and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                       for w in weights), "SETUP: bad split_weights")  # fmt: skip
        _check(_int(obj.get("index"), 1, len(nodes) - 1), "SETUP: bad index")
        _check(_int(obj.get("max_seq"), 2, 1 << 24) and _int(obj.get("max_batch"), 1, 4096), "SETUP: bad max_seq/max_batch")
        peers = obj.get("peers")
        _check(isinstance(peers, list) and len(peers) == len(nodes)
               and all(isinstance(p, str) and len(p) < 300 for p in peers), "SETUP: bad peer list")  # fmt: skip
        _check(obj.get("sync") in ("q80", "f16", "f32"), "SETUP: bad sync format")
        _check(isinstance(obj.get("check_residual", False), bool), "SETUP: bad check_residual")
        _check(_int(obj.get("weight_bytes", 0), 0, 1 << 48), "SETUP: bad weight_bytes")
        _check(obj.get("kv_storage", "ram") in ("ram", "disk"), "SETUP: bad kv_storage")
        _check(obj.get("kv_type", DEFAULT_KV_TYPE) in KV_TYPES and (obj.get("kv_type") != "q8_0" or cfg.head_dim % 32 == 0),
               "SETUP: bad kv_type")  # fmt: skip
        try:
            session_id = bytes.fromhex(str(obj.get("session_id")))
            model_hash = bytes.fromhex(str(obj.get("model_hash", "")))
        except ValueError:
            raise ProtocolError("SETUP: bad session id") from None
        _check(len(session_id) == 16 and len(model_hash) in (0, 32), "SETUP: bad session id")
        _check(isinstance(obj.get("local_weights"), bool), "SETUP: bad local_weights")
        return cls(cfg, tuple(float(w) for w in weights), tuple(nodes), obj["index"], obj["max_seq"], obj["max_batch"],
                   obj["sync"], tuple(peers), session_id, obj["local_weights"], model_hash,
                   obj.get("check_residual", False), obj.get("weight_bytes", 0), obj.get("kv_storage", "ram"),
                   obj.get("kv_type", DEFAULT_KV_TYPE))  # fmt: skip


@dataclass(frozen=True)
class Residual(Message):
    """Debug (SETUP check_residual): a worker's hash of its residual stream after each block of a forward pass,
    u64 each, 2 per layer; every node must hold the same stream."""

    TYPE, LIMIT = RESIDUAL, 8 * 2 * CONFIG_LIMITS["n_layers"][1]
    hashes: bytes

    def encode(self) -> bytes:
        return self.hashes

    @classmethod
    def decode(cls, payload: bytes, *, n_layers: int) -> Residual:
        _check(len(payload) == 16 * n_layers, "malformed RESIDUAL")
        return cls(payload)


MESSAGES: dict[int, type[Message]] = {m.TYPE: m for m in (Hello, Challenge, Auth, AuthOk, Error, Setup, Ready, Forward,
                                                          Stop, Abort, Logits, Residual)}  # fmt: skip
LIMITS = {**{t: m.LIMIT for t, m in MESSAGES.items()}, TENSOR: TENSOR_HEAD.size + (8 << 30), PARTIAL: 4 + (1 << 30)}
