"""A TCP connection in non-blocking mode with blocking-with-timeout helpers and byte counters.

The partial-sum exchange needs non-blocking sockets (send to and receive from every peer at once without
deadlocking on full buffers); the rest of the protocol wants plain blocking calls. `Conn` offers both on one
socket, waiting in poll(), so nothing ever spins. `sent` / `received` count what the socket calls moved;
`deadline` bounds a whole exchange (the handshake), `timeout` each wait."""

from __future__ import annotations

import select
import socket
import time

from dllama.net.protocol import PeerClosed

_IN = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_OUT = select.POLLOUT | select.POLLHUP | select.POLLERR


class Timeout(PeerClosed):
    """The peer did not answer in time."""


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
        """Like socket.recv_into but waits (up to the timeout) for data; 0 means EOF."""
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
