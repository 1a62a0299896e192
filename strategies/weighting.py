"""Client weights the server can trust.

FedAvg weighs each update by the client's example count (McMahan et al. 2017), and
that count is whatever the client says: one client claiming 10^9 examples owns the
weighted mean with a perfectly well-formed update (weight inflation; e.g. the
"quantity" attacks of Fang et al. 2020 and the weight-scaling discussion in Kairouz et
al. 2021, "Advances and Open Problems in Federated Learning", Sec. 5.1). The server
therefore decides the weights (``strategy.weighting``):

- ``bounded`` (default): each client's claim capped at the largest count the server
  will grant it: ``strategy.max_client_examples`` where the operator configured one
  (a number for every node, or ``{client id: max}`` for declared per-node maxima in a
  deployment), else the count the plan knows for that client (its shard, or under
  sample-level DP the declared public size every client shares).
- ``uniform``: every accepted update weighs 1 (the client's claim is ignored).
- ``reported``: the clients' claims as sent (trusts every client; only for
  experiments that measure the attack).

Pure numpy; the strategy applies it to each round's accepted rows and records every
claim it bounded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlora.core.errors import ConfigError

BOUNDED, UNIFORM, REPORTED = "bounded", "uniform", "reported"
RULES = (BOUNDED, UNIFORM, REPORTED)


@dataclass(frozen=True)
class ClientWeights:
    """How the server turns claimed example counts into aggregation weights."""

    rule: str = BOUNDED
    # client id (as a string) -> the largest weight the server grants it
    bounds: Mapping[str, float] = field(default_factory=dict)
    # the bound of a client with no entry in ``bounds`` (a single configured maximum)
    default_bound: float | None = None

    def bound_of(self, cid: Any) -> float:
        """The largest weight of client ``cid``; one the plan does not know gets the
        smallest weight the server grants anyone."""
        if str(cid) in self.bounds:
            return self.bounds[str(cid)]
        if self.default_bound is not None:
            return self.default_bound
        return min(self.bounds.values(), default=1.0)

    def apply(self, claimed: Sequence[float], cids: Sequence[Any]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """(the weights the rule uses, one record per claim the server changed)."""
        claimed = np.asarray(claimed, dtype=np.float64)
        if self.rule == REPORTED:
            return claimed, []
        if self.rule == UNIFORM:
            return np.ones_like(claimed), []
        used = claimed.copy()
        bounded = []
        for i, cid in enumerate(cids):
            bound = self.bound_of(cid)
            if not claimed[i] <= bound:  # also a NaN claim
                used[i] = bound
                bounded.append({"cid": str(cid), "claimed": float(claimed[i]), "used": float(bound)})
        return used, bounded


def _positive(value: Any, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        raise ConfigError(key, f"must be a positive number of examples, got {value!r}")
    return number


def client_weights(strategy_cfg: Any, plan_counts: Mapping[int, int]) -> ClientWeights:
    """The server's weighting from ``strategy.weighting`` / ``strategy.max_client_examples``;
    ``plan_counts`` are the example counts the plan knows per client."""
    rule = str(strategy_cfg.get("weighting") or BOUNDED)
    if rule not in RULES:
        raise ConfigError("strategy.weighting", f"unknown weighting {rule!r}; choose one of {list(RULES)}")
    configured = strategy_cfg.get("max_client_examples")
    bounds = {str(c): float(n) for c, n in plan_counts.items()}
    default = None
    if configured is not None:
        if isinstance(configured, Mapping) or hasattr(configured, "items"):
            for cid, value in configured.items():
                bounds[str(cid)] = _positive(value, f"strategy.max_client_examples.{cid}")
        else:
            default = _positive(configured, "strategy.max_client_examples")
            bounds = {c: default for c in bounds}
    return ClientWeights(rule=rule, bounds=bounds, default_bound=default)
