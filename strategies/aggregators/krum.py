"""Distance-based selection: Krum, multi-Krum and Bulyan."""

from __future__ import annotations

import operator

import numpy as np

from strategies.aggregators._numerics import (
    _SORT_BLOCK_BYTES,
    _check,
    _column_blocks,
    _krum_scores,
    _lowest,
    _pairwise_sq_dists,
    _sorted_columns,
)
from strategies.aggregators.mean import fedavg
from strategies.aggregators.registry import (
    check_num_malicious,
    check_params,
    register,
    register_requirements,
)


@register_requirements("krum")
def _krum_requirements(num_malicious: int = 0) -> list[tuple[int, str]]:
    f = check_num_malicious(num_malicious)
    return [(2 * f + 3, "n >= 2f+3")]


@register_requirements("multi_krum")
def _multi_krum_requirements(
    num_malicious: int = 0, num_selected: int | None = None
) -> list[tuple[int, str]]:
    f = check_num_malicious(num_malicious)
    bounds = [(2 * f + 3, "n >= 2f+3")]
    if num_selected is not None:
        m = operator.index(num_selected)
        if m < 1:
            raise ValueError(f"needs num_selected >= 1, got {m}")
        bounds.append((m + f, "num_selected <= n - f"))
    return bounds


@register_requirements("bulyan")
def _bulyan_requirements(num_malicious: int = 0) -> list[tuple[int, str]]:
    f = check_num_malicious(num_malicious)
    return [(4 * f + 3, "n >= 4f+3")]



@register("krum")
def krum(
    updates: np.ndarray, weights: np.ndarray, num_malicious: int = 0, report: dict | None = None
) -> np.ndarray:
    """The update with the lowest Krum score, returned unchanged.

    Blanchard, El Mhamdi, Guerraoui, Stainer (2017), "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS,
    https://papers.nips.cc/paper/6617-machine-learning-with-adversaries-byzantine-tolerant-gradient-descent.

    Parameters
    ----------
    updates : ndarray, shape (n, d)
        One flattened update per row; needs n >= 2f+3.
    weights : ndarray, shape (n,)
        Ignored (Krum selects, it does not average).
    num_malicious : int, default 0
        f, the number of Byzantine updates tolerated.
    report : dict, optional
        Filled with ``selected`` (the chosen row, as a one-element list) and ``scores``
        (every row's Krum score).

    Returns
    -------
    ndarray, shape (d,)
        A copy of the row minimising the sum of squared distances to its n-f-2 nearest
        other rows, as ``flwr``'s ``aggregate_krum(results, num_malicious, to_keep=0)``.
        Exact score ties go to the lexicographically smaller row (Flower: the first
        in list order). Distances come from a Gram matrix rather than Flower's
        pairwise loop, so scores agree to float rounding and the choice can differ
        only between rows whose scores tie to that precision.
    """
    _check(updates, weights)
    check_params("krum", len(updates), num_malicious=num_malicious)
    scores = _krum_scores(_pairwise_sq_dists(updates), num_malicious)
    best = int(_lowest(scores, 1, updates)[0])
    if report is not None:
        report.update(selected=[best], scores=[float(s) for s in scores])
    return updates[best].copy()


@register("multi_krum")
def multi_krum(
    updates: np.ndarray,
    weights: np.ndarray,
    num_malicious: int = 0,
    num_selected: int | None = None,
    report: dict | None = None,
) -> np.ndarray:
    """Weighted mean of the ``num_selected`` updates with the lowest Krum scores.

    Blanchard, El Mhamdi, Guerraoui, Stainer (2017), "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS,
    https://papers.nips.cc/paper/6617-machine-learning-with-adversaries-byzantine-tolerant-gradient-descent.

    Parameters
    ----------
    updates : ndarray, shape (n, d)
        One flattened update per row; needs n >= 2f+3.
    weights : ndarray, shape (n,)
        Example counts; the selected rows are averaged with these weights, as
        ``flwr``'s ``aggregate_krum(results, num_malicious, to_keep=num_selected)``
        averages by ``num_examples``.
    num_malicious : int, default 0
        f, the number of Byzantine updates tolerated.
    num_selected : int, optional
        m, how many rows to average, 1 <= m <= n - f; None means n - f. m = 1 is Krum.
    report : dict, optional
        Filled with ``selected`` (the m averaged rows, ascending) and ``scores``.

    Returns
    -------
    ndarray, shape (d,)
        Scores and tie-breaking as in :func:`krum`: exact ties at the selection
        boundary go to the lexicographically smaller rows (Flower's ``argsort``
        leaves their order to the sort algorithm).
    """
    _check(updates, weights)
    n = len(updates)
    check_params("multi_krum", n, num_malicious=num_malicious, num_selected=num_selected)
    m = n - num_malicious if num_selected is None else num_selected
    scores = _krum_scores(_pairwise_sq_dists(updates), num_malicious)
    chosen = _lowest(scores, m, updates)
    if report is not None:
        report.update(selected=sorted(int(i) for i in chosen), scores=[float(s) for s in scores])
    # Zero weight outside the selection: one matrix-vector product, no copy of the rows.
    selected = np.zeros(n)
    selected[chosen] = np.asarray(weights, dtype=np.float64)[chosen]
    return fedavg(updates, selected)


