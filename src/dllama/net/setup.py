"""The SETUP message: model config, the split plan and session facts, as validated JSON.

A worker trusts nothing in it: every number is type- and range-checked before it sizes any allocation."""

from __future__ import annotations

import dataclasses

from dllama.model.config import ModelConfig
from dllama.net.protocol import ProtocolError
from dllama.split.plan import NodeShare, SplitPlan

LIMITS = {
    "dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1 << 10, "n_heads": 1 << 10, "n_kv_heads": 1 << 10,
    "head_dim": 1 << 12, "vocab_size": 1 << 22, "context_length": 1 << 24,
}  # fmt: skip


def encode_setup(plan: SplitPlan, index: int, *, max_seq: int, max_batch: int, buffer_type: str,
                 peers: list[str], session_id: bytes, session_key: bytes, local_weights: bool,
                 model_hash: bytes) -> dict:  # fmt: skip
    cfg = dataclasses.asdict(plan.cfg)
    return {
        "config": cfg,
        "weights": list(plan.weights),
        "nodes": [
            [n.kv_heads[0], n.kv_heads[1], n.ffn[0], n.ffn[1], n.vocab[0], n.vocab[1]] for n in plan.nodes
        ],
        "index": index,
        "max_seq": max_seq,
        "max_batch": max_batch,
        "buffer_type": buffer_type,
        "peers": peers,  # "host:port" of every node, root first (root's entry unused)
        "session_id": session_id.hex(),
        "session_key": session_key.hex(),
        "local_weights": local_weights,
        "model_hash": model_hash.hex(),
    }


def _int(obj: dict, key: str, lo: int, hi: int) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"SETUP: bad {key}")
    return v


def decode_setup(obj: dict) -> dict:
    """Validated setup: {'plan', 'share', 'index', 'max_seq', 'max_batch', 'buffer_type', 'peers', ...}."""
    if not isinstance(obj, dict):
        raise ProtocolError("SETUP: not a JSON object")
    c = obj.get("config")
    if not isinstance(c, dict):
        raise ProtocolError("SETUP: missing config")
    ints = {k: _int(c, k, 1, hi) for k, hi in LIMITS.items()}
    for k in ("rope_base", "norm_eps", "rope_linear_scale"):
        if not isinstance(c.get(k), (int, float)) or isinstance(c.get(k), bool) or not c[k] > 0:
            raise ProtocolError(f"SETUP: bad {k}")
    ff = c.get("rope_freq_factors")
    if ff is not None and (
        not isinstance(ff, list)
        or len(ff) != ints["head_dim"] // 2
        or not all(isinstance(v, (int, float)) for v in ff)
    ):
        raise ProtocolError("SETUP: bad rope_freq_factors")
    try:
        cfg = ModelConfig(
            arch=str(c.get("arch")), tied_output=bool(c.get("tied_output")), name=str(c.get("name", ""))[:200],
            rope_base=float(c["rope_base"]), norm_eps=float(c["norm_eps"]),
            rope_linear_scale=float(c["rope_linear_scale"]),
            rope_freq_factors=tuple(float(v) for v in ff) if ff is not None else None, **ints,
        )  # fmt: skip
    except TypeError:
        raise ProtocolError("SETUP: bad config") from None
    if cfg.n_heads % cfg.n_kv_heads or cfg.dim % 32 or cfg.hidden_dim % 32 or cfg.head_dim % 2:
        raise ProtocolError("SETUP: inconsistent model shape")
    nodes_raw = obj.get("nodes")
    if not isinstance(nodes_raw, list) or not 2 <= len(nodes_raw) <= cfg.n_kv_heads:
        raise ProtocolError("SETUP: bad node list")
    nodes = []
    kv_at, ffn_at, vocab_at = 0, 0, 0
    for i, n in enumerate(nodes_raw):
        if not (isinstance(n, list) and len(n) == 6 and all(isinstance(v, int) and v >= 0 for v in n)):
            raise ProtocolError("SETUP: bad node share")
        k0, k1, f0, f1, v0, v1 = n
        if k0 != kv_at or k1 <= k0 or f0 != ffn_at or f1 < f0 or f1 % 32 or v0 != vocab_at or v1 < v0:
            raise ProtocolError("SETUP: node shares do not tile the model")
        nodes.append(NodeShare(i, (k0, k1), (k0 * cfg.group, k1 * cfg.group), (f0, f1), (v0, v1)))
        kv_at, ffn_at, vocab_at = k1, f1, v1
    if kv_at != cfg.n_kv_heads or ffn_at != cfg.hidden_dim or vocab_at != cfg.vocab_size:
        raise ProtocolError("SETUP: node shares do not cover the model")
    weights = obj.get("weights")
    if not isinstance(weights, list) or len(weights) != len(nodes):
        raise ProtocolError("SETUP: bad weights")
    index = _int(obj, "index", 1, len(nodes) - 1)
    peers = obj.get("peers")
    if (
        not isinstance(peers, list)
        or len(peers) != len(nodes)
        or not all(isinstance(p, str) and len(p) < 300 for p in peers)
    ):
        raise ProtocolError("SETUP: bad peer list")
    buffer_type = obj.get("buffer_type")
    if buffer_type not in ("q80", "f32"):
        raise ProtocolError("SETUP: bad buffer_type")
    try:
        session_id = bytes.fromhex(str(obj.get("session_id")))
        session_key = bytes.fromhex(str(obj.get("session_key")))
        model_hash = bytes.fromhex(str(obj.get("model_hash", "")))
    except ValueError:
        raise ProtocolError("SETUP: bad session id/key") from None
    if len(session_id) != 16 or len(session_key) != 32:
        raise ProtocolError("SETUP: bad session id/key")
    plan = SplitPlan(cfg, tuple(float(w) for w in weights), tuple(nodes))
    return {
        "plan": plan,
        "share": nodes[index],
        "index": index,
        "max_seq": _int(obj, "max_seq", 2, 1 << 24),
        "max_batch": _int(obj, "max_batch", 1, 4096),
        "buffer_type": buffer_type,
        "peers": peers,
        "session_id": session_id,
        "session_key": session_key,
        "local_weights": bool(obj.get("local_weights")),
        "model_hash": model_hash,
    }
