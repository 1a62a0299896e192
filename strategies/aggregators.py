"""Aggregation rules over a stacked (n, d) matrix of client updates.

Every aggregator is a pure function ``f(updates, weights, **params) -> ndarray[d]``
over ``updates`` of shape (n, d) float32 (one flattened LoRA delta per row) and
non-negative ``weights`` of shape (n,). No Flower imports: the strategy is a thin
adapter around these. New rules plug in with :func:`register` or by dotted path.

Registered rules: ``fedavg``, ``median``, ``trimmed_mean``, ``krum``, ``multi_krum``,
``bulyan`` and ``centered_clipping``. The robust ones reproduce the definitions in
``flwr.server.strategy.aggregate`` (see each docstring for the exact correspondence)
but work on the whole matrix at once: column blocks are transposed and sorted with
NumPy's SIMD sort, and pairwise distances come from one Gram matrix.

Preconditions (e.g. Krum's ``n >= 2f+3``) are checked by :func:`check_params`, both at
configuration time and inside every rule when it is called, so a rule given too few
updates raises ``ValueError`` instead of returning a meaningless aggregate;
:func:`min_clients` gives the smallest n each rule accepts.

Norm bounding (Sun et al. 2019) is a preprocessing step, not a rule: :func:`norm_bound`
clips the rows, and :func:`with_norm_bound` puts it in front of any aggregator.

Rows are assumed finite: the strategy rejects updates containing NaN or Inf before
they reach an aggregator.

Decisions for the audit log: the rules that decide something about single updates
(which rows Krum, multi-Krum and Bulyan keep, how many rows centered clipping and norm
bounding clip, how many values the trimmed mean cuts) take an optional keyword
``report``: a dict they fill in place, still returning only the aggregate, so the
``f(updates, weights, **params) -> ndarray[d]`` interface is unchanged. Row indices go
under :data:`REPORT_ROW_KEYS`, per-row values under :data:`REPORT_PER_ROW_KEYS`;
:func:`label_rows` maps both to client ids.
"""

from __future__ import annotations

import functools
import importlib
import operator
from collections.abc import Callable, Iterator

import numpy as np

Aggregator = Callable[..., np.ndarray]
AGGREGATORS: dict[str, Aggregator] = {}
# Per rule: validates its keyword parameters and returns its lower bounds on n as
# (minimum n, precondition as written in error messages).
_REQUIREMENTS: dict[str, Callable[..., list[tuple[int, str]]]] = {}

# Column blocks of the Gram product: large enough for BLAS to run near peak, small
# enough that the centred copy of a block stays a fraction of the (n, d) matrix.
_GRAM_BLOCK_BYTES = 1 << 26
# Column blocks that are transposed and sorted: the (width, n) copy stays in cache.
_SORT_BLOCK_BYTES = 1 << 22

# Keys of a ``report`` that hold row indices, and keys that hold one value per row.
REPORT_ROW_KEYS = ("selected", "clipped")
REPORT_PER_ROW_KEYS = ("scores", "norms")


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


def label_rows(report: dict, ids: list) -> dict:
    """A copy of an aggregator's ``report`` with row indices replaced by ``ids[row]``.

    Lists under :data:`REPORT_ROW_KEYS` become lists of ids, lists under
    :data:`REPORT_PER_ROW_KEYS` become ``{id: value}``; nested reports (e.g. the norm
    bound in front of a rule) are mapped the same way. The rules only see rows; the
    caller knows which client sent each row.
    """
    out: dict = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out[key] = label_rows(value, ids)
        elif key in REPORT_ROW_KEYS:
            out[key] = [ids[int(i)] for i in value]
        elif key in REPORT_PER_ROW_KEYS:
            out[key] = {str(ids[i]): v for i, v in enumerate(value)}
        else:
            out[key] = value
    return out


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


# Client-level DP (strategies.client_dp) needs a bound on how far one client can move the
# aggregate. For the mean of L2-clipped updates over a fixed denominator it is C / (qN):
# adding or removing one client changes the clipped sum by at most C. Rules that select or
# reweight updates depending on all of them (Krum, median, ...) have no such bound.
fedavg.client_dp_sensitivity = "sum of L2-clipped updates: add/remove one client changes it by <= C"


# -- preconditions ---------------------------------------------------------------------


def _requires(name: str) -> Callable[[Callable[..., list[tuple[int, str]]]], Callable]:
    def wrap(fn: Callable[..., list[tuple[int, str]]]) -> Callable[..., list[tuple[int, str]]]:
        _REQUIREMENTS[name] = fn
        return fn

    return wrap


def _num_malicious(num_malicious: int) -> int:
    f = operator.index(num_malicious)
    if f < 0:
        raise ValueError(f"needs num_malicious >= 0, got {f}")
    return f


