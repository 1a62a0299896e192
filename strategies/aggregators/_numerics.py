"""Numerics shared by the rules: column blocks, row-sorted columns, norms, distances,
Krum scores and order-independent selection. Blocks keep each copy a fraction of the
(n, d) matrix; float64 accumulation keeps sums exact enough for the selections."""

from __future__ import annotations

import functools

import numpy as np

from fedlora.core.arrays import column_blocks as _column_blocks

# Column blocks of the Gram product: large enough for BLAS to run near peak, small
# enough that the centred copy of a block stays a fraction of the (n, d) matrix.
_GRAM_BLOCK_BYTES = 1 << 26
# Column blocks that are transposed and sorted: the (width, n) copy stays in cache.
_SORT_BLOCK_BYTES = 1 << 22


def _check(updates: np.ndarray, weights: np.ndarray) -> None:
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must be a non-empty (n, d) matrix, got shape {updates.shape}")
    if weights.shape != (updates.shape[0],):
        raise ValueError(f"weights must have shape ({updates.shape[0]},), got {weights.shape}")



def _sorted_columns(updates: np.ndarray, cols: slice, rows: np.ndarray | None = None) -> np.ndarray:
    """Columns ``cols`` (of ``rows``, default all) as a (width, n) block, each row sorted.

    Sorting contiguous rows uses NumPy's SIMD sort; sorting or partitioning along
    axis 0 of the (n, d) matrix is several times slower, strided and scalar.
    """
    block = updates[:, cols] if rows is None else updates[rows, cols]
    block = np.ascontiguousarray(block.T)
    block.sort(axis=1)
    return block


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
