"""Calibrate DP-SGD noise once, for the whole planned run.

Noise is chosen so that ALL local steps a client may take over ALL planned rounds
meet (target_epsilon, delta): the client may be sampled in every round, so the plan
assumes it is. Calibrating per round instead would spend the budget once per round.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from opacus.accountants.utils import get_noise_multiplier

from fedlora.core.errors import ConfigError
from fedlora.core.units import CLIENT, unit_of
from fedlora.privacy.accounting import epsilon_from_history
from fedlora.privacy.evaluation import epsilon_fraction


@dataclass(frozen=True)
class DPPlan:
    """What one client will use: enough, with its history, to recompute epsilon."""

    sample_rate: float
    noise_multiplier: float
    steps_per_round: int  # probe steps + fine-tuning steps
    # Opacus's normaliser of the noisy sum, q * n of the declared size: a public constant.
    expected_batch_size: int
    probe_steps: int
    planned_rounds: int
    max_grad_norm: float
    target_epsilon: float
    delta: float
    accountant: str
    # privacy.evaluation=dp: the noise multiplier of each noisy-count release and how many
    # releases the plan reserves budget for (fedlora.privacy.evaluation).
    evaluation_noise_multiplier: float | None = None
    planned_evaluations: int = 0

    @property
    def planned_steps(self) -> int:
        return self.steps_per_round * self.planned_rounds

    @property
    def evaluation_entry(self) -> tuple[float, float, int] | None:
        """One evaluation release as a ledger entry: the Gaussian mechanism, q = 1, one step."""
        if self.evaluation_noise_multiplier is None:
            return None
        return (self.evaluation_noise_multiplier, 1.0, 1)

    @property
    def planned_history(self) -> list[tuple[float, float, int]]:
        """Every release the plan allows: all DP-SGD steps and all evaluations."""
        history = [(self.noise_multiplier, self.sample_rate, self.planned_steps)]
        if self.evaluation_entry is not None and self.planned_evaluations:
            history.append((self.evaluation_noise_multiplier, 1.0, self.planned_evaluations))
        return history

    @property
    def planned_epsilon(self) -> float:
        return epsilon_from_history(self.planned_history, self.delta, self.accountant)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def local_steps(num_examples: int, train_cfg: Any) -> int:
    """Optimizer steps per round: ``train.local_steps`` or ``local_epochs`` passes."""
    if train_cfg.local_steps is not None:
        steps = int(train_cfg.local_steps)
        if steps < 0:
            raise ConfigError("train.local_steps", f"must be >= 0, got {steps}")
        return steps
    if float(train_cfg.local_epochs) <= 0:
        raise ConfigError("train.local_epochs", f"must be > 0, got {train_cfg.local_epochs}")
    batch = min(int(train_cfg.batch_size), num_examples)
    return max(1, math.ceil(float(train_cfg.local_epochs) * num_examples / batch))


def probe_steps(train_cfg: Any) -> int:
    """Linear-probe steps per round (``train.probe_steps``, 0 = none)."""
    steps = int(train_cfg.get("probe_steps") or 0)
    if steps < 0:
        raise ConfigError("train.probe_steps", f"must be >= 0, got {steps}")
    return steps


def declared_examples(privacy_cfg: Any, mean_shard: int, validation_fraction: float) -> int:
    """The training-set size every client declares under sample-level DP (public).

    Each client's sample rate q = B / n, its steps per round and the delta < 1/n check
    are derived from this declared size, and it is the client's FedAvg weight, so the
    client's real size is never published: the add/remove-one analysis of Poisson
    sampling at the public rate q holds (a published real n would not be covered by it).
    ``privacy.declared_examples`` sets it; the default is the training part of the mean
    shard ``mean_shard`` (:func:`fedlora.data.partition.mean_shard_size`: public, from the
    dataset's size, the federation's and the partition), which is every client's real
    size under an IID split or replication.
    """
    given = privacy_cfg.get("declared_examples")
    if given is not None:
        if int(given) < 1:
            raise ConfigError("privacy.declared_examples", f"must be >= 1 (or null), got {given}")
        return int(given)
    shard = max(1, int(mean_shard))
    return shard - min(int(round(float(validation_fraction) * shard)), shard - 1)


def check_budget(target_epsilon: float, delta: float) -> None:
    if not target_epsilon > 0:
        raise ConfigError("privacy.target_epsilon", f"must be > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ConfigError("privacy.delta", f"must lie in (0, 1), got {delta}")


@functools.lru_cache(maxsize=1024)
def _noise_multiplier(eps: float, delta: float, q: float, steps: int, accountant: str) -> float:
    # PRV's log(1 - q) at q = 1 is computed and discarded (see accounting.epsilon_from_history).
    with np.errstate(divide="ignore"):
        return float(get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps,
                                          accountant=accountant, epsilon_tolerance=0.01))


def _calibrated_sigma(eps: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """The noise multiplier meeting (eps, delta) over ``steps``; inf if none can."""
    try:
        return _noise_multiplier(eps, delta, q, steps, accountant)
    except ValueError:
        return math.inf


# Far above any useful evaluation noise: the search's upper end.
MAX_EVALUATION_SIGMA = 1e4


@functools.lru_cache(maxsize=1024)
def _composed_sigma(eps: float, delta: float, q: float, steps: int, fixed: tuple, accountant: str,
                    cap: float) -> float:
    """The smallest noise multiplier (to 0.5%) for ``steps`` at rate ``q`` such that they,
    composed with the ``fixed`` entries, meet (eps, delta); inf if none up to ``cap`` can.
    Epsilon falls as sigma grows: bracket by doubling, then bisect (Opacus's search does
    the same for a single entry)."""
    def meets(sigma: float) -> bool:
        return epsilon_from_history([(sigma, q, steps), *fixed], delta, accountant) <= eps

    low, high = 0.0, 1.0
    while not meets(high):
        if high >= cap:
            return math.inf
        low, high = high, min(2 * high, cap)
    while high - low > 0.005 * high:
        mid = (low + high) / 2
        if meets(mid):
            high = mid
        else:
            low = mid
    return high


def plan_sample_dp(
    num_examples: int, train_cfg: Any, privacy_cfg: Any, rounds: int, target_epsilon: float | None = None,
    evaluations: int = 0,
) -> DPPlan:
    """Sample-level DP-SGD plan for a client holding ``num_examples`` training rows.

    ``target_epsilon`` is the client's own budget (default ``privacy.target_epsilon``).
    ``evaluations``: noisy evaluation releases to reserve budget for
    (:mod:`fedlora.privacy.evaluation`): DP-SGD alone is calibrated to
    ``1 - privacy.evaluation_epsilon_fraction`` of the budget, and the evaluations get the
    least noise that keeps both together within it. Composition charges a release less
    beside training than alone (RDP and PRV share the log(1/delta) term), so this leaves
    evaluation far less noisy than giving it a budget of its own.
    """
    eps = float(privacy_cfg.target_epsilon if target_epsilon is None else target_epsilon)
    delta = float(privacy_cfg.delta)
    check_budget(eps, delta)
    if delta >= 1.0 / num_examples:
        # delta >= 1/n admits mechanisms that publish a whole record outright.
        raise ConfigError(
            "privacy.delta",
            f"delta={delta} is not below 1/n = 1/{num_examples} for a client holding "
            f"{num_examples} examples; use a smaller delta (e.g. {0.1 / num_examples:.1e})",
        )
    if int(train_cfg.batch_size) < 1:
        raise ConfigError("train.batch_size", f"must be >= 1, got {train_cfg.batch_size}")
    if float(privacy_cfg.max_grad_norm) <= 0:
        raise ConfigError("privacy.max_grad_norm", f"must be > 0, got {privacy_cfg.max_grad_norm}")
    sample_rate = min(1.0, int(train_cfg.batch_size) / num_examples)
    probe = probe_steps(train_cfg)
    steps = local_steps(num_examples, train_cfg) + probe
    if steps < 1:
        raise ConfigError("train.local_steps", "a round needs at least one local or probe step")
    total = steps * rounds
    cap = float(privacy_cfg.max_noise_multiplier)
    accountant = str(privacy_cfg.accountant)
    share = epsilon_fraction(privacy_cfg) if evaluations else 0.0
    sigma = _calibrated_sigma(eps * (1 - share), delta, sample_rate, total, accountant)
    eval_sigma = None
    if evaluations and sigma <= cap:
        eval_sigma = _composed_sigma(eps, delta, 1.0, int(evaluations), ((sigma, sample_rate, total),), accountant,
                                     MAX_EVALUATION_SIGMA)
    if sigma > cap:
        raise ConfigError(
            "privacy.target_epsilon",
            f"epsilon={eps} at delta={delta} over {total} steps ({rounds} rounds x {steps} "
            f"local steps incl. {probe} probe steps, sample rate {sample_rate:.4f}, {num_examples} examples) needs a "
            f"noise multiplier of {sigma:.2f}, above privacy.max_noise_multiplier={cap}"
            + (f" (training gets {1 - share:g} of the budget, privacy.evaluation_epsilon_fraction={share:g} goes "
               "to the noisy evaluations)" if evaluations else "")
            + "; raise the target epsilon, plan fewer rounds or local steps, or raise the cap",
        )
    return DPPlan(
        sample_rate=sample_rate,
        noise_multiplier=sigma,
        steps_per_round=steps,
        expected_batch_size=max(1, round(sample_rate * num_examples)),
        probe_steps=probe,
        planned_rounds=rounds,
        max_grad_norm=float(privacy_cfg.max_grad_norm),
        target_epsilon=eps,
        delta=delta,
        accountant=accountant,
        evaluation_noise_multiplier=eval_sigma,
        planned_evaluations=int(evaluations),
    )


@dataclass(frozen=True)
class ClientDPPlan:
    """Client-level DP-FedAvg (McMahan et al. 2018): the server's mechanism per round.

    Every round each client is sampled independently with probability ``sample_rate``
    (Poisson sampling), its delta is clipped to L2 norm ``clipping_norm``, and
    N(0, (noise_multiplier * clipping_norm)^2) is added to the sum. One round is one
    step of the subsampled Gaussian mechanism for every client.
    """

    sample_rate: float
    noise_multiplier: float
    clipping_norm: float
    num_clients: int
    planned_rounds: int
    target_epsilon: float
    delta: float
    accountant: str

    @property
    def expected_clients(self) -> float:
        return self.sample_rate * self.num_clients

    @property
    def planned_epsilon(self) -> float:
        return epsilon_from_history(
            [(self.noise_multiplier, self.sample_rate, self.planned_rounds)], self.delta, self.accountant
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_client_dp(privacy_cfg: Any, num_clients: int, sample_rate: float, rounds: int) -> ClientDPPlan:
    """Client-level plan: calibrate the server's noise for all planned rounds, or check a
    user-given ``privacy.noise_multiplier`` against ``privacy.target_epsilon``."""
    eps = float(privacy_cfg.target_epsilon)
    delta = float(privacy_cfg.delta)
    check_budget(eps, delta)
    if delta >= 1.0 / num_clients:
        # The protected record is a whole client: delta must be small against 1/#clients.
        raise ConfigError(
            "privacy.delta",
            f"delta={delta} is not below 1/#clients = 1/{num_clients} (client-level DP protects "
            f"whole clients); use a smaller delta (e.g. {0.1 / num_clients:.1e})",
        )
    clip = float(privacy_cfg.clipping_norm)
    if not clip > 0:
        raise ConfigError("privacy.clipping_norm", f"must be > 0, got {clip}")
    if not 0 < sample_rate <= 1:
        raise ConfigError("federation.fraction_fit", f"client sampling rate must lie in (0, 1], got {sample_rate}")
    accountant = str(privacy_cfg.accountant)
    cap = float(privacy_cfg.max_noise_multiplier)
    given = privacy_cfg.get("noise_multiplier")
    if given is not None:
        sigma = float(given)
        if not sigma > 0:
            raise ConfigError("privacy.noise_multiplier", f"must be > 0, got {sigma}")
        spent = epsilon_from_history([(sigma, sample_rate, rounds)], delta, accountant)
        if spent > eps:
            raise ConfigError(
                "privacy.noise_multiplier",
                f"noise multiplier {sigma} over {rounds} rounds at client sampling rate {sample_rate:g} "
                f"spends client-level eps {spent:.3f} > privacy.target_epsilon={eps}; raise the noise, "
                "plan fewer rounds, or sample fewer clients per round",
            )
    else:
        sigma = _calibrated_sigma(eps, delta, sample_rate, rounds, accountant)
        if sigma > cap:
            raise ConfigError(
                "privacy.target_epsilon",
                f"client-level epsilon={eps} at delta={delta} over {rounds} rounds at client sampling "
                f"rate {sample_rate:g} needs a noise multiplier of {sigma:.2f}, above "
                f"privacy.max_noise_multiplier={cap}; raise the target epsilon, plan fewer rounds, "
                "or sample fewer clients per round",
            )
    return ClientDPPlan(
        sample_rate=sample_rate,
        noise_multiplier=sigma,
        clipping_norm=clip,
        num_clients=num_clients,
        planned_rounds=rounds,
        target_epsilon=eps,
        delta=delta,
        accountant=accountant,
    )


def client_level_plan(cfg: Any) -> ClientDPPlan | None:
    """The server's client-level plan of an experiment (None unless ``privacy=client``);
    clients are Poisson-sampled at rate ``federation.fraction_fit``."""
    if unit_of(cfg) != CLIENT:
        return None
    fed = cfg.federation
    return plan_client_dp(cfg.privacy, int(fed.num_clients), float(fed.fraction_fit), int(fed.rounds))


def clients_per_round(cfg: Any) -> int:
    """Clients sampled per round (expected count under Poisson client sampling)."""
    fed = cfg.federation
    n = int(fed.num_clients)
    if unit_of(cfg) == CLIENT:
        return max(1, round(float(fed.fraction_fit) * n))
    return min(n, max(math.ceil(float(fed.fraction_fit) * n), int(fed.min_fit_clients)))
