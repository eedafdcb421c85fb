"""Framing and the handshake of the dllama protocol; the messages themselves are in messages.py.

Frame = 8-byte header `<2sBBI` (magic b"DL", type, flags=0, payload length) + payload. The header is checked
(magic, known type, length within the type's limit and the caller's tighter bound) before the payload is read.

Handshake (every connection, before anything else is accepted):
  client -> HELLO     {version, role, client nonce, [session id, node index]}
  server -> CHALLENGE {version, server nonce}
  client -> AUTH      HMAC(key, "dllama-client" | server nonce | client nonce | role)
  server -> AUTH_OK   HMAC(key, "dllama-server" | client nonce | server nonce | role), then its model's sha256
The key is the cluster secret between root and worker (a worker obeys only a root that knows it, and the root
knows it talks to a real worker). Between workers it is a per-session key each derives from the cluster secret and
the session id (`session_key`): it never travels. A version mismatch is answered with ERROR.

After AUTH_OK both ends derive this link's frame keys from the handshake key and both nonces (`frame_keys`; the
server's model hash is bound in too, since AUTH_OK's proof does not cover it) and every later frame carries an
HMAC tag (conn.Conn.start_integrity; the C mesh tags its partial sums with keys of its own, mesh.Mesh).
DLLAMA_INSECURE_NO_MAC=1 turns the tags off (benchmarks of their cost only; every node must have it)."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket

from dllama.errors import DllamaError
from dllama.net import messages as M
from dllama.net.messages import HEADER, LIMITS, NAMES, ProtocolError

__all__ = ["PeerClosed", "ProtocolError", "RemoteError"]


class PeerClosed(DllamaError):
    """The peer closed the connection (or stopped answering)."""


class RemoteError(DllamaError):
    """The peer reported an error (ERROR / ABORT frame)."""


def header(mtype: int, length: int) -> bytes:
    return HEADER.pack(M.MAGIC, mtype, 0, length)


def send(conn, msg: M.Message) -> None:
    payload = msg.encode()
    conn.sendall(header(msg.TYPE, len(payload)) + payload)


def send_error(conn, text: str) -> None:
    """Best effort: tell the peer why we give up."""
    try:
        send(conn, M.Error(text))
    except (OSError, DllamaError):
        pass


def recv_exact(conn, n: int, buf: memoryview | None = None) -> memoryview:
    """Exactly n bytes (into `buf` when given); PeerClosed on EOF."""
    out = buf if buf is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        k = conn.recv_into(out[got:n], n - got)
        if k == 0:
            raise PeerClosed(f"{getattr(conn, 'name', 'peer')} closed the connection")
        got += k
    return out[:n]


def recv_header(conn, expect: tuple[int, ...], max_len: int | None = None) -> tuple[int, int]:
    """(type, payload length) of the next frame, which must be one of `expect`. An ERROR / ABORT frame instead is
    read and raised as RemoteError."""
    magic, mtype, flags, length = HEADER.unpack(recv_exact(conn, HEADER.size))
    if magic != M.MAGIC or flags != 0:
        raise ProtocolError("bad frame header (not a dllama peer?)")
    if mtype not in LIMITS:
        raise ProtocolError(f"unknown message type {mtype}")
    if length > LIMITS[mtype]:
        raise ProtocolError(f"{NAMES[mtype]} of {length} bytes exceeds the limit of {LIMITS[mtype]}")
    if mtype in (M.ERROR, M.ABORT):
        raise RemoteError(M.explanation(mtype, bytes(recv_exact(conn, length)) if length else b""))
    if mtype not in expect:
        raise ProtocolError(f"expected {'/'.join(NAMES[e] for e in expect)}, got {NAMES[mtype]}")
    if max_len is not None and length > max_len:
        raise ProtocolError(f"{NAMES[mtype]} of {length} bytes exceeds the expected {max_len}")
    return mtype, length


def peer_explanation(conn, wait: float = 2.0) -> str | None:
    """After a send failed: the ERROR / ABORT the peer sent before closing (why it gave up), if there is one."""
    try:
        conn.timeout, conn.deadline = wait, None
        recv_header(conn, ())
    except RemoteError as e:
        return str(e)
    except (DllamaError, OSError):
        pass
    return None


def recv(conn, *classes: type[M.Message], **decode_kw) -> M.Message:
    """The next message, decoded as whichever of `classes` its type says."""
    by_type = {c.TYPE: c for c in classes}
    mtype, length = recv_header(conn, tuple(by_type))
    payload = bytes(recv_exact(conn, length)) if length else b""
    return by_type[mtype].decode(payload, **decode_kw)


# ---- authentication ----
def key_of(secret: str | bytes | None) -> bytes:
    if secret is None:
        return b""
    return secret.encode() if isinstance(secret, str) else secret


def session_key(cluster_key: bytes, session_id: bytes) -> bytes:
    """The key workers of one session authenticate each other with, derived on each side (never sent)."""
    return hmac.new(cluster_key, b"dllama-session" + session_id, hashlib.sha256).digest()


def frame_keys(key: bytes, client_nonce: bytes, server_nonce: bytes, role: int, model_hash: bytes) -> list[bytes]:
    """Client->server and server->client keys of the Python frames, then of the C mesh's partial sums."""
    ctx = client_nonce + server_nonce + bytes([role]) + model_hash
    labels = (b"dllama-frames-c2s", b"dllama-frames-s2c", b"dllama-mesh-c2s", b"dllama-mesh-s2c")
    return [hmac.new(key, label + ctx, hashlib.sha256).digest() for label in labels]


