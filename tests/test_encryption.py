"""The encrypted wire format, checked against an independent AES-256-GCM (the `cryptography` package's one-shot
AESGCM, not the streaming code the product uses): both the Python links (conn.Conn) and the C mesh
(dllama.net._mesh) must put `header | AES-256-GCM(key, nonce = u64 sequence number | 4 zero bytes, payload,
aad = header) | tag` on the wire, with the sequence number counting frames per direction from 0 (so a nonce is
never reused under a key), and must refuse a frame whose bits were changed.

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


def nonce(seq: int) -> bytes:
    return struct.pack("<Q", seq) + bytes(4)


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "peer closed"
        out += chunk
    return bytes(out)


def read_frame(s: socket.socket) -> tuple[bytes, bytes, bytes]:
    """(header, ciphertext, tag) of one Conn frame, as on the wire."""
    head = recv_exact(s, M.HEADER.size)
    length = M.HEADER.unpack(head)[3]
    body = recv_exact(s, length + TAG)
    return head, body[:length], body[length:]


def conn_pair(encrypt: bool = True):
    """An encrypting Conn on one end of a socketpair, the raw socket (the test) on the other, and the keys."""
    a, b = socket.socketpair()
    keys = [os.urandom(32) for _ in range(4)]
    conn = Conn(a, "worker 1 (test)", timeout=5)
    conn.start_integrity(keys[0], keys[1], (keys[2], keys[3]), encrypt=encrypt)
    return conn, b, keys


def test_conn_frames_are_aes_gcm_with_the_sequence_number_as_nonce():
    conn, raw, (send_key, recv_key, _, _) = conn_pair()
    weights = os.urandom(3 << 20)  # sent in pieces, like a TENSOR: header + head first, then the data
    head = M.TensorHead(0, 1, 0, 0, 3, 1 << 20).encode()
    messages = [M.Forward(5, 1, 0, M.LOGITS_ARGMAX, b"\x01" * 64), M.Stop()]
    t = threading.Thread(target=lambda: (P.send(conn, messages[0]),
                                         conn.sendall(P.header(M.TENSOR, len(head) + len(weights)) + head),
                                         conn.sendall(memoryview(weights)[:12345]),
                                         conn.sendall(memoryview(weights)[12345:]), P.send(conn, messages[1])))  # fmt: skip
    t.start()
    ref = AESGCM(send_key)
    plain = []
    for seq in range(3):
        h, ct, tag = read_frame(raw)
        plain.append(ref.decrypt(nonce(seq), ct + tag, h))
        if len(ct) > 64:
            assert weights[:4096] not in ct and ct != plain[-1]
    t.join()
    assert plain == [messages[0].encode(), head + weights, b""]

    # the other way: frames made by the reference are read (and decrypted in place) by the Conn
    frames = [M.Logits(best=(1.5, 7)).encode(), os.urandom(100_000)]
    ref_r = AESGCM(recv_key)
    for seq, (mtype, payload) in enumerate(zip((M.LOGITS, M.TENSOR), frames, strict=True)):
        h = P.header(mtype, len(payload))
        raw.sendall(h + ref_r.encrypt(nonce(seq), payload, h))
    assert P.recv(conn, M.Logits, mode=M.LOGITS_ARGMAX, vocab=(0, 10)).best == (1.5, 7)
    _, length = P.recv_header(conn, (M.TENSOR,))
    got = bytearray(length)
    P.recv_exact(conn, 40_000, memoryview(got)[:40_000])
    P.recv_exact(conn, length - 40_000, memoryview(got)[40_000:])
    assert bytes(got) == frames[1]
    conn.close()
    raw.close()


@pytest.mark.parametrize("where", ["header", "payload", "tag"])
def test_conn_refuses_an_altered_encrypted_frame(where):
    conn, raw, (_, recv_key, _, _) = conn_pair()
    payload = M.Logits(best=(1.5, 7)).encode()
    h = P.header(M.LOGITS, len(payload))
    wire = bytearray(h + AESGCM(recv_key).encrypt(nonce(0), payload, h))
    wire[{"header": 2, "payload": 8 + 3, "tag": len(wire) - 1}[where]] ^= 0x01  # header: the type byte
    raw.sendall(bytes(wire))
    with pytest.raises(M.ProtocolError, match=r"(worker 1 \(test\) failed its integrity check|unknown message type)"):
        P.recv(conn, M.Logits, mode=M.LOGITS_ARGMAX, vocab=(0, 10))
    conn.close()
    raw.close()


def test_conn_refuses_a_replayed_encrypted_frame():
    conn, raw, (_, recv_key, _, _) = conn_pair()
    payload = M.Logits(best=(1.5, 7)).encode()
    h = P.header(M.LOGITS, len(payload))
    frame = h + AESGCM(recv_key).encrypt(nonce(0), payload, h)
    raw.sendall(frame + frame)  # the same frame twice: the second is sequence 1, encrypted under nonce 0
    P.recv(conn, M.Logits, mode=M.LOGITS_ARGMAX, vocab=(0, 10))
    with pytest.raises(M.ProtocolError, match="integrity check"):
        P.recv(conn, M.Logits, mode=M.LOGITS_ARGMAX, vocab=(0, 10))
    conn.close()
    raw.close()


def mesh_pair(n_bytes: int):
    """A 2-node C mesh (we are node 0) whose peer is the raw socket the test holds."""
    from dllama.net import _mesh

    a, b = socket.socketpair()
    a.setblocking(False)
    ks, kr = os.urandom(32), os.urandom(32)
    mesh = _mesh.TcpMesh([-1, a.fileno()], 0, M.PARTIAL_PREFIX, M.EXPLAIN_TYPES, 5000, [None, (ks, kr, True)])
    return mesh, a, b, ks, kr


def mesh_frame(key: bytes, seq: int, step: int, payload: bytes) -> bytes:
    head = M.PARTIAL_PREFIX + struct.pack("<II", len(payload) + 4, step)
    return head + AESGCM(key).encrypt(nonce(seq), payload, head)


def test_mesh_partial_sums_are_aes_gcm_with_the_sequence_number_as_nonce():
    mesh, a, raw, ks, kr = mesh_pair(0)
    for seq in range(4):
        ours, theirs = os.urandom(2304), os.urandom(2304)
        raw.sendall(mesh_frame(kr, seq, 100 + seq, theirs))  # the peer's frame waits in the socket
        got = mesh.exchange(ours, 100 + seq)
        assert got[2304:] == theirs and got[:2304] == bytes(2304)  # decrypted in place; our own slot untouched
        wire = recv_exact(raw, 12 + 2304 + TAG)
        head = wire[:12]
        assert head == M.PARTIAL_PREFIX + struct.pack("<II", 2308, 100 + seq)
        assert ours[:64] not in wire
        assert AESGCM(ks).decrypt(nonce(seq), wire[12:], head) == ours
    a.close()
    raw.close()


@pytest.mark.parametrize("where", ["step", "payload", "tag", "replay"])
def test_mesh_refuses_an_altered_encrypted_partial_sum(where):
    from dllama.net import _mesh

    mesh, a, raw, ks, kr = mesh_pair(0)
    theirs = os.urandom(1024)
    raw.sendall(mesh_frame(kr, 0, 7, theirs))
    mesh.exchange(os.urandom(1024), 7)
    frame = bytearray(mesh_frame(kr, 0 if where == "replay" else 1, 8, theirs))
    if where != "replay":
        frame[{"step": 8, "payload": 12 + 500, "tag": len(frame) - 3}[where]] ^= 0x04
    raw.sendall(bytes(frame))
    with pytest.raises(RuntimeError) as e:
        mesh.exchange(os.urandom(1024), 8)
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
