"""Client-level DP-FedAvg as a wrapper around the aggregating strategy.

McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
Language Models" (https://arxiv.org/abs/1710.06963). The wrapped
:class:`~strategies.fedlora_strategy.FedLoRAStrategy` keeps its round bookkeeping,
reply triage, server step, checkpoint and evaluation; the wrapper replaces the two
steps the guarantee rests on:

- **sampling**: every client independently with probability q (Poisson sampling, as
  the subsampled-Gaussian accountant assumes), from generators that are fresh each
  round (:class:`~fedlora.privacy.randomness.NoiseSource`);
- **aggregation**: the Gaussian mechanism on the sum of clipped deltas over the
  expected number of clients (:func:`fedlora.privacy.dp_fedavg.gaussian_fedavg`). It
  releases every round, even one in which nobody was sampled or every reply failed.

Who took part and how many were clipped is secret under this mechanism: the wrapper
turns off the inner strategy's log lines about participants.

This is the shape of Flower's ``DifferentialPrivacyServerSideFixedClipping``, which is
not reused because it assumes full weights (ours are deltas), a fixed number of
sampled clients and noise scaled by the realised count.
"""

from __future__ import annotations

import time
from logging import INFO
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

from fedlora.privacy.calibration import ClientDPPlan
from fedlora.privacy.dp_fedavg import gaussian_fedavg, poisson_sample
from fedlora.privacy.randomness import SERVER_NOISE, SERVER_SAMPLING, NoiseSource
from strategies.fedlora_strategy import FedLoRAStrategy
from strategies.triage import ReplyBatch


class ClientLevelDP(Strategy):
    """``strategy`` with client-level DP-FedAvg sampling and release.

    Parameters
    ----------
    strategy : FedLoRAStrategy
        The aggregating strategy (its rule must be ``fedavg``: only the mean of clipped
        updates has the sensitivity C; preflight checks it).
    plan : ClientDPPlan
        Sampling rate, clipping norm, noise multiplier and expected clients per round.
    noise : NoiseSource, optional
        Where the sampling and noise randomness comes from: fresh OS entropy every round
        (default), or derived from ``privacy.noise_seed`` (not private). No generator
        outlives its round, so no state can leak through a checkpoint.
    """

    def __init__(self, strategy: FedLoRAStrategy, plan: ClientDPPlan, noise: NoiseSource | None = None) -> None:
        self.strategy = strategy
        self.plan = plan
        self.noise = noise or NoiseSource()
        strategy.participation_public = False

    _OWN = ("strategy", "plan", "noise")

    # Round state, checkpoint, restore and replay belong to the wrapped strategy: reads
    # and writes of anything but the wrapper's own three attributes go to it.
    def __getattr__(self, name: str) -> Any:
        if name in self._OWN:
            raise AttributeError(name)
        return getattr(self.strategy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.strategy, name, value)

    def __repr__(self) -> str:
        p = self.plan
        return (
            f"ClientLevelDP(DP-FedAvg: Poisson client sampling q={p.sample_rate:g}, "
            f"clipping_norm={p.clipping_norm:g}, noise_multiplier={p.noise_multiplier:.4f}, "
            f"target eps={p.target_epsilon:g} delta={p.delta:g} (client-level), "
            f"server_lr={self.strategy.server_lr}, d={self.strategy.dimension})"
        )

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        log(INFO, "%s", self)
        return ndarrays_to_parameters(self.strategy.global_arrays)

    # -- sampling ------------------------------------------------------------------
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self.strategy.fit_round(server_round, client_manager, self._poisson)

    def _poisson(self, server_round: int, client_manager: ClientManager, ins: FitIns) -> list[tuple[ClientProxy, FitIns]]:
        client_manager.wait_for(self.strategy.min_available_clients)
        pool = client_manager.all()
        chosen = poisson_sample(sorted(pool), self.plan.sample_rate,
                                self.noise.numpy_generator(SERVER_SAMPLING, server_round))
        # Poisson sampling is what the client-level accountant assumes: record it as such.
        self.strategy.notify("on_sample", server_round, list(chosen), method="poisson",
                             sample_rate=self.plan.sample_rate, eligible=len(pool))
        if not chosen:  # released as noise alone; not logged (the count is secret)
            self._release(server_round, ReplyBatch(updates=self._empty()))
        return [(pool[cid], ins) for cid in chosen]

    # -- release -------------------------------------------------------------------
    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.strategy.round_offset
        return self._release(server_round, self.strategy.triage(server_round, results, failures))

    def release_noise_only(self, server_round: int) -> None:
        """A round whose fit could not run (e.g. SecAgg+ halted): the mechanism still
        releases its noise and the round is in the ledger."""
        self._release(server_round, ReplyBatch(updates=self._empty()))

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.strategy.dimension), np.float32)

    def _release(self, server_round: int, batch: ReplyBatch) -> tuple[Parameters, dict[str, Scalar]]:
        """One release of the Gaussian mechanism, even with no update."""
        plan, inner = self.plan, self.strategy
        start = time.perf_counter()
        release = gaussian_fedavg(batch.updates, plan.clipping_norm, plan.noise_multiplier, plan.expected_clients,
                                  self.noise.numpy_generator(SERVER_NOISE, server_round))
        agg_seconds = time.perf_counter() - start
        new_params = inner.step(release.aggregate)
        # How many took part and were clipped is secret (amplification by subsampling).
        log(INFO, "round %s: client-level DP-FedAvg released, noise std on the mean %.3g", server_round,
            release.noise_std)
        inner.notify("on_aggregation", server_round, {
            "rule": "gaussian_fedavg (client-level DP-FedAvg)",
            "params": {"clipping_norm": plan.clipping_norm, "noise_multiplier": plan.noise_multiplier,
                       "expected_clients": plan.expected_clients},
            "updates": list(batch.row_cids),
            "decisions": {"clipped_count": int(release.clipped), "noise_std_on_mean": float(release.noise_std)},
        })
        if inner.recorder is not None:
            inner.recorder.on_fit(server_round, batch.clients, batch.rejected, agg_seconds)
            inner.recorder.on_client_dp(server_round, plan, release.clipped)
        metrics = {"accepted": release.num_clients, "rejected": len(batch.rejected), "aggregation_s": agg_seconds}
        inner.end_round(server_round)
        return new_params, metrics

    # -- evaluation: the wrapped strategy's ------------------------------------------
    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.strategy.evaluate(server_round, parameters)
