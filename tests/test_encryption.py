"""The wire format of the links' tags, checked against an independent AES-256-GCM (the `cryptography` package's
one-shot AESGCM, not the streaming code the product uses), for both the Python links (conn.Conn) and the C mesh
(dllama.net._mesh), with the sequence number counting frames per direction from 0 (so a nonce is never reused
under a key) and nonce = u64 sequence number | 4 zero bytes:

- default (AES-256-GMAC): `header | payload | tag`, tag = AESGCM(key).encrypt(nonce, b"", header | payload), i.e.
  GCM over an empty plaintext with header and payload as associated data;
- encrypted (--encrypt): `header | AES-256-GCM(key, nonce, payload, aad = header) | tag`.

Both must refuse a frame whose bits were changed (header, payload, tag) or that comes replayed or out of order, and
a peer of the previous protocol version (3, HMAC-SHA256 tags) is told so in one line.

The end-to-end tests (real processes, an on-path relay) are in test_integrity.py."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dllama.net import messages as M
from dllama.net import protocol as P
from dllama.net.conn import Conn

TAG = 16
MODES = pytest.mark.parametrize("encrypt", [False, True], ids=["gmac", "encrypted"])


def nonce(seq: int) -> bytes:
    return struct.pack("<Q", seq) + bytes(4)


def ref_seal(key: bytes, seq: int, head: bytes, payload: bytes, encrypt: bool) -> bytes:
    """What follows `head` on the wire, by the reference."""
    if encrypt:
        return AESGCM(key).encrypt(nonce(seq), payload, head)
    return payload + AESGCM(key).encrypt(nonce(seq), b"", head + payload)  # the GMAC tag


def ref_open(key: bytes, seq: int, head: bytes, body: bytes, encrypt: bool) -> bytes:
    """The payload of a frame (body = what followed its header, tag included); InvalidTag unless it verifies."""
    if encrypt:
        return AESGCM(key).decrypt(nonce(seq), body, head)
    payload, tag = body[:-TAG], body[-TAG:]
    assert AESGCM(key).decrypt(nonce(seq), tag, head + payload) == b""
    return payload


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "peer closed"
        out += chunk
    return bytes(out)


def read_frame(s: socket.socket) -> tuple[bytes, bytes]:
    """(header, what follows it: payload or ciphertext, and tag) of one Conn frame, as on the wire."""
    head = recv_exact(s, M.HEADER.size)
    length = M.HEADER.unpack(head)[3]
    return head, recv_exact(s, length + TAG)


def conn_pair(encrypt: bool = True):
    """A Conn with integrity on one end of a socketpair, the raw socket (the test) on the other, and the keys."""
    a, b = socket.socketpair()
    keys = [os.urandom(32) for _ in range(4)]
    conn = Conn(a, "worker 1 (test)", timeout=5)
    conn.start_integrity(keys[0], keys[1], (keys[2], keys[3]), encrypt=encrypt)
    return conn, b, keys


def test_the_reference_gmac_is_gcm_over_associated_data_only():
    """Sanity of the reference itself: the GMAC tag is 16 bytes, depends on every byte of header and payload and on
    the nonce, and equals the tag of an encryption whose ciphertext is empty."""
    key, head, payload = os.urandom(32), os.urandom(8), os.urandom(100)
    tag = ref_seal(key, 5, head, payload, False)[-TAG:]
    assert len(ref_seal(key, 5, head, payload, False)) == len(payload) + TAG
    assert tag == AESGCM(key).encrypt(nonce(5), b"", head + payload)
    assert tag != ref_seal(key, 6, head, payload, False)[-TAG:]
    assert tag != ref_seal(key, 5, head, payload[:-1] + bytes([payload[-1] ^ 1]), False)[-TAG:]


@MODES
def test_conn_frames_match_the_reference_with_the_sequence_number_as_nonce(encrypt):
    conn, raw, (send_key, recv_key, _, _) = conn_pair(encrypt)
    weights = os.urandom(3 << 20)  # sent in pieces, like a TENSOR: header + head first, then the data
    head = M.TensorHead(0, 1, 0, 0, 3, 1 << 20).encode()
    messages = [M.Forward(5, 1, 0, M.LOGITS_ARGMAX, b"\x01" * 64), M.Stop()]
    t = threading.Thread(target=lambda: (P.send(conn, messages[0]),
                                         conn.sendall(P.header(M.TENSOR, len(head) + len(weights)) + head),
                                         conn.sendall(memoryview(weights)[:12345]),
                                         conn.sendall(memoryview(weights)[12345:]), P.send(conn, messages[1])))  # fmt: skip
    t.start()
    plain = []
    for seq in range(3):
        h, body = read_frame(raw)
        plain.append(ref_open(send_key, seq, h, body, encrypt))
        if len(body) > 1 << 20:  # the weights: hidden when encrypted, in clear (and tagged) when not
            assert (weights[:4096] in body) is not encrypt
    t.join()
    assert plain == [messages[0].encode(), head + weights, b""]

    # the other way: frames made by the reference are read (and decrypted in place) by the Conn
    frames = [M.Logits(best=(1.5, 7)).encode(), os.urandom(100_000)]
    for seq, (mtype, payload) in enumerate(zip((M.LOGITS, M.TENSOR), frames, strict=True)):
        h = P.header(mtype, len(payload))
        raw.sendall(h + ref_seal(recv_key, seq, h, payload, encrypt))
    assert P.recv(conn, M.Logits, mode=M.LOGITS_ARGMAX, vocab=(0, 10)).best == (1.5, 7)
    _, length = P.recv_header(conn, (M.TENSOR,))
    got = bytearray(length)
    P.recv_exact(conn, 40_000, memoryview(got)[:40_000])
    P.recv_exact(conn, length - 40_000, memoryview(got)[40_000:])
    assert bytes(got) == frames[1]
    conn.close()
    raw.close()


@MODES
@pytest.mark.parametrize("where", ["header", "payload", "tag"])
def test_conn_refuses_an_altered_frame(where, encrypt):
    conn, raw, (_, recv_key, _, _) = conn_pair(encrypt)
    payload = M.Logits(best=(1.5, 7)).encode()
    h = P.header(M.LOGITS, len(payload))
    wire = bytearray(h + ref_seal(recv_key, 0, h, payload, encrypt))
    # header: the type byte (LOGITS -> another known type, so only the tag can tell), payload: the token id
    wire[{"header": 2, "payload": 8 + 4, "tag": len(wire) - 1}[where]] ^= 0x01
    raw.sendall(bytes(wire))
    with pytest.raises(M.ProtocolError, match=r"(worker 1 \(test\) failed its integrity check|unknown message type)"):
        P.recv(conn, M.Logits, mode=M.LOGITS_ARGMAX, vocab=(0, 10))
    conn.close()
    raw.close()


@MODES
@pytest.mark.parametrize("order", ["replay", "reorder"])
def test_conn_refuses_a_replayed_or_reordered_frame(order, encrypt):
    conn, raw, (_, recv_key, _, _) = conn_pair(encrypt)
    frames = []
    for seq, best in enumerate([(1.5, 7), (2.5, 8)]):
        payload = M.Logits(best=best).encode()
        h = P.header(M.LOGITS, len(payload))
        frames.append(h + ref_seal(recv_key, seq, h, payload, encrypt))
    if order == "replay":  # the same frame twice: the second is sequence 1, tagged under nonce 0
        raw.sendall(frames[0] + frames[0])
        assert P.recv(conn, M.Logits, mode=M.LOGITS_ARGMAX, vocab=(0, 10)).best == (1.5, 7)
    else:  # the second frame first
        raw.sendall(frames[1] + frames[0])
    with pytest.raises(M.ProtocolError, match=r"worker 1 \(test\) failed its integrity check"):
        P.recv(conn, M.Logits, mode=M.LOGITS_ARGMAX, vocab=(0, 10))
    conn.close()
    raw.close()


def mesh_pair(encrypt: bool):
    """A 2-node C mesh (we are node 0) whose peer is the raw socket the test holds."""
    from dllama.net import _mesh

    a, b = socket.socketpair()
    a.setblocking(False)
    ks, kr = os.urandom(32), os.urandom(32)
    mesh = _mesh.TcpMesh([-1, a.fileno()], 0, M.PARTIAL_PREFIX, M.EXPLAIN_TYPES, 5000, [None, (ks, kr, encrypt)])
    return mesh, a, b, ks, kr


def mesh_frame(key: bytes, seq: int, step: int, payload: bytes, encrypt: bool) -> bytes:
    head = M.PARTIAL_PREFIX + struct.pack("<II", len(payload) + 4, step)
    return head + ref_seal(key, seq, head, payload, encrypt)


@MODES
def test_mesh_partial_sums_match_the_reference_with_the_sequence_number_as_nonce(encrypt):
    mesh, a, raw, ks, kr = mesh_pair(encrypt)
    for seq in range(4):
        ours, theirs = os.urandom(2304), os.urandom(2304)
        raw.sendall(mesh_frame(kr, seq, 100 + seq, theirs, encrypt))  # the peer's frame waits in the socket
        got = mesh.exchange(ours, 100 + seq)
        assert got[2304:] == theirs and got[:2304] == bytes(2304)  # (decrypted in place); our own slot untouched
        wire = recv_exact(raw, 12 + 2304 + TAG)
        head = wire[:12]
        assert head == M.PARTIAL_PREFIX + struct.pack("<II", 2308, 100 + seq)
        assert (ours[:64] in wire) is not encrypt
        assert ref_open(ks, seq, head, wire[12:], encrypt) == ours
    a.close()
    raw.close()


@MODES
@pytest.mark.parametrize("where", ["step", "payload", "tag", "replay", "reorder"])
def test_mesh_refuses_an_altered_partial_sum(where, encrypt):
    """Frame 1 of the peer with its step word rewritten to another step (the one the receiver then asks for, so
    only the tag can tell: the head is authenticated), a bit flipped in its payload or its tag, frame 0 replayed
    as frame 1, or frame 2 sent in place of frame 1: COMM_INTEGRITY."""
    from dllama.net import _mesh

    mesh, a, raw, ks, kr = mesh_pair(encrypt)
    theirs = os.urandom(1024)
    raw.sendall(mesh_frame(kr, 0, 7, theirs, encrypt))
    mesh.exchange(os.urandom(1024), 7)
    seq = {"replay": 0, "reorder": 2}.get(where, 1)
    frame = bytearray(mesh_frame(kr, seq, 8, theirs, encrypt))
    step = 8
    if where == "step":
        step = 9
        frame[8:12] = struct.pack("<I", step)
    elif where in ("payload", "tag"):
        frame[{"payload": 12 + 500, "tag": len(frame) - 3}[where]] ^= 0x04
    raw.sendall(bytes(frame))
    with pytest.raises(RuntimeError) as e:
        mesh.exchange(os.urandom(1024), step)
    assert e.value.args[:2] == (1, _mesh.INTEGRITY)
    a.close()
    raw.close()


def test_keys_depend_on_the_encrypt_flag_and_both_nonces():
    k = b"secret"
    cn, sn, h = os.urandom(16), os.urandom(16), bytes(32)
    plain = P.frame_keys(k, cn, sn, M.ROLE_ROOT, h, 0)
    enc = P.frame_keys(k, cn, sn, M.ROLE_ROOT, h, M.FLAG_ENCRYPT)
    other = P.frame_keys(k, cn, os.urandom(16), M.ROLE_ROOT, h, M.FLAG_ENCRYPT)
    assert len({*plain, *enc, *other}) == 12 and all(len(x) == 32 for x in enc)


def test_a_version_3_peer_gets_the_version_mismatch_error_both_ways():
    """Version 4 changed the default tag (HMAC-SHA256 -> AES-256-GMAC), version 5 the sum at 4, 8, ... nodes: a
    version-3 client is answered with a readable ERROR by the server, and a client talking to a version-3 server stops
    with one clear line."""
    assert M.VERSION == 5
    a, b = socket.socketpair()
    b.sendall(P.header(M.HELLO, M.Hello.S.size) + M.Hello(3, M.ROLE_ROOT, os.urandom(16), bytes(16), 0, 0).encode())
    server = Conn(a, "root (test)", timeout=5)
    with pytest.raises(M.ProtocolError, match=r"protocol version mismatch \(peer speaks 3\)"):
        P.server_read_hello(server)
    server.close()
    reply = recv_exact(b, 8)
    reply += recv_exact(b, M.HEADER.unpack(reply)[3])
    assert M.HEADER.unpack(reply[:8])[1] == M.ERROR
    assert b"protocol version mismatch: worker speaks 5, you 3" in reply
    b.close()

    a, b = socket.socketpair()
    client = Conn(a, "worker 1 (test)", timeout=5)

    def old_server() -> None:
        P.recv(Conn(b, "client", timeout=5), M.Hello)
        b.sendall(P.header(M.CHALLENGE, M.Challenge.S.size) + M.Challenge(3, os.urandom(16)).encode())

    t = threading.Thread(target=old_server)
    t.start()
    with pytest.raises(M.ProtocolError, match="protocol version mismatch: we speak 5, the peer 3"):
        P.client_handshake(client, b"secret", M.ROLE_ROOT)
    t.join()
    client.close()
    b.close()


@MODES
def test_link_keys_must_be_32_bytes(encrypt):
    """AES-256 in both modes: a shorter key (which AES would take as AES-128) is a programming error, not a mode."""
    from dllama.net import _mesh

    a, b = socket.socketpair()
    short, good = os.urandom(16), os.urandom(32)
    with pytest.raises(ValueError, match="32-byte keys"):
        _mesh.TcpMesh([-1, a.fileno()], 0, M.PARTIAL_PREFIX, M.EXPLAIN_TYPES, 5000, [None, (good, short, encrypt)])
    with pytest.raises(ValueError, match="32 bytes"):
        Conn(a, "worker 1 (test)", timeout=5).start_integrity(short, good, (good, good), encrypt=encrypt)
    a.close()
    b.close()
