"""A Flower strategy that aggregates LoRA *deltas* with a pluggable aggregation rule.

Clients return ``local - global`` for the adapter tensors. Replies are triaged
(:mod:`strategies.triage`): every update is validated before it is stacked into one
(n, d) float32 matrix, and a malformed update is counted as a failure with its reason,
so one broken client cannot crash or poison the round. The rule (a registered
aggregator or a user's function, optionally behind norm bounding) aggregates the
matrix, and the server optimiser (:mod:`strategies.server_optimizers`: FedAvg with a
server learning rate, FedAvgM, FedAdagrad, FedAdam, FedYogi) turns the aggregate into
the step added to the global adapter.

Client-level DP is a wrapper around this strategy (:mod:`strategies.client_dp`), as
in Flower's own DP strategies; it replaces the sampling and the aggregation through
:meth:`FedLoRAStrategy.fit_round` and :meth:`FedLoRAStrategy.triage`.

It subclasses the compatibility ``flwr.server.strategy.Strategy`` because Flower's
SecAgg+ workflow runs only there (see design.md).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    log,
    ndarrays_to_parameters,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedlora.client.state import EXPERIMENT_KEY
from fedlora.core.arrays import unflatten
from fedlora.core.compression import Codec
from fedlora.core.config import seed_for
from fedlora.core.profiles import Profiles
from fedlora.models.ranks import RANK_CAP_KEY, LoRALayout, RankPlan, energy_rank, flexlora, svd_order
from fedlora.privacy.evaluation import DP, NOISY_CORRECT, NOISY_EXAMPLES, PLAIN, federated_accuracy
from fedlora.record.checkpoint import Checkpoint
from fedlora.reply import MalformedReply, parse_history, reported_float
from strategies.aggregators import get_aggregator, label_rows, with_norm_bound
from strategies.sampling import (
    Excluding,
    attach_histories,
    client_id,
    how_many,
    power_of_choice,
    resource_aware,
    uniform_sample,
)
from strategies.server_optimizers import ServerOptimizer
from strategies.client_reports import summarise
from strategies.triage import ReplyBatch, RoundFacts, payload_bytes, triage
from strategies.weighting import REPORTED, ClientWeights

EvaluateFn = Callable[[int, list[np.ndarray]], tuple[float, dict[str, Scalar]]]
Sampler = Callable[[int, ClientManager, FitIns], list[tuple[ClientProxy, FitIns]]]

SELECTION_SALT = 0x5E1EC

__all__ = ["FedLoRAStrategy", "RoundFailed", "payload_bytes"]


class RoundFailed(RuntimeError):
    """Fewer valid results than the round needs; the run stops after checkpointing."""


class FedLoRAStrategy(Strategy):
    """Sample clients, triage their LoRA deltas, aggregate, step the global adapter.

    Parameters
    ----------
    initial_arrays : list[np.ndarray]
        The initial global adapter (trainable tensors in a fixed order).
    aggregator : str, default "fedavg"
        Name in ``strategies.aggregators`` or a dotted path to a function.
    aggregator_params : dict, optional
        Keyword arguments of the aggregator.
    norm_bound : float, optional
        Clip every update to this L2 norm before the aggregator (Sun et al. 2019),
        through :func:`strategies.aggregators.with_norm_bound`.
    server_lr : float, default 1.0
        Step size of the server update on the aggregated delta (FedAvg's, when no
        ``server_optimizer`` is given).
    server_optimizer : ServerOptimizer, optional
        How the aggregate becomes the step (:mod:`strategies.server_optimizers`); its
        moments are part of the checkpoint.
    fraction_fit, fraction_evaluate : float
        Fraction of available clients sampled for training / federated evaluation.
    min_fit_clients, min_evaluate_clients, min_available_clients : int
        Lower bounds on sampled and connected clients.
    evaluate_fn : callable, optional
        Centralized evaluation ``(round, arrays) -> (loss, metrics)`` on the server.
    recorder : object, optional
        Receives ``on_fit``, ``on_evaluate`` and ``on_federated_evaluate`` per round; if
        it defines them, also ``on_sample`` (whom configure_fit sampled, and how) and
        ``on_aggregation`` (the rule, its parameters and its decisions per client).
    experiment_id : str, optional
        The experiment's id, sent with every fit instruction: clients keep their own
        spend record under it, across server restarts.
    on_round_start : callable, optional
        Called as ``on_round_start(server_round, strategy)`` before clients are asked to
        train (the server app marks the round as started in its checkpoint: a resume
        never runs a started round again, whose clients may have spent budget).
    on_round_end : callable, optional
        Called as ``on_round_end(server_round, strategy)`` after every aggregation
        (the server app writes its checkpoint there).
    min_fit_results : int, optional
        A round with fewer valid updates fails (:class:`RoundFailed`) after it is
        recorded and checkpointed; None accepts any number. Clients that trained in it
        spent privacy budget, so the ledger keeps the round and a resumed run goes on
        with the next one (repeating it would spend more than was planned).
    """

    def __init__(
        self,
        initial_arrays: list[np.ndarray],
        aggregator: str = "fedavg",
        aggregator_params: dict[str, Any] | None = None,
        norm_bound: float | None = None,
        server_lr: float = 1.0,
        server_optimizer: ServerOptimizer | None = None,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int = 2,
        min_evaluate_clients: int = 2,
        min_available_clients: int = 2,
        evaluate_fn: EvaluateFn | None = None,
        recorder: Any = None,
        experiment_id: str = "",
        on_round_start: Callable[[int, "FedLoRAStrategy"], None] | None = None,
        on_round_end: Callable[[int, "FedLoRAStrategy"], None] | None = None,
        min_fit_results: int | None = None,
        evaluation: str = PLAIN,
        codec: Codec | None = None,
        selection: str = "uniform",
        selection_candidates: int | None = None,
        ranks: RankPlan | None = None,
        layout: LoRALayout | None = None,
        profiles: Profiles | None = None,
        weighting: ClientWeights | None = None,
        over_selection: float = 0.0,
        planned_spend: Callable[[str | None], tuple[float, float, int] | None] | None = None,
    ) -> None:
        super().__init__()
        self.global_arrays = [np.asarray(a, dtype=np.float32) for a in initial_arrays]
        self.aggregator_name = aggregator
        rule = get_aggregator(aggregator)
        signature = inspect.signature(rule).parameters
        self.norm_bound = None if norm_bound is None else float(norm_bound)
        self.aggregate = rule if self.norm_bound is None else with_norm_bound(rule, self.norm_bound)
        self.aggregator_params = dict(aggregator_params or {})
        # Stateful rules (centered clipping) take the previous aggregate as reference.
        self.reference: np.ndarray | None = None
        self._takes_reference = "reference" in signature
        # Rules that can explain their decisions fill a ``report`` dict (audit log);
        # others (e.g. a user's rule) are called exactly as before.
        self._takes_report = "report" in signature
        # Rules that normalise by each client's work (FedNova) get the rows' step counts.
        self._takes_steps = "local_steps" in signature
        self.optimizer = server_optimizer or ServerOptimizer("fedavg", lr=float(server_lr))
        self.server_lr = self.optimizer.lr
        self.fraction_fit = float(fraction_fit)
        self.fraction_evaluate = float(fraction_evaluate)
        self.min_fit_clients = int(min_fit_clients)
        self.min_evaluate_clients = int(min_evaluate_clients)
        self.min_available_clients = int(min_available_clients)
        self.evaluate_fn = evaluate_fn
        self.evaluation = str(evaluation)
        self.codec = codec or Codec()
        # power_of_choice: the d candidates drawn uniformly each round, of which the
        # highest-loss clients train; losses come from the clients' federated evaluation.
        self.selection = str(selection)
        self.selection_candidates = selection_candidates
        self.client_losses: dict[str, float] = {}
        # resource_aware: the clients' declared speed and availability (fedlora.core.profiles).
        self.profiles = profiles or Profiles()
        # Heterogeneous / adaptive LoRA ranks (fedlora.models.ranks): the layout of the
        # factors among the arrays, and the rank the next round's clients train at most.
        self.ranks = ranks if ranks is not None and ranks.varies else None
        self.layout = layout if self.ranks is not None else None
        if self.ranks is not None and self.layout is None:
            raise ValueError("heterogeneous or adaptive LoRA ranks need the adapter's layout")
        self.rank_cap: int | None = None
        # The weights the rule uses (strategies.weighting): the ServerApp passes the
        # configured one (by default each claim bounded by what the plan knows); a strategy
        # built without one takes the claims as sent.
        self.weighting = weighting or ClientWeights(rule=REPORTED)
        # Over-selection (strategies.deadline): sample (1 + over_selection) times the
        # round's target and close the round once the target has reported.
        self.over_selection = float(over_selection)
        self.round_quorum: int | None = None
        # The privacy spend a client planned for one round ((sigma, q, steps), sample-level
        # DP; None without), by client id, or the largest any client planned for None: what
        # a client cut off by the deadline may have released.
        self.planned_spend = planned_spend or (lambda cid: None)
        self._cut_off: list[dict[str, Any]] = []
        self.recorder = recorder
        self.on_round_start = on_round_start
        self.on_round_end = on_round_end
        self.min_fit_results = None if min_fit_results is None else int(min_fit_results)
        # Whether log lines may name participants; a wrapper whose mechanism hides who
        # took part (client-level DP) turns it off.
        self.participation_public = True
        # After a resume Flower counts rounds from 1 again; ours continue from the checkpoint.
        self.round_offset = 0
        # After a resume: each client's sample-level history as the ledger holds it, sent
        # to that client alone with its first fit instruction (a client that lost its own
        # record continues from it; one that kept it takes it only if it extends its own).
        self.pending_histories: dict[str, list[list[float]]] = {}
        # Flower node id -> client id, learned from replies (or asked, after a resume).
        self.node_clients: dict[str, str] = {}
        self.experiment_id = str(experiment_id)
        # The last round whose fit was started, and the last one that ended (released its
        # aggregate); a SecAgg+ round can halt in between (see server_app).
        self.started_round = 0
        self.completed_round = 0
        # The instructions of the started round, for a replay of the same draw.
        self._instructions: list[tuple[ClientProxy, FitIns]] = []
        self._replaying = False
        # Clients that declined because another round would exceed their privacy budget.
        self.exhausted: set[str] = set()
        # Payload bytes of the global adapter in this round's fit instructions.
        self.bytes_down_per_client = 0

    def __repr__(self) -> str:
        return (
            f"FedLoRAStrategy(aggregator={self.aggregator_name}{self.aggregator_params or ''}, "
            f"norm_bound={self.norm_bound}, server_optimizer={self.optimizer.name}, server_lr={self.server_lr}, "
            f"fraction_fit={self.fraction_fit}, min_fit_clients={self.min_fit_clients}, "
            f"d={self.dimension})"
        )

    @property
    def dimension(self) -> int:
        """d: the number of adapter parameters that travel."""
        return int(sum(a.size for a in self.global_arrays))

    # -- events ------------------------------------------------------------------
    def notify(self, event: str, *args: Any, **kwargs: Any) -> None:
        """Optional recorder events: a recorder without them (tests' fakes) still works."""
        handler = getattr(self.recorder, event, None)
        if handler is not None:
            handler(*args, **kwargs)

    def _log_participant(self, level: int, msg: str, *args: Any) -> None:
        """A log line about one participant: only where who took part is not secret
        (the server-internal record has it either way)."""
        if self.participation_public:
            log(level, msg, *args)

    def secagg_halted(self, server_round: int) -> None:
        """SecAgg+ could not finish the round (it is replayed unmasked, see server_app):
        a fact about the draw, for the server-internal record only."""
        self.notify("on_secagg_halted", server_round)

    # -- sampling ------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        log(INFO, "%s", self)
        return ndarrays_to_parameters(self.global_arrays)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self.fit_round(server_round, client_manager, self.sample_uniform)

    def fit_round(self, server_round: int, client_manager: ClientManager, sample: Sampler) -> list[tuple[ClientProxy, FitIns]]:
        """Start a round (or replay the started one) with clients drawn by ``sample``."""
        server_round += self.round_offset
        if self._replaying:
            return self._instructions
        self.started_round = server_round
        if self.on_round_start is not None:
            self.on_round_start(server_round, self)
        # The strategy's own global adapter is canonical: a client-level DP round in
        # which nobody was sampled still moves it (by noise), which Flower never sees.
        config: dict[str, Scalar] = {"server_round": server_round, EXPERIMENT_KEY: self.experiment_id}
        if self.rank_cap is not None:
            config[RANK_CAP_KEY] = self.rank_cap
        ins = FitIns(ndarrays_to_parameters(self.global_arrays), config)
        self.bytes_down_per_client = payload_bytes(ins.parameters)
        self._instructions = attach_histories(sample(server_round, client_manager, ins), self.pending_histories,
                                              self.node_clients, server_round)
        return self._instructions

    def cut_off(self, nodes: list[int], reason: str) -> None:
        """Sampled nodes whose reply had not arrived when the round closed
        (:class:`strategies.deadline.RoundDeadline`). They trained, or may have: their
        update may still reach the SuperLink after the round, so each is counted as
        having spent its planned round (sample-level DP; under client-level DP a missing
        update is a zero contribution to a mechanism accounted at its sampling rate)."""
        for node in nodes:
            cid = self.node_clients.get(str(node))
            self._cut_off.append({"node_id": str(node), "cid": cid, "reason": reason,
                                  "planned_spend": self.planned_spend(cid)})
        self._log_participant(WARNING, "round %s: %s sampled client(s) cut off: %s", self.started_round, len(nodes),
                              reason)

    def round_closed(self, seconds: float, simulated: bool) -> None:
        """How long the round's training took until it closed, on the real clock or the
        simulated one (:mod:`strategies.deadline`)."""
        self.notify("on_round_closed", self.started_round, seconds, simulated)

    @contextlib.contextmanager
    def replaying(self):
        """``configure_fit`` returns the started round's instructions again (same draw)."""
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False

    def sample_uniform(self, server_round: int, client_manager: ClientManager, ins: FitIns) -> list[tuple[ClientProxy, FitIns]]:
        """``fraction_fit`` of the clients with budget left, uniformly without replacement."""
        clients, eligible = uniform_sample(client_manager, self.fraction_fit, self.min_fit_clients,
                                           self.min_available_clients, self.exhausted, self.over_selection)
        if not clients:
            log(WARNING, "round %s: %s clients with budget left, fewer than needed; no training", server_round, eligible)
            return []
        how: dict[str, Any] = {"method": "uniform without replacement"}
        self.round_quorum = None
        if self.over_selection > 0:
            self.round_quorum = how_many(self.fraction_fit, self.min_fit_clients, eligible)
            how.update(over_selection=self.over_selection, target=self.round_quorum)
        if self.selection == "power_of_choice":
            clients, how = self._power_of_choice(client_manager, clients, eligible)
        elif self.selection == "resource_aware":
            clients, how = self._resource_aware(client_manager, len(clients), server_round)
            if len(clients) < self.min_fit_clients:
                log(WARNING, "round %s: %s clients online with budget left, fewer than federation.min_fit_clients; "
                    "no training", server_round, len(clients))
                return []
        self.notify("on_sample", server_round, [c.cid for c in clients], **how,
                    fraction_fit=self.fraction_fit, eligible=eligible, excluded_out_of_budget=sorted(self.exhausted))
        return [(c, ins) for c in clients]

    def _power_of_choice(self, client_manager: ClientManager, chosen: list[ClientProxy], eligible: int):
        """From ``d`` candidates drawn uniformly (``federation.selection_candidates``,
        default twice the clients per round), the ``m = len(chosen)`` of highest loss."""
        m = len(chosen)
        d = min(eligible, max(m, int(self.selection_candidates or 2 * m)))
        candidates = client_manager.sample(num_clients=d, min_num_clients=self.min_available_clients,
                                           criterion=Excluding(self.exhausted))
        by_node = {c.cid: c for c in candidates}
        picked = power_of_choice([c.cid for c in candidates], self.client_losses, m)
        return [by_node[n] for n in picked], {"method": "power of choice", "candidates": len(candidates)}

    def _resource_aware(self, client_manager: ClientManager, m: int, server_round: int):
        """``m`` of the clients online this round (by their declared availability), drawn
        with probability proportional to their declared speed (:func:`resource_aware`)."""
        pool = [c for c in client_manager.all().values() if c.cid not in self.exhausted]
        ids = {c.cid: int(client_id(c, self.node_clients, server_round)) for c in pool}
        online = [c.cid for c in pool if self.profiles.online(ids[c.cid], server_round)]
        rng = np.random.default_rng(seed_for(self.profiles.seed, server_round, SELECTION_SALT))
        picked = resource_aware(online, {n: self.profiles.of(ids[n]).speed for n in online}, m, rng)
        by_node = {c.cid: c for c in pool}
        return [by_node[n] for n in picked], {"method": "resource-aware (declared speed and availability)",
                                              "online": len(online)}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        server_round += self.round_offset
        if self.fraction_evaluate <= 0:
            return []
        n = how_many(self.fraction_evaluate, self.min_evaluate_clients, client_manager.num_available())
        clients = client_manager.sample(num_clients=n, min_num_clients=self.min_available_clients)
        # The experiment names the spend record a dp evaluation appends to.
        ins = EvaluateIns(ndarrays_to_parameters(self.global_arrays),
                          {"server_round": server_round, EXPERIMENT_KEY: self.experiment_id})
        return [(c, ins) for c in clients]

    # -- aggregation ---------------------------------------------------------------
    def triage(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
        facts: RoundFacts | None = None,
    ) -> ReplyBatch:
        """The round's replies sorted (:func:`strategies.triage.triage`); what they tell
        about the federation (who declined, which node is which client) is kept. The
        facts to check them by are the started round's unless given."""
        if facts is None:
            started = self._instructions and self.started_round == server_round
            facts = RoundFacts(server_round=server_round,
                               sampled=frozenset(str(p.cid) for p, _ in self._instructions) if started else None,
                               node_clients=dict(self.node_clients))
        batch = triage(results, failures, self.global_arrays, self.bytes_down_per_client, self.codec, self.layout,
                       facts)
        cut, self._cut_off = self._cut_off, []
        for info in cut:
            batch.rejected.append({"cid": None, "node_id": info["node_id"], "accepted": False,
                                   "reason": info["reason"], "bytes_down": self.bytes_down_per_client})
        if cut:
            batch.num_failures += len(cut)
            self.notify("on_cut_off", server_round, cut)
        for info in batch.clients:
            self.node_clients[str(info["node_id"])] = str(info["cid"])
            # A client that replied holds its history; it needs none from us again.
            self.pending_histories.pop(str(info["cid"]), None)
            if info.get("declined"):
                self._log_participant(INFO, "round %s: client %s declined (%s); no longer sampled", server_round,
                                      info["cid"], info.get("reason"))
        self.exhausted.update(batch.declined_nodes)
        for info in batch.rejected:
            if info.get("cid") is None:
                self._log_participant(WARNING, "round %s: client failure: %s", server_round, info["reason"])
            else:
                self._log_participant(WARNING, "round %s: rejected update from client %s: %s", server_round,
                                      info["cid"], info["reason"])
        return batch

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.round_offset
        batch = self.triage(server_round, results, failures)
        # Declining (budget spent) is planned, not a failure: when clients declined, the
        # minimum is capped by those that were still expected to train.
        required = self.min_fit_results
        if required is not None and batch.declined_nodes:
            required = min(required, batch.expected_updates())
        if required is not None and batch.num_accepted < required:
            self._fail_round(server_round, batch)
        agg_seconds = 0.0
        new_params: Parameters | None = None
        error = None
        decisions: dict[str, Any] = {}
        if batch.num_accepted:
            self._trust_weights(server_round, batch)
            start = time.perf_counter()
            try:
                aggregate, report = self._robust_aggregate(batch)
            except ValueError as err:
                # E.g. Krum given fewer updates than n >= 2f + 3: fail the round, not the run.
                error = f"aggregator {self.aggregator_name} failed on {batch.num_accepted} updates: {err}"
                log(WARNING, "round %s: %s; the global adapter is unchanged", server_round, error)
            else:
                agg_seconds = time.perf_counter() - start
                new_params = self.step(aggregate)
                decisions = label_rows(report, batch.row_cids)
        else:
            log(WARNING, "round %s: no valid update; the global adapter is unchanged", server_round)
        self.notify("on_aggregation", server_round, {
            "rule": self.aggregator_name,
            "params": self.aggregator_params,
            "norm_bound": self.norm_bound,
            "updates": batch.row_cids,
            "decisions": decisions,
            **({"error": error} if error else {}),
        })
        if self.recorder is not None:
            self.recorder.on_fit(server_round, batch.clients, batch.rejected, agg_seconds, aggregation_error=error)
        metrics = {"accepted": batch.num_accepted, "rejected": len(batch.rejected), "aggregation_s": agg_seconds}
        if error:
            metrics["aggregation_error"] = error
        self.end_round(server_round)
        return new_params, metrics

    def _trust_weights(self, server_round: int, batch: ReplyBatch) -> None:
        """Replace the claimed example counts by the weights the server grants
        (``strategy.weighting``) and record every claim it bounded."""
        batch.weights, bounded = self.weighting.apply(batch.weights, batch.row_cids)
        for item in bounded:
            self._log_participant(WARNING, "round %s: client %s claimed %g examples; weighted as %g "
                                  "(strategy.weighting=%s)", server_round, item["cid"], item["claimed"],
                                  item["used"], self.weighting.rule)
        if bounded:
            self.notify("on_weights", server_round, bounded)

    def _fail_round(self, server_round: int, batch: ReplyBatch) -> None:
        reasons = "; ".join(sorted({str(r.get("reason")) for r in batch.rejected}))
        error = (
            f"round {server_round} failed: {batch.num_accepted} valid update(s) from {batch.num_results} result(s) "
            f"and {batch.num_failures} failure(s), fewer than federation.min_fit_results={self.min_fit_results}"
            + (f" ({reasons})" if reasons else " (too few clients were available to sample)")
        )
        if batch.num_results == 0 and "round_timeout_s" in reasons:
            error += ("; not one client finished its round before the deadline, which is shorter than a client's "
                      "local training: raise federation.round_timeout_s")
        log(WARNING, "%s", error)
        if self.recorder is not None:
            self.recorder.on_fit(server_round, batch.clients, batch.rejected, 0.0, aggregation_error=error)
        self.end_round(server_round)
        raise RoundFailed(error)

    def _robust_aggregate(self, batch: ReplyBatch) -> tuple[np.ndarray, dict[str, Any]]:
        """The aggregate and what the rule (and norm bounding) decided, by row."""
        updates, weights = batch.updates, batch.weights
        report: dict[str, Any] = {}
        params = dict(self.aggregator_params)
        if self._takes_steps:
            params["local_steps"] = batch.row_steps
        if self._takes_reference:
            params["reference"] = self.reference
        if self._takes_report or self.norm_bound is not None:
            params["report"] = report
        if self.ranks is not None and self.ranks.aggregation == "svd":
            # FlexLoRA: the mean of the clients' products B_k A_k, refactored at the global rank.
            return flexlora(self.global_arrays, updates, weights, batch.row_ranks, self.layout), report
        aggregate = self.aggregate(updates, weights, **params)
        if self._takes_reference:
            self.reference = np.asarray(aggregate, dtype=np.float32).copy()
        return aggregate, report

    def step(self, aggregate: np.ndarray) -> Parameters:
        """The server step: the optimiser's move for ``aggregate`` added to the global adapter."""
        step = unflatten(self.optimizer.step(aggregate), self.global_arrays)
        self.global_arrays = [g + s for g, s in zip(self.global_arrays, step)]
        if self.ranks is not None:
            self._adapt_rank()
        return ndarrays_to_parameters(self.global_arrays)

    def _adapt_rank(self) -> None:
        """Under ``lora.adaptive_energy``: refactor the global adapter in singular-value
        order (the same products B A), so that a cap drops the weakest directions, and cap
        the next round's ranks at the smallest one holding that share of the energy."""
        if self.ranks.adaptive_energy is not None:
            self.global_arrays, spectra = svd_order(self.global_arrays, self.layout)
            self.rank_cap = energy_rank(spectra, self.ranks.adaptive_energy)
        self.notify("on_ranks", self.started_round, {
            "global_rank": self.ranks.global_rank, "aggregation": self.ranks.aggregation,
            "next_rank_cap": self.rank_cap})

    # -- state -------------------------------------------------------------------
    def end_round(self, server_round: int) -> None:
        self.completed_round = server_round
        if self.on_round_end is not None:
            self.on_round_end(server_round, self)

    def checkpoint(self, server_round: int) -> Checkpoint:
        """Everything needed to continue after ``server_round`` (see :mod:`fedlora.record.checkpoint`)."""
        # No generator state: every round draws fresh randomness (see NoiseSource).
        state = {"exhausted": sorted(self.exhausted), "experiment_id": self.experiment_id,
                 "started_round": max(self.started_round, server_round),
                 "server_optimizer": self.optimizer.state(), "rank_cap": self.rank_cap}
        arrays = {} if self.reference is None else {"reference": self.reference}
        arrays.update(self.optimizer.state_arrays())
        return Checkpoint(round=server_round, global_arrays=list(self.global_arrays), state=state, arrays=arrays)

    def restore(self, ckpt: Checkpoint) -> None:
        self.global_arrays = [np.asarray(a, dtype=np.float32) for a in ckpt.global_arrays]
        # A round that was started may have been trained and spent: it is never run again.
        self.round_offset = max(int(ckpt.round), int(ckpt.state.get("started_round", 0)))
        self.started_round = self.round_offset
        self.completed_round = int(ckpt.round)
        self.exhausted = set(ckpt.state.get("exhausted", []))
        self.experiment_id = str(ckpt.state.get("experiment_id") or self.experiment_id)
        self.reference = ckpt.arrays.get("reference")
        self.optimizer.restore(ckpt.state.get("server_optimizer") or {}, ckpt.arrays)
        cap = ckpt.state.get("rank_cap")
        self.rank_cap = None if cap is None else int(cap)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        server_round += self.round_offset
        if self.evaluation == DP:
            return self._aggregate_noisy_counts(server_round, results)
        valid = [(proxy, r) for proxy, r in results if r.num_examples > 0 and math.isfinite(r.loss)]
        if not valid:
            return None, {}
        # Each client's claims, summarised by their median (strategies.client_reports): a
        # weighted mean would follow one client claiming loss 0 on 10^9 examples.
        cids = [self._reporter(proxy, r) for proxy, r in valid]
        loss = summarise({c: float(r.loss) for c, (_, r) in zip(cids, valid)})
        acc = summarise({c: reported_float(r.metrics.get("accuracy")) for c, (_, r) in zip(cids, valid)})
        self.client_losses.update({proxy.cid: float(r.loss) for proxy, r in valid})
        outliers = sorted(set(loss.outliers) | set(acc.outliers))
        self._flag_outliers(server_round, outliers)
        if self.recorder is not None:
            self.recorder.on_federated_evaluate(server_round, loss.median, acc.median, len(valid), outliers=outliers)
        return loss.median, ({} if acc.median is None else {"accuracy": acc.median})

    def _reporter(self, proxy: ClientProxy, res: EvaluateRes) -> str:
        return str(res.metrics.get("partition_id", self.node_clients.get(str(proxy.cid), proxy.cid)))

    def _flag_outliers(self, server_round: int, outliers: list[str]) -> None:
        for cid in outliers:
            self._log_participant(WARNING, "round %s: client %s reported evaluation numbers far from the other "
                                  "clients' (an outlier; the median is what the run reports)", server_round, cid)

    def _aggregate_noisy_counts(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]]):
        """``privacy.evaluation=dp``: each client's noisy accuracy from its noisy counts
        (post-processing of its release), their median the federation's; every
        release's spend joins the ledger. A release whose spend record is malformed is
        left out whole."""
        released = []
        for proxy, r in results:
            m = r.metrics
            if NOISY_CORRECT not in m or NOISY_EXAMPLES not in m:
                continue
            try:
                history = parse_history(m["dp_history"]) if m.get("dp_history") else None
            except MalformedReply as err:
                log(WARNING, "round %s: evaluation reply of node %s ignored: %s", server_round, proxy.cid, err)
                continue
            released.append((proxy, m, history))
        rates = {}
        for proxy, m, _ in released:
            counts = (reported_float(m[NOISY_CORRECT]), reported_float(m[NOISY_EXAMPLES]))
            rate = federated_accuracy([counts]) if all(map(math.isfinite, counts)) else math.nan
            if rate is None:
                continue
            rates[str(m.get("partition_id", proxy.cid))] = rate
            if math.isfinite(rate):
                self.client_losses[proxy.cid] = 1.0 - rate
        acc = summarise(rates)
        self._flag_outliers(server_round, list(acc.outliers))
        if self.recorder is not None:
            clients = [{"cid": str(m.get("partition_id")), "privacy_unit": m.get("privacy_unit"),
                        "delta": m.get("delta"), "dp_history": history}
                       for _, m, history in released if history]
            self.recorder.on_federated_evaluate(server_round, None, acc.median, len(released), mode=DP,
                                                clients=clients, outliers=list(acc.outliers))
        return None, ({} if acc.median is None else {"accuracy": acc.median})

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        server_round += self.round_offset
        if self.evaluate_fn is None:
            return None
        loss, metrics = self.evaluate_fn(server_round, self.global_arrays)
        if self.recorder is not None:
            self.recorder.on_evaluate(server_round, loss, metrics)
        return loss, metrics
