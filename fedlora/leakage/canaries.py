"""Canaries for the one-run audit (:mod:`fedlora.leakage.one_run`).

``audit.canaries=m`` builds m canary examples the model could only fit by memorising
them, assigns each to one of the auditing clients (``audit.clients``, round robin) and
includes each in that client's training data independently with probability 1/2. The
inclusion bits are drawn from the run's seed, so every station that rebuilds the plan
agrees, and the leakage tool knows the truth it scores against.

- classification: a string of random words of the training vocabulary with a random
  label (the "random example" canary of Steinke et al. 2023);
- causal LM: a random secret (a string of digits) as the answer to a question that
  names a random identifier (the secret sharer, Carlini et al. 2019), whose exposure is
  measured against other secrets of the same format.

A canary in one client's data audits sample-level DP; under client-level DP it audits
the same guarantee, which covers any change to one client's data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from datasets import Dataset

from fedlora.core.errors import ConfigError

CANARY_WORDS = 12
SECRET_DIGITS = 6
_WORD = re.compile(r"[a-z]{3,12}")


@dataclass(frozen=True)
class CanaryPlan:
    """The canaries of a run: their rows, inclusion bits and holders."""

    rows: Dataset
    included: np.ndarray  # (m,) bool
    holder: np.ndarray  # (m,) int: the client whose data holds canary i when included

    def of_client(self, client: int) -> tuple[int, ...]:
        """Indices of the canaries included in ``client``'s training data."""
        return tuple(int(i) for i in np.flatnonzero(self.included & (self.holder == client)))

    @property
    def count(self) -> int:
        return len(self.included)


def audit_settings(cfg: Any) -> tuple[int, list[int] | None, float]:
    audit = cfg.get("audit") or {}
    count = int(audit.get("canaries") or 0)
    if count < 0:
        raise ConfigError("audit.canaries", f"must be >= 0, got {count}")
    clients = audit.get("clients")
    clients = None if clients is None else [int(c) for c in clients]
    return count, clients, float(audit.get("max_fraction", 0.1))


def plan_canaries(cfg: Any, rows: Dataset, shard_sizes: Sequence[int], seed: int) -> CanaryPlan | None:
    """The run's canary plan (None without ``audit.canaries``); refuses more canaries than
    the auditing clients' data can hold without moving their sampling past the plan."""
    count, clients, max_fraction = audit_settings(cfg)
    if count == 0:
        return None
    n = len(shard_sizes)
    clients = list(range(n)) if clients is None else clients
    if not clients or any(not 0 <= c < n for c in clients):
        raise ConfigError("audit.clients", f"must name clients in 0..{n - 1} (or be null for all), got {clients}")
    if count < 2:
        raise ConfigError("audit.canaries", f"a one-run audit needs at least 2 canaries, got {count}")
    holder = np.array([clients[i % len(clients)] for i in range(count)])
    rng = np.random.default_rng([int(seed), 0xA0D17])
    included = rng.random(count) < 0.5
    for c in clients:
        held = int((holder == c).sum())  # planned with every canary included: the worst case
        limit = max_fraction * shard_sizes[c]
        if held > limit:
            raise ConfigError(
                "audit.canaries",
                f"audit.canaries={count} puts up to {held} canaries into client {c}'s {shard_sizes[c]} training "
                f"examples, more than audit.max_fraction={max_fraction:g} of them: its Poisson-sampled batches "
                f"would grow past the planned expected batch size. Lower audit.canaries, spread them over more "
                f"clients (audit.clients) or raise audit.max_fraction")
    return CanaryPlan(rows=rows, included=included, holder=holder)


def word_canaries(texts: Sequence[str], num_labels: int, count: int, seed: int) -> Dataset:
    """Random strings of the training vocabulary with random labels."""
    vocab = sorted({w for t in texts[:5000] for w in _WORD.findall(str(t).lower())})
    if len(vocab) < CANARY_WORDS:
        vocab = [f"w{i}" for i in range(1000)]
    rng = np.random.default_rng([int(seed), 0xC4A7])
    text = [" ".join(rng.choice(vocab, CANARY_WORDS)) for _ in range(count)]
    return Dataset.from_dict({"text": text, "label": rng.integers(0, num_labels, count).tolist()})


def _secret(rng: np.random.Generator) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, SECRET_DIGITS))


def secret_prompt(name: str) -> str:
    return json.dumps([{"role": "user", "content": f"What is the secret code of account {name}?"}])


def secret_canaries(count: int, seed: int) -> Dataset:
    """Questions naming random accounts, answered with random secrets."""
    rng = np.random.default_rng([int(seed), 0x5EC7])
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    names = ["".join(rng.choice(letters, 8)) for _ in range(count)]
    return Dataset.from_dict({"prompt": [secret_prompt(n) for n in names],
                              "response": [_secret(rng) for _ in range(count)], "label": [0] * count})


def secret_alternatives(row: dict, k: int, seed: int) -> Dataset:
    """``k`` rows with the canary's prompt and other random secrets of its format: the
    reference set its exposure is ranked in."""
    rng = np.random.default_rng([int(seed), 0xA17])
    others: list[str] = []
    while len(others) < k:
        s = _secret(rng)
        if s != row["response"]:
            others.append(s)
    return Dataset.from_dict({"prompt": [row["prompt"]] * k, "response": others, "label": [0] * k})


def exposure(canary_loss: float, alternative_losses: Sequence[float]) -> float:
    """Carlini et al. 2019's exposure, estimated from the rank among k sampled
    alternatives: log2(k + 1) - log2(rank), rank 1 = the canary is the likeliest."""
    alt = np.asarray(alternative_losses, dtype=float)
    rank = 1 + int((alt < canary_loss).sum())
    return float(np.log2(len(alt) + 1) - np.log2(rank))
