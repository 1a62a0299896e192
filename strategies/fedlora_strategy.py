"""A Flower strategy that aggregates LoRA *deltas* with a pluggable aggregation rule.

Clients return ``local - global`` for the adapter tensors. Each update is validated
(tensor count, shapes, floating dtype, finite values) before it is stacked into one
(n, d) float32 matrix; a malformed update is counted as a failure with its reason and
never reaches the aggregator, so one broken client cannot crash or poison the round.
The aggregate is applied as a server step ``global += server_lr * aggregate``
(server_lr = 1 is FedAvg; Reddi et al. 2021 for server optimizers).

It subclasses the compatibility ``flwr.server.strategy.Strategy`` because Flower's
SecAgg+ workflow runs only there (see design.md).
"""

from __future__ import annotations

import contextlib
import inspect
import json
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
    GetPropertiesIns,
    Parameters,
    Scalar,
    log,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import Strategy

from fedlora.privacy.calibration import ClientDPPlan
from fedlora.privacy.randomness import SERVER_NOISE, SERVER_SAMPLING, NoiseSource
from strategies.aggregators import get_aggregator, label_rows, norm_bound
from strategies.client_dp import gaussian_fedavg, poisson_sample
from fedlora.checkpoint import Checkpoint
from fedlora.client_state import EXPERIMENT_KEY, HISTORY_KEY
from fedlora.lora import flatten, unflatten
from fedlora.reply import FitReply
from strategies.validation import validate_update

EvaluateFn = Callable[[int, list[np.ndarray]], tuple[float, dict[str, Scalar]]]


class RoundFailed(RuntimeError):
    """Fewer valid results than the round needs; the run stops after checkpointing."""


class _Excluding(Criterion):
    """Sample only clients not in ``excluded`` (e.g. those whose budget is spent)."""

    def __init__(self, excluded: set[str]) -> None:
        self.excluded = excluded

    def select(self, client: ClientProxy) -> bool:
        return client.cid not in self.excluded


def payload_bytes(parameters: Parameters) -> int:
    """Bytes of the serialized tensors in a message (Flower's framing not counted)."""
    return sum(len(t) for t in parameters.tensors)


def failure_reason(failure: Any, limit: int = 400) -> str:
    """A client failure in one readable line: the last line of its error, shortened."""
    if isinstance(failure, BaseException):
        text = str(failure)
    else:
        text = f"status {failure[1].status.code.name}: {failure[1].status.message}"
    lines = [ln.strip() for ln in text.replace("\\n", "\n").splitlines() if ln.strip()]
    last = lines[-1] if lines else type(failure).__name__
    return last[-limit:]


