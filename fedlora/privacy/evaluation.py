"""Federated evaluation under DP: what a client may release about its validation data.

A client's loss and accuracy on its own validation rows are statistics of private data;
no training mechanism noises them. ``privacy.evaluation`` chooses what happens to them:

- ``plain``: released in the clear (the default without DP). Under DP the accountant's
  epsilon does not cover them, and every such run says so at start.
- ``dp``: the client releases its correct-prediction count and its example count, each
  plus Gaussian noise N(0, (sigma_e * sqrt(2))^2) drawn from a secret generator. Adding
  or removing one example changes the pair by at most (1, 1), an L2 sensitivity of
  sqrt(2), so one release is the Gaussian mechanism (Dwork & Roth 2014, Thm A.1; its RDP
  in Mironov 2017) with noise multiplier sigma_e: in the ledger it is the entry
  ``(sigma_e, q=1, steps=1)`` beside the DP-SGD entries, and the same accountant composes
  both into the client's epsilon. The server adds the noisy counts over clients and
  publishes their ratio (post-processing); the loss is not released.
- ``off``: clients are not asked; the server's own test split is evaluated every round.

The noise is calibrated once, with the training noise: DP-SGD alone gets
``1 - privacy.evaluation_epsilon_fraction`` of the target epsilon, and the evaluations the
least noise that keeps training and evaluation (one release per round) together within
the target (:func:`fedlora.privacy.calibration.plan_sample_dp`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from fedlora.core.errors import ConfigError
from fedlora.core.units import CLIENT, NONE, SAMPLE

PLAIN, DP, OFF = "plain", "dp", "off"
MODES = (PLAIN, DP, OFF)
# One example moves (correct, examples) by at most (1, 1).
COUNT_SENSITIVITY = math.sqrt(2.0)
# The reply keys of a dp evaluation (noisy counts: the mechanism's output).
NOISY_CORRECT, NOISY_EXAMPLES = "noisy_correct", "noisy_examples"
DEFAULT_EPSILON_FRACTION = 0.1


def evaluation_mode(cfg: Any) -> str:
    """``privacy.evaluation`` of an experiment, checked against its privacy unit."""
    unit = str(cfg.privacy.unit)
    value = cfg.privacy.get("evaluation")
    # YAML 1.1 reads an unquoted off as false.
    mode = OFF if value is False else str(value or (PLAIN if unit == NONE else OFF))
    if mode not in MODES:
        raise ConfigError("privacy.evaluation", f"must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == DP and unit == NONE:
        raise ConfigError("privacy.evaluation", "dp needs a DP run (privacy=sample); without DP use plain or off")
    if mode == DP and unit == CLIENT:
        raise ConfigError(
            "privacy.evaluation",
            "dp is the sample-level mechanism (noisy counts with per-example sensitivity); under "
            "privacy=client use off (the server's test split is evaluated every round) or plain "
            "(clients' metrics in the clear, not covered by the client-level epsilon)",
        )
    return mode


def epsilon_fraction(privacy_cfg: Any) -> float:
    """``privacy.evaluation_epsilon_fraction``: the share of the target epsilon the
    planned evaluations alone may spend, in (0, 1)."""
    value = privacy_cfg.get("evaluation_epsilon_fraction")
    value = DEFAULT_EPSILON_FRACTION if value is None else float(value)
    if not 0 < value < 1:
        raise ConfigError("privacy.evaluation_epsilon_fraction", f"must lie in (0, 1), got {value}")
    return value


def planned_evaluations(cfg: Any) -> int:
    """Noisy evaluation releases a client may make over the run: one per round when
    ``privacy.evaluation=dp`` and clients are evaluated at all, else none (an
    asynchronous run evaluates on the server only)."""
    if str(cfg.privacy.unit) != SAMPLE or evaluation_mode(cfg) != DP:
        return 0
    if str(cfg.federation.get("mode") or "sync") == "async":
        return 0
    return int(cfg.federation.rounds) if float(cfg.federation.fraction_evaluate) > 0 else 0


def noisy_counts(correct: int, examples: int, noise_multiplier: float, rng: np.random.Generator) -> tuple[float, float]:
    """The Gaussian mechanism on (correct, examples): each count plus N(0, (sigma_e * sqrt 2)^2)."""
    std = float(noise_multiplier) * COUNT_SENSITIVITY
    noise = rng.normal(0.0, std, size=2)
    return float(correct + noise[0]), float(examples + noise[1])


def federated_accuracy(releases: Iterable[tuple[float, float]]) -> float | None:
    """Accuracy over clients from their noisy counts: sum of correct over sum of
    examples, clamped to [0, 1] (post-processing); None when the noisy total is not
    positive (nothing can be said)."""
    pairs = list(releases)
    total = sum(n for _, n in pairs)
    if not pairs or total <= 0:
        return None
    return min(1.0, max(0.0, sum(c for c, _ in pairs) / total))

