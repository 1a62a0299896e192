"""The rule registry: names to functions, their preconditions, and their reports.

A rule registers with :func:`register` (and its preconditions with
:func:`register_requirements`); :func:`get_aggregator` also takes any function by dotted
path. :func:`check_params` and :func:`min_clients` answer for every rule at
configuration time and inside the rule when it is called.
"""

from __future__ import annotations

import importlib
import operator
from collections.abc import Callable

import numpy as np

Aggregator = Callable[..., np.ndarray]
AGGREGATORS: dict[str, Aggregator] = {}
# Per rule: validates its keyword parameters and returns its lower bounds on n as
# (minimum n, precondition as written in error messages).
_REQUIREMENTS: dict[str, Callable[..., list[tuple[int, str]]]] = {}

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


def register_requirements(name: str) -> Callable[[Callable[..., list[tuple[int, str]]]], Callable]:
    def wrap(fn: Callable[..., list[tuple[int, str]]]) -> Callable[..., list[tuple[int, str]]]:
        _REQUIREMENTS[name] = fn
        return fn

    return wrap


def check_num_malicious(num_malicious: int) -> int:
    f = operator.index(num_malicious)
    if f < 0:
        raise ValueError(f"needs num_malicious >= 0, got {f}")
    return f


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
