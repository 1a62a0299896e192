"""A client's fit reply: one typed record, its keys named once (the field names).

The client fills a :class:`FitReply`; :meth:`FitReply.to_metrics` turns it into Flower
metrics holding only what the release policy lets this mode send
(:mod:`fedlora.privacy.release`); the server reads it back with :meth:`FitReply.from_metrics`
and records it with :meth:`FitReply.as_record`. Nobody else spells a key.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedlora.privacy.release import ReleasePolicy

HistoryEntry = tuple[float, float, int, int]  # noise_multiplier, sample_rate, steps, round


@dataclass
class FitReply:
    partition_id: int
    privacy_unit: str
    num_examples: int
    steps: int = 0
    probe_steps: int = 0
    # Statistics in the clear: sent only where the policy allows (no DP; the norm of a
    # noised update under sample-level DP).
    train_loss: float | None = None
    update_norm: float | None = None
    # Labels: a simulated attacker, a budget decline, a refused server history.
    attack: str | None = None
    declined: bool | None = None
    reason: str | None = None
    history_refused: str | None = None
    # Where LoRA ranks vary: the components the update carries (fedlora.models.ranks).
    lora_rank: int | None = None
    # Sample-level DP: the client's public plan and its own spend.
    epsilon: float | None = None
    delta: float | None = None
    sample_rate: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    accountant: str | None = None
    budget_epsilon: float | None = None
    total_steps: int | None = None
    dp_history: list[HistoryEntry] | None = None

    def to_metrics(self, policy: ReleasePolicy) -> dict[str, Any]:
        """Flower metrics (scalars; the history as JSON) of the fields ``policy`` lets
        this mode send; unset fields are left out."""
        allowed = policy.reply_keys()
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if value is None or key not in allowed:
                continue
            out[key] = json.dumps([list(e) for e in value]) if key == "dp_history" else value
        return out

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any], default_partition: Any = None) -> "FitReply":
        """The reply in ``metrics`` (keys it does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in metrics.items() if k in known}
        if isinstance(values.get("dp_history"), str):
            values["dp_history"] = [tuple(e) for e in json.loads(values["dp_history"])]
        values.setdefault("partition_id", default_partition)
        values.setdefault("privacy_unit", "none")
        values.setdefault("num_examples", 0)
        return cls(**values)

    def as_record(self) -> dict[str, Any]:
        """The set fields, for the run record (``cid`` is the client id)."""
        return {"cid": self.partition_id, **{k: v for k, v in asdict(self).items() if v is not None}}


def reported_float(value: Any) -> float:
    """A number a client reported, as a float: NaN where it is none (a report to flag,
    never a crash of the server)."""
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


REPLY_FIELDS = frozenset(f.name for f in fields(FitReply))
