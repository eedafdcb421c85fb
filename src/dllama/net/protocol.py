"""Framing and the handshake of the dllama protocol; the messages themselves are in messages.py.

Frame = 8-byte header `<2sBBI` (magic b"DL", type, flags=0, payload length) + payload. The header is checked
(magic, known type, length within the type's limit and the caller's tighter bound) before the payload is read.

Handshake (every connection, before anything else is accepted):
  client -> HELLO     {version, role, client nonce, [session id, node index], flags}
  server -> CHALLENGE {version, server nonce}
  client -> AUTH      HMAC(key, "dllama-client" | server nonce | client nonce | role | flags)
  server -> AUTH_OK   HMAC(key, "dllama-server" | client nonce | server nonce | role | flags), then its model's sha256
The key is the cluster secret between root and worker (a worker obeys only a root that knows it, and the root
knows it talks to a real worker). Between workers it is a per-session key each derives from the cluster secret and
the session id (`session_key`): it never travels. A version mismatch is answered with ERROR.

After AUTH_OK both ends derive this link's keys with HKDF-SHA256 from the handshake key, both nonces, the role,
the flags and the server's model hash (`frame_keys`; AUTH_OK's proof does not cover the hash): 32 bytes each, one
per direction for the Python frames (conn.Conn) and one per direction for the C mesh's partial sums (mesh.Mesh).

Every later frame is followed by a 16-byte tag, the same on both kinds of frames (the C mesh's header is 12 bytes:
the 8 above, the length counting the u32 sync step that follows, then the step). With the frame's key for its
direction, `seq` the number of frames sent before it in that direction on this link (from 0) and
nonce = u64 little-endian seq | 4 zero bytes:
  default (AES-256-GMAC):  wire = header | payload | tag,  tag = AES-256-GCM(key, nonce, plaintext = empty,
                           associated data = header | payload).tag
  FLAG_ENCRYPT (--encrypt): wire = header | ciphertext | tag,  (ciphertext, tag) = AES-256-GCM(key, nonce,
                           plaintext = payload, associated data = header)
Sizes do not change. A nonce is never reused under a key: the keys are fresh for every connection (both nonces are
the HKDF salt) and direction, one frame per sequence number, and an encrypted link never shares a key with a
tag-only one (the flags are in the HKDF context). An altered, dropped, replayed or reordered frame fails its tag.
The flag is covered by both proofs and the keys, so a relay that clears or sets it makes the handshake fail.
DLLAMA_INSECURE_NO_MAC=1 turns the default tags off (benchmarks of their cost only; every node must have it); it
never turns encryption off."""

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


def frame_keys(key: bytes, client_nonce: bytes, server_nonce: bytes, role: int, model_hash: bytes,
               flags: int = 0) -> list[bytes]:  # fmt: skip
    """Client->server and server->client keys of the Python frames, then of the C mesh's partial sums: HKDF-SHA256
    (RFC 5869) with both nonces as salt, so every connection has fresh keys; the flags are in the context, so an
    encrypted link never shares a key with a tag-only (AES-GMAC) one."""
    info = b"dllama-frame-keys" + bytes([role, flags]) + model_hash
    from cryptography.hazmat.primitives import hashes  # here: a single node never needs it (~20 ms at start)
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    okm = HKDF(algorithm=hashes.SHA256(), length=4 * 32, salt=client_nonce + server_nonce, info=info).derive(key)
    return [okm[i : i + 32] for i in range(0, len(okm), 32)]


def _start_integrity(conn, keys: list[bytes], client: bool, encrypt: bool) -> None:
    if not hasattr(conn, "start_integrity"):
        return  # a bare socket (tests speaking the protocol by hand) gets no tags: its peer then rejects it
    if os.environ.get("DLLAMA_INSECURE_NO_MAC") == "1" and not encrypt:
        return
    c2s, s2c, mc2s, ms2c = keys
    if client:
        conn.start_integrity(c2s, s2c, (mc2s, ms2c), encrypt=encrypt)
    else:
        conn.start_integrity(s2c, c2s, (ms2c, mc2s), encrypt=encrypt)


