"""Adapter tensors as numbers: the flat vector an aggregator sees, and L2 clipping.

One implementation of L2 clipping serves the three places that bound a norm: the
client before SecAgg+ masks its delta, the server's norm bounding in front of a rule
(Sun et al. 2019) and client-level DP-FedAvg's clipping (McMahan et al. 2018).
Norms are summed in float64 over column blocks, so a float32 (n, d) matrix is never
copied whole.
"""

from __future__ import annotations

import numpy as np

# Column blocks whose float32 products take ~32 MiB: BLAS runs near peak and a centred
# copy of a block stays a fraction of the (n, d) matrix.
NORM_BLOCK_BYTES = 1 << 25


def subtract(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    return [x - y for x, y in zip(a, b)]


def flatten(arrays: list[np.ndarray]) -> np.ndarray:
    """The tensors as one float32 vector (the row an aggregator sees)."""
    return np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])


def unflatten(vector: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    """Split a flat vector back into tensors shaped (and typed) like ``like``."""
    out, offset = [], 0
    for ref in like:
        out.append(vector[offset : offset + ref.size].reshape(ref.shape).astype(ref.dtype))
        offset += ref.size
    return out


def column_blocks(n: int, d: int, block_bytes: int):
    """Slices of the d columns such that n float32 rows of one slice take ~block_bytes."""
    width = max(1, block_bytes // (4 * max(n, 1)))
    for start in range(0, d, width):
        yield slice(start, min(start + width, d))


def row_sq_norms(updates: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """Squared L2 norm of every row of ``updates - center``; block sums added in float64."""
    n, d = updates.shape
    total = np.zeros(n)
    for cols in column_blocks(n, d, NORM_BLOCK_BYTES):
        block = updates[:, cols] if center is None else updates[:, cols] - center[cols]
        total += np.einsum("ij,ij->i", block, block)
    return total


def clip_rows(updates: np.ndarray, max_norm: float, *, inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every row of ``updates`` (n, d) with L2 norm above ``max_norm`` scaled down to it.

    Returns the clipped rows (``updates`` itself when ``inplace``) and every row's norm
    before clipping. A scaled float32 row meets the bound up to float32 rounding.
    """
    if not max_norm > 0:
        raise ValueError(f"L2 clipping needs max_norm > 0, got {max_norm}")
    if updates.ndim != 2:
        raise ValueError(f"updates must be an (n, d) matrix, got shape {updates.shape}")
    out = updates if inplace else updates.copy()
    norms = np.sqrt(row_sq_norms(updates)) if len(updates) else np.zeros(0)
    over = np.flatnonzero(norms > max_norm)
    out[over] *= (max_norm / norms[over])[:, None].astype(out.dtype)
    return out, norms


def clip_l2(delta: list[np.ndarray], max_norm: float) -> tuple[list[np.ndarray], bool]:
    """The tensors of ``delta`` scaled together to L2 norm <= ``max_norm`` (and whether
    they had to be)."""
    clipped, norms = clip_rows(flatten(delta)[None, :], max_norm)
    if not norms[0] > max_norm:
        return delta, False
    return unflatten(clipped[0], delta), True