def _start_integrity(conn, keys: list[bytes], client: bool) -> None:
    if os.environ.get("DLLAMA_INSECURE_NO_MAC") == "1" or not hasattr(conn, "start_integrity"):
        return  # a bare socket (tests speaking the protocol by hand) gets no tags: its peer then rejects it
    c2s, s2c, mc2s, ms2c = keys
    if client:
        conn.start_integrity(c2s, s2c, (mc2s, ms2c))
    else:
        conn.start_integrity(s2c, c2s, (ms2c, mc2s))


def _mac(key: bytes, label: bytes, a: bytes, b: bytes, role: int) -> bytes:
    return hmac.new(key, label + a + b + bytes([role]), hashlib.sha256).digest()


def client_handshake(conn, key: bytes, role: int, session_id: bytes = b"\0" * 16, index: int = 0) -> bytes:
    """Runs the client side; returns the server's model hash (32 bytes, zeros when it has no model)."""
    nonce = os.urandom(16)
    send(conn, M.Hello(M.VERSION, role, nonce, session_id, index))
    ch = recv(conn, M.Challenge)
    if ch.version != M.VERSION:
        raise ProtocolError(f"protocol version mismatch: we speak {M.VERSION}, the peer {ch.version}")
    send(conn, M.Auth(_mac(key, b"dllama-client", ch.nonce, nonce, role)))
    ok = recv(conn, M.AuthOk)
    if not hmac.compare_digest(ok.proof, _mac(key, b"dllama-server", nonce, ch.nonce, role)):
        raise ProtocolError("the peer could not prove it knows the cluster secret")
    _start_integrity(conn, frame_keys(key, nonce, ch.nonce, role, ok.model_hash), client=True)
    return ok.model_hash


def server_read_hello(conn) -> M.Hello:
    """First step of the server side. Rejects other versions and roles."""
    _, length = recv_header(conn, (M.HELLO,))
    hello = M.Hello.decode(bytes(recv_exact(conn, length)))
    if hello.version != M.VERSION:
        send_error(conn, f"protocol version mismatch: worker speaks {M.VERSION}, you {hello.version}")
        raise ProtocolError(f"protocol version mismatch (peer speaks {hello.version})")
    if hello.role not in (M.ROLE_ROOT, M.ROLE_PEER):
        raise ProtocolError("bad role in HELLO")
    return hello


def server_authenticate(conn, key: bytes, hello: M.Hello, model_hash: bytes, refuse=None) -> None:
    """Verifies the client's proof. `refuse()` may then return a reason (e.g. busy) sent instead of AUTH_OK."""
    nonce = os.urandom(16)
    send(conn, M.Challenge(M.VERSION, nonce))
    proof = recv(conn, M.Auth).proof
    if not hmac.compare_digest(proof, _mac(key, b"dllama-client", nonce, hello.nonce, hello.role)):
        send_error(conn, "authentication failed (wrong cluster secret)")
        raise ProtocolError("authentication failed (wrong cluster secret)")
    reason = refuse() if refuse else None
    if reason:
        send_error(conn, reason)
        raise RemoteError(reason)
    send(conn, M.AuthOk(_mac(key, b"dllama-server", hello.nonce, nonce, hello.role), model_hash))
    _start_integrity(conn, frame_keys(key, hello.nonce, nonce, hello.role, model_hash), client=False)


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
