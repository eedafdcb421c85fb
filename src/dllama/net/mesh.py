"""One node's links: a Conn to every other node, and the C TCP mesh (csrc/mesh_tcp.c) over their sockets that the
engine exchanges partial sums through. A failed exchange comes back from the engine as one CommError, turned here into
one NodeFailure that names the node and says what happened: with a peer's ABORT, the node that peer saw fail."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dllama.errors import DllamaError
from dllama.net import _mesh
from dllama.net import messages as M
from dllama.net.conn import Conn
from dllama.net.protocol import PeerClosed


class NodeFailure(PeerClosed):
    def __init__(self, node: int, message: str):
        super().__init__(message)
        self.node = node


@dataclass
class Counters:
    """Cumulative: seconds blocked on the network, bytes sent and received at the socket calls."""

    network_s: float = 0.0
    sent: int = 0
    received: int = 0

    def __sub__(self, o: Counters) -> Counters:
        return Counters(self.network_s - o.network_s, self.sent - o.sent, self.received - o.received)


# How long an exchange waits for the peers' partial sums on the CPU before sleeping (mesh_tcp.c: only while they
# have recently come that fast). A sleep costs a wake-up per exchange, 2 per layer: on the VMs measured here 20-50 %
# of the token time at 2-4 nodes on loopback. DLLAMA_SPIN_US=0 turns it off (e.g. on a machine paid per CPU second).
SPIN_US = 50


def spin_us() -> int:
    v = os.environ.get("DLLAMA_SPIN_US", "").strip()
    if not v:
        return SPIN_US
    if not v.isdigit() or int(v) > 1_000_000:
        raise DllamaError(f"DLLAMA_SPIN_US must be a whole number of microseconds from 0 to 1000000, not {v!r}")
    return int(v)


# After the first steps (DATA_TIMEOUT: pages of weights may still be coming in from disk) a peer is declared failed
# after STEP_MARGIN x the measured time per token x T, at least MIN_STEP_TIMEOUT; every node measures its own steps,
# so in a butterfly the node next to a stopped one gives up first (comm.h: later rounds wait longer)
STEP_MARGIN, MIN_STEP_TIMEOUT = 20.0, 2.0


class Mesh:
    def __init__(self, index: int, links: dict[int, Conn], timeout: float):
        self.index, self.links = index, links
        self.per_token_s: float | None = None  # measured step time per token (moving average)
        n = len(links) + 1
        self.timeout = timeout
        fds = [links[j].fileno() if j != index else -1 for j in range(n)]
        keys = [links[j].mesh_keys if j != index else None for j in range(n)]  # from each link's handshake
        self.tcp = _mesh.TcpMesh(fds, index, M.PARTIAL_PREFIX, M.EXPLAIN_TYPES, int(timeout * 1000), keys,
                                 spin_us())

    @property
    def capsule(self):  # what Engine.set_comm takes
        return self.tcp.capsule

    def counters(self) -> Counters:
        wait, sent, received = self.tcp.counters()
        return Counters(wait, sent + sum(c.sent for c in self.links.values()),
                        received + sum(c.received for c in self.links.values()))  # fmt: skip

    def failure(self, args: tuple) -> NodeFailure:
        """The engine's CommError args (node, kind, errno, frame type, the peer's explanation) as one error."""
        node, kind, err, mtype, msg = args
        name = self.links[node].name if node in self.links else f"node {node}"
        if kind == _mesh.TIMEOUT:  # err: the wait in ms (a butterfly's later rounds wait longer)
            return NodeFailure(node, f"no partial sum from {name} within {(err / 1000 or self.timeout):.0f} s")
        if kind == _mesh.SOCKERR:
            return NodeFailure(node, f"{name}: connection lost ({os.strerror(err)})")
        if kind == _mesh.PEER_ERROR:
            if node in self.links:  # the text as read by the mesh: checked (and decrypted) by the link's Conn
                msg = self.links[node].verify_read_frame(mtype, bytes(msg), self.tcp.overread(node))
                if msg is None:
                    return NodeFailure(node, f"{name} sent an error message that failed its integrity check")
            abort = M.as_abort(mtype, msg)
            if abort and abort.failed_node != self.index and abort.failed_node in self.links:  # blame who failed
                why = abort.reason if "(reported by " in abort.reason else f"{abort.reason} (reported by {name})"
                return NodeFailure(abort.failed_node, why)
            return NodeFailure(node, f"{name}: {M.explanation(mtype, msg)}")
        if kind == _mesh.NONFINITE:
            return NodeFailure(node, f"{name} sent a partial sum with NaN or infinite values")
        if kind == _mesh.INTEGRITY:
            return NodeFailure(node, f"partial sum from {name} failed its integrity check (altered on the way?)")
        if kind == _mesh.BADFRAME:
            return NodeFailure(node, f"{name} sent a malformed or out-of-step partial sum")
        return NodeFailure(node, f"{name} disconnected")

    def start_step(self, T: int) -> None:
        """Before a forward pass of T tokens: the step timeout, once steps have been measured."""
        if self.per_token_s is not None:
            self.set_timeout(max(MIN_STEP_TIMEOUT, STEP_MARGIN * self.per_token_s * T))

    def end_step(self, seconds: float, T: int) -> None:
        dt = seconds / T
        self.per_token_s = dt if self.per_token_s is None else 0.8 * self.per_token_s + 0.2 * dt

    def set_timeout(self, seconds: float) -> None:
        """The longest wait for a peer's partial sum (the step timeout), and for the links' other messages."""
        self.timeout = seconds
        self.tcp.set_timeout(max(1, int(seconds * 1000)))
        for c in self.links.values():
            if c.timeout is not None:
                c.timeout = seconds

    def close(self) -> None:
        for c in self.links.values():
            c.close()
