"""Membership inference metrics and scores.

Scores are "higher = more likely a member". Two attacks on the final model:

- **loss threshold** (Yeom et al. 2018, "Privacy risk in machine learning"): the score
  is minus the example's loss under the final model;
- **reference-calibrated** (difficulty calibration, Watson et al. 2022, "On the
  importance of difficulty calibration in membership inference attacks"; the
  likelihood-ratio idea of LiRA, Carlini et al. 2022, with one reference model): the
  score is the loss under a reference model minus the loss under the final model. For
  fine-tuning the natural reference is the pre-trained model the run started from: it
  saw neither members nor non-members, so the difference removes how hard an example
  is by itself and keeps what training on it changed (Mireshghallah et al. 2022 use the
  same reference for language models). It needs no shadow models, which a federation
  of LLM fine-tunes could not afford.

AUC and the TPR at a low FPR (Carlini et al. 2022 argue the latter is what matters).
Pure math: numpy only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

LOW_FPRS = (0.01, 0.001)


def roc_auc(scores: Sequence[float], members: Sequence[bool]) -> float:
    """The probability that a random member outscores a random non-member (ties 1/2)."""
    s, y = np.asarray(scores, dtype=float), np.asarray(members, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("need members and non-members")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n1, n0 = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def tpr_at_fpr(scores: Sequence[float], members: Sequence[bool], fpr: float) -> float:
    """The share of members above the strictest threshold that lets at most ``fpr`` of
    the non-members through (0 when even one false positive exceeds it)."""
    s, y = np.asarray(scores, dtype=float), np.asarray(members, dtype=bool)
    negatives = np.sort(s[~y])[::-1]
    allowed = int(np.floor(fpr * len(negatives)))
    # Threshold: strictly above the (allowed+1)-th highest non-member score.
    threshold = negatives[allowed] if allowed < len(negatives) else -np.inf
    return float((s[y] > threshold).mean())


def summary(scores: Sequence[float], members: Sequence[bool], fprs: Sequence[float] = LOW_FPRS) -> dict:
    """AUC and TPR at each low FPR, with the counts behind them."""
    y = np.asarray(members, dtype=bool)
    out = {"auc": roc_auc(scores, y), "members": int(y.sum()), "non_members": int((~y).sum())}
    for f in fprs:
        out[f"tpr_at_{f:g}_fpr"] = tpr_at_fpr(scores, y, f)
    return out
