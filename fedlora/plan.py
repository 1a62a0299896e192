"""The experiment plan: every fact of a run, computed once from the config.

Preflight (``strategies.preflight``) checks a config and returns this plan; the
simulation, the ServerApp and every ClientApp read their facts from it. In deployment
each side rebuilds it with :func:`build_plan` from the same Hydra overrides, so all
agree without any fact travelling. No station re-derives what the plan holds: each
client's shard and training-set size (real and as used), its sample-level DP plan and
budget, the client-level plan, the malicious clients, the clients per round, the
SecAgg+ settings, the round-failure minimum, the release policy and the noise source.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from fedlora.attacks import malicious_clients
from fedlora.core.compression import Codec
from fedlora.core.config import canonical_json, seed_for
from fedlora.core.profiles import Profiles
from fedlora.core.secure import SecAggSettings, secure_enabled, secure_settings
from fedlora.core.units import CLIENT, NONE, SAMPLE, unit_of
from fedlora.data import client_split, partition_indices
from fedlora.data.partition import mean_shard_size
from fedlora.data.sources import TaskData
from fedlora.leakage.canaries import CanaryPlan, audit_settings, plan_canaries
from fedlora.models.ranks import RankPlan
from fedlora.privacy import DPPlan, plan_sample_dp
from fedlora.privacy.budgets import client_epsilons
from fedlora.privacy.calibration import (
    ClientDPPlan,
    client_level_plan,
    clients_per_round,
    declared_examples,
)
from fedlora.privacy.evaluation import planned_evaluations
from fedlora.privacy.randomness import NoiseSource
from fedlora.privacy.release import ReleasePolicy
from fedlora.tasks import Task, get_task


def config_key(cfg: Any) -> str:
    """A config (or config group) as canonical JSON: a cache key identical in every process."""
    return canonical_json(cfg)


@dataclass(frozen=True)
class ClientPlan:
    """One client's facts: its rows of the configured dataset and how it trains."""

    client: int
    train_indices: np.ndarray
    val_indices: np.ndarray
    num_examples: int  # as the run uses and reports it (see weight_examples)
    dp: DPPlan | None
    malicious: bool
    canaries: tuple[int, ...] = ()  # the audit's canaries included in its training data


@dataclass(frozen=True)
class ExperimentPlan:
    cfg: Any
    label_names: tuple[str, ...]
    federation_train_size: int
    clients: tuple[ClientPlan, ...]
    client_dp: ClientDPPlan | None
    malicious: tuple[int, ...]
    clients_per_round: int
    secagg: SecAggSettings | None
    min_fit_results: int | None
    release: ReleasePolicy
    noise: NoiseSource
    canaries: CanaryPlan | None = None
    codec: Codec = Codec()  # how updates travel (the compression group)
    ranks: RankPlan | None = None  # each client's LoRA rank, their aggregation and adaptation
    profiles: Profiles = Profiles()  # each client's declared speed and availability

    @property
    def unit(self) -> str:
        return unit_of(self.cfg)

    @property
    def task(self) -> Task:
        return get_task(self.cfg.model)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def client(self, client: int) -> ClientPlan:
        return self.clients[int(client)]

    def planned_round_spend(self, client: str | None) -> tuple[float, float, int] | None:
        """What one round costs ``client`` under sample-level DP, ``(noise multiplier,
        sample rate, steps)`` as its ledger entries hold it; for an unknown client
        (None) the costliest of any client's (smallest noise, largest rate and steps);
        None without sample-level DP."""
        if client is not None and str(client).isdigit() and int(client) < self.num_clients:
            dp = self.client(int(client)).dp
            return None if dp is None else (dp.noise_multiplier, dp.sample_rate, dp.steps_per_round)
        plans = {id(c.dp): c.dp for c in self.clients if c.dp is not None}.values()
        if not plans:
            return None
        return (min(p.noise_multiplier for p in plans), max(p.sample_rate for p in plans),
                max(p.steps_per_round for p in plans))

    def task_data(self) -> TaskData:
        """The configured dataset (loaded once per process)."""
        return self.task.load_data(self.cfg.data, int(self.cfg.seed))


def aggregator_name(strategy_cfg: Any) -> str:
    """``strategy.aggregator``: a registered name, a dotted path, or ``{_target_: path}``."""
    agg = strategy_cfg.aggregator
    return str(agg["_target_"]) if OmegaConf.is_dict(agg) or isinstance(agg, dict) else str(agg)


def aggregator_params(strategy_cfg: Any) -> dict[str, Any]:
    """The aggregator's keyword arguments (``strategy.params``), nulls left to defaults."""
    params = strategy_cfg.get("params") or {}
    if OmegaConf.is_config(params):
        params = OmegaConf.to_container(params, resolve=True)
    return {k: v for k, v in params.items() if v is not None}


def weight_examples(cfg: Any, federation_train_size: int, actual: int) -> int:
    """A client's training-set size as the run uses and reports it: its DP plan and its
    FedAvg weight. Under sample-level DP the declared public size
    (:func:`fedlora.privacy.calibration.declared_examples`), never the real one; under
    client-level DP 1 (every client weighs the same in DP-FedAvg); without DP the real size."""
    unit = unit_of(cfg)
    if unit == SAMPLE:
        shard = mean_shard_size(cfg.partition, federation_train_size, int(cfg.federation.num_clients))
        return declared_examples(cfg.privacy, shard, float(cfg.data.validation_fraction))
    return 1 if unit == CLIENT else int(actual)