def _bulyan_select(dist: np.ndarray, num_malicious: int, theta: int, updates: np.ndarray) -> np.ndarray:
    """Indices of ``theta`` rows picked by Krum one at a time, each pick leaving the pool.

    As in ``flwr``'s ``aggregate_bulyan`` each round scores the remaining pool with
    ``max(1, n_r - f - 2)`` neighbours (n_r the pool size). While that is at least 2,
    a score is (sum of distances to the other remaining rows) minus (sum of the f+1
    largest of them); both are updated in O(n) per pick from rows sorted once, instead
    of re-scoring the (n_r, n_r) pool each round. Picks from a pool of at most f+3
    (one neighbour counted, which only happens for f <= 2) are scored directly, so
    that the exact ties of mutual nearest neighbours stay exact for :func:`_lowest`.
    """
    n = len(dist)
    f = num_malicious
    rows = np.arange(n)
    self_first = dist.copy()
    np.fill_diagonal(self_first, -np.inf)
    order = np.argsort(self_first, axis=1, kind="stable")[:, 1:]  # others, nearest first
    sorted_dist = np.take_along_axis(dist, order, axis=1)
    position = np.empty((n, n), dtype=np.intp)
    position[rows[:, None], order] = np.arange(n - 1)
    # The f+1 farthest remaining others of row i sit at sorted positions >= edge[i].
    edge = np.full(n, n - 2 - f)
    farthest = sorted_dist[:, n - 2 - f :].sum(axis=1)
    total = dist.sum(axis=1)
    removed = np.zeros(n, dtype=bool)
    picked = []
    for step in range(theta):
        pool = n - step
        if pool >= f + 4:
            scores = total - farthest
            scores[removed] = np.inf
        else:
            remaining = np.flatnonzero(~removed)
            scores = np.full(n, np.inf)
            scores[remaining] = _krum_scores(dist[np.ix_(remaining, remaining)], f)
        best = int(_lowest(scores, 1, updates)[0])
        picked.append(best)
        removed[best] = True
        if pool - 1 >= f + 4:
            total -= dist[:, best]
            hit = np.flatnonzero((position[:, best] >= edge) & ~removed)
            farthest[hit] -= dist[hit, best]
            # Widen the farthest block of those rows to the next remaining neighbour.
            moving = hit
            while moving.size:
                edge[moving] -= 1
                moving = moving[removed[order[moving, edge[moving]]]]
            farthest[hit] += sorted_dist[hit, edge[hit]]
    return np.asarray(picked)


def _mean_closest_to_median(block: np.ndarray, beta: int) -> np.ndarray:
    """Per row of a row-sorted (width, theta) block: mean of the ``beta`` values closest
    to the row's median.

    The beta values nearest any point form a contiguous window ``s[w : w + beta]`` of
    the sorted row, so the ``theta - beta`` values left out pair up as ``s[j]`` (below
    the window) or ``s[j + beta]`` (above it) for each j < theta - beta. The window
    starts past j exactly when ``med - s[j] > s[j + beta] - med``; in float32 the left
    side never increases and the right side never decreases with j, so the condition
    holds for a prefix of j and marks directly which of each pair is left out. Equal
    distances on both sides keep the lower value.
    """
    theta = block.shape[1]
    half = theta // 2
    med = block[:, half] if theta % 2 else (block[:, half - 1] + block[:, half]) / 2
    spare = theta - beta
    below = block[:, :spare]
    above = block[:, beta:]
    window_past = (med[:, None] - below) > (above - med[:, None])
    left_out = np.where(window_past, below, above).sum(axis=1, dtype=np.float64)
    return (block.sum(axis=1, dtype=np.float64) - left_out) / beta


@register("bulyan")
def bulyan(
    updates: np.ndarray, weights: np.ndarray, num_malicious: int = 0, report: dict | None = None
) -> np.ndarray:
    """Bulyan: iterated Krum selection, then a coordinate-wise trimmed mean around the median.

    El Mhamdi, Guerraoui, Rouault (2018), "The Hidden Vulnerability of Distributed
    Learning in Byzantium", ICML, https://arxiv.org/abs/1802.07927.

    Parameters
    ----------
    updates : ndarray, shape (n, d)
        One flattened update per row; needs n >= 4f+3.
    weights : ndarray, shape (n,)
        Ignored (unweighted, as in the paper).
    num_malicious : int, default 0
        f, the number of Byzantine updates tolerated.
    report : dict, optional
        Filled with ``selected`` (the theta rows Krum chose, ascending), ``theta`` and
        ``beta`` (values averaged per coordinate around the median).

    Returns
    -------
    ndarray, shape (d,)
        theta = n - 2f rows are chosen by Krum one at a time (each chosen row leaves the
        pool and the next Krum runs on the rest); per coordinate, the mean of the
        beta = theta - 2f chosen values closest to their median. This is ``flwr``'s
        ``aggregate_bulyan(results, num_malicious, aggregate_krum, to_keep=0)``,
        including its neighbour count ``max(1, n_r - f - 2)`` on the shrinking pool,
        equal up to float rounding. Exact Krum score ties go to the lexicographically
        smaller row, as in :func:`krum` (Flower: the first in list order); ties in
        the distance to the median (Flower leaves their order to ``argpartition``)
        go to the lower value.
    """
    _check(updates, weights)
    n, d = updates.shape
    check_params("bulyan", n, num_malicious=num_malicious)
    theta = n - 2 * num_malicious
    beta = theta - 2 * num_malicious
    chosen = np.sort(_bulyan_select(_pairwise_sq_dists(updates), num_malicious, theta, updates))
    if report is not None:
        report.update(selected=[int(i) for i in chosen], theta=theta, beta=beta)
    out = np.empty(d, dtype=updates.dtype)
    for cols in _column_blocks(theta, d, _SORT_BLOCK_BYTES):
        out[cols] = _mean_closest_to_median(_sorted_columns(updates, cols, chosen), beta)
    return out
