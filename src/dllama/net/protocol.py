"""The dllama wire protocol (version 1): length-prefixed typed frames over TCP.

Frame = 8-byte header `<2sBBI` (magic b"DL", type, flags=0, payload length) + payload. Every length is checked
against the type's limit before a byte of payload is allocated; payloads are fixed structs, raw tensor bytes or
small JSON objects -- never pickle.

Handshake (every connection, before anything else is accepted):
  client -> HELLO     {version, role, client nonce, [session id, node index]}
  server -> CHALLENGE {version, server nonce, model hash}
  client -> AUTH      HMAC(key, "dllama-client" | server nonce | client nonce | role)
  server -> AUTH_OK   HMAC(key, "dllama-server" | client nonce | server nonce | role)
The key is the cluster secret for the root (so a worker obeys only a root that knows it, and the root knows it
talks to a real worker); between workers it is a per-session key the root handed out. The secret never
travels. A version mismatch is answered with ERROR and the connection closed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct

from dllama.errors import DllamaError

VERSION = 1
MAGIC = b"DL"
HEADER = struct.Struct("<2sBBI")

# message types
HELLO, CHALLENGE, AUTH, AUTH_OK, ERROR, SETUP, TENSOR, READY, FORWARD, PARTIAL, STOP, ABORT, LOGITS = range(
    1, 14
)
NAMES = {v: k for k, v in dict(
    HELLO=HELLO, CHALLENGE=CHALLENGE, AUTH=AUTH, AUTH_OK=AUTH_OK, ERROR=ERROR, SETUP=SETUP, TENSOR=TENSOR,
    READY=READY, FORWARD=FORWARD, PARTIAL=PARTIAL, STOP=STOP, ABORT=ABORT, LOGITS=LOGITS,
).items()}  # fmt: skip

ROLE_ROOT, ROLE_PEER = 1, 2

HELLO_S = struct.Struct("<HB16s16sH")  # version, role, client nonce, session id, node index
CHALLENGE_S = struct.Struct(
    "<H16s32s"
)  # version, server nonce, sha256 of the worker's local model (or zeros)
TENSOR_S = struct.Struct("<iiiii")  # layer (-1 global), slot, type, rows, cols; raw bytes follow
FORWARD_S = struct.Struct(
    "<IIii"
)  # pos, T, embedding type, logits wanted (LOGITS_*); T embedding rows follow
LOGITS_NONE, LOGITS_ARGMAX, LOGITS_FULL = 0, 1, 2  # nothing / (best logit, its id) / the f32 logits slice
ARGMAX_S = struct.Struct("<fI")
PARTIAL_S = struct.Struct("<I")  # sync step (2 * layer + 0/1); partial sums follow

# payload limits per type (bytes); TENSOR / FORWARD / PARTIAL are further checked against exact expected sizes
LIMITS = {
    HELLO: HELLO_S.size, CHALLENGE: CHALLENGE_S.size, AUTH: 32, AUTH_OK: 32, ERROR: 4096, SETUP: 1 << 20,
    TENSOR: TENSOR_S.size + (8 << 30), READY: 1 << 16, FORWARD: FORWARD_S.size + (1 << 30),
    PARTIAL: PARTIAL_S.size + (1 << 30), STOP: 0, ABORT: 4096, LOGITS: 4 << 22,
}  # fmt: skip


class ProtocolError(DllamaError):
    """The peer broke the protocol (bad magic, type, size, authentication, ...)."""


class PeerClosed(DllamaError):
    """The peer closed the connection."""


class RemoteError(DllamaError):
    """The peer reported an error (ERROR / ABORT frame)."""


def header(mtype: int, length: int) -> bytes:
    return HEADER.pack(MAGIC, mtype, 0, length)


def send(sock: socket.socket, mtype: int, payload: bytes | memoryview = b"") -> int:
    sock.sendall(header(mtype, len(payload)))
    if len(payload):
        sock.sendall(payload)
    return HEADER.size + len(payload)


def send_json(sock: socket.socket, mtype: int, obj) -> int:
    return send(sock, mtype, json.dumps(obj, separators=(",", ":")).encode())


def recv_exact(sock: socket.socket, n: int, buf: memoryview | None = None) -> memoryview:
    """Exactly n bytes (into `buf` when given); PeerClosed on EOF."""
    out = buf if buf is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        k = sock.recv_into(out[got:n], n - got)
        if k == 0:
            raise PeerClosed(f"{getattr(sock, 'name', 'peer')} closed the connection")
        got += k
    return out[:n]


def parse_header(raw: bytes | memoryview, expect: tuple[int, ...] | None = None) -> tuple[int, int]:
    magic, mtype, flags, length = HEADER.unpack(raw)
    if magic != MAGIC or flags != 0:
        raise ProtocolError("bad frame header (not a dllama peer?)")
    if mtype not in LIMITS:
        raise ProtocolError(f"unknown message type {mtype}")
    if length > LIMITS[mtype]:
        raise ProtocolError(f"{NAMES[mtype]} of {length} bytes exceeds the limit of {LIMITS[mtype]}")
    if expect is not None and mtype not in expect and mtype not in (ERROR, ABORT):
        want = "/".join(NAMES[e] for e in expect)
        raise ProtocolError(f"expected {want}, got {NAMES[mtype]}")
    return mtype, length


def recv(
    sock: socket.socket, expect: tuple[int, ...] | None = None, max_len: int | None = None
) -> tuple[int, bytes]:
    """One frame. ERROR / ABORT frames raise RemoteError; `max_len` tightens the type's limit."""
    mtype, length = parse_header(recv_exact(sock, HEADER.size), expect)
    if max_len is not None and length > max_len and mtype not in (ERROR, ABORT):
        raise ProtocolError(f"{NAMES[mtype]} of {length} bytes exceeds the expected {max_len}")
    payload = bytes(recv_exact(sock, length)) if length else b""
    if mtype in (ERROR, ABORT):
        raise RemoteError(decode_error(mtype, payload))
    return mtype, payload


