"""Empirical epsilon lower bounds from one training run (Steinke, Nasr, Jagielski 2023,
"Privacy auditing with one (1) training run", NeurIPS).

m canaries are each included in the training data independently with probability 1/2.
After training, the auditor scores every canary, guesses "included" for the k+ highest
scores and "excluded" for the k- lowest, and abstains on the rest. If the training
algorithm is (eps, delta)-DP, the number of correct guesses W among the r = k+ + k-
made is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) up to a delta
term (their Theorem 3.1 / Proposition 5.2):

    P[W >= v] <= P[Binomial(r, q) >= v] + 2 m delta * max_i P[v > Binomial(r, q) >= v - i] / i

So v correct guesses reject every eps whose p-value is below 1 - confidence: the largest
such eps is the empirical lower bound. The guess counts tried are fixed in advance and
the confidence is split among them (Bonferroni), so choosing the best count after
seeing the scores keeps the stated confidence.

Pure math: no torch, no Flower.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats

#: The share of the canaries guessed on, tried in this order (each k+ = k- = share * m / 2).
GUESS_SHARES = (0.1, 0.2, 0.4, 1.0)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] for an (eps, delta)-DP algorithm with m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    q = 1.0 / (1.0 + math.exp(-eps))  # the accuracy of eps-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, beta)
    # alpha = max_i P[v > Binomial(r, q) >= v - i] / i, i = 1..v
    tails = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(tails / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest eps that v correct of r guesses reject at ``confidence`` (0 if none)."""
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < level:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return lo
    for _ in range(50):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


def max_certifiable(m: int, delta: float, confidence: float = 0.95, shares: Sequence[float] = GUESS_SHARES) -> float:
    """The bound when every guess is right: the most m canaries can ever certify."""
    per = (1.0 - confidence) / len(shares)
    return max(epsilon_lower_bound(m, r, r, delta, 1.0 - per) for r in _guess_counts(m, shares))


@dataclass(frozen=True)
class AuditResult:
    """The one-run audit of a set of canaries."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    included: int
    guesses: int
    correct: int
    max_certifiable: float

    def to_dict(self) -> dict:
        return asdict(self)


def _guess_counts(m: int, shares: Sequence[float]) -> list[int]:
    return sorted({max(2, 2 * int(round(s * m / 2))) for s in shares if m >= 2})


def audit(scores: Sequence[float], included: Sequence[bool], delta: float, confidence: float = 0.95,
          shares: Sequence[float] = GUESS_SHARES) -> AuditResult:
    """Guess the top and bottom halves of each fixed guess count, keep the best bound at
    ``confidence`` split across the counts. Higher score = more likely included."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    if m < 2 or len(included) != m:
        raise ValueError(f"need at least 2 canaries with one inclusion bit each, got {m} and {len(included)}")
    order = np.argsort(-scores, kind="stable")
    counts = _guess_counts(m, shares)
    per = 1.0 - (1.0 - confidence) / len(counts)
    best = None
    for r in counts:
        top, bottom = order[: r // 2], order[m - r // 2:]
        v = int(included[top].sum() + (~included[bottom]).sum())
        eps = epsilon_lower_bound(m, r, v, delta, per)
        if best is None or eps > best[0] or (eps == best[0] == 0.0):
            best = (eps, r, v)  # with no bound at all, report the widest guess
    return AuditResult(epsilon_lower_bound=best[0], confidence=confidence, delta=delta, canaries=m,
                       included=int(included.sum()), guesses=best[1], correct=best[2],
                       max_certifiable=max_certifiable(m, delta, confidence, shares))
