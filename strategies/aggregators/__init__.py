"""Aggregation rules over a stacked (n, d) matrix of client updates.

Every aggregator is a pure function ``f(updates, weights, **params) -> ndarray[d]``
over ``updates`` of shape (n, d) float32 (one flattened LoRA delta per row) and
non-negative ``weights`` of shape (n,). No Flower imports: the strategy is a thin
adapter around these. New rules plug in with :func:`register` or by dotted path.

Registered rules: ``fedavg``, ``fednova`` (its rows' local step counts come from the
strategy), ``median``, ``trimmed_mean``, ``krum``, ``multi_krum``,
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

from strategies.aggregators.registry import (  # noqa: I001  (registry first: the families register into it)
    AGGREGATORS, REPORT_PER_ROW_KEYS, REPORT_ROW_KEYS, Aggregator, check_params, get_aggregator, label_rows,
    min_clients, register,
)
from strategies.aggregators.mean import fedavg, fednova
from strategies.aggregators.coordinatewise import median, trimmed_mean
from strategies.aggregators.krum import bulyan, krum, multi_krum
from strategies.aggregators.clipping import centered_clipping, norm_bound, with_norm_bound

__all__ = [
    "AGGREGATORS", "REPORT_PER_ROW_KEYS", "REPORT_ROW_KEYS", "Aggregator", "bulyan", "centered_clipping",
    "check_params", "fedavg", "get_aggregator", "krum", "label_rows", "median", "min_clients", "multi_krum",
    "norm_bound", "register", "trimmed_mean", "with_norm_bound",
]
