"""The cluster a runner drives: what every node does for one forward pass, behind one small interface.

`step(pos, T, emb_type, rows, want)`: every node runs all layers for T tokens (the local engine's x[:T] already
holds their embeddings; `rows` are the same embeddings in the model's own type, for the other nodes), the partial
sums are added across nodes after each block, and the logits of the last row come back (vocab-sized; with
LOGITS_ARGMAX only the argmax entry is meaningful; None for LOGITS_NONE). `counters()` says how long it waited on
the network and how many bytes crossed the sockets.

Implementations: `LocalCluster` (one node: N = 1 is the same code path) and `TcpCluster` (workers over TCP, the
all-reduce in C). A pipeline-parallel or GPU cluster would be a third: nothing above this interface changes."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from dllama.net.mesh import Counters


class Cluster(Protocol):
    n_nodes: int
    broken: str | None  # why the cluster cannot run (a node failed); None when it can

    def step(self, pos: int, T: int, emb_type: int, rows: bytes, want: int) -> np.ndarray | None: ...

    def counters(self) -> Counters: ...

    def close(self) -> None: ...
