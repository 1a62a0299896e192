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
    # The round of the instruction this reply answers (the server's number, echoed).
    server_round: int | None = None
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
        """The reply in ``metrics`` (keys it does not know are ignored); a value of the
        wrong type, a non-UTF-8 or oversized text or a malformed history raises
        :class:`MalformedReply` with the reason: a client's reply is untrusted input."""
        values = {k: _parse(k, v) for k, v in metrics.items() if k in REPLY_FIELDS}
        values.setdefault("partition_id", default_partition)
        values.setdefault("privacy_unit", "none")
        values.setdefault("num_examples", 0)
        return cls(**values)

    def as_record(self) -> dict[str, Any]:
        """The set fields, for the run record (``cid`` is the client id)."""
        return {"cid": self.partition_id, **{k: v for k, v in asdict(self).items() if v is not None}}


class MalformedReply(ValueError):
    """A reply field the server cannot take: the reason is the rejection's."""


# A free-text field is a label or one line of reason; longer is an attempt to bloat the record.
MAX_TEXT = 500
# More history entries than any plan makes (rounds x (training + evaluation) of years of runs).
MAX_HISTORY = 100_000
_INT_FIELDS = {"partition_id", "num_examples", "server_round", "steps", "probe_steps", "lora_rank", "total_steps"}
_FLOAT_FIELDS = {"train_loss", "update_norm", "epsilon", "delta", "sample_rate", "noise_multiplier",
                 "max_grad_norm", "budget_epsilon"}
_TEXT_FIELDS = {"privacy_unit", "attack", "reason", "history_refused", "accountant"}


def _text(key: str, value: Any) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise MalformedReply(f"{key} is not UTF-8 text") from err
    if not isinstance(value, str):
        raise MalformedReply(f"{key} must be text, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise MalformedReply(f"{key} is {len(value)} characters long (at most {MAX_TEXT})")
    return "".join(ch if ch.isprintable() else "?" for ch in value)


def parse_history(value: Any) -> list[HistoryEntry]:
    """A client's spend record as it sent it (JSON text), checked entry by entry."""
    if not isinstance(value, str):
        raise MalformedReply(f"dp_history must be JSON text, got {type(value).__name__}")
    if len(value) > 64 * MAX_HISTORY:
        raise MalformedReply(f"dp_history is {len(value)} characters long")
    try:
        entries = json.loads(value)
    except (ValueError, RecursionError) as err:
        raise MalformedReply(f"dp_history is not JSON: {str(err)[:80]}") from err
    if not isinstance(entries, list) or len(entries) > MAX_HISTORY:
        raise MalformedReply("dp_history must be a list of [noise_multiplier, sample_rate, steps, round] entries")
    parsed = []
    for entry in entries:
        if (not isinstance(entry, list) or len(entry) != 4
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in entry)
                or entry[0] < 0 or not 0 <= entry[1] <= 1 or entry[2] < 0 or entry[2] != int(entry[2])
                or entry[3] != int(entry[3])):
            raise MalformedReply(f"dp_history entry {str(entry)[:80]} is not [sigma >= 0, 0 <= q <= 1, steps >= 0, "
                                 "round]")
        parsed.append((float(entry[0]), float(entry[1]), int(entry[2]), int(entry[3])))
    return parsed


def _parse(key: str, value: Any) -> Any:
    """One reply field, checked for its type."""
    if value is None:
        return None
    if key == "dp_history":
        if isinstance(value, list):  # already parsed (a reply built in this process)
            value = json.dumps([list(e) for e in value])
        return parse_history(value)
    if key in _INT_FIELDS:
        if key == "partition_id" and isinstance(value, str) and value.isdigit() and len(value) < 20:
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise MalformedReply(f"{key} must be an integer, got {type(value).__name__}")
        return value
    if key in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedReply(f"{key} must be a number, got {type(value).__name__}")
        return float(value)
    if key in _TEXT_FIELDS:
        return _text(key, value)
    if key == "declined":
        if not isinstance(value, bool):
            raise MalformedReply(f"declined must be true or false, got {type(value).__name__}")
    return value


def reported_float(value: Any) -> float:
    """A number a client reported, as a float: NaN where it is none (a report to flag,
    never a crash of the server)."""
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


REPLY_FIELDS = frozenset(f.name for f in fields(FitReply))