def _honest_majority(num_malicious: int | None) -> list[tuple[int, str]]:
    # A coordinate-wise median or trimmed mean is only bounded by honest values while
    # they are the majority of every coordinate.
    if num_malicious is None:
        return []
    f = _num_malicious(num_malicious)
    return [(2 * f + 1, "f < n/2 (n >= 2f+1)")]


@_requires("fedavg")
def _fedavg_requirements(num_malicious: int = 0) -> list[tuple[int, str]]:
    _num_malicious(num_malicious)
    return []


@_requires("median")
def _median_requirements(num_malicious: int | None = None) -> list[tuple[int, str]]:
    return _honest_majority(num_malicious)


@_requires("trimmed_mean")
def _trimmed_mean_requirements(
    beta: float = 0.1, num_malicious: int | None = None
) -> list[tuple[int, str]]:
    if not 0 <= beta < 0.5:
        raise ValueError(f"needs 0 <= beta < 0.5, got beta={beta}")
    return _honest_majority(num_malicious)


@_requires("krum")
def _krum_requirements(num_malicious: int = 0) -> list[tuple[int, str]]:
    f = _num_malicious(num_malicious)
    return [(2 * f + 3, "n >= 2f+3")]


@_requires("multi_krum")
def _multi_krum_requirements(
    num_malicious: int = 0, num_selected: int | None = None
) -> list[tuple[int, str]]:
    f = _num_malicious(num_malicious)
    bounds = [(2 * f + 3, "n >= 2f+3")]
    if num_selected is not None:
        m = operator.index(num_selected)
        if m < 1:
            raise ValueError(f"needs num_selected >= 1, got {m}")
        bounds.append((m + f, "num_selected <= n - f"))
    return bounds


@_requires("bulyan")
def _bulyan_requirements(num_malicious: int = 0) -> list[tuple[int, str]]:
    f = _num_malicious(num_malicious)
    return [(4 * f + 3, "n >= 4f+3")]


@_requires("centered_clipping")
def _centered_clipping_requirements(
    tau: float = 1.0, iterations: int = 1, reference: np.ndarray | None = None, num_malicious: int = 0
) -> list[tuple[int, str]]:
    _num_malicious(num_malicious)
    if not tau > 0:
        raise ValueError(f"needs tau > 0, got tau={tau}")
    if operator.index(iterations) < 1:
        raise ValueError(f"needs iterations >= 1, got iterations={iterations}")
    return []


def _requirements(name: str, params: dict) -> list[tuple[int, str]]:
    if name not in _REQUIREMENTS:
        get_aggregator(name)  # unknown names raise KeyError; user rules check themselves
        return []
    try:
        return _REQUIREMENTS[name](**params)
    except ValueError as err:
        raise ValueError(f"{name} {err}") from None


def check_params(name: str, n: int, **params) -> None:
    """Raise ``ValueError`` naming the violated precondition of rule ``name`` on n updates.

    Parameters
    ----------
    name : str
        Registered rule (or a dotted path, for which only ``n >= 1`` is checked).
    n : int
        Number of updates the rule will aggregate (clients per round).
    **params
        The rule's keyword parameters. ``num_malicious`` (f, the number of Byzantine
        clients tolerated) is accepted by every rule so that a strategy-level f can be
        validated whatever the rule; ``fedavg`` and ``centered_clipping`` only require
        it to be >= 0. Unknown parameters raise ``TypeError``.

    Raises
    ------
    ValueError
        ``n >= 2f+3`` (krum, multi_krum), ``n >= 4f+3`` (bulyan), ``f < n/2``
        (median, trimmed_mean given num_malicious), ``0 <= beta < 0.5``,
        ``num_selected >= 1`` and ``num_selected <= n - f`` (multi_krum),
        ``num_malicious >= 0``, ``tau > 0``, ``iterations >= 1``, ``n >= 1``.
    """
    if n < 1:
        raise ValueError(f"{name} needs n >= 1 update, got n={n}")
    for needed, condition in _requirements(name, params):
        if n < needed:
            given = [f"n={n}"] + [f"{key}={params[key]}" for key in ("num_malicious", "num_selected") if key in params]
            raise ValueError(f"{name} needs {condition}, got {', '.join(given)}")


def min_clients(name: str, **params) -> int:
    """Smallest number of updates for which ``check_params(name, n, **params)`` passes.

    Raises ``ValueError`` (or ``TypeError``) for parameters that are invalid for every n.
    """
    return max([1] + [needed for needed, _ in _requirements(name, params)])


# -- shared numerics -------------------------------------------------------------------


