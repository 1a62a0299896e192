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
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import Strategy

from strategies.aggregators import get_aggregator
from strategies.validation import flatten, unflatten, validate_update

EvaluateFn = Callable[[int, list[np.ndarray]], tuple[float, dict[str, Scalar]]]


class _Excluding(Criterion):
    """Sample only clients not in ``excluded`` (e.g. those whose budget is spent)."""

    def __init__(self, excluded: set[str]) -> None:
        self.excluded = excluded

    def select(self, client: ClientProxy) -> bool:
        return client.cid not in self.excluded


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
    server_lr : float, default 1.0
        Step size of the server update on the aggregated delta.
    fraction_fit, fraction_evaluate : float
        Fraction of available clients sampled for training / federated evaluation.
    min_fit_clients, min_evaluate_clients, min_available_clients : int
        Lower bounds on sampled and connected clients.
    evaluate_fn : callable, optional
        Centralized evaluation ``(round, arrays) -> (loss, metrics)`` on the server.
    recorder : object, optional
        Receives ``on_fit``, ``on_evaluate`` and ``on_federated_evaluate`` per round.
    """

    def __init__(
        self,
        initial_arrays: list[np.ndarray],
        aggregator: str = "fedavg",
        aggregator_params: dict[str, Any] | None = None,
        server_lr: float = 1.0,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int = 2,
        min_evaluate_clients: int = 2,
        min_available_clients: int = 2,
        evaluate_fn: EvaluateFn | None = None,
        recorder: Any = None,
    ) -> None:
        super().__init__()
        self.global_arrays = [np.asarray(a, dtype=np.float32) for a in initial_arrays]
        self.aggregator_name = aggregator
        self.aggregate = get_aggregator(aggregator)
        self.aggregator_params = dict(aggregator_params or {})
        self.server_lr = float(server_lr)
        self.fraction_fit = float(fraction_fit)
        self.fraction_evaluate = float(fraction_evaluate)
        self.min_fit_clients = int(min_fit_clients)
        self.min_evaluate_clients = int(min_evaluate_clients)
        self.min_available_clients = int(min_available_clients)
        self.evaluate_fn = evaluate_fn
        self.recorder = recorder
        # Clients that declined because another round would exceed their privacy budget.
        self.exhausted: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"FedLoRAStrategy(aggregator={self.aggregator_name}, server_lr={self.server_lr}, "
            f"fraction_fit={self.fraction_fit}, min_fit_clients={self.min_fit_clients}, "
            f"d={sum(a.size for a in self.global_arrays)})"
        )

    # -- sampling ------------------------------------------------------------------
    def _num(self, fraction: float, minimum: int, available: int) -> int:
        return max(math.ceil(fraction * available), minimum)

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        log(INFO, "%s", self)
        return ndarrays_to_parameters(self.global_arrays)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.global_arrays = [a.astype(np.float32) for a in parameters_to_ndarrays(parameters)]
        eligible = client_manager.num_available() - len(self.exhausted)
        n = self._num(self.fraction_fit, self.min_fit_clients, eligible)
        if n > eligible:
            log(WARNING, "round %s: %s clients with budget left, fewer than the %s needed; no training",
                server_round, eligible, n)
            return []
        clients = client_manager.sample(
            num_clients=n, min_num_clients=self.min_available_clients, criterion=_Excluding(self.exhausted)
        )
        ins = FitIns(parameters, {"server_round": server_round})
        return [(c, ins) for c in clients]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if self.fraction_evaluate <= 0:
            return []
        n = self._num(self.fraction_evaluate, self.min_evaluate_clients, client_manager.num_available())
        clients = client_manager.sample(num_clients=n, min_num_clients=self.min_available_clients)
        ins = EvaluateIns(parameters, {"server_round": server_round})
        return [(c, ins) for c in clients]

    # -- aggregation ---------------------------------------------------------------
    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        clients: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        accepted: list[tuple[list[np.ndarray], int]] = []
        for proxy, res in results:
            info = {"cid": res.metrics.get("partition_id", proxy.cid), **res.metrics}
            if res.metrics.get("declined"):
                self.exhausted.add(proxy.cid)
                info["accepted"] = False
                clients.append(info)
                log(INFO, "round %s: client %s declined (%s); no longer sampled", server_round,
                    info["cid"], res.metrics.get("reason"))
                continue
            arrays = parameters_to_ndarrays(res.parameters)
            reason = validate_update(arrays, self.global_arrays)
            if reason is None and res.num_examples <= 0:
                reason = f"num_examples must be positive, got {res.num_examples}"
            info["accepted"] = reason is None
            if reason is None:
                accepted.append((arrays, res.num_examples))
            else:
                info["reason"] = reason
                rejected.append(info)
                log(WARNING, "round %s: rejected update from client %s: %s", server_round, info["cid"], reason)
            clients.append(info)
        for failure in failures:
            reason = failure_reason(failure)
            rejected.append({"cid": None, "accepted": False, "reason": reason})
            log(WARNING, "round %s: client failure: %s", server_round, reason)

        agg_seconds = 0.0
        new_params: Parameters | None = None
        if accepted:
            d = sum(a.size for a in self.global_arrays)
            updates = np.empty((len(accepted), d), dtype=np.float32)
            for row, (arrays, _) in enumerate(accepted):
                updates[row] = flatten(arrays)
            weights = np.asarray([n for _, n in accepted], dtype=np.float64)
            start = time.perf_counter()
            aggregate = self.aggregate(updates, weights, **self.aggregator_params)
            agg_seconds = time.perf_counter() - start
            step = unflatten(self.server_lr * aggregate, self.global_arrays)
            self.global_arrays = [g + s for g, s in zip(self.global_arrays, step)]
            new_params = ndarrays_to_parameters(self.global_arrays)
        else:
            log(WARNING, "round %s: no valid update; the global adapter is unchanged", server_round)
        if self.recorder is not None:
            self.recorder.on_fit(server_round, clients, rejected, agg_seconds)
        metrics = {"accepted": len(accepted), "rejected": len(rejected), "aggregation_s": agg_seconds}
        return new_params, metrics

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
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
        if self.evaluate_fn is None:
            return None
        loss, metrics = self.evaluate_fn(server_round, parameters_to_ndarrays(parameters))
        if self.recorder is not None:
            self.recorder.on_evaluate(server_round, loss, metrics)
        return loss, metrics