class FedLoRAStrategy(Strategy):
    """Sample clients, validate their LoRA deltas, aggregate, step the global adapter.

    Parameters
    ----------
    initial_arrays : list[np.ndarray]
        The initial global adapter (trainable tensors in a fixed order).
    aggregator : str, default "fedavg"
        Name in ``strategies.aggregators`` or a dotted path to a function.
    aggregator_params : dict, optional
        Keyword arguments of the aggregator.
    norm_bound : float, optional
        Clip every update to this L2 norm before the aggregator (Sun et al. 2019).
    server_lr : float, default 1.0
        Step size of the server update on the aggregated delta.
    fraction_fit, fraction_evaluate : float
        Fraction of available clients sampled for training / federated evaluation.
    min_fit_clients, min_evaluate_clients, min_available_clients : int
        Lower bounds on sampled and connected clients.
    evaluate_fn : callable, optional
        Centralized evaluation ``(round, arrays) -> (loss, metrics)`` on the server.
    recorder : object, optional
        Receives ``on_fit``, ``on_evaluate`` and ``on_federated_evaluate`` per round
        (and ``on_client_dp`` under client-level DP); if it defines them, also
        ``on_sample`` (whom configure_fit sampled, and how) and ``on_aggregation`` (the
        rule, its parameters and its decisions per client) for the audit log.
    client_dp : ClientDPPlan, optional
        Client-level DP (DP-FedAvg): Poisson sampling of clients at the plan's rate,
        clipping, and Gaussian noise on the sum replace sampling and the aggregator
        (see :mod:`strategies.client_dp`).
    noise : NoiseSource, optional
        Where the randomness of client sampling and DP noise comes from: fresh OS
        entropy every round (default), or derived from ``privacy.noise_seed`` (not
        private). No generator outlives its round, so no state can leak through a
        checkpoint.
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
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int = 2,
        min_evaluate_clients: int = 2,
        min_available_clients: int = 2,
        evaluate_fn: EvaluateFn | None = None,
        recorder: Any = None,
        client_dp: ClientDPPlan | None = None,
        noise: NoiseSource | None = None,
        experiment_id: str = "",
        on_round_start: Callable[[int, "FedLoRAStrategy"], None] | None = None,
        on_round_end: Callable[[int, "FedLoRAStrategy"], None] | None = None,
        min_fit_results: int | None = None,
    ) -> None:
        super().__init__()
        self.global_arrays = [np.asarray(a, dtype=np.float32) for a in initial_arrays]
        self.aggregator_name = aggregator
        self.aggregate = get_aggregator(aggregator)
        self.aggregator_params = dict(aggregator_params or {})
        self.norm_bound = None if norm_bound is None else float(norm_bound)
        # Stateful rules (centered clipping) take the previous aggregate as reference.
        self.reference: np.ndarray | None = None
        signature = inspect.signature(self.aggregate).parameters
        self._takes_reference = "reference" in signature
        # Rules that can explain their decisions fill a ``report`` dict (audit log);
        # others (e.g. a user's rule) are called exactly as before.
        self._takes_report = "report" in signature
        self.server_lr = float(server_lr)
        self.fraction_fit = float(fraction_fit)
        self.fraction_evaluate = float(fraction_evaluate)
        self.min_fit_clients = int(min_fit_clients)
        self.min_evaluate_clients = int(min_evaluate_clients)
        self.min_available_clients = int(min_available_clients)
        self.evaluate_fn = evaluate_fn
        self.recorder = recorder
        self.client_dp = client_dp
        self.on_round_start = on_round_start
        self.on_round_end = on_round_end
        self.min_fit_results = None if min_fit_results is None else int(min_fit_results)
        # After a resume Flower counts rounds from 1 again; ours continue from the checkpoint.
        self.round_offset = 0
        # After a resume: each client's sample-level history as the ledger holds it, sent
        # to that client alone with its first fit instruction (a client that lost its own
        # record continues from it; one that kept it takes it only if it extends its own).
        self.pending_histories: dict[str, list[list[float]]] = {}
        # Flower node id -> client id, learned from replies (or asked, after a resume).
        self.node_clients: dict[str, str] = {}
        self.noise = noise or NoiseSource()
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
        if self.client_dp is not None:
            p = self.client_dp
            return (
                f"FedLoRAStrategy(client-level DP-FedAvg: Poisson client sampling q={p.sample_rate:g}, "
                f"clipping_norm={p.clipping_norm:g}, noise_multiplier={p.noise_multiplier:.4f}, "
                f"target eps={p.target_epsilon:g} delta={p.delta:g} (client-level), server_lr={self.server_lr}, "
                f"d={sum(a.size for a in self.global_arrays)})"
            )
        return (
            f"FedLoRAStrategy(aggregator={self.aggregator_name}{self.aggregator_params or ''}, "
            f"norm_bound={self.norm_bound}, server_lr={self.server_lr}, "
            f"fraction_fit={self.fraction_fit}, min_fit_clients={self.min_fit_clients}, "
            f"d={sum(a.size for a in self.global_arrays)})"
        )

    # -- sampling ------------------------------------------------------------------
    def _notify(self, event: str, *args: Any, **kwargs: Any) -> None:
        """Optional recorder events: a recorder without them (tests' fakes) still works."""
        handler = getattr(self.recorder, event, None)
        if handler is not None:
            handler(*args, **kwargs)

    def _log_participant(self, level: int, msg: str, *args: Any) -> None:
        """A log line about one participant: not under client-level DP, where who took
        part is secret (the server-internal record has it)."""
        if self.client_dp is None:
            log(level, msg, *args)

    def secagg_halted(self, server_round: int) -> None:
        """SecAgg+ could not finish the round (it is replayed unmasked, see server_app):
        a fact about the draw, for the server-internal record only."""
        self._notify("on_secagg_halted", server_round)

    def _num(self, fraction: float, minimum: int, available: int) -> int:
        return max(math.ceil(fraction * available), minimum)

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        log(INFO, "%s", self)
        return ndarrays_to_parameters(self.global_arrays)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        server_round += self.round_offset
        if self._replaying:
            return self._instructions
        self.started_round = server_round
        if self.on_round_start is not None:
            self.on_round_start(server_round, self)
        self._instructions = self._with_histories(server_round, self._configure_fit(server_round, client_manager))
        return self._instructions

    @contextlib.contextmanager
    def replaying(self):
        """``configure_fit`` returns the started round's instructions again (same draw)."""
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False

    def _configure_fit(self, server_round: int, client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        # The strategy's own global adapter is canonical: a client-level DP round in
        # which nobody was sampled still moves it (by noise), which Flower never sees.
        config: dict[str, Scalar] = {"server_round": server_round, EXPERIMENT_KEY: self.experiment_id}
        ins = FitIns(ndarrays_to_parameters(self.global_arrays), config)
        self.bytes_down_per_client = payload_bytes(ins.parameters)
        if self.client_dp is not None:
            return self._configure_poisson(server_round, client_manager, ins)
        # Nodes connect asynchronously (SuperNodes, simulation actors): wait for the minimum.
        client_manager.wait_for(self.min_available_clients)
        eligible = client_manager.num_available() - len(self.exhausted)
        n = self._num(self.fraction_fit, self.min_fit_clients, eligible)
        if n > eligible:
            log(WARNING, "round %s: %s clients with budget left, fewer than the %s needed; no training",
                server_round, eligible, n)
            return []
        clients = client_manager.sample(
            num_clients=n, min_num_clients=self.min_available_clients, criterion=_Excluding(self.exhausted)
        )
        self._notify("on_sample", server_round, [c.cid for c in clients], method="uniform without replacement",
                     fraction_fit=self.fraction_fit, eligible=eligible, excluded_out_of_budget=sorted(self.exhausted))
        return [(c, ins) for c in clients]

    def _with_histories(
        self, server_round: int, instructions: list[tuple[ClientProxy, FitIns]]
    ) -> list[tuple[ClientProxy, FitIns]]:
        """After a resume, each sampled client's own ledger history in its own instruction
        (never another client's). The node's client id is asked once (get_properties)."""
        if not self.pending_histories:
            return instructions
        out = []
        for proxy, ins in instructions:
            cid = self.node_clients.get(proxy.cid)
            if cid is None:
                res = proxy.get_properties(GetPropertiesIns({}), timeout=None, group_id=server_round)
                cid = str(res.properties.get("partition_id", ""))
                self.node_clients[proxy.cid] = cid
            history = self.pending_histories.get(cid)
            if history:
                ins = FitIns(ins.parameters, {**ins.config, HISTORY_KEY: json.dumps(history)})
            out.append((proxy, ins))
        return out

    def _configure_poisson(
        self, server_round: int, client_manager: ClientManager, ins: FitIns
    ) -> list[tuple[ClientProxy, FitIns]]:
        client_manager.wait_for(self.min_available_clients)
        pool = client_manager.all()
        chosen = poisson_sample(sorted(pool), self.client_dp.sample_rate,
                                self.noise.numpy_generator(SERVER_SAMPLING, server_round))
        # Poisson sampling is what the client-level accountant assumes: record it as such.
        self._notify("on_sample", server_round, list(chosen), method="poisson",
                     sample_rate=self.client_dp.sample_rate, eligible=len(pool))
        if not chosen:  # released as noise alone; not logged (the count is secret)
            self._aggregate_client_dp(server_round, self._stack([]), [], [])
        return [(pool[cid], ins) for cid in chosen]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        server_round += self.round_offset
        if self.fraction_evaluate <= 0:
            return []
        n = self._num(self.fraction_evaluate, self.min_evaluate_clients, client_manager.num_available())
        clients = client_manager.sample(num_clients=n, min_num_clients=self.min_available_clients)
        ins = EvaluateIns(ndarrays_to_parameters(self.global_arrays), {"server_round": server_round})
        return [(c, ins) for c in clients]

    # -- aggregation ---------------------------------------------------------------
    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.round_offset
        clients: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        accepted: list[tuple[list[np.ndarray], int]] = []
        row_cids: list[Any] = []  # the client behind each row of the stacked updates
        for proxy, res in results:
            reply = FitReply.from_metrics(res.metrics, default_partition=proxy.cid)
            info = {**reply.as_record(), "node_id": proxy.cid,
                    "bytes_up": payload_bytes(res.parameters), "bytes_down": self.bytes_down_per_client}
            self.node_clients[proxy.cid] = str(info["cid"])
            # A client that replied holds its history; it needs none from us again.
            self.pending_histories.pop(str(info["cid"]), None)
            if reply.declined:
                self.exhausted.add(proxy.cid)
                info["accepted"] = False
                clients.append(info)
                self._log_participant(INFO, "round %s: client %s declined (%s); no longer sampled", server_round,
                                      info["cid"], reply.reason)
                continue
            arrays = parameters_to_ndarrays(res.parameters)
            reason = validate_update(arrays, self.global_arrays)
            if reason is None and res.num_examples <= 0:
                reason = f"num_examples must be positive, got {res.num_examples}"
            info["accepted"] = reason is None
            if reason is None:
                accepted.append((arrays, res.num_examples))
                row_cids.append(info["cid"])
            else:
                info["reason"] = reason
                rejected.append(info)
                self._log_participant(WARNING, "round %s: rejected update from client %s: %s", server_round,
                                      info["cid"], reason)
            clients.append(info)
        for failure in failures:
            reason = failure_reason(failure)
            node = None if isinstance(failure, BaseException) else failure[0].cid
            rejected.append({"cid": None, "node_id": node, "accepted": False, "reason": reason,
                             "bytes_down": self.bytes_down_per_client})
            self._log_participant(WARNING, "round %s: client failure: %s", server_round, reason)

        if self.client_dp is not None:
            return self._aggregate_client_dp(server_round, self._stack(accepted), clients, rejected)
        # Declining (budget spent) is planned, not a failure: when clients declined, the
        # minimum is capped by those that were still expected to train.
        declined = sum(bool(c.get("declined")) for c in clients)
        required = self.min_fit_results
        if required is not None and declined:
            required = min(required, len(results) + len(failures) - declined)
        if required is not None and len(accepted) < required:
            self._fail_round(server_round, clients, rejected, len(accepted))
        agg_seconds = 0.0
        new_params: Parameters | None = None
        error = None
        decisions: dict[str, Any] = {}
        if accepted:
            updates = self._stack(accepted)
            weights = np.asarray([n for _, n in accepted], dtype=np.float64)
            start = time.perf_counter()
            try:
                aggregate, report = self._robust_aggregate(updates, weights)
            except ValueError as err:
                # E.g. Krum given fewer updates than n >= 2f + 3: fail the round, not the run.
                error = f"aggregator {self.aggregator_name} failed on {len(accepted)} updates: {err}"
                log(WARNING, "round %s: %s; the global adapter is unchanged", server_round, error)
            else:
                agg_seconds = time.perf_counter() - start
                new_params = self._step(aggregate)
                decisions = label_rows(report, row_cids)
        else:
            log(WARNING, "round %s: no valid update; the global adapter is unchanged", server_round)
        self._notify("on_aggregation", server_round, {
            "rule": self.aggregator_name,
            "params": self.aggregator_params,
            "norm_bound": self.norm_bound,
            "updates": row_cids,
            "decisions": decisions,
            **({"error": error} if error else {}),
        })
        if self.recorder is not None:
            self.recorder.on_fit(server_round, clients, rejected, agg_seconds, aggregation_error=error)
        metrics = {"accepted": len(accepted), "rejected": len(rejected), "aggregation_s": agg_seconds}
        if error:
            metrics["aggregation_error"] = error
        self._end_round(server_round)
        return new_params, metrics

    def _fail_round(self, server_round: int, clients: list[dict], rejected: list[dict], valid: int) -> None:
        reasons = "; ".join(sorted({str(r.get("reason")) for r in rejected}))
        error = (
            f"round {server_round} failed: {valid} valid update(s) from {len(clients)} result(s) and "
            f"{len(rejected) - sum(r.get('cid') is not None for r in rejected)} failure(s), fewer than "
            f"federation.min_fit_results={self.min_fit_results}" + (f" ({reasons})" if reasons else
            " (too few clients were available to sample)")
        )
        log(WARNING, "%s", error)
        if self.recorder is not None:
            self.recorder.on_fit(server_round, clients, rejected, 0.0, aggregation_error=error)
        self._end_round(server_round)
        raise RoundFailed(error)

    def _robust_aggregate(self, updates: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """The aggregate and what the rule (and norm bounding) decided, by row."""
        report: dict[str, Any] = {}
        if self.norm_bound is not None:
            updates = norm_bound(updates, self.norm_bound, report=report.setdefault("norm_bound", {}))
        params = dict(self.aggregator_params)
        if self._takes_reference:
            params["reference"] = self.reference
        if self._takes_report:
            params["report"] = report
        aggregate = self.aggregate(updates, weights, **params)
        if self._takes_reference:
            self.reference = np.asarray(aggregate, dtype=np.float32).copy()
        return aggregate, report

    def _stack(self, accepted: list[tuple[list[np.ndarray], int]]) -> np.ndarray:
        d = sum(a.size for a in self.global_arrays)
        updates = np.empty((len(accepted), d), dtype=np.float32)
        for row, (arrays, _) in enumerate(accepted):
            updates[row] = flatten(arrays)
        return updates

    def _step(self, aggregate: np.ndarray) -> Parameters:
        step = unflatten(self.server_lr * aggregate, self.global_arrays)
        self.global_arrays = [g + s for g, s in zip(self.global_arrays, step)]
        return ndarrays_to_parameters(self.global_arrays)

    def _aggregate_client_dp(
        self, server_round: int, updates: np.ndarray, clients: list[dict], rejected: list[dict]
    ) -> tuple[Parameters, dict[str, Scalar]]:
        """One release of the client-level Gaussian mechanism, even with no update."""
        plan = self.client_dp
        start = time.perf_counter()
        release = gaussian_fedavg(updates, plan.clipping_norm, plan.noise_multiplier, plan.expected_clients,
                                  self.noise.numpy_generator(SERVER_NOISE, server_round))
        agg_seconds = time.perf_counter() - start
        new_params = self._step(release.aggregate)
        # How many took part and were clipped is secret (amplification by subsampling).
        log(INFO, "round %s: client-level DP-FedAvg released, noise std on the mean %.3g", server_round,
            release.noise_std)
        self._notify("on_aggregation", server_round, {
            "rule": "gaussian_fedavg (client-level DP-FedAvg)",
            "params": {"clipping_norm": plan.clipping_norm, "noise_multiplier": plan.noise_multiplier,
                       "expected_clients": plan.expected_clients},
            "updates": [c["cid"] for c in clients if c.get("accepted")],
            "decisions": {"clipped_count": int(release.clipped), "noise_std_on_mean": float(release.noise_std)},
        })
        if self.recorder is not None:
            self.recorder.on_fit(server_round, clients, rejected, agg_seconds)
            self.recorder.on_client_dp(server_round, plan, release.clipped)
        metrics = {"accepted": release.num_clients, "rejected": len(rejected), "aggregation_s": agg_seconds}
        self._end_round(server_round)
        return new_params, metrics

    # -- state -------------------------------------------------------------------
    def release_noise_only(self, server_round: int) -> None:
        """A client-level DP round whose fit could not run (e.g. SecAgg+ halted): the
        mechanism still releases its noise and the round is in the ledger."""
        self._aggregate_client_dp(server_round, self._stack([]), [], [])

    def _end_round(self, server_round: int) -> None:
        self.completed_round = server_round
        if self.on_round_end is not None:
            self.on_round_end(server_round, self)

    def checkpoint(self, server_round: int) -> Checkpoint:
        """Everything needed to continue after ``server_round`` (see :mod:`fedlora.checkpoint`)."""
        # No generator state: every round draws fresh randomness (see NoiseSource).
        state = {"exhausted": sorted(self.exhausted), "experiment_id": self.experiment_id,
                 "started_round": max(self.started_round, server_round)}
        arrays = {} if self.reference is None else {"reference": self.reference}
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

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        server_round += self.round_offset
        valid = [r for _, r in results if r.num_examples > 0 and math.isfinite(r.loss)]
        total = sum(r.num_examples for r in valid)
        if total == 0:
            return None, {}
        loss = sum(r.loss * r.num_examples for r in valid) / total
        acc = sum(float(r.metrics.get("accuracy", 0.0)) * r.num_examples for r in valid) / total
        if self.recorder is not None:
            self.recorder.on_federated_evaluate(server_round, loss, acc, len(valid))
        return loss, {"accuracy": acc}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        server_round += self.round_offset
        if self.evaluate_fn is None:
            return None
        loss, metrics = self.evaluate_fn(server_round, self.global_arrays)
        if self.recorder is not None:
            self.recorder.on_evaluate(server_round, loss, metrics)
        return loss, metrics
