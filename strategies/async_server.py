"""Asynchronous federated learning (``federation.mode=async``): FedBuff on Flower's
Message API.

Flower's compatibility workflow runs synchronous rounds; here the ServerApp drives the
:class:`~flwr.server.Grid` itself (push / pull). ``concurrency`` clients train at any
time, each on the global adapter it was sent; every reply is triaged as it arrives
(the same validation, reply checks and ledger as a synchronous round), its staleness
is the number of global steps taken since its adapter was sent, and once
``buffer_size`` fresh-enough updates are in, the configured aggregation rule steps the
global adapter (:mod:`strategies.fedbuff`: each update scaled by its staleness weight).
A client that replied is sent the newest adapter at once, so no one waits for the
slowest.

A *version* (one global step) is what a synchronous run calls a round: it is recorded,
checkpointed, evaluated on the server's test split and audited the same way, and
``federation.rounds`` of them make the run. A training instruction carries the version
it will first be aggregated into as its ``server_round`` (a client's spend record and
the ledger are keyed by it; a client may train twice towards one version, which the
ledger keeps as two entries).

Clocks: on a real federation a reply is processed when it arrives. In a simulation a
reply carries its client's simulated duration (:mod:`fedlora.client.heterogeneity`);
every in-flight instruction is then awaited and the reply that finishes first on the
simulated clock is processed first (a discrete-event simulation, as in FedScale), so the
simulated wall clock is that of a real fleet of parallel devices.

Privacy: sample-level DP composes per client exactly as in synchronous rounds (each
instruction is one round of the client's own DP-SGD plan, its spend appended before
its update leaves). Client-level DP is refused: its accountant assumes each round's
participants are a Poisson sample released through one Gaussian mechanism, which an
asynchronous buffer filled by whoever finishes first is not.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.common import FitIns, log, ndarrays_to_parameters
from flwr.server import Grid
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedlora.client.heterogeneity import SIMULATION_RECORD, simulated_seconds
from fedlora.client.state import EXPERIMENT_KEY
from strategies.fedbuff import FedBuffBuffer
from strategies.fedlora_strategy import FedLoRAStrategy, RoundFailed
from strategies.triage import ReplyBatch, RoundFacts, payload_bytes, stack

ASYNC = "async"
SYNC = "sync"
MODES = (SYNC, ASYNC)


@dataclass(frozen=True)
class AsyncSettings:
    """FedBuff's knobs (``federation.*``)."""

    buffer_size: int  # K: updates per global step
    concurrency: int  # clients training at any time
    max_staleness: int | None
    staleness_exponent: float = 0.5

    @classmethod
    def from_config(cls, fed: Any, clients_per_round: int) -> "AsyncSettings":
        k = int(fed.get("buffer_size") or clients_per_round)
        concurrency = fed.get("concurrency")
        stale = fed.get("max_staleness")
        # Default: twice the buffer training at once (FedBuff's C > K), as many as there are.
        return cls(buffer_size=k, concurrency=int(concurrency) if concurrency is not None
                   else min(2 * k, int(fed.num_clients)),
                   max_staleness=None if stale is None else int(stale),
                   staleness_exponent=float(fed.get("staleness_exponent", 0.5)))


@dataclass
class Dispatch:
    node: int
    version: int  # the global version it was sent
    tag: int  # its server_round: the version it first joins
    started: float  # on the run's clock


