"""All-reduce of the partial sums after each attention and feed-forward block.

Every node sends its partial sum (T x dim, Q80 by default) to every other node in one round and adds what it
receives, like the original, but every node adds the *same* quantized values in the same node order (its own
partial is quantized too), so the residual stream stays bit-identical on all nodes. The per-token loop over the
layers, with the exchange after each block, runs in C (`Engine.forward_cluster`) with the GIL released: sends and
receives are interleaved with poll(), so big prompt batches cannot deadlock on full socket buffers, waiting costs
no CPU, and there is no Python work per sync. This module wires the sockets in and turns failures into errors
that name the node.

Frame of one partial sum: the protocol's 8-byte header (type PARTIAL) + u32 sync step + T rows (dim * 34/32 bytes
each for q80, dim * 4 for f32); per sync a node sends one to, and receives one from, each other node.
"""

from __future__ import annotations

import os

from dllama.net import protocol as P
from dllama.net.conn import Conn

XC_TIMEOUT, XC_CLOSED, XC_BADFRAME, XC_SOCKERR = 1, 2, 3, 4


class NodeFailure(P.PeerClosed):
    def __init__(self, node: int, message: str):
        super().__init__(message)
        self.node = node


def row_bytes(buffer_type: str, dim: int) -> int:
    return dim * 34 // 32 if buffer_type == "q80" else dim * 4


class Exchange:
    def __init__(self, engine, index: int, links: dict[int, Conn], buffer_type: str, timeout: float = 30.0):
        if buffer_type not in ("q80", "f32"):
            raise ValueError(f"unknown buffer type {buffer_type}")
        self.engine, self.index, self.links, self.timeout = engine, index, links, timeout
        self.order = sorted(links)
        self.frame = P.HEADER.size + P.PARTIAL_S.size  # + T rows
        self.row = row_bytes(buffer_type, engine.cfg.dim)
        engine.k.set_links([links[j].fileno() for j in self.order], self.order, index,
                           0 if buffer_type == "q80" else 1, int(timeout * 1000))  # fmt: skip
        self.bytes_sent = 0
        self.bytes_recv = 0

    def forward(self, pos: int, T: int) -> float:
        """Runs every layer, synchronising after each block; returns the seconds spent waiting on peers."""
        failed = self.engine.k.forward_cluster(pos, T)
        if failed is not None:
            raise self._failure(T, *failed)
        n = 2 * self.engine.cfg.n_layers * len(self.links) * (self.frame + T * self.row)
        self.bytes_sent += n
        self.bytes_recv += n
        return self.engine.k.take_net_s()

    def _failure(self, T: int, code: int, link: int, err: int, got: int, head: bytes) -> NodeFailure:
        node = self.order[link]
        conn = self.links[node]
        if code == XC_TIMEOUT:
            return NodeFailure(node, f"no partial sum from {conn.name} within {self.timeout:.0f} s")
        if code == XC_SOCKERR:
            return NodeFailure(node, f"{conn.name}: connection lost ({os.strerror(err)})")
        if code == XC_BADFRAME and len(head) == P.HEADER.size:
            try:
                mtype, length = P.parse_header(head)
            except P.ProtocolError as e:
                return NodeFailure(node, f"{conn.name} sent garbage: {e}")
            if mtype in (P.ERROR, P.ABORT):  # the peer explains why it gives up: read the rest and report it
                data = self.engine.k.received(link, min(got, P.HEADER.size + length))[P.HEADER.size :]
                conn.timeout = 2.0
                try:
                    if len(data) < length:
                        data += bytes(P.recv_exact(conn, length - len(data)))
                except (P.PeerClosed, OSError):
                    pass
                return NodeFailure(node, f"{conn.name}: {P.decode_error(mtype, bytes(data))}")
            return NodeFailure(
                node, f"{conn.name} sent a malformed partial sum ({P.NAMES[mtype]}, {length} bytes)"
            )
        if code == XC_BADFRAME:
            return NodeFailure(node, f"{conn.name} is out of step")
        return NodeFailure(node, f"{conn.name} disconnected")
