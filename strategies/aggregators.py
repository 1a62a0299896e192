"""Aggregation rules over a stacked (n, d) matrix of client updates.

Every aggregator is a pure function ``f(updates, weights, **params) -> ndarray[d]``
over ``updates`` of shape (n, d) float32 (one flattened LoRA delta per row) and
non-negative ``weights`` of shape (n,). No Flower imports: the strategy is a thin
adapter around these. New rules plug in with :func:`register` or by dotted path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

Aggregator = Callable[..., np.ndarray]
AGGREGATORS: dict[str, Aggregator] = {}


def register(name: str) -> Callable[[Aggregator], Aggregator]:
    def wrap(fn: Aggregator) -> Aggregator:
        AGGREGATORS[name] = fn
        return fn

    return wrap


def get_aggregator(name: str) -> Aggregator:
    """A registered rule by name, or any function by dotted path (``pkg.mod.fn``)."""
    if name in AGGREGATORS:
        return AGGREGATORS[name]
    if "." in name:
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    raise KeyError(f"unknown aggregator {name!r}; registered: {sorted(AGGREGATORS)}")


def _check(updates: np.ndarray, weights: np.ndarray) -> None:
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must be a non-empty (n, d) matrix, got shape {updates.shape}")
    if weights.shape != (updates.shape[0],):
        raise ValueError(f"weights must have shape ({updates.shape[0]},), got {weights.shape}")


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
