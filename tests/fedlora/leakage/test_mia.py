"""Membership-inference metrics against their definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedlora.leakage.mia import roc_auc, summary, tpr_at_fpr


def pairwise_auc(scores, members):
    pos = [s for s, m in zip(scores, members) if m]
    neg = [s for s, m in zip(scores, members) if not m]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])


def test_auc_is_the_pairwise_win_rate_with_ties_halved():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    members = rng.random(60) < 0.4
    assert roc_auc(scores, members) == pytest.approx(pairwise_auc(scores, members))
    assert roc_auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert roc_auc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    with pytest.raises(ValueError):
        roc_auc([1, 2], [True, True])


def test_tpr_at_low_fpr_lets_through_at_most_that_share_of_non_members():
    non = np.arange(1000, dtype=float)  # non-member scores 0..999
    members = np.array([999.5, 998.5, 990.5, 100.0])
    scores = np.concatenate([members, non])
    y = np.r_[np.ones(4, bool), np.zeros(1000, bool)]
    # 1% FPR: 10 non-members may pass, threshold above 989 -> 3 of 4 members.
    assert tpr_at_fpr(scores, y, 0.01) == 0.75
    # 0.1% FPR: one non-member (999) may pass, threshold above 998 -> 2 of 4.
    assert tpr_at_fpr(scores, y, 0.001) == 0.5
    out = summary(scores, y)
    assert out["members"] == 4 and out["non_members"] == 1000 and set(out) >= {"auc", "tpr_at_0.01_fpr"}
