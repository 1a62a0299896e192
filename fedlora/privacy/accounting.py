"""Epsilon from a plain history of ``(noise_multiplier, sample_rate, steps)``.

Opacus keeps exactly this history in its accountants; rebuilding an accountant from
the history is the same as having stepped one accountant through it. That is what
lets each client's epsilon compose over all its local steps of all rounds (the
accountant persists in Flower's ``context.state``), instead of restarting every
round as a fresh ``PrivacyEngine`` would.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from opacus.accountants import IAccountant, create_accountant

Entry = tuple[float, float, int]


def make_accountant(name: str, history: Iterable[Entry] = ()) -> IAccountant:
    accountant = create_accountant(mechanism=name)
    accountant.history = [(float(s), float(q), int(k)) for s, q, k in history]
    return accountant


def epsilon_from_history(history: Iterable[Entry], delta: float, accountant: str = "rdp") -> float:
    """(epsilon, delta)-DP guarantee of the subsampled Gaussian mechanism over ``history``."""
    entries = [e for e in history if int(e[2]) > 0]
    if not entries:
        return 0.0
    # PRV takes log(1 - q) for every entry; at q = 1 (a Gaussian release without sampling,
    # e.g. a noisy evaluation) that branch is computed and then discarded by np.where.
    with np.errstate(divide="ignore"):
        return float(make_accountant(accountant, entries).get_epsilon(delta=delta))
