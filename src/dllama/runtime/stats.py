"""Per-forward timing and traffic, as printed by `dllama inference`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Step:
    n_tokens: int  # tokens in this forward pass (1 when generating)
    total_s: float
    compute_s: float
    network_s: float  # time blocked on synchronisation
    sent: int  # bytes sent by the root, counted at its sockets
    recv: int  # bytes received by the root


@dataclass
class Stats:
    prompt: list[Step] = field(default_factory=list)
    gen: list[Step] = field(default_factory=list)

    def clear(self) -> None:
        self.prompt.clear()
        self.gen.clear()

    @staticmethod
    def tokens_per_s(steps: list[Step]) -> float:
        t = sum(s.total_s for s in steps)
        return sum(s.n_tokens for s in steps) / t if t > 0 else 0.0
