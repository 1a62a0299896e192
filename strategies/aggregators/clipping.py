"""Clipping: centered clipping (a rule) and norm bounding (a step in front of any rule)."""

from __future__ import annotations

import functools
import inspect
import operator

import numpy as np

from fedlora.core.arrays import clip_rows, row_sq_norms
from strategies.aggregators._numerics import _GRAM_BLOCK_BYTES, _check, _column_blocks
from strategies.aggregators.registry import (
    Aggregator,
    check_num_malicious,
    check_params,
    register,
    register_requirements,
)


@register_requirements("centered_clipping")
def _centered_clipping_requirements(
    tau: float = 1.0, iterations: int = 1, reference: np.ndarray | None = None, num_malicious: int = 0
) -> list[tuple[int, str]]:
    check_num_malicious(num_malicious)
    if not tau > 0:
        raise ValueError(f"needs tau > 0, got tau={tau}")
    if operator.index(iterations) < 1:
        raise ValueError(f"needs iterations >= 1, got iterations={iterations}")
    return []

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
        norms = np.sqrt(row_sq_norms(updates, center=center))
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
    try:
        out, norms = clip_rows(updates, max_norm, inplace=inplace)
    except ValueError as err:
        raise ValueError(f"norm_bound: {err}") from None
    if report is not None:
        clipped = np.flatnonzero(norms > max_norm)
        report.update(max_norm=float(max_norm), clipped=[int(i) for i in clipped], norms=[float(x) for x in norms])
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

    # A rule that cannot report (e.g. a user's) is called without ``report``.
    takes_report = "report" in inspect.signature(fn).parameters

    @functools.wraps(fn)
    def bounded(updates: np.ndarray, weights: np.ndarray, **params) -> np.ndarray:
        report = params.get("report") if takes_report else params.pop("report", None)
        own = None if report is None else report.setdefault("norm_bound", {})
        return fn(norm_bound(updates, max_norm, report=own), weights, **params)

    return bounded
