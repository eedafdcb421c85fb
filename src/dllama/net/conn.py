"""A TCP connection in non-blocking mode with blocking-with-timeout helpers and byte counters.

The partial-sum exchange needs non-blocking sockets (send to and receive from every peer at once without
deadlocking on full buffers); the rest of the protocol wants plain blocking calls. `Conn` offers both on one
socket, waiting in poll(), so nothing ever spins. `sent` / `received` count what the socket calls moved;
`deadline` bounds a whole exchange (the handshake), `timeout` each wait.

Integrity: once the handshake has derived this link's keys (protocol.frame_keys, never sent), `start_integrity`
makes every frame carry the 16-byte tag defined in protocol.py (AES-256-GMAC over header | payload by default, or
with `encrypt` the payload AES-256-GCM encrypted and the header authenticated; nonce = the frame's u64 sequence
number, one key and counter per direction). The header stays in clear (type and length: the framing needs them);
the byte counts do not change. `Conn` follows the frame boundaries itself (the header says how long the payload
is), so callers send and receive frames exactly as before, in as many pieces as they like (TENSOR payloads go
straight into the engine's buffers, decrypted there in place; both modes stream, nothing is copied to be tagged):
on sending, the tag follows the frame's last byte; on receiving, the tag is read and checked before the frame's
last byte is handed over, so nothing of an altered, replayed or reordered frame is ever acted on (a flipped bit
gives ProtocolError naming the link). AES-GCM rather than ChaCha20-Poly1305: the `cryptography` package offers it
as a streaming cipher (frames of any size in pieces, in place), which its ChaCha20-Poly1305 is not, and x86 CPUs
have AES-NI and carry-less multiply for it."""

from __future__ import annotations

import hmac
import select
import socket
import struct
import time

from dllama.net.messages import HEADER, MAGIC, ProtocolError
from dllama.net.protocol import PeerClosed

_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_OUT = select.POLLOUT | select.POLLHUP | select.POLLERR


TAG = 16
_SEQ = struct.Struct("<Q")
_LEN = struct.Struct("<I")
_JOIN = 1 << 16  # frames up to this size go out in one send with their tag
_CHUNK = 1 << 20  # payload bytes encrypted at a time (a big TENSOR is not copied whole)
_SMALL = 1 << 16  # frames up to this size are tagged in one go from a copy (see _Stream)


class Timeout(PeerClosed):
    """The peer did not answer in time."""


class _Stream:
    """The tag state of one direction: sequence number and where we are in the current frame. AES-256-GMAC (OpenSSL
    through `cryptography`): GCM over an empty plaintext, header and payload as associated data. Nonce = the sequence
    number: never reused under a key (a fresh key per connection and direction, one frame per number, a u64 that
    does not wrap). A frame of up to _SMALL bytes is collected and tagged by the one-shot AESGCM, whose keyed context
    lives as long as the link (~1 us for a FORWARD); a bigger one streams through a GCM context made for that frame
    (~13 us to set up, nothing copied)."""

    def __init__(self, key: bytes, sending: bool):
        # imported here: only a cluster needs it, and it adds ~20 ms to every start
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(key) != 32:
            raise ValueError("link keys are 32 bytes (AES-256)")
        self.alg, self.aead, self.sending = algorithms.AES(key), AESGCM(key), sending
        self._cipher, self._gcm, self._invalid = Cipher, modes.GCM, InvalidTag
        self.seq = 0
        self.head = bytearray()
        self.left = -1  # payload bytes still to come in this frame; -1 while in its header
        self.ctx = None  # the streaming context of this frame
        self.small: bytearray | None = None  # or: this (small) frame so far

    def take_header(self, data) -> int:
        """Feeds header bytes; returns how many were used."""
        k = min(HEADER.size - len(self.head), len(data))
        self.head += data[:k]
        if len(self.head) == HEADER.size:
            self.left = _LEN.unpack_from(self.head, 4)[0]
            self._begin(bytes(self.head))
        return k

    def _nonce(self) -> bytes:
        return _SEQ.pack(self.seq) + bytes(4)

    def _begin(self, head: bytes) -> None:
        if self.left <= _SMALL:
            self.small = bytearray(head)
        else:  # both directions compute the tag (the receiver compares it): an encryptor of an empty plaintext
            self.ctx = self._cipher(self.alg, self._gcm(self._nonce())).encryptor()
            self.ctx.authenticate_additional_data(head)

    def _feed(self, data) -> None:
        if self.small is not None:
            self.small += data
        else:
            self.ctx.authenticate_additional_data(data)

    def seal(self, data):
        """Sending: what goes on the wire for these payload bytes."""
        self._feed(data)
        return data

    def open(self, view: memoryview) -> None:
        """Receiving: these payload bytes, as received, made plain in place."""
        self._feed(view)

    def _tag(self) -> bytes:
        if self.small is not None:
            return self.aead.encrypt(self._nonce(), b"", bytes(self.small))
        self.ctx.finalize()
        return self.ctx.tag

    def tag(self) -> bytes:
        """Sending: the finished frame's tag; ready for the next frame."""
        t = self._tag()
        self._next()
        return t

    def check(self, got: bytes) -> bool:
        """Receiving: whether the finished frame's tag is `got`; ready for the next frame."""
        ok = hmac.compare_digest(self._tag(), got)
        self._next()
        return ok

    def _next(self) -> None:
        self.seq += 1
        self.head.clear()
        self.left, self.ctx, self.small = -1, None, None


