"""Bytes on the wire, measured by the kernel, not by the product: `ss -tinp` reports bytes_received for every TCP
socket of the root (this process) and of the worker processes; the difference across a forward pass is what
crossed each link. The expected numbers are the README's formula evaluated BY HAND for the default model, written
as literals, so a change of the wire format, of the sync type or of the formula in the code cannot move both sides.

Default model (SmolLM2-135M-Instruct): dim 576, L = 30 layers, vocabulary 49152, embedding rows in Q8_0
(576 / 32 blocks * 34 B = 612 B). 3 nodes: the vocabulary splits 16384 / 16384 / 16384 rows.
Frame header 8 B (magic 2, type 1, flags 1, length 4); after the handshake every frame ends with a 16 B integrity
tag (AES-256-GMAC, or GCM's with --encrypt: the same size). A partial-sum frame: header 8 + step 4 + T rows + tag 16.
  q80 partial row S = 576 / 32 * 34 = 612 B   -> one frame (T=1) = 12 + 612 + 16 = 640 B;  2L frames = 60 * 640 = 38400
  f32 partial row S = 576 * 4 = 2304 B        -> one frame (T=1) = 12 + 2304 + 16 = 2332 B; 60 * 2332 = 139920
  FORWARD (T=1) = header 8 + head 16 (pos, T, type, want) + 612 + tag 16 = 652 B
  LOGITS greedy = header 8 + (f32 logit, u32 id) 8 + tag 16 = 32 B;  sampling = 8 + 4 * 16384 + 16 = 65560 B
Per generated token and per worker:
  q80 greedy:   root -> worker 652 + 38400 = 39052;   worker -> root 38400 + 32 = 38432;  worker -> worker 38400
  q80 sampling: root -> worker 39052;                 worker -> root 38400 + 65560 = 103960
  f32 greedy:   root -> worker 652 + 139920 = 140572; worker -> root 139920 + 32 = 139952; worker -> worker 139920
A prompt step of T = 5 tokens (q80, greedy): FORWARD 24 + 5 * 612 + 16 = 3100; partial frame 12 + 5 * 612 + 16 = 3088,
  60 of them = 185280:  root -> worker 3100 + 185280 = 188380;  worker -> root 185280 + 32 = 185312;
  worker -> worker 185280.
"""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from dllama.model.gguf_model import GGUFModel
from dllama.runtime.root import Root

QUIET = {"log": lambda *a: None}

EXPECTED = {  # (root->worker, worker->root, worker->worker) per step, from the hand arithmetic above
    ("q80", "argmax", 1): (39052, 38432, 38400),
    ("q80", "full", 1): (39052, 103960, 38400),
    ("q80", "argmax", 5): (188380, 185312, 185280),
    ("f32", "argmax", 1): (140572, 139952, 139920),
    ("f32", "full", 1): (140572, 139920 + 65560, 139920),
}


def _ss() -> str:
    if not shutil.which("ss"):
        pytest.fail("`ss` (iproute2) is missing: install it (scripts/test.sh does, as root)")
    return subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def tcp_received(pids: set[int]) -> dict[tuple[str, str], tuple[int, int]]:
    """(local addr, peer addr) -> (owner pid, bytes_received) for every established TCP socket of `pids`."""
    out, head = {}, None
    for line in _ss().splitlines():
        if not line[:1].isspace():
            head = line
            continue
        if head is None:
            continue
        f = head.split()
        m = re.search(r"pid=(\d+)", head)
        pid = int(m.group(1)) if m else -1
        if pid in pids:
            r = re.search(r"bytes_received:(\d+)", line)
            out[(f[2], f[3])] = (pid, int(r.group(1)) if r else 0)
        head = None
    return out


def link_bytes(pids: set[int]) -> dict[tuple[int, int], int]:
    """(sender pid, receiver pid) -> bytes the receiver's kernel has received on their connections."""
    socks = tcp_received(pids)
    owner = {local: pid for (local, _), (pid, _) in socks.items()}
    links: dict[tuple[int, int], int] = {}
    for (_, peer), (pid, got) in socks.items():
        if peer in owner:
            key = (owner[peer], pid)
            links[key] = links.get(key, 0) + got
    return links


def measure(root: Root, pids: set[int], tokens: list[int], pos: int, want: str):
    before = link_bytes(pids)
    root.run(tokens, pos, want)
    after = link_bytes(pids)
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}