def recv_json(sock: socket.socket, mtype: int) -> dict:
    _, payload = recv(sock, (mtype,))
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError(f"malformed {NAMES[mtype]} payload") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed {NAMES[mtype]} payload")
    return obj


def decode_error(mtype: int, payload: bytes) -> str:
    text = payload.decode("utf-8", "replace")
    if mtype == ABORT:
        try:
            obj = json.loads(text)
            return f"node {obj.get('failed_node')} failed: {obj.get('reason')}"
        except json.JSONDecodeError:
            pass
    return text


def send_error(sock: socket.socket, message: str) -> None:
    try:
        send(sock, ERROR, message.encode()[:4096])
    except OSError:
        pass


# ---- authentication ----
def key_of(secret: str | bytes | None) -> bytes:
    if secret is None:
        return b""
    return secret.encode() if isinstance(secret, str) else secret


def _mac(key: bytes, label: bytes, a: bytes, b: bytes, role: int) -> bytes:
    return hmac.new(key, label + a + b + bytes([role]), hashlib.sha256).digest()


def client_handshake(
    sock: socket.socket, key: bytes, role: int, session_id: bytes = b"\0" * 16, index: int = 0
) -> bytes:
    """Runs the client side; returns the server's model hash (32 bytes, zeros when it has no model)."""
    nonce = os.urandom(16)
    send(sock, HELLO, HELLO_S.pack(VERSION, role, nonce, session_id, index))
    _, payload = recv(sock, (CHALLENGE,), CHALLENGE_S.size)
    if len(payload) != CHALLENGE_S.size:
        raise ProtocolError("malformed CHALLENGE")
    version, server_nonce, model_hash = CHALLENGE_S.unpack(payload)
    if version != VERSION:
        raise ProtocolError(f"protocol version mismatch: we speak {VERSION}, the peer {version}")
    send(sock, AUTH, _mac(key, b"dllama-client", server_nonce, nonce, role))
    _, proof = recv(sock, (AUTH_OK,), 32)
    if not hmac.compare_digest(proof, _mac(key, b"dllama-server", nonce, server_nonce, role)):
        raise ProtocolError("the peer could not prove it knows the cluster secret")
    return model_hash


def server_read_hello(sock: socket.socket) -> tuple[int, bytes, bytes, int]:
    """First step of the server side: (role, client nonce, session id, index). Rejects other versions."""
    _, payload = recv(sock, (HELLO,), HELLO_S.size)
    if len(payload) != HELLO_S.size:
        raise ProtocolError("malformed HELLO")
    version, role, nonce, session_id, index = HELLO_S.unpack(payload)
    if version != VERSION:
        send_error(sock, f"protocol version mismatch: worker speaks {VERSION}, you {version}")
        raise ProtocolError(f"protocol version mismatch (peer speaks {version})")
    if role not in (ROLE_ROOT, ROLE_PEER):
        raise ProtocolError("bad role in HELLO")
    return role, nonce, session_id, index


def server_authenticate(
    sock: socket.socket, key: bytes, role: int, client_nonce: bytes, model_hash: bytes, refuse=None
) -> None:
    """Verifies the client's proof. `refuse()` may then return a reason (e.g. busy) sent instead of AUTH_OK."""
    nonce = os.urandom(16)
    send(sock, CHALLENGE, CHALLENGE_S.pack(VERSION, nonce, model_hash))
    _, proof = recv(sock, (AUTH,), 32)
    if not hmac.compare_digest(proof, _mac(key, b"dllama-client", nonce, client_nonce, role)):
        send_error(sock, "authentication failed (wrong cluster secret)")
        raise ProtocolError("authentication failed (wrong cluster secret)")
    reason = refuse() if refuse else None
    if reason:
        send_error(sock, reason)
        raise RemoteError(reason)
    send(sock, AUTH_OK, _mac(key, b"dllama-server", client_nonce, nonce, role))


# ---- sockets ----
def tune(sock: socket.socket) -> None:
    """Low latency, and a dead peer noticed within seconds even when no data is flowing."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as e:
        raise DllamaError(f"cannot connect to {address}: {e.strerror or e}") from None
    tune(sock)
    return sock