def _column_blocks(n: int, d: int, block_bytes: int) -> Iterator[slice]:
    """Slices of the d columns such that n float32 rows of one slice take ~block_bytes."""
    width = max(1, block_bytes // (4 * max(n, 1)))
    for start in range(0, d, width):
        yield slice(start, min(start + width, d))


def _sorted_columns(updates: np.ndarray, cols: slice, rows: np.ndarray | None = None) -> np.ndarray:
    """Columns ``cols`` (of ``rows``, default all) as a (width, n) block, each row sorted.

    Sorting contiguous rows uses NumPy's SIMD sort; sorting or partitioning along
    axis 0 of the (n, d) matrix is several times slower, strided and scalar.
    """
    block = updates[:, cols] if rows is None else updates[rows, cols]
    block = np.ascontiguousarray(block.T)
    block.sort(axis=1)
    return block


def _row_sq_norms(updates: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """Squared L2 norm of every row of ``updates - center``; block sums added in float64."""
    n, d = updates.shape
    total = np.zeros(n)
    for cols in _column_blocks(n, d, _GRAM_BLOCK_BYTES // 2):
        block = updates[:, cols] if center is None else updates[:, cols] - center[cols]
        total += np.einsum("ij,ij->i", block, block)
    return total


def _pairwise_sq_dists(updates: np.ndarray) -> np.ndarray:
    """(n, n) float64 squared Euclidean distances via ``||x||^2 + ||y||^2 - 2 x.y``.

    Rows are centred on their mean first: distances do not change, but the norms
    shrink to the spread of the updates, so the subtraction does not cancel away the
    distances between updates that share a large common component. Block products are
    summed in float64.
    """
    n, d = updates.shape
    center = (np.full(n, 1.0 / n, dtype=updates.dtype) @ updates).astype(updates.dtype)
    gram = np.zeros((n, n))
    for cols in _column_blocks(n, d, _GRAM_BLOCK_BYTES):
        block = updates[:, cols] - center[cols]
        gram += block @ block.T  # same operand transposed: NumPy calls BLAS syrk
    sq = np.diag(gram).copy()
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def _krum_scores(dist: np.ndarray, num_malicious: int) -> np.ndarray:
    """Krum score of every row: sum of its ``max(1, n-f-2)`` smallest distances to others.

    ``max(1, .)`` and the cap at ``n - 1`` reproduce ``flwr``'s ``aggregate_krum``,
    which matters inside Bulyan where the pool shrinks below ``f + 3``.
    """
    n = len(dist)
    k = min(max(1, n - num_malicious - 2), n - 1)
    if k == 0:
        return np.zeros(n)
    others = dist.copy()
    np.fill_diagonal(others, np.inf)
    return np.partition(others, k - 1, axis=1)[:, :k].sum(axis=1)


def _precedes(updates: np.ndarray, i: int, j: int) -> int:
    """-1, 0 or 1 as row i is lexicographically before, equal to or after row j."""
    differ = np.flatnonzero(updates[i] != updates[j])
    if not differ.size:
        return 0
    return -1 if updates[i, differ[0]] < updates[j, differ[0]] else 1


def _lowest(scores: np.ndarray, m: int, updates: np.ndarray) -> np.ndarray:
    """Indices of the ``m`` lowest scores.

    Exact ties at the cut are structural in Krum, not accidents: when one neighbour
    is counted, two mutual nearest neighbours have the same score. They go to the
    lexicographically smaller row, so the selection does not depend on the order in
    which clients report (Flower takes the first in list order; the two agree when
    the rows arrive in lexicographic order).
    """
    cut = np.partition(scores, m - 1)[m - 1]
    below = np.flatnonzero(scores < cut)
    tied = np.flatnonzero(scores == cut)
    if len(below) + len(tied) > m:
        tied = np.asarray(sorted(tied, key=functools.cmp_to_key(lambda i, j: _precedes(updates, i, j))))
    return np.concatenate([below, tied[: m - len(below)]])


# -- robust rules ----------------------------------------------------------------------


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


@register("centered_clipping")
def centered_clipping(
    updates: np.ndarray,
    weights: np.ndarray,
    tau: float = 1.0,
    iterations: int = 1,
    reference: np.ndarray | None = None,
    report: dict | None = None,
) -> np.ndarray:
    """Centered clipping: ``v <- v + mean_i clip_tau(x_i - v)``, repeated ``iterations`` times.

    Karimireddy, He, Jaggi (2021), "Learning from History for Byzantine Robust
    Optimization", ICML, https://arxiv.org/abs/2012.10333.
    ``clip_tau(z) = z * min(1, tau / ||z||)``.

    Parameters
    ----------
    updates : ndarray, shape (n, d)
        One flattened update per row.
    weights : ndarray, shape (n,)
        Ignored: the mean is unweighted, as in the paper.
    tau : float, default 1.0
        Clipping radius, > 0. Each iteration moves v by at most tau.
    iterations : int, default 1
        Number of clipping iterations, >= 1.
    reference : ndarray, shape (d,), optional
        Starting point v. The method's robustness comes from history: the caller passes
        the previous round's aggregate here (the strategy keeps it across rounds);
        None starts from zeros, as in the first round.
    report : dict, optional
        Filled with ``clipped_per_iteration`` (how many rows lay farther than tau from
        v in each iteration), ``clipped`` (rows clipped in any iteration, ascending),
        ``tau`` and ``iterations``.

    Returns
    -------
    ndarray, shape (d,)
        The final v, in the dtype of ``updates``. Differences to v are taken in that
        dtype, against v rounded to it, so each iteration moves v by at most tau up
        to that rounding.
    """
    _check(updates, weights)
    n, d = updates.shape
    check_params("centered_clipping", n, tau=tau, iterations=iterations)
    v = np.zeros(d) if reference is None else np.array(reference, dtype=np.float64)
    if v.shape != (d,):
        raise ValueError(f"reference must have shape ({d},), got {v.shape}")
    clipped_per_iteration: list[int] = []
    clipped_any = np.zeros(n, dtype=bool)
    for _ in range(iterations):
        # Differences are taken in the input dtype against v rounded to it, so the
        # clipped step is exact up to that rounding with no float64 copy of the rows.
        center = v.astype(updates.dtype)
        norms = np.sqrt(_row_sq_norms(updates, center=center))
        coef = np.ones(n)
        over = norms > tau
        coef[over] = tau / norms[over]
        clipped_per_iteration.append(int(over.sum()))
        clipped_any |= over
        coef = (coef / n).astype(updates.dtype)
        step = np.empty(d)
        for cols in _column_blocks(n, d, _GRAM_BLOCK_BYTES // 2):
            step[cols] = coef @ (updates[:, cols] - center[cols])
        v = center + step
    if report is not None:
        report.update(
            clipped_per_iteration=clipped_per_iteration,
            clipped=[int(i) for i in np.flatnonzero(clipped_any)],
            tau=float(tau),
            iterations=int(iterations),
        )
    return v.astype(updates.dtype)


# -- norm bounding ---------------------------------------------------------------------


def norm_bound(
    updates: np.ndarray, max_norm: float, *, inplace: bool = False, report: dict | None = None
) -> np.ndarray:
    """Scale every row whose L2 norm exceeds ``max_norm`` down to norm ``max_norm``.

    Sun, Kairouz, Suresh, McMahan (2019), "Can You Really Backdoor Federated
    Learning?", https://arxiv.org/abs/1911.07963.

    Parameters
    ----------
    updates : ndarray, shape (n, d)
        One update per row; n may be 0.
    max_norm : float
        Bound on each row's L2 norm, > 0. A scaled float32 row meets the bound up to
        float32 rounding (relative 1e-7).
    inplace : bool, default False
        Scale ``updates`` itself instead of a copy.
    report : dict, optional
        Filled with ``max_norm``, ``clipped`` (the scaled rows, ascending) and ``norms``
        (every row's L2 norm before scaling).

    Returns
    -------
    ndarray, shape (n, d)
        The bounded rows (``updates`` itself when ``inplace``).
    """
    if not max_norm > 0:
        raise ValueError(f"norm_bound needs max_norm > 0, got {max_norm}")
    if updates.ndim != 2:
        raise ValueError(f"updates must be an (n, d) matrix, got shape {updates.shape}")
    out = updates if inplace else updates.copy()
    norms = np.sqrt(_row_sq_norms(updates))
    over = np.flatnonzero(norms > max_norm)
    if report is not None:
        report.update(max_norm=float(max_norm), clipped=[int(i) for i in over], norms=[float(x) for x in norms])
    out[over] *= (max_norm / norms[over])[:, None].astype(out.dtype)
    return out


def with_norm_bound(fn: Aggregator, max_norm: float) -> Aggregator:
    """``fn`` with every update norm-bounded to ``max_norm`` first (see :func:`norm_bound`).

    The wrapper keeps ``fn``'s name, docstring, attributes and signature (so a caller
    inspecting it still sees, e.g., centered clipping's ``reference`` parameter), and
    never modifies the caller's matrix. Given a ``report``, the bounding's own decisions
    go under its ``"norm_bound"`` key.
    """
    if not max_norm > 0:
        raise ValueError(f"norm_bound needs max_norm > 0, got {max_norm}")

    @functools.wraps(fn)
    def bounded(updates: np.ndarray, weights: np.ndarray, **params) -> np.ndarray:
        report = params.get("report")
        own = None if report is None else report.setdefault("norm_bound", {})
        return fn(norm_bound(updates, max_norm, report=own), weights, **params)

    return bounded