class _SealedStream(_Stream):
    """AES-256-GCM: payload encrypted (streaming, in place when receiving), header authenticated, nonce = sequence
    number (as above)."""

    def _begin(self, head: bytes) -> None:
        cipher = self._cipher(self.alg, self._gcm(self._nonce()))
        self.ctx = cipher.encryptor() if self.sending else cipher.decryptor()
        self.ctx.authenticate_additional_data(head)

    def seal(self, data):
        out = bytearray(len(data))
        self.ctx.update_into(data, out)
        return out

    def open(self, view: memoryview) -> None:
        self.ctx.update_into(view, view)

    def check(self, got: bytes) -> bool:
        try:
            self.ctx.finalize_with_tag(got)
            ok = True
        except self._invalid:
            ok = False
        self._next()
        return ok


class Conn:
    def __init__(self, sock: socket.socket, name: str, timeout: float | None = 30.0):
        sock.setblocking(False)
        self.sock = sock
        self.name = name  # e.g. "worker 1 (127.0.0.1:9991)", for error messages
        self.timeout = timeout  # seconds per wait; None waits forever (TCP keepalive still detects dead peers)
        self.deadline: float | None = None  # time.monotonic() by which everything must be done
        self.sent = 0
        self.received = 0
        self._poll_in = select.poll()
        self._poll_in.register(sock, _IN)
        self._poll_out = select.poll()
        self._poll_out.register(sock, _OUT)
        self._tx: _Stream | None = None
        self._rx: _Stream | None = None
        self.encrypted = False
        # (send key, receive key, encrypt) of the C mesh's partial sums on this link
        self.mesh_keys: tuple[bytes, bytes, bool] | None = None

    def start_integrity(self, send_key: bytes, recv_key: bytes, mesh_keys: tuple[bytes, bytes],
                        encrypt: bool = False) -> None:  # fmt: skip
        """From the next frame on, tag (and with `encrypt` encrypt) what we send and check (decrypt) what we
        receive (called right after the handshake, at a frame boundary in both directions)."""
        stream = _SealedStream if encrypt else _Stream
        self._tx, self._rx = stream(send_key, True), stream(recv_key, False)
        self.encrypted = encrypt
        self.mesh_keys = (*mesh_keys, encrypt)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _wait(self, poller, what: str) -> None:
        t = self.timeout
        if self.deadline is not None:
            left = max(0.0, self.deadline - time.monotonic())
            t = left if t is None else min(t, left)
        if not poller.poll(None if t is None else int(t * 1000)):
            raise Timeout(f"{self.name} did not {what} within {self.timeout or 0:.0f} s")

    def readable_now(self) -> bool:
        """Data (or EOF, or an error) is waiting, without blocking."""
        return bool(self._poll_in.poll(0))

    def sendall(self, data) -> None:
        tx = self._tx
        if tx is None:
            return self._send(data)
        view = memoryview(data).cast("B")
        pieces, size, off = [], 0, 0
        while off < len(view):
            if tx.left < 0:
                k = tx.take_header(view[off:])
                pieces.append(view[off : off + k])
            else:
                k = min(tx.left, len(view) - off, _CHUNK)
                pieces.append(tx.seal(view[off : off + k]))
                tx.left -= k
            off += k
            size += k
            if tx.left == 0:  # the frame is complete: its tag follows it
                pieces.append(tx.tag())
                size += TAG
            if size > _JOIN:  # big: piece by piece (an encrypted chunk is sent before the next is made)
                for p in pieces:
                    self._send(p)
                pieces, size = [], 0
        if pieces:
            self._send(b"".join(pieces))

    def _send(self, data) -> None:
        view = memoryview(data).cast("B")
        off = 0
        while off < len(view):
            try:
                k = self.sock.send(view[off:])
                off += k
                self.sent += k
            except BlockingIOError:
                self._wait(self._poll_out, "accept data")
            except OSError as e:
                raise PeerClosed(f"{self.name}: connection lost ({e.strerror or e})") from None

    def recv_into(self, buf, nbytes: int = 0) -> int:
        """Like socket.recv_into but waits (up to the timeout) for data; 0 means EOF. With integrity on, never
        reads past the current frame, and checks its tag before returning the frame's last bytes."""
        rx = self._rx
        if rx is None:
            return self._recv_into(buf, nbytes)
        view = memoryview(buf).cast("B")
        n = min(nbytes or len(view), len(view))
        if rx.left < 0:
            k = self._recv_into(view, min(n, HEADER.size - len(rx.head)))
            if k:
                rx.take_header(view[:k])
        else:
            k = self._recv_into(view, min(n, rx.left))
            if k:
                rx.open(view[:k])
                rx.left -= k
        if k and rx.left == 0:
            self._check_tag(rx)
        return k

    def verify_read_frame(self, mtype: int, payload: bytes, tag_start: bytes = b"", wait: float = 2.0) -> bytes | None:
        """A frame someone else took off this socket (the C mesh reads a peer's ERROR / ABORT in place of a
        partial sum, as it came, and perhaps `tag_start`, the first bytes of its tag): its payload made plain if
        its tag, which follows it on the socket, verifies (so its text can be believed), else None."""
        rx = self._rx
        if rx is None:
            return payload
        if rx.left >= 0 or rx.head:
            return None  # we were inside another frame: cannot be one the peer sent whole
        rx.take_header(HEADER.pack(MAGIC, mtype, 0, len(payload)))
        plain = bytearray(payload)
        rx.open(memoryview(plain))
        rx.left = 0
        self.timeout, self.deadline = wait, None
        try:
            self._check_tag(rx, tag_start)
        except (ProtocolError, PeerClosed):
            return None
        return bytes(plain)

    def _check_tag(self, rx: _Stream, start: bytes = b"") -> None:
        got = bytearray(TAG)
        have = min(len(start), TAG)
        got[:have] = start[:have]
        while have < TAG:
            k = self._recv_into(memoryview(got)[have:], TAG - have)
            if k == 0:
                raise PeerClosed(f"{self.name} closed the connection")
            have += k
        if not rx.check(bytes(got)):
            raise ProtocolError(f"frame from {self.name} failed its integrity check (altered on the way?)")

    def _recv_into(self, buf, nbytes: int = 0) -> int:
        while True:
            try:
                k = self.sock.recv_into(buf, nbytes)
                self.received += k
                return k
            except BlockingIOError:
                self._wait(self._poll_in, "send data")
            except OSError as e:
                raise PeerClosed(f"{self.name}: connection lost ({e.strerror or e})") from None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
