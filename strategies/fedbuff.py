"""FedBuff's buffer and staleness weighting (pure numpy).

Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"
(AISTATS): clients train on whatever global model they last received; the server keeps
the updates in a buffer and, once ``K`` are in, steps the global model with their
staleness-weighted aggregate. An update computed on version ``v`` and arriving at
version ``t`` has staleness ``tau = t - v`` and is weighted ``1 / (1 + tau) ** a``
(``a = 1/2`` in the paper, after Xie et al. 2019's polynomial staleness function);
updates staler than ``max_staleness`` are refused (bounded staleness: the analysis of
FedBuff assumes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def staleness_weight(tau: int, exponent: float = 0.5) -> float:
    """``1 / (1 + tau) ** exponent``: 1 for a fresh update, less for a stale one."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    return float((1.0 + tau) ** -exponent)


@dataclass
class Buffered:
    cid: Any
    update: np.ndarray
    weight: float
    steps: float
    staleness: int


@dataclass
class FedBuffBuffer:
    """Updates waiting for the next global step: ``size`` of them make one."""

    size: int
    max_staleness: int | None = None
    exponent: float = 0.5
    items: list[Buffered] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"buffer size must be >= 1, got {self.size}")

    def refusal(self, staleness: int) -> str | None:
        """Why an update of this staleness is refused, or None."""
        if self.max_staleness is not None and staleness > self.max_staleness:
            return (f"stale update: computed {staleness} global steps ago, more than "
                    f"federation.max_staleness={self.max_staleness}")
        return None

    def add(self, cid: Any, update: np.ndarray, weight: float, steps: float, staleness: int) -> None:
        self.items.append(Buffered(cid, np.asarray(update, np.float32), float(weight), float(steps), int(staleness)))

    @property
    def full(self) -> bool:
        return len(self.items) >= self.size

    def drain(self) -> list[Buffered]:
        """The buffered updates, oldest first; the buffer is empty afterwards."""
        items, self.items = self.items, []
        return items

    def staleness_factors(self, items: list[Buffered]) -> np.ndarray:
        return np.asarray([staleness_weight(b.staleness, self.exponent) for b in items], dtype=np.float64)