def client_dp_plans(cfg: Any, num_examples: list[int]) -> list[DPPlan | None]:
    """The sample-level DP plan of every client (client i's declared training-set size
    ``num_examples[i]``, its own budget); all None without sample-level DP. Clients with
    the same size and budget share one plan, so a large federation calibrates a few."""
    if unit_of(cfg) != SAMPLE:
        return [None] * len(num_examples)
    n = int(cfg.federation.num_clients)
    budgets = client_epsilons(cfg.privacy, range(len(num_examples)), n)
    rounds, evaluations = int(cfg.federation.rounds), planned_evaluations(cfg)
    plans: dict[tuple[int, float], DPPlan] = {}
    for size, eps in zip(num_examples, budgets.values()):
        if (size, eps) not in plans:
            plans[size, eps] = plan_sample_dp(size, cfg.train, cfg.privacy, rounds, eps, evaluations=evaluations)
    return [plans[size, eps] for size, eps in zip(num_examples, budgets.values())]


@functools.lru_cache(maxsize=4)
def _partitions(task_name: str, data_key: str, partition_key: str, num_partitions: int, seed: int):
    task = get_task({"task": task_name}).load_data(OmegaConf.create(json.loads(data_key)), seed)
    return partition_indices(task.train, num_partitions, OmegaConf.create(json.loads(partition_key)))


def min_fit_results(cfg: Any) -> int | None:
    """The fewest valid updates a round needs (conf/federation), None where the
    mechanism decides: client-level DP releases its noise whatever the count, and
    SecAgg+ has its own reconstruction threshold."""
    if unit_of(cfg) == CLIENT or secure_enabled(cfg):
        return None
    value = cfg.federation.get("min_fit_results")
    return int(cfg.federation.min_fit_clients if value is None else value)


def build_plan(cfg: Any) -> ExperimentPlan:
    """Every fact of the experiment ``cfg`` (a resolved config); raises ConfigError on
    a plan that cannot work (an unreachable epsilon, a delta too large for a client)."""
    task = get_task(cfg.model).load_data(cfg.data, int(cfg.seed))
    n = int(cfg.federation.num_clients)
    parts = _partitions(str(cfg.model.get("task") or "classification"), config_key(cfg.data),
                        config_key(cfg.partition), n, int(cfg.seed))
    malicious = tuple(malicious_clients(cfg.attack, n))
    splits = [client_split(parts[pid], float(cfg.data.validation_fraction), seed_for(cfg.seed, pid))
              for pid in range(n)]
    count = audit_settings(cfg)[0]
    canaries = plan_canaries(cfg, get_task(cfg.model).canaries(task, count, int(cfg.seed)) if count else None,
                             [len(train) for train, _ in splits], int(cfg.seed))
    held = [canaries.of_client(pid) if canaries else () for pid in range(n)]
    declared = weight_examples(cfg, len(task.train), 0) if unit_of(cfg) != NONE else None
    weights = [declared if declared is not None else len(train) + len(h) for (train, _), h in zip(splits, held)]
    clients = [ClientPlan(client=pid, train_indices=train_idx, val_indices=val_idx, num_examples=weights[pid], dp=dp,
                          malicious=pid in malicious, canaries=held[pid])
               for pid, ((train_idx, val_idx), dp) in enumerate(zip(splits, client_dp_plans(cfg, weights)))]
    secagg = None
    if secure_enabled(cfg):
        secagg = secure_settings(cfg, max(c.num_examples for c in clients))
    return ExperimentPlan(
        cfg=cfg,
        label_names=tuple(task.label_names),
        federation_train_size=len(task.train),
        clients=tuple(clients),
        client_dp=client_level_plan(cfg),
        malicious=malicious,
        clients_per_round=clients_per_round(cfg),
        secagg=secagg,
        min_fit_results=min_fit_results(cfg),
        release=ReleasePolicy.from_config(cfg),
        noise=NoiseSource.from_config(cfg.privacy),
        canaries=canaries,
        codec=Codec.from_config(cfg),
        ranks=RankPlan.from_config(cfg),
        profiles=Profiles.from_config(cfg),
    )


# Plans by config key, this process's (a few: an experiment and a sweep's neighbours).
_PLANS: dict[str, ExperimentPlan] = {}
_MAX_PLANS = 4


def remember_plan(plan: ExperimentPlan) -> None:
    """Keep ``plan`` as this process's plan of its config (it was built here already)."""
    key = config_key(plan.cfg)
    _PLANS.pop(key, None)
    while len(_PLANS) >= _MAX_PLANS:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = plan


def build_plan_cached(cfg: Any) -> ExperimentPlan:
    """:func:`build_plan` once per process for one config (deployed ClientApps build a
    client per message; simulated clients a process each)."""
    key = config_key(cfg)
    if key not in _PLANS:
        remember_plan(build_plan(OmegaConf.create(json.loads(key))))
    return _PLANS[key]
