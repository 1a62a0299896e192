"""Coordinate-wise robust statistics: the median and the trimmed mean."""

from __future__ import annotations

import numpy as np

from strategies.aggregators._numerics import (
    _SORT_BLOCK_BYTES,
    _check,
    _column_blocks,
    _sorted_columns,
)
from strategies.aggregators.registry import (
    check_num_malicious,
    check_params,
    register,
    register_requirements,
)


def _honest_majority(num_malicious: int | None) -> list[tuple[int, str]]:
    # A coordinate-wise median or trimmed mean is only bounded by honest values while
    # they are the majority of every coordinate.
    if num_malicious is None:
        return []
    f = check_num_malicious(num_malicious)
    return [(2 * f + 1, "f < n/2 (n >= 2f+1)")]


@register_requirements("fedavg")
def _fedavg_requirements(num_malicious: int = 0) -> list[tuple[int, str]]:
    check_num_malicious(num_malicious)
    return []


@register_requirements("median")
def _median_requirements(num_malicious: int | None = None) -> list[tuple[int, str]]:
    return _honest_majority(num_malicious)


@register_requirements("trimmed_mean")
def _trimmed_mean_requirements(
    beta: float = 0.1, num_malicious: int | None = None
) -> list[tuple[int, str]]:
    if not 0 <= beta < 0.5:
        raise ValueError(f"needs 0 <= beta < 0.5, got beta={beta}")
    return _honest_majority(num_malicious)



@register("median")
def median(updates: np.ndarray, weights: np.ndarray, num_malicious: int | None = None) -> np.ndarray:
    """Coordinate-wise median of the rows, unweighted.

    Yin, Chen, Ramchandran, Bartlett (2018), "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML, https://arxiv.org/abs/1803.01498.

    Parameters
    ----------
    updates : ndarray, shape (n, d)
        One flattened update per row.
    weights : ndarray, shape (n,)
        Ignored: every update counts once, so a client cannot gain influence by
        claiming more examples. Accepted for the common aggregator signature.
    num_malicious : int, optional
        f, the number of Byzantine updates to tolerate; when given, f < n/2 is checked.

    Returns
    -------
    ndarray, shape (d,)
        For even n the mean of the two middle values, computed as ``np.median`` does,
        so the result equals ``flwr.server.strategy.aggregate.aggregate_median`` bit
        for bit.
    """
    _check(updates, weights)
    n, d = updates.shape
    check_params("median", n, num_malicious=num_malicious)
    out = np.empty(d, dtype=updates.dtype)
    half = n // 2
    for cols in _column_blocks(n, d, _SORT_BLOCK_BYTES):
        block = np.ascontiguousarray(updates[:, cols].T)
        # A single kth takes NumPy's SIMD selection; for even n the lower middle
        # value is the largest of the lower half.
        block.partition(half, axis=1)
        upper = block[:, half]
        out[cols] = upper if n % 2 else (block[:, :half].max(axis=1) + upper) / 2
    return out


@register("trimmed_mean")
def trimmed_mean(
    updates: np.ndarray,
    weights: np.ndarray,
    beta: float = 0.1,
    num_malicious: int | None = None,
    report: dict | None = None,
) -> np.ndarray:
    """Coordinate-wise beta-trimmed mean of the rows, unweighted.

    Yin, Chen, Ramchandran, Bartlett (2018), "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates", ICML, https://arxiv.org/abs/1803.01498.

    Parameters
    ----------
    updates : ndarray, shape (n, d)
        One flattened update per row.
    weights : ndarray, shape (n,)
        Ignored (unweighted, as in the paper).
    beta : float, default 0.1
        Fraction cut at each end, 0 <= beta < 0.5. Per coordinate the ``int(beta * n)``
        largest and the ``int(beta * n)`` smallest values are dropped (truncation, the
        same count at both ends, as ``flwr``'s ``aggregate_trimmed_avg`` with
        ``proportiontocut=beta`` and ``scipy.stats.trim_mean``) and the remaining
        ``n - 2 int(beta * n)`` are averaged.
    num_malicious : int, optional
        f; when given, f < n/2 is checked. Robustness to f Byzantine updates also needs
        ``int(beta * n) >= f``, which is left to the caller's choice of beta.
    report : dict, optional
        Filled with ``beta``, ``trimmed_per_end`` (values cut at each end of every
        coordinate) and ``kept`` (values averaged per coordinate).

    Returns
    -------
    ndarray, shape (d,)
        Equals ``aggregate_trimmed_avg`` up to float rounding (the sum is in float64).
    """
    _check(updates, weights)
    n, d = updates.shape
    check_params("trimmed_mean", n, beta=beta, num_malicious=num_malicious)
    cut = int(beta * n)
    if report is not None:
        report.update(beta=float(beta), trimmed_per_end=cut, kept=n - 2 * cut)
    out = np.empty(d, dtype=updates.dtype)
    for cols in _column_blocks(n, d, _SORT_BLOCK_BYTES):
        if cut:
            block = _sorted_columns(updates, cols)[:, cut : n - cut]
        else:
            block = updates[:, cols].T
        out[cols] = block.sum(axis=1, dtype=np.float64) / (n - 2 * cut)
    return out
