"""One node: the engine alone, its partial sums added to itself."""

from __future__ import annotations

import numpy as np

from dllama.engine.engine import Engine
from dllama.net.mesh import Counters
from dllama.net.messages import LOGITS_NONE


class LocalCluster:
    n_nodes = 1
    broken = None

    def __init__(self, engine: Engine):
        self.engine = engine

    def step(self, pos: int, T: int, emb_type: int, rows: bytes, want: int) -> np.ndarray | None:
        self.engine.forward(pos, T)
        return None if want == LOGITS_NONE else self.engine.compute_logits(T - 1)

    def counters(self) -> Counters:
        return Counters()

    def close(self) -> None:
        pass
