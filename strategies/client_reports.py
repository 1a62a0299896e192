"""What clients report about themselves, aggregated so that one liar cannot steer it.

A client's federated-evaluation loss and accuracy are its own claims: a
metric-poisoning client reports loss 0 and accuracy 1.0, and an example-weighted mean
follows it as far as its claimed weight lets it. The run therefore reports the
server's own evaluation of the global adapter as its result, and summarises the
clients' claims by their median (breakdown point 1/2: f < n/2 liars move it no further
than the honest reports on either side of it; Huber and Ronchetti 2009, Sec. 1.4),
flagging a report as an outlier when it lies more than ``k`` scaled median absolute
deviations from the median (Hampel 1974; Leys et al. 2013 recommend k = 3 and the
1.4826 consistency factor). Honest clients on non-IID shards differ, so the scale has a
floor: a report within ``floor`` of the median is never flagged.

Pure numpy, no Flower.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

MAD_SCALE = 1.4826  # the MAD of a normal sample estimates 0.6745 sigma


@dataclass(frozen=True)
class ReportSummary:
    """The median of the clients' reports and the clients whose report is an outlier."""

    median: float | None
    outliers: tuple[str, ...]


def summarise(reports: Mapping[Any, float], k: float = 3.0, floor: float = 0.05) -> ReportSummary:
    """Median and Hampel outliers of ``{client: value}`` (non-finite values are outliers)."""
    finite = {str(c): float(v) for c, v in reports.items() if np.isfinite(v)}
    broken = tuple(sorted(str(c) for c, v in reports.items() if not np.isfinite(v)))
    if not finite:
        return ReportSummary(None, broken)
    values = np.fromiter(finite.values(), dtype=np.float64)
    median = float(np.median(values))
    scale = max(MAD_SCALE * float(np.median(np.abs(values - median))), floor * max(1.0, abs(median)))
    far = tuple(sorted(c for c, v in finite.items() if abs(v - median) > k * scale))
    return ReportSummary(median, tuple(sorted(broken + far)))
