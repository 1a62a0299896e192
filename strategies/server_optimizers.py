"""Server optimisers over the aggregated delta (pure numpy, no Flower).

The aggregate of a round (FedAvg, a robust rule, or DP-FedAvg's noised mean) is treated
as a pseudo-gradient Delta_t (Reddi et al. 2021, "Adaptive Federated Optimization",
https://arxiv.org/abs/2003.00295, Algorithm 2), and the server moves the global adapter by

- ``fedavg``: ``lr * Delta_t`` (``lr = 1`` is plain FedAvg, McMahan et al. 2017);
- ``fedavgm``: momentum ``m_t = momentum * m_{t-1} + Delta_t``, step ``lr * m_t``
  (Hsu, Qi, Brown 2019, "Measuring the effects of non-identical data distribution");
- ``fedadagrad`` / ``fedadam`` / ``fedyogi``: ``m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t``
  and the second moment ``v_t`` by Adagrad (``v + Delta^2``), Adam
  (``beta2 * v + (1 - beta2) * Delta^2``) or Yogi
  (``v - (1 - beta2) * Delta^2 * sign(v - Delta^2)``), step ``lr * m_t / (sqrt(v_t) + tau)``,
  with ``v_{-1} = tau^2`` as in the paper (no bias correction: Algorithm 2 has none).

An optimiser only reads the released aggregate, so under client-level DP it is
post-processing of the noised mean and costs no privacy; under sample-level DP the
aggregate is of noised updates already. Its state (moments, step count) is part of the
checkpoint, so a resumed run continues the same trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlora.core.errors import ConfigError

OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
ADAPTIVE = ("fedadagrad", "fedadam", "fedyogi")
# Defaults of Reddi et al. 2021 (their Table/Appendix: beta1 0.9, beta2 0.99, tau 1e-3)
# and of Hsu et al. 2019 (server momentum 0.9).
DEFAULTS = {"momentum": 0.9, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
STATE_PREFIX = "server_optimizer_"


@dataclass
class ServerOptimizer:
    """One of :data:`OPTIMIZERS` with its state over a flat parameter vector."""

    name: str = "fedavg"
    lr: float = 1.0
    momentum: float = DEFAULTS["momentum"]
    beta1: float = DEFAULTS["beta1"]
    beta2: float = DEFAULTS["beta2"]
    tau: float = DEFAULTS["tau"]
    steps: int = 0
    moments: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError("strategy.server_optimizer",
                              f"unknown optimiser {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ConfigError("strategy.server_lr", f"must be > 0, got {self.lr}")
        for key in ("momentum", "beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"strategy.server_optimizer_params.{key}", f"must lie in [0, 1), got "
                                  f"{getattr(self, key)}")
        if not self.tau > 0:
            raise ConfigError("strategy.server_optimizer_params.tau", f"must be > 0, got {self.tau}")

    def step(self, delta: np.ndarray) -> np.ndarray:
        """The change to add to the global parameters for the aggregate ``delta``."""
        delta = np.asarray(delta, dtype=np.float64)
        self.steps += 1
        if self.name == "fedavg":
            return (self.lr * delta).astype(np.float32)
        if self.name == "fedavgm":
            m = self.moments.get("m", np.zeros_like(delta))
            m = self.momentum * m + delta
            self.moments["m"] = m
            return (self.lr * m).astype(np.float32)
        m = self.beta1 * self.moments.get("m", np.zeros_like(delta)) + (1 - self.beta1) * delta
        v = self.moments.get("v", np.full_like(delta, self.tau**2))
        sq = delta * delta
        if self.name == "fedadagrad":
            v = v + sq
        elif self.name == "fedadam":
            v = self.beta2 * v + (1 - self.beta2) * sq
        else:  # fedyogi
            v = v - (1 - self.beta2) * sq * np.sign(v - sq)
        self.moments["m"], self.moments["v"] = m, v
        return (self.lr * m / (np.sqrt(v) + self.tau)).astype(np.float32)

    # -- checkpoint ------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """The moments under checkpoint array names."""
        return {STATE_PREFIX + k: v for k, v in self.moments.items()}

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps}

    def restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Continue from a checkpoint written by the same optimiser."""
        saved = state.get("name", self.name)
        if saved != self.name:
            raise ConfigError("strategy.server_optimizer",
                              f"the checkpoint was written by {saved!r}, the config asks for {self.name!r}; "
                              "resume with the run's own optimiser")
        self.steps = int(state.get("steps", 0))
        self.moments = {k[len(STATE_PREFIX):]: np.asarray(v, dtype=np.float64)
                        for k, v in arrays.items() if k.startswith(STATE_PREFIX)}


def from_config(strategy_cfg: Any) -> ServerOptimizer:
    """``strategy.server_optimizer`` with ``strategy.server_lr`` and
    ``strategy.server_optimizer_params`` (unset keys take :data:`DEFAULTS`)."""
    params = dict(strategy_cfg.get("server_optimizer_params") or {})
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise ConfigError("strategy.server_optimizer_params",
                          f"unknown keys {sorted(unknown)}; known: {', '.join(DEFAULTS)}")
    values = {k: float(v) for k, v in params.items() if v is not None}
    return ServerOptimizer(name=str(strategy_cfg.get("server_optimizer") or "fedavg"),
                           lr=float(strategy_cfg.get("server_lr", 1.0)), **values)
