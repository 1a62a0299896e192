"""Checks that stop a bad experiment before the federation starts, in simulation
(``simulations.run``) and in deployment (the ServerApp of ``flwr run``).

Every problem is reported as a :class:`ConfigError` naming the setting to change:
federation sizes, data and columns, partitions, the model, and the privacy plan of
every client (a target epsilon that needs more noise than the cap allows).
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Any

from omegaconf import OmegaConf

from fedlora.attacks import get_attack, malicious_clients
from fedlora.core.errors import ConfigError
from fedlora.core.profiles import Profiles
from fedlora.core.secure import check_secure, secure_enabled
from fedlora.core.units import CLIENT, NONE, SAMPLE, UNITS, unit_of
from fedlora.models.ranks import RankPlan
from fedlora.plan import ExperimentPlan, aggregator_name, aggregator_params, build_plan
from fedlora.privacy.budgets import check_budgets
from fedlora.privacy.calibration import check_budget, clients_per_round
from fedlora.privacy.evaluation import OFF, evaluation_mode
from fedlora.record.tracking import check_tracking
from fedlora.tasks.runtime import get_bundle
from strategies.aggregators import AGGREGATORS, check_params, get_aggregator
from strategies.async_server import ASYNC, MODES, SYNC, AsyncSettings
from strategies.sampling import SELECTIONS
from strategies.server_optimizers import from_config as server_optimizer
from strategies.weighting import client_weights

# Settings read as numbers. A Hydra override can hand over text, a list, a map or null,
# which would fail deep in the plan as a TypeError that names no setting; they are
# checked first. Counts are integers, the rest finite numbers; ``None`` is allowed where
# the setting has a meaning for null.
COUNTS = ("federation.num_clients", "federation.rounds", "federation.min_fit_clients",
          "federation.min_evaluate_clients", "federation.min_available_clients", "train.batch_size",
          "train.eval_batch_size", "train.probe_steps", "lora.r", "seed")
OPTIONAL_COUNTS = ("federation.min_fit_results", "federation.selection_candidates", "train.local_steps",
                   "data.max_train_samples", "data.max_test_samples")
NUMBERS = ("federation.fraction_fit", "federation.fraction_evaluate", "federation.client_resources.num_cpus",
           "train.lr", "train.local_epochs", "lora.alpha", "lora.dropout", "data.validation_fraction")
OPTIONAL_NUMBERS = ("strategy.norm_bound",)
DP_NUMBERS = ("privacy.target_epsilon", "privacy.delta", "privacy.max_grad_norm", "privacy.max_noise_multiplier")
DP_OPTIONAL_NUMBERS = ("privacy.evaluation_epsilon_fraction",)
_ABSENT = object()


def check_types(cfg: Any) -> None:
    """Every numeric setting holds a number of its kind, or a ConfigError names it."""
    dp = str(cfg.privacy.get("unit")) != NONE
    groups = [(COUNTS, True, False), (OPTIONAL_COUNTS, True, True), (NUMBERS, False, False),
              (OPTIONAL_NUMBERS, False, True), (DP_NUMBERS if dp else (), False, False),
              (DP_OPTIONAL_NUMBERS if dp else (), False, True)]
    for keys, count, nullable in groups:
        for key in keys:
            value = OmegaConf.select(cfg, key, default=_ABSENT)
            if value is _ABSENT or (value is None and nullable):
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if count and not (number and float(value).is_integer()):
                raise ConfigError(key, f"must be an integer{' or null' if nullable else ''}, got {value!r}")
            if not (number and math.isfinite(value)):
                raise ConfigError(key, f"must be a finite number{' or null' if nullable else ''}, got {value!r}")
    seed = OmegaConf.select(cfg, "seed", default=0)
    if not 0 <= seed < 2**32:
        raise ConfigError("seed", f"must lie in [0, 2**32), got {seed!r}")
    rule = OmegaConf.select(cfg, "strategy.aggregator", default="fedavg")
    if not (isinstance(rule, str) and rule or OmegaConf.is_dict(rule) and isinstance(rule.get("_target_"), str)):
        raise ConfigError("strategy.aggregator", f"must be a rule's name, a dotted path or {{_target_: dotted path}}, "
                          f"got {rule!r}")


def backend_cpus(cfg: Any) -> int:
    configured = cfg.federation.backend_num_cpus
    return int(configured) if configured else (os.cpu_count() or 1)


def check_federation(cfg: Any, simulation: bool = True) -> None:
    fed = cfg.federation
    n = int(fed.num_clients)
    if n < 1:
        raise ConfigError("federation.num_clients", f"must be >= 1, got {n}")
    if int(fed.rounds) < 1:
        raise ConfigError("federation.rounds", f"must be >= 1, got {fed.rounds}")
    for name in ("fraction_fit", "fraction_evaluate"):
        value = float(fed[name])
        low_ok = value > 0 if name == "fraction_fit" else value >= 0
        if not (low_ok and value <= 1):
            raise ConfigError(f"federation.{name}", f"must lie in (0, 1], got {value}")
    for name in ("min_fit_clients", "min_available_clients", "min_evaluate_clients"):
        minimum = int(fed[name])
        if minimum < 1:
            raise ConfigError(f"federation.{name}", f"must be >= 1, got {minimum}")
        if name != "min_evaluate_clients" or float(fed.fraction_evaluate) > 0:
            if minimum > n:
                raise ConfigError(
                    "federation.num_clients",
                    f"{n} clients is fewer than federation.{name}={minimum}; add clients or "
                    f"lower federation.{name}",
                )
    min_results = fed.get("min_fit_results")
    if min_results is not None and not 1 <= int(min_results) <= n:
        raise ConfigError("federation.min_fit_results", f"must lie in [1, num_clients={n}] or be null, got {min_results}")
    cpus = float(fed.client_resources.num_cpus)
    # Deployed clients run on their SuperNodes' machines, not this one's cores.
    if simulation and (cpus <= 0 or cpus > backend_cpus(cfg)):
        raise ConfigError(
            "federation.client_resources.num_cpus",
            f"{cpus} CPUs per client but the backend has {backend_cpus(cfg)}",
        )
    if int(cfg.train.get("probe_steps") or 0) and str(cfg.model.get("pooling", "model")) != "mean":
        raise ConfigError(
            "train.probe_steps",
            "linear probing needs model.pooling=mean; set train.probe_steps=0 for this model",
        )
    unit = str(cfg.privacy.unit)
    if unit not in UNITS:
        raise ConfigError("privacy", f"unknown privacy unit {unit!r}; choose one of {UNITS}")
    if unit != NONE:
        check_budget(float(cfg.privacy.target_epsilon), float(cfg.privacy.delta))
    if unit == SAMPLE:
        check_budgets(cfg.privacy, n)
    if unit == CLIENT:
        check_client_dp_aggregator(aggregator_name(cfg.strategy))
    check_aggregator(cfg)
    check_ranks(cfg)
    check_selection(cfg)
    check_stragglers(cfg)
    check_mode(cfg)
    check_secure(cfg, clients_per_round(cfg), robust=not getattr(
        get_aggregator(aggregator_name(cfg.strategy)), "client_dp_sensitivity", None))
    malicious_clients(cfg.attack, n)


ASYNC_AGGREGATORS = ("fedavg", "median", "trimmed_mean")


def check_mode(cfg: Any) -> None:
    """``federation.mode``: sync, or async (FedBuff) with what an asynchronous buffer can carry."""
    fed = cfg.federation
    mode = str(fed.get("mode") or SYNC)
    if mode not in MODES:
        raise ConfigError("federation.mode", f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != ASYNC:
        return
    refuse = lambda setting, why: ConfigError(setting, f"federation.mode=async: {why}")  # noqa: E731
    if secure_enabled(cfg):
        raise refuse("secure", "SecAgg+ masks one synchronous cohort per round (its pairwise masks cancel only "
                     "in that cohort's sum); use federation.mode=sync with it, or secure=none")
    if unit_of(cfg) == CLIENT:
        raise refuse("privacy", "client-level DP's accountant assumes each round's participants are a Poisson "
                     "sample released through one Gaussian mechanism, which a buffer filled by whoever finishes "
                     "first is not; use privacy=sample (each client's own DP-SGD composes as in sync rounds)")
    agg = aggregator_name(cfg.strategy)
    if agg not in ASYNC_AGGREGATORS:
        raise refuse("strategy", f"{agg} assumes one fixed set of updates per round (its f malicious of n "
                     f"participants, or a reference or local-step normaliser per round); an asynchronous buffer "
                     f"mixes updates of several global versions. Use one of {', '.join(ASYNC_AGGREGATORS)}")
    if fed.get("round_timeout_s") is not None or float(fed.get("over_selection") or 0) > 0:
        raise refuse("federation.round_timeout_s", "an asynchronous run has no rounds to close: set "
                     "federation.round_timeout_s=null and federation.over_selection=0 (max_staleness bounds "
                     "how late an update may be)")
    if str(fed.get("selection") or "uniform") != "uniform":
        raise refuse("federation.selection", "idle clients are sent work uniformly; set federation.selection=uniform")
    if RankPlan.from_config(cfg).varies:
        raise refuse("lora", "heterogeneous or adaptive LoRA ranks aggregate per round; use one rank")
    n = int(fed.num_clients)
    settings = AsyncSettings.from_config(fed, clients_per_round(cfg))
    if not 1 <= settings.buffer_size <= n:
        raise ConfigError("federation.buffer_size", f"must lie in [1, num_clients={n}], got {settings.buffer_size}")
    if not settings.buffer_size <= settings.concurrency <= n:
        raise ConfigError("federation.concurrency", f"must lie in [buffer_size={settings.buffer_size}, "
                          f"num_clients={n}], got {settings.concurrency}")
    if settings.max_staleness is not None and settings.max_staleness < 0:
        raise ConfigError("federation.max_staleness", f"must be >= 0 (or null), got {settings.max_staleness}")
    if not settings.staleness_exponent >= 0:
        raise ConfigError("federation.staleness_exponent", f"must be >= 0, got {settings.staleness_exponent}")


def check_stragglers(cfg: Any) -> None:
    """``federation.round_timeout_s`` and ``federation.over_selection``: values that make
    sense, with the sampling and the mechanisms they can work with."""
    fed = cfg.federation
    timeout, over = fed.get("round_timeout_s"), float(fed.get("over_selection") or 0.0)
    if timeout is not None and not float(timeout) > 0:
        raise ConfigError("federation.round_timeout_s", f"must be > 0 seconds (or null: no deadline), got {timeout}")
    if secure_enabled(cfg) and timeout is not None:
        raise ConfigError("federation.round_timeout_s", "SecAgg+ runs its own stages, each with its own deadline: "
                          "set secure.timeout instead (and federation.round_timeout_s=null)")
    if over == 0:
        return
    if not over > 0:
        raise ConfigError("federation.over_selection", f"must be >= 0 (a fraction of the round's target), got {over}")
    if unit_of(cfg) == CLIENT:
        raise ConfigError("federation.over_selection", "client-level DP samples each client independently (Poisson, "
                          "the rate its accountant uses), so a round has no target to over-select for: raise "
                          "federation.fraction_fit instead, and set federation.over_selection=0")
    if secure_enabled(cfg):
        raise ConfigError("federation.over_selection", "SecAgg+ masks over every sampled client and closes each "
                          "stage at secure.timeout, not at a quorum; set federation.over_selection=0")
    if str(fed.get("selection") or "uniform") != "uniform":
        raise ConfigError("federation.over_selection", f"works with federation.selection=uniform, not "
                          f"{fed.selection}; set federation.over_selection=0")
    target, n = clients_per_round(cfg), int(fed.num_clients)
    if math.ceil(target * (1.0 + over)) > n:
        raise ConfigError("federation.over_selection", f"{target} clients per round over-selected by {over:g} is "
                          f"{math.ceil(target * (1.0 + over))}, more than the federation's {n} clients: lower it "
                          "(or federation.fraction_fit)")


def check_selection(cfg: Any) -> None:
    """``federation.selection``: a known policy whose inputs this run has."""
    fed = cfg.federation
    selection = str(fed.get("selection") or "uniform")
    if selection not in SELECTIONS:
        raise ConfigError("federation.selection", f"unknown policy {selection!r}; choose one of {', '.join(SELECTIONS)}")
    if selection == "resource_aware":
        Profiles.from_config(cfg)  # valid profiles
        if unit_of(cfg) == CLIENT:
            raise ConfigError(
                "federation.selection", "resource_aware draws clients with unequal probabilities, but client-level "
                "DP's accountant assumes one Poisson rate for every client; use selection=uniform with "
                "privacy=client")
        return
    if selection != "power_of_choice":
        return
    if unit_of(cfg) == CLIENT:
        raise ConfigError(
            "federation.selection", "power_of_choice picks clients by their losses, which under client-level DP "
            "would make participation depend on single clients' data outside the Poisson sample the accountant "
            "assumes; use selection=uniform with privacy=client")
    if float(fed.fraction_evaluate) <= 0 or evaluation_mode(cfg) == OFF:
        raise ConfigError(
            "federation.selection", "power_of_choice reads the clients' losses from their federated evaluation: set "
            "federation.fraction_evaluate > 0 and privacy.evaluation=dp (or plain)")
    candidates = fed.get("selection_candidates")
    if candidates is not None and int(candidates) < 1:
        raise ConfigError("federation.selection_candidates", f"must be >= 1 (or null), got {candidates}")


def check_ranks(cfg: Any) -> None:
    """Heterogeneous / adaptive LoRA ranks (fedlora.models.ranks) in combinations that work."""
    ranks = RankPlan.from_config(cfg)
    if not ranks.varies:
        return
    setting = "federation.client_ranks" if ranks.heterogeneous else (
        "lora.adaptive_energy" if ranks.adaptive_energy is not None else "lora.self_pruning")
    if secure_enabled(cfg):
        raise ConfigError(setting, "SecAgg+ sums updates of one length; clients of different ranks send different "
                          "lengths. Use one rank (lora.r) with secure=secaggplus")
    if bool(cfg.lora.get("freeze_a")):
        raise ConfigError(setting, "FFA-LoRA (lora.freeze_a=true) trains B against one frozen rank-lora.r A for "
                          "every client; use lora.freeze_a=false with heterogeneous or adaptive ranks")
    if get_attack(str(cfg.attack.name)).colluding:
        raise ConfigError(setting, f"attack={cfg.attack.name} pools the colluders' updates, which need one rank; "
                          "use one rank (lora.r) for colluding attacks")
    unit = unit_of(cfg)
    if ranks.self_pruning is not None and unit == CLIENT:
        raise ConfigError("lora.self_pruning", "a client's pruned rank depends on its own data and would travel "
                          "outside the client-level mechanism; set lora.self_pruning=null with privacy=client")
    refactors = ranks.aggregation == "svd" or ranks.adaptive_energy is not None
    optimiser = str(cfg.strategy.get("server_optimizer") or "fedavg")
    if refactors and optimiser != "fedavg":
        raise ConfigError("strategy.server_optimizer", f"{optimiser} keeps moments per coordinate of the global "
                          "adapter, which lora.aggregation=svd and lora.adaptive_energy refactor every round; "
                          "use strategy.server_optimizer=fedavg")
    if ranks.aggregation == "svd":
        if aggregator_name(cfg.strategy) != "fedavg":
            raise ConfigError("lora.aggregation", "svd (FlexLoRA) averages the clients' products B_k A_k with "
                              "FedAvg weights; use strategy=fedavg, or lora.aggregation=zero_padding for a "
                              "robust rule")
        if unit == CLIENT:
            raise ConfigError("lora.aggregation", "svd (FlexLoRA) is not the Gaussian mechanism on clipped updates "
                              "that client-level DP accounts; use lora.aggregation=zero_padding with privacy=client")
    if ranks.adaptive_energy is not None and "reference" in inspect.signature(
            get_aggregator(aggregator_name(cfg.strategy))).parameters:
        raise ConfigError("lora.adaptive_energy", "the rule keeps last round's aggregate as its reference, which "
                          "the adaptive rank refactors; use a stateless rule or lora.adaptive_energy=null")


def check_rank_fits(ranks: RankPlan, bundle: Any) -> None:
    """No LoRA rank above what a layer can hold (min of its input and output sizes)."""
    arrays = dict(bundle.model.named_parameters())
    for a, b in bundle.layout.pairs:
        out_size = int(arrays[bundle.names[b]].shape[0])
        in_size = None if a is None else int(arrays[bundle.names[a]].shape[1])
        limit = out_size if in_size is None else min(out_size, in_size)
        if ranks.global_rank > limit:
            setting = "federation.client_ranks" if ranks.client_ranks else "lora.r"
            raise ConfigError(setting, f"rank {ranks.global_rank} exceeds what {bundle.names[b]} can hold "
                              f"(min of its input and output sizes: {limit}); lower the rank to at most {limit}")


def check_aggregator(cfg: Any) -> None:
    """The rule exists and its preconditions hold for the clients sampled per round."""
    name = aggregator_name(cfg.strategy)
    try:
        get_aggregator(name)
    except (KeyError, ImportError, AttributeError) as err:
        raise ConfigError("strategy.aggregator", str(err).strip("'\"")) from err
    bound = cfg.strategy.get("norm_bound")
    if bound is not None and not float(bound) > 0:
        raise ConfigError("strategy.norm_bound", f"must be > 0 (or null), got {bound}")
    server_optimizer(cfg.strategy)  # a known optimiser with valid parameters
    client_weights(cfg.strategy, {})  # a known weighting with valid maxima
    if name not in AGGREGATORS:
        return  # a user's rule: its own checks run when it is called
    params = aggregator_params(cfg.strategy)
    params.setdefault("num_malicious", int(cfg.strategy.get("num_malicious") or 0))
    n = clients_per_round(cfg)
    try:
        check_params(name, n, **params)
    except ValueError as err:
        raise ConfigError(
            "strategy", f"{name} with {n} clients per round: {err}; sample more clients per round "
            "(federation.num_clients / federation.fraction_fit) or lower strategy.num_malicious"
        ) from err


def check_client_dp_aggregator(name: str) -> None:
    """Client-level DP needs a bounded sensitivity of the aggregate to one client."""
    try:
        fn = get_aggregator(name)
    except (KeyError, ImportError, AttributeError) as err:
        raise ConfigError("strategy.aggregator", str(err)) from err
    if not getattr(fn, "client_dp_sensitivity", None):
        raise ConfigError(
            "strategy",
            f"aggregator {name!r} has no sensitivity bound for client-level DP: it selects or "
            "reweights updates depending on all of them, so one client can move the result by more "
            "than the clipping norm and the server's noise would not cover it. Use strategy=fedavg "
            "with privacy=client, or sample-level DP (privacy=sample), under which any aggregator "
            "is post-processing",
        )


def preflight(cfg: Any, simulation: bool = True) -> ExperimentPlan:
    """Check ``cfg`` and return its experiment plan (every fact of the run, built once)."""
    check_types(cfg)
    check_federation(cfg, simulation)
    check_tracking(cfg)
    plan = build_plan(cfg)
    # Loads (and caches) the model the server evaluates: an unknown model fails here.
    bundle = get_bundle(cfg, plan.num_labels)
    check_rank_fits(plan.ranks, bundle)
    plan.task.check(bundle.tokenizer, plan.task_data(), cfg)
    return plan
