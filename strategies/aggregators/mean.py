"""The mean: FedAvg, the only rule with a bounded client-level sensitivity."""

from __future__ import annotations

import numpy as np

from strategies.aggregators._numerics import _check
from strategies.aggregators.registry import (
    check_num_malicious,
    register,
    register_requirements,
)


@register("fedavg")
def fedavg(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of the rows (McMahan et al. 2017, "Communication-Efficient Learning
    of Deep Networks from Decentralized Data", https://arxiv.org/abs/1602.05629)."""
    _check(updates, weights)
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum()
    if not total > 0:
        raise ValueError("fedavg needs a positive total weight")
    # One BLAS matrix-vector product: no (n, d) temporary.
    return (w / total).astype(updates.dtype) @ updates


# Client-level DP (strategies.client_dp) needs a bound on how far one client can move the
# aggregate. For the mean of L2-clipped updates over a fixed denominator it is C / (qN):
# adding or removing one client changes the clipped sum by at most C. Rules that select or
# reweight updates depending on all of them (Krum, median, ...) have no such bound.
fedavg.client_dp_sensitivity = "sum of L2-clipped updates: add/remove one client changes it by <= C"


@register_requirements("fedavg")
def _fedavg_requirements(num_malicious: int = 0) -> list[tuple[int, str]]:
    check_num_malicious(num_malicious)
    return []
