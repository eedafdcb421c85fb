"""A TCP connection in non-blocking mode with blocking-with-timeout helpers and byte counters.

The partial-sum exchange needs non-blocking sockets (send to and receive from every peer at once without
deadlocking on full buffers); the rest of the protocol wants plain blocking calls. `Conn` offers both on one
socket, waiting in poll(), so nothing ever spins. `sent` / `received` count what the socket calls moved;
`deadline` bounds a whole exchange (the handshake), `timeout` each wait.

Integrity: once the handshake has derived this link's keys (protocol.frame_keys, never sent), `start_integrity`
makes every frame carry a 16-byte tag = HMAC-SHA256(key, u64 sequence number | header | payload) truncated, one key
and counter per direction. `Conn` follows the frame boundaries itself (the header says how long the payload is), so
callers send and receive frames exactly as before, in as many pieces as they like (TENSOR payloads go straight
into the engine's buffers): on sending, the tag follows the frame's last byte; on receiving, the tag is read and
checked before the frame's last byte is handed over, so nothing of an altered, replayed or reordered frame is ever
acted on (a flipped bit gives ProtocolError naming the link)."""

from __future__ import annotations

import hashlib
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


class Timeout(PeerClosed):
    """The peer did not answer in time."""


class _Stream:
    """The tag state of one direction: sequence number and where we are in the current frame."""

    def __init__(self, key: bytes):
        self.base = hmac.new(key, digestmod=hashlib.sha256)
        self.seq = 0
        self.head = bytearray()
        self.left = -1  # payload bytes still to come in this frame; -1 while in its header
        self.mac = None

    def take_header(self, data) -> int:
        """Feeds header bytes; returns how many were used."""
        k = min(HEADER.size - len(self.head), len(data))
        self.head += data[:k]
        if len(self.head) == HEADER.size:
            self.mac = self.base.copy()
            self.mac.update(_SEQ.pack(self.seq))
            self.mac.update(self.head)
            self.left = _LEN.unpack_from(self.head, 4)[0]
        return k

    def tag(self) -> bytes:
        """The finished frame's tag; ready for the next frame."""
        t = self.mac.digest()[:TAG]
        self.seq += 1
        self.head.clear()
        self.left, self.mac = -1, None
        return t


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
        self.mesh_keys: tuple[bytes, bytes] | None = None  # (send, receive) keys of the C mesh's partial sums

    def start_integrity(self, send_key: bytes, recv_key: bytes, mesh_keys: tuple[bytes, bytes]) -> None:
        """From the next frame on, tag what we send and check what we receive (called right after the handshake,
        at a frame boundary in both directions)."""
        self._tx, self._rx, self.mesh_keys = _Stream(send_key), _Stream(recv_key), mesh_keys

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
        pieces, start, off = [], 0, 0
        while off < len(view):
            if tx.left < 0:
                off += tx.take_header(view[off:])
            else:
                k = min(tx.left, len(view) - off)
                tx.mac.update(view[off : off + k])
                tx.left -= k
                off += k
            if tx.left == 0:  # the frame is complete: its tag follows it
                pieces += (view[start:off], tx.tag())
                start = off
        if start < len(view):
            pieces.append(view[start:])
        if sum(len(p) for p in pieces) <= _JOIN:
            self._send(b"".join(pieces))
        else:
            for p in pieces:
                self._send(p)

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
                rx.mac.update(view[:k])
                rx.left -= k
        if k and rx.left == 0:
            self._check_tag(rx)
        return k

    def verify_read_frame(self, mtype: int, payload: bytes, wait: float = 2.0) -> bool:
        """A frame someone else took off this socket (the C mesh reads a peer's ERROR / ABORT in place of a
        partial sum): True if its tag, which follows it on the socket, verifies, so its text can be believed."""
        rx = self._rx
        if rx is None:
            return True
        if rx.left >= 0 or rx.head:
            return False  # we were inside another frame: cannot be one the peer sent whole
        rx.take_header(HEADER.pack(MAGIC, mtype, 0, len(payload)))
        rx.mac.update(payload)
        rx.left = 0
        self.timeout, self.deadline = wait, None
        try:
            self._check_tag(rx)
        except (ProtocolError, PeerClosed):
            return False
        return True

    def _check_tag(self, rx: _Stream) -> None:
        want = rx.tag()
        got = bytearray(TAG)
        have = 0
        while have < TAG:
            k = self._recv_into(memoryview(got)[have:], TAG - have)
            if k == 0:
                raise PeerClosed(f"{self.name} closed the connection")
            have += k
        if not hmac.compare_digest(want, bytes(got)):
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
