"""The release policy: what a client sends and what a run publishes, per privacy mode.

An accountant's epsilon covers the mechanism's outputs and nothing else. Everything a
run lets out of a client or publishes must therefore be covered by the mechanism,
post-processing of its output, or a public fact (the config, planned steps, sigma, q,
each client's declared training-set size); everything else stays with the client, or
with the server in a record marked server-internal. ``PRIVACY.md`` is this policy in
prose; the tables there and :data:`REPLY_KEYS` are checked against each other by the
tests.

Two facts matter most:

- **Client-level DP: who took part is secret.** Amplification by subsampling assumes
  the Poisson sample is secret; publishing the participants of each round (or their
  number) gives the adversary back what the amplification hid (a client known to be in
  5 of 50 rounds at q = 0.1, target epsilon 4, has epsilon 8.9 by PLD). So under
  ``privacy=client`` the participants, their count, their updates' norms, the clipped
  count, the aggregator's per-client decisions, the bytes (which count the clients),
  failures and rejections go only to ``server_internal/`` in the run dir, and the
  console, results.json, the audit log, the plots and W&B get none of them.
- **Nothing computed in the clear on private data leaves a client under DP**: no
  training loss, no norm of a raw update, no quantization error of a masked one, no
  evaluation on its validation data unless ``privacy.evaluation`` says so (``dp``: noisy
  counts in the ledger; ``plain``: in the clear, with a warning). Under sample-level DP the norm of the released
  (already noised) update is post-processing and may travel; under SecAgg+ nothing
  about a single update does, since SecAgg+ exists to hide it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from fedlora.core.units import CLIENT, NONE, SAMPLE
from fedlora.privacy.evaluation import DP, NOISY_CORRECT, NOISY_EXAMPLES, OFF, PLAIN, evaluation_mode

# Every reply: who it is, its mode and the planned work (public facts), its training-set
# size as the FedAvg weight (declared under sample-level DP, 1 under client-level DP),
# the labels of a simulated attacker or of a budget decline, and the LoRA rank its update
# carries where ranks vary (declared in the config, capped by the server's adaptive rank,
# or pruned by the client from its noised adapter: public or post-processing), and the
# round of the instruction it answers (the server's own number, echoed).
BASE_REPLY = frozenset({"partition_id", "privacy_unit", "steps", "probe_steps", "num_examples", "server_round"})
OPTIONAL_REPLY = frozenset({"attack", "declined", "reason", "history_refused", "lora_rank"})
# Sample-level DP: the client's plan (public: sigma, q, clip, accountant) and its spend.
SAMPLE_DP_REPLY = frozenset({"epsilon", "delta", "sample_rate", "noise_multiplier", "max_grad_norm", "accountant",
                             "budget_epsilon", "total_steps", "dp_history"})
# Statistics of the client's update or of its data in the clear.
TRAIN_LOSS, UPDATE_NORM = "train_loss", "update_norm"

# (privacy unit, SecAgg+ on) -> the metric keys a fit reply may hold.
REPLY_KEYS: dict[tuple[str, bool], frozenset[str]] = {
    ("none", False): BASE_REPLY | {TRAIN_LOSS, UPDATE_NORM},
    ("none", True): BASE_REPLY | {TRAIN_LOSS},
    (SAMPLE, False): BASE_REPLY | SAMPLE_DP_REPLY | {UPDATE_NORM},  # the norm of a noised update
    (SAMPLE, True): BASE_REPLY | SAMPLE_DP_REPLY,
    (CLIENT, False): BASE_REPLY,
    (CLIENT, True): BASE_REPLY,
}

# An evaluation reply under privacy.evaluation=dp: the noisy counts (the mechanism's
# output), the client's spend record with them, or a decline and its reason.
DP_EVALUATION_REPLY = frozenset({"partition_id", "privacy_unit", NOISY_CORRECT, NOISY_EXAMPLES, "epsilon", "delta",
                                 "accountant", "dp_history", "declined", "reason"})

# Round-record keys that name or count the participants, or describe single updates.
# Timings too: a round takes longer the more clients were drawn.
PARTICIPATION_KEYS = ("clients", "sampled", "failures", "num_accepted", "num_rejected", "bytes_up", "bytes_down",
                      "aggregation", "aggregation_s", "secagg_halted", "elapsed_s", "weights_bounded",
                      "evaluation_outliers", "cut_off", "round_clock")
# Inside the public client_dp block: a count of clipped participants.
CLIPPED_KEY = "clipped_updates"
INTERNAL_DIR = "server_internal"
INTERNAL_NOTE = (
    "SERVER-INTERNAL. Under client-level DP these files name and count the clients that took part in "
    "each round and describe their single updates. Amplification by subsampling assumes exactly this "
    "stays secret: publishing any of it voids the client-level epsilon the run reports. Do not publish, "
    "upload or share this folder.\n"
)


@dataclass(frozen=True)
class ReleasePolicy:
    """What may leave a client and what a run may publish, for one privacy mode."""

    unit: str = "none"
    secure: bool = False
    evaluation: str = PLAIN  # privacy.evaluation (fedlora.privacy.evaluation)

    @classmethod
    def from_config(cls, cfg: Any) -> "ReleasePolicy":
        secure = str((cfg.get("secure") or {}).get("name", "none")) == "secaggplus"
        return cls(unit=str(cfg.privacy.unit), secure=secure, evaluation=evaluation_mode(cfg))

    def reply_keys(self) -> frozenset[str]:
        return REPLY_KEYS[(self.unit, self.secure)] | OPTIONAL_REPLY

    def reply(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``metrics`` cut to what this mode lets a client send."""
        allowed = self.reply_keys()
        return {k: v for k, v in metrics.items() if k in allowed}

    @property
    def client_evaluation(self) -> bool:
        """Whether clients evaluate on their validation data at all (``privacy.evaluation``
        is not ``off``)."""
        return self.evaluation != OFF

    @property
    def evaluation_covered(self) -> bool:
        """Whether what clients release about their validation data is covered by the
        run's guarantee: noisy counts, or nothing, under DP; without DP nothing is."""
        return self.unit == NONE or self.evaluation != PLAIN

    def evaluation_reply(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``metrics`` of an evaluation reply cut to what this mode lets a client send:
        under ``dp`` the noisy counts and the spend record; ``plain`` sends the task's
        metrics as they are."""
        if self.evaluation != DP:
            return dict(metrics)
        return {k: v for k, v in metrics.items() if k in DP_EVALUATION_REPLY}

    @property
    def participation_public(self) -> bool:
        return self.unit != CLIENT

    def split_round(self, record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(published, server-internal) parts of one round record (round 0, the initial
        evaluation, has no participants)."""
        if self.participation_public or not record.get("round"):
            return record, {}
        public = {k: v for k, v in record.items() if k not in PARTICIPATION_KEYS}
        internal = {k: record[k] for k in PARTICIPATION_KEYS if k in record}
        if "client_dp" in record:
            public["client_dp"] = {k: v for k, v in record["client_dp"].items() if k != CLIPPED_KEY}
            if CLIPPED_KEY in record["client_dp"]:
                internal["client_dp"] = {CLIPPED_KEY: record["client_dp"][CLIPPED_KEY]}
        if internal:
            internal = {"round": record.get("round"), **internal}
        return public, internal


# Flower's own log lines that count or name a round's participants.
_PARTICIPATION_LOG = re.compile(
    r"\b\d+\s+(?:clients?|results?|failures?|nodes?)\b|\bclients?\s+\d+\b|\bnode(?:_id)?\s*[=:]?\s*\d{3,}\b",
    re.IGNORECASE,
)


class ParticipationLogFilter(logging.Filter):
    """Drops log records that count or name a round's participants (e.g. Flower's
    "configure_fit: strategy sampled 7 clients", "aggregate_fit: received 7 results"):
    under client-level DP the console must not show them."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):
            return True
        return not _PARTICIPATION_LOG.search(text)


def hide_participation_in_logs(logger_name: str = "flwr") -> ParticipationLogFilter:
    """Install the filter on Flower's logger (idempotent); returns it."""
    logger = logging.getLogger(logger_name)
    for existing in logger.filters:
        if isinstance(existing, ParticipationLogFilter):
            return existing
    flt = ParticipationLogFilter()
    logger.addFilter(flt)
    return flt
