"""The mean: FedAvg (the only rule with a bounded client-level sensitivity) and FedNova's
normalised mean."""

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


def _normaliser(steps: np.ndarray, momentum: float) -> np.ndarray:
    """FedNova's ||a_i||_1 for local SGD with momentum rho over tau_i steps:
    (tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho); tau_i itself without momentum."""
    tau = np.asarray(steps, dtype=np.float64)
    if momentum == 0:
        return tau
    rho = float(momentum)
    return (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)


@register("fednova")
def fednova(updates: np.ndarray, weights: np.ndarray, local_steps: np.ndarray, momentum: float = 0.0) -> np.ndarray:
    """Normalised averaging (Wang et al. 2020, "Tackling the Objective Inconsistency
    Problem in Heterogeneous Federated Optimization", https://arxiv.org/abs/2007.07481):
    each delta divided by its client's normaliser a_i (its local step count under plain
    SGD; the momentum form of the paper's Table 1 under ``momentum``), the weighted mean
    of those rescaled by tau_eff = sum p_i a_i. A client that ran more steps no longer
    pulls the global model towards its own objective; with equal steps it is FedAvg.
    ``local_steps`` holds each row's steps (the strategy passes the replies' counts)."""
    _check(updates, weights)
    w = np.asarray(weights, dtype=np.float64)
    if not w.sum() > 0:
        raise ValueError("fednova needs a positive total weight")
    a = _normaliser(local_steps, momentum)
    if a.shape != w.shape or not np.all(a > 0):
        raise ValueError(f"fednova needs a positive step count per update, got {list(local_steps)}")
    p = w / w.sum()
    tau_eff = float(p @ a)
    return (tau_eff * p / a).astype(updates.dtype) @ updates


@register_requirements("fednova")
def _fednova_requirements(num_malicious: int = 0, momentum: float = 0.0) -> list[tuple[int, str]]:
    check_num_malicious(num_malicious)
    if not 0 <= float(momentum) < 1:
        raise ValueError(f"fednova's momentum must lie in [0, 1), got {momentum}")
    return []