@pytest.mark.parametrize("sync", ["q80", "f32"])
def test_kernel_counted_bytes_match_the_hand_computed_formula(default_model, workers, sync):
    ws = workers(2)
    me, wp = os.getpid(), [w.proc.pid for w in ws]
    pids = {me, *wp}
    m = GGUFModel(default_model)
    with Root(m, nthreads=1, max_seq=64, workers=[w.address for w in ws], secret="test-secret", sync=sync,
              **QUIET) as root:  # fmt: skip
        cases = [("argmax", [1, 2, 3, 4, 5], 0)] if sync == "q80" else []
        cases += [("argmax", [7], 5), ("argmax", [9], 6), ("full", [11], 7), ("full", [13], 8)]
        for want, toks, pos in cases:
            d = measure(root, pids, toks, pos, want)
            r2w, w2r, w2w = EXPECTED[(sync, want, len(toks))]
            got = {"root->worker": [d.get((me, p), 0) for p in wp], "worker->root": [d.get((p, me), 0) for p in wp],
                   "worker->worker": [d.get((wp[0], wp[1]), 0), d.get((wp[1], wp[0]), 0)]}  # fmt: skip
            print(f"{sync} {want} T={len(toks)}: kernel-counted {got}")
            assert got == {"root->worker": [r2w] * 2, "worker->root": [w2r] * 2, "worker->worker": [w2w] * 2}, (
                f"{sync} {want} T={len(toks)}: expected root->worker {r2w}, worker->root {w2r}, "
                f"worker->worker {w2w} bytes per link, the kernel counted {got}"
            )


def test_f32_logit_slices_are_exact_when_sampling(default_model, workers):
    """The workers' f32 logit slices (sampling mode) are the same values the root gets in one piece alone."""
    m = GGUFModel(default_model)
    ws = workers(2)
    with Root(m, nthreads=1, max_seq=64, workers=[w.address for w in ws], secret="test-secret", sync="f32",
              **QUIET) as root:  # fmt: skip
        full = root.run([1, 2, 3], 0, "full").logits.copy()
        best = root.run([1, 2, 3], 0, "argmax").logits.copy()
    assert np.isfinite(full).all()
    k = int(full.argmax())
    assert best[k] == full[k] and int(np.argmax(best)) == k


# 4, 8, ... nodes sum their partial sums in a butterfly (graph.c): at 8, node i swaps with i^1, i^2, i^4 only. The synthetic 8-KV-head
# model (tiny-8kv, F32 weights): dim 256, L = 4 layers, vocabulary 1024 (128 rows per node), embedding rows F32.
#   q80 partial row S = 256 / 32 * 34 = 272 B -> one frame (T=1) = 12 + 272 + 16 = 300 B; 2L frames = 8 * 300 = 2400
#   FORWARD (T=1) = 8 + 16 + 4 * 256 + 16 = 1064 B;  LOGITS greedy = 32 B
# Per greedy token: root -> partner (1, 2, 4) 1064 + 2400 = 3464, root -> other worker 1064;
#   partner -> root 2400 + 32 = 2432, other worker -> root 32; worker <-> worker 2400 between partners, 0 otherwise
#   (all-to-all, as 2, 3 and 5-7 nodes sum, would put 2400 on every one of the 56 directed links).
def test_eight_nodes_swap_partial_sums_with_three_partners_only(tiny8, workers):
    ws = workers(7)
    me, wp = os.getpid(), [w.proc.pid for w in ws]
    pid = [me, *wp]
    m = GGUFModel(tiny8["f32"])
    with Root(m, nthreads=1, max_seq=64, workers=[w.address for w in ws], secret="test-secret", sync="q80",
              **QUIET) as root:  # fmt: skip
        root.run([3], 0, "argmax")  # warm-up: any first-use traffic is not counted
        d = measure(root, set(pid), [7], 1, "argmax")
    got = {(a, b): d.get((pid[a], pid[b]), 0) for a in range(8) for b in range(8) if a != b}
    want = {}
    for a in range(8):
        for b in range(8):
            if a == b:
                continue
            partners = (a ^ b) in (1, 2, 4)
            if a == 0:
                want[a, b] = 1064 + (2400 if partners else 0)
            elif b == 0:
                want[a, b] = 32 + (2400 if partners else 0)
            else:
                want[a, b] = 2400 if partners else 0
    bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not bad, f"bytes per directed link (node a -> node b): (counted, expected) {bad}"