def _mac(key: bytes, label: bytes, a: bytes, b: bytes, role: int, flags: int) -> bytes:
    return hmac.new(key, label + a + b + bytes([role, flags]), hashlib.sha256).digest()


def client_handshake(conn, key: bytes, role: int, session_id: bytes = b"\0" * 16, index: int = 0,
                     encrypt: bool = False) -> bytes:  # fmt: skip
    """Runs the client side; returns the server's model hash (32 bytes, zeros when it has no model). With
    `encrypt`, every later frame of this link is encrypted (the server cannot turn that down: it refuses or agrees)."""
    if encrypt and not key:
        raise DllamaError("--encrypt needs a cluster secret (--secret or DLLAMA_SECRET): the keys are derived from it")
    flags = M.FLAG_ENCRYPT if encrypt else 0
    nonce = os.urandom(16)
    send(conn, M.Hello(M.VERSION, role, nonce, session_id, index, flags))
    ch = recv(conn, M.Challenge)
    if ch.version != M.VERSION:
        raise ProtocolError(f"protocol version mismatch: we speak {M.VERSION}, the peer {ch.version}")
    send(conn, M.Auth(_mac(key, b"dllama-client", ch.nonce, nonce, role, flags)))
    ok = recv(conn, M.AuthOk)
    if not hmac.compare_digest(ok.proof, _mac(key, b"dllama-server", nonce, ch.nonce, role, flags)):
        raise ProtocolError("the peer could not prove it knows the cluster secret")
    _start_integrity(conn, frame_keys(key, nonce, ch.nonce, role, ok.model_hash, flags), True, encrypt)
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
    if hello.flags & ~M.FLAG_ENCRYPT:
        raise ProtocolError("unknown flags in HELLO")
    return hello


def server_authenticate(conn, key: bytes, hello: M.Hello, model_hash: bytes, refuse=None,
                        encrypt: bool = False) -> None:  # fmt: skip
    """Verifies the client's proof. `refuse()` may then return a reason (e.g. busy) sent instead of AUTH_OK.
    The client's choice to encrypt is followed; `encrypt` (a worker started with --encrypt, or a peer link of an
    encrypted session) refuses a client that does not encrypt."""
    wants = bool(hello.flags & M.FLAG_ENCRYPT)
    if encrypt and not wants:
        who = "root" if hello.role == M.ROLE_ROOT else "peer"
        send_error(conn, "this worker accepts only encrypted links (started with --encrypt, or its session is "
                   "encrypted): start the root with --encrypt")  # fmt: skip
        raise ProtocolError(f"refused a {who} that does not encrypt (this worker requires --encrypt)")
    if wants and not key:
        send_error(conn, "this worker has no cluster secret: it cannot encrypt (give both sides --secret)")
        raise ProtocolError("refused to encrypt without a cluster secret")
    nonce = os.urandom(16)
    send(conn, M.Challenge(M.VERSION, nonce))
    proof = recv(conn, M.Auth).proof
    if not hmac.compare_digest(proof, _mac(key, b"dllama-client", nonce, hello.nonce, hello.role, hello.flags)):
        send_error(conn, "authentication failed (wrong cluster secret, or the handshake was altered)")
        raise ProtocolError("authentication failed (wrong cluster secret, or the handshake was altered)")
    reason = refuse() if refuse else None
    if reason:
        send_error(conn, reason)
        raise RemoteError(reason)
    send(conn, M.AuthOk(_mac(key, b"dllama-server", hello.nonce, nonce, hello.role, hello.flags), model_hash))
    keys = frame_keys(key, hello.nonce, nonce, hello.role, model_hash, hello.flags)
    _start_integrity(conn, keys, False, wants)


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
