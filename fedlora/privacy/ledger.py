"""A plain per-client privacy ledger: what each client actually used, round by round.

Like Opacus's accountant history, every entry is ``(noise_multiplier, sample_rate,
steps)`` plus who, when, the privacy unit and delta: enough for anyone to recompute
epsilon with any accountant (``epsilon_from_history``), nothing that must be trusted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from typing import Any

from fedlora.core.units import CLIENT, SAMPLE
from fedlora.privacy.accounting import epsilon_from_history

ACCOUNTANTS = ("rdp", "prv")
# Client-level DP entries hold for every client alike (the server's mechanism).
EVERY_CLIENT = "all"


@dataclass(frozen=True)
class LedgerEntry:
    client: str
    round: int
    unit: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float


class PrivacyLedger:
    def __init__(self, entries: list[LedgerEntry] | None = None) -> None:
        self.entries: list[LedgerEntry] = list(entries or [])
        # Epsilon by (history, delta, accountant): the plots and the audit log ask for
        # every client's epsilon after every round, every round; a history never changes
        # its epsilon, so each is computed once.
        self._epsilon_cache: dict[tuple, float] = {}

    def add(self, entry: LedgerEntry) -> None:
        self.entries.append(entry)

    def rename(self, old: str, new: str) -> None:
        """Entries held under a placeholder (``node:<id>``, a node whose client was not
        known yet) now belong to the client ``new``."""
        if any(e.client == old for e in self.entries):
            self.entries = [replace(e, client=new) if e.client == old else e for e in self.entries]

    def clients(self) -> list[str]:
        return sorted({e.client for e in self.entries}, key=_natural)

    def history(self, client: str, up_to_round: int | None = None) -> list[tuple[float, float, int]]:
        return [
            (e.noise_multiplier, e.sample_rate, e.steps)
            for e in self.entries
            if e.client == client and (up_to_round is None or e.round <= up_to_round)
        ]

    def delta(self, client: str) -> float:
        return max(e.delta for e in self.entries if e.client == client)

    def epsilon(self, client: str, accountant: str = "rdp", up_to_round: int | None = None) -> float:
        history = self.history(client, up_to_round)
        key = (tuple(history), self.delta(client), accountant)
        if key not in self._epsilon_cache:
            self._epsilon_cache[key] = epsilon_from_history(history, self.delta(client), accountant)
        return self._epsilon_cache[key]

    def epsilons(self, accountant: str = "rdp") -> dict[str, float]:
        return {c: self.epsilon(c, accountant) for c in self.clients()}

    def epsilon_by_round(self, accountant: str = "rdp") -> dict[str, dict[int, float]]:
        """Each client's cumulative epsilon after every round it took part in."""
        rounds: dict[str, list[int]] = defaultdict(list)
        for e in self.entries:
            rounds[e.client].append(e.round)
        return {
            c: {r: self.epsilon(c, accountant, r) for r in sorted(set(rounds[c]))} for c in self.clients()
        }

    def client_histories(self, unit: str = SAMPLE) -> dict[str, list[list[float]]]:
        """Per client ``[noise_multiplier, sample_rate, steps, round]`` rows of one unit."""
        out: dict[str, list[list[float]]] = defaultdict(list)
        for e in self.entries:
            if e.unit == unit:
                out[e.client].append([e.noise_multiplier, e.sample_rate, e.steps, e.round])
        return dict(out)

    def to_dict(self) -> dict[str, Any]:
        return {"entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "PrivacyLedger":
        """The ledger :meth:`to_dict` wrote, every entry checked: a malformed one raises
        ValueError naming it, and no ledger is built (an entry dropped or misread would
        understate a client's epsilon)."""
        if not isinstance(payload, dict) or not isinstance(payload.get("entries", []), list):
            raise ValueError("a privacy ledger is an object with a list of entries")
        return cls([_entry(i, e) for i, e in enumerate(payload.get("entries", []))])


_FIELDS = tuple(LedgerEntry.__dataclass_fields__)


def _entry(index: int, raw: Any) -> LedgerEntry:
    """One ledger entry from JSON, or ValueError saying which and why."""
    where = f"entry {index}"
    if not isinstance(raw, dict) or set(raw) != set(_FIELDS):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{where}: expected the fields {list(_FIELDS)}, found {found}")
    problems = []
    if not isinstance(raw["client"], str) or not raw["client"]:
        problems.append(f"client {raw['client']!r} is not a client id")
    if raw["unit"] not in (SAMPLE, CLIENT):
        problems.append(f"unit {raw['unit']!r} is not {SAMPLE!r} or {CLIENT!r}")
    for name in ("round", "steps"):
        if not isinstance(raw[name], int) or isinstance(raw[name], bool) or raw[name] < 0:
            problems.append(f"{name} {raw[name]!r} is not a non-negative integer")
    checks = (("noise_multiplier", lambda v: v >= 0, ">= 0"), ("sample_rate", lambda v: 0 < v <= 1, "in (0, 1]"),
              ("delta", lambda v: 0 < v < 1, "in (0, 1)"))
    for name, ok, what in checks:
        value = raw[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or not ok(value):
            problems.append(f"{name} {value!r} is not a finite number {what}")
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}")
    return LedgerEntry(**raw)


def _natural(value: str) -> tuple:
    return (0, int(value), "") if value.isdigit() else (1, 0, value)