class FedBuffServer:
    """Drives an asynchronous run of ``strategy`` through ``grid`` (see module doc)."""

    def __init__(self, grid: Grid, strategy: FedLoRAStrategy, settings: AsyncSettings, num_versions: int,
                 simulated: bool, seed: int = 0, poll_s: float = 0.05) -> None:
        self.grid, self.strategy, self.settings = grid, strategy, settings
        self.num_versions = int(num_versions)
        self.simulated = simulated
        self.buffer = FedBuffBuffer(settings.buffer_size, settings.max_staleness, settings.staleness_exponent)
        self.rng = np.random.default_rng(seed)
        self.poll_s = poll_s
        # After a resume the versions go on from the checkpoint's (a started one is skipped).
        self.version = strategy.round_offset
        self.in_flight: dict[str, Dispatch] = {}
        self.now = 0.0  # the run's clock (simulated seconds, or real seconds since start)
        self.start = time.monotonic()
        # What the version being filled has seen: its record's clients, rejections, nodes sent.
        self.clients: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.sent: list[str] = []
        self._order = itertools.count()
        # Simulated clock: replies back but not yet processed, by simulated finish time.
        self._arrived: list[tuple[float, int, Message, Dispatch]] = []
        self._last_step_at = 0.0

    # -- the loop --------------------------------------------------------------------
    def run(self) -> None:
        strategy = self.strategy
        self._begin_version()
        while self.version < self.num_versions:
            self._fill()
            if not self.in_flight and not self._arrived:
                error = (f"asynchronous run stopped after global step {self.version}: no client left to train "
                         "(every client declined, its privacy budget spent, or none is connected)")
                if strategy.recorder is not None:
                    strategy.recorder.on_fit(self.version + 1, self.clients, self.rejected, 0.0,
                                             aggregation_error=error)
                raise RoundFailed(error)
            for msg, dispatch in self._next_replies():
                self._receive(msg, dispatch)
                if self.buffer.full:
                    self._step()
                    if self.version >= self.num_versions:
                        break
        # Still training when the run ended (or finished later on the simulated clock):
        # their updates may yet leave them, so they count as having spent their round.
        left = sorted([d.node for d in self.in_flight.values()] + [item[3].node for item in self._arrived])
        if left:
            strategy.cut_off(left, f"the run ended (federation.rounds={self.num_versions} global steps) before "
                             "its reply")
            strategy.triage(self.version, [], [])  # records them (and their planned spend) with the last version
            strategy.end_round(self.version)  # and checkpoints the ledger with them
        self.in_flight.clear()
        self._arrived.clear()

    def _begin_version(self) -> None:
        self.clients, self.rejected, self.sent = [], [], []
        self.strategy.started_round = self.version + 1
        if self.strategy.on_round_start is not None:
            self.strategy.on_round_start(self.version + 1, self.strategy)

    # -- dispatch --------------------------------------------------------------------
    def _idle_nodes(self) -> list[int]:
        # On the simulated clock a reply that came back but has not finished yet is still training.
        busy = {d.node for d in self.in_flight.values()} | {item[3].node for item in self._arrived}
        exhausted = self.strategy.exhausted
        return [n for n in self.grid.get_node_ids() if n not in busy and str(n) not in exhausted]

    def _fill(self) -> None:
        """Send the newest adapter to idle clients until ``concurrency`` are training."""
        free = self.settings.concurrency - len(self.in_flight) - len(self._arrived)
        idle = self._idle_nodes()
        if free <= 0 or not idle:
            return
        picked = self.rng.choice(len(idle), size=min(free, len(idle)), replace=False)
        nodes = [idle[i] for i in sorted(picked)]
        tag = self.version + 1
        config = {"server_round": tag, EXPERIMENT_KEY: self.strategy.experiment_id}
        ins = FitIns(ndarrays_to_parameters(self.strategy.global_arrays), config)
        self.strategy.bytes_down_per_client = payload_bytes(ins.parameters)
        messages = [Message(content=compat.fitins_to_recorddict(ins, True), dst_node_id=node,
                            message_type=MessageType.TRAIN, group_id=str(tag)) for node in nodes]
        for mid, node in zip(self.grid.push_messages(messages), nodes):
            self.in_flight[mid] = Dispatch(node=node, version=self.version, tag=tag, started=self.now)
            self.sent.append(str(node))

    def _next_replies(self) -> list[tuple[Message, Dispatch]]:
        """The next reply to process: on the real clock whatever has arrived; on the
        simulated clock, once every in-flight reply is back, the one that finished first."""
        while True:
            pending = list(self.in_flight)
            got = list(self.grid.pull_messages(pending))
            if self.simulated:
                for msg in got:
                    d = self.in_flight.pop(msg.metadata.reply_to_message_id)
                    finish = d.started + (simulated_seconds(msg) or 0.0)
                    heapq.heappush(self._arrived, (finish, next(self._order), msg, d))
                if not self.in_flight and self._arrived:
                    finish, _, msg, d = heapq.heappop(self._arrived)
                    self.now = max(self.now, finish)
                    return [(msg, d)]
            elif got:
                self.now = time.monotonic() - self.start
                return [(msg, self.in_flight.pop(msg.metadata.reply_to_message_id)) for msg in got]
            time.sleep(self.poll_s)

    # -- one reply -------------------------------------------------------------------
    def _receive(self, msg: Message, d: Dispatch) -> None:
        strategy = self.strategy
        proxy = GridClientProxy(d.node, self.grid, msg.metadata.run_id)
        facts = RoundFacts(server_round=d.tag, sampled=frozenset({str(d.node)}),
                           node_clients=dict(strategy.node_clients))
        if msg.has_error():
            batch = strategy.triage(d.tag, [], [Exception(msg.error)], facts=facts)
            for info in batch.rejected:
                info["node_id"] = str(d.node)
        else:
            msg.content.config_records.pop(SIMULATION_RECORD, None)
            batch = strategy.triage(d.tag, [(proxy, compat.recorddict_to_fitres(msg.content, False))], [],
                                    facts=facts)
        staleness = self.version - d.version
        for info in batch.clients:
            info["staleness"] = staleness
        if batch.num_accepted:
            refusal = self.buffer.refusal(staleness)
            info = batch.clients[0]
            if refusal is not None:
                info["accepted"], info["reason"] = False, refusal
                batch.rejected.append(info)
                log(WARNING, "%s", f"client {info['cid']}: {refusal}")
            else:
                self.buffer.add(batch.row_cids[0], batch.updates[0], float(batch.weights[0]),
                                float(batch.row_steps[0]), staleness)
        self.clients += batch.clients
        self.rejected += batch.rejected

    # -- one global step -------------------------------------------------------------
    def _step(self) -> None:
        strategy, items = self.strategy, self.buffer.drain()
        self.version += 1
        v = self.version
        factors = self.buffer.staleness_factors(items)
        batch = ReplyBatch(updates=stack([b.update for b in items], strategy.dimension) * factors[:, None].astype(
            np.float32), weights=np.asarray([b.weight for b in items]), row_cids=[b.cid for b in items],
            row_steps=np.asarray([b.steps for b in items]), clients=self.clients, rejected=self.rejected)
        strategy._trust_weights(v, batch)
        start = time.perf_counter()
        aggregate, report = strategy._robust_aggregate(batch)
        agg_seconds = time.perf_counter() - start
        strategy.step(aggregate)
        strategy.notify("on_sample", v, self.sent, method="fedbuff (asynchronous)",
                        buffer_size=self.settings.buffer_size, concurrency=self.settings.concurrency)
        strategy.notify("on_aggregation", v, {
            "rule": strategy.aggregator_name, "params": strategy.aggregator_params, "norm_bound": strategy.norm_bound,
            "updates": batch.row_cids, "decisions": {},
            "fedbuff": {"buffer_size": self.settings.buffer_size, "staleness": [b.staleness for b in items],
                        "staleness_weights": [round(float(f), 6) for f in factors],
                        "max_staleness": self.settings.max_staleness}})
        now = self.now if self.simulated else time.monotonic() - self.start
        strategy.notify("on_round_closed", v, now - self._last_step_at, self.simulated, elapsed_s=now)
        self._last_step_at = now
        if strategy.recorder is not None:
            strategy.recorder.on_fit(v, self.clients, self.rejected, agg_seconds)
        strategy.end_round(v)
        log(INFO, "asynchronous step %s: %s updates (staleness %s)", v, len(items), [b.staleness for b in items])
        strategy.evaluate(v - strategy.round_offset, None)  # it counts from the resume, as Flower does
        if v < self.num_versions:
            self._begin_version()
