"""The C mesh's all-to-all (dllama.net._mesh.TcpMesh.exchange) between in-process nodes on socketpairs, one thread
each: every node gets every other node's bytes exactly, step after step, without tags, with the default AES-GMAC
tags and encrypted, for frames far smaller and far larger than a socket buffer (partial sends and reads, header and body
split across reads), and a peer's frame that is already waiting is taken as well as one that comes later."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from dllama.net import _mesh
from dllama.net import messages as M


def make_meshes(n: int, mode: str, spin_us: int = 0):
    socks: dict[tuple[int, int], socket.socket] = {}
    for i in range(n):
        for j in range(i + 1, n):
            socks[i, j], socks[j, i] = socket.socketpair()
    keys = {(i, j): os.urandom(32) for i in range(n) for j in range(n) if i != j}
    meshes = []
    for i in range(n):
        fds, ks = [], []
        for j in range(n):
            if j == i:
                fds.append(-1)
                ks.append(None)
            else:
                socks[i, j].setblocking(False)
                fds.append(socks[i, j].fileno())
                ks.append(None if mode == "none" else (keys[i, j], keys[j, i], mode == "aes-gcm"))
        meshes.append(_mesh.TcpMesh(fds, i, M.PARTIAL_PREFIX, M.EXPLAIN_TYPES, 10_000, ks, spin_us))
    return meshes, list(socks.values())


def run_nodes(n: int, node, socks) -> None:
    """node(i) in a thread per node; the sockets closed afterwards; any node's exception fails the test."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            node(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in socks:
        s.close()
    assert not errors, errors


@pytest.mark.parametrize("spin_us", [0, 50, 100_000])  # never spin, the default, spin through the late node's sleep
@pytest.mark.parametrize("mode", ["none", "gmac", "aes-gcm"])
@pytest.mark.parametrize("n,nbytes,steps", [(2, 612, 200), (4, 2176, 100), (3, 3 << 20, 4)])
def test_every_node_gets_every_other_nodes_bytes(mode, n, nbytes, steps, spin_us):
    meshes, socks = make_meshes(n, mode, spin_us)
    sent = [[os.urandom(nbytes) for _ in range(steps)] for _ in range(n)]
    got: list[list[bytes]] = [[] for _ in range(n)]

    def node(i: int) -> None:
        for s in range(steps):
            if i == n - 1 and s % 3 == 0:
                time.sleep(0.002)  # a late node: the others wait in poll(), its frames arrive after theirs
            got[i].append(meshes[i].exchange(sent[i][s], 1000 + s))

    run_nodes(n, node, socks)
    for i in range(n):
        assert len(got[i]) == steps
        for s in range(steps):
            want = b"".join(bytes(nbytes) if j == i else sent[j][s] for j in range(n))
            assert got[i][s] == want, (i, s)


@pytest.mark.parametrize("mode", ["none", "gmac", "aes-gcm"])
def test_pairwise_swaps_touch_only_the_named_peers(mode):
    """The butterfly's rounds (engine graph.c at 4, 8, ... nodes; here 4): each exchange names one partner, gets its
    bytes and nothing from the others, and the links' sequence numbers stay in step for a full exchange afterwards
    (every link carries frames only in the rounds that use it)."""
    n, nbytes, steps = 4, 2176, 30
    meshes, socks = make_meshes(n, mode)
    got: list[list[tuple[int, bytes]]] = [[] for _ in range(n)]

    def data(i: int, s: int, r: int) -> bytes:
        return bytes([i, s, r]) * (nbytes // 3) + bytes(nbytes % 3)

    def node(i: int) -> None:
        for s in range(steps):
            for r, bit in enumerate((1, 2)):
                if i == 3 and s % 4 == 0:
                    time.sleep(0.002)  # a late partner
                got[i].append((i ^ bit, meshes[i].exchange(data(i, s, r), 500 + s, [i ^ bit])))
        got[i].append((-1, meshes[i].exchange(data(i, 99, 9), 9999)))  # all peers again

    run_nodes(n, node, socks)
    for i in range(n):
        assert len(got[i]) == 2 * steps + 1
        for k, (peer, out) in enumerate(got[i][:-1]):
            s, r = divmod(k, 2)
            want = b"".join(data(peer, s, r) if j == peer else bytes(nbytes) for j in range(n))
            assert out == want, (i, s, r)
        assert got[i][-1][1] == b"".join(bytes(nbytes) if j == i else data(j, 99, 9) for j in range(n))
    with pytest.raises(ValueError, match="no such peer"):
        meshes[0].exchange(b"x", 1, [0])


@pytest.mark.parametrize("spin_us", [0, 100_000])
def test_a_step_mismatch_is_a_bad_frame(spin_us):
    meshes, socks = make_meshes(2, "gmac", spin_us)
    errors = []

    def node(i: int, step: int) -> None:
        try:
            meshes[i].exchange(b"x" * 100, step)
        except RuntimeError as e:
            errors.append(e.args)

    threads = [threading.Thread(target=node, args=(0, 5)), threading.Thread(target=node, args=(1, 6))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in socks:
        s.close()
    assert sorted(errors) == [(0, _mesh.BADFRAME, 0), (1, _mesh.BADFRAME, 0)]


@pytest.mark.parametrize("spin_us", [0, 100_000])
def test_a_peer_that_goes_away_while_we_wait_is_named(spin_us):
    """Node 1 closes its socket instead of sending: node 0, spinning or asleep in poll(), names the link."""
    meshes, socks = make_meshes(2, "gmac", spin_us)
    timer = threading.Timer(0.05, socks[1].close)  # socks: [node 0's end, node 1's end]
    timer.start()
    with pytest.raises(RuntimeError) as e:
        meshes[0].exchange(b"x" * 100, 7)
    timer.join()
    for s in socks:
        s.close()
    # the peer closed with our frame unread: a reset (SOCKERR) rather than a clean end (CLOSED); either names node 1
    assert e.value.args[0] == 1 and e.value.args[1] in (_mesh.CLOSED, _mesh.SOCKERR), e.value.args


@pytest.mark.parametrize("value", ["-1", "abc", "2000000", "1.5"])
def test_a_bad_spin_setting_is_one_clear_error(monkeypatch, value):
    from dllama.errors import DllamaError
    from dllama.net.mesh import spin_us

    monkeypatch.setenv("DLLAMA_SPIN_US", value)
    with pytest.raises(DllamaError, match="DLLAMA_SPIN_US"):
        spin_us()
    monkeypatch.setenv("DLLAMA_SPIN_US", "0")
    assert spin_us() == 0
