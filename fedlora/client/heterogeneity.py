"""A simulated heterogeneous fleet: the clients' profiles (``federation.profiles``)
enacted in a simulation, as a ClientApp mod around training, on a simulated clock.

On a real federation devices are slow, offline or drop out by themselves, in parallel.
A simulation on one machine runs its clients a few at a time at the machine's speed, so
its wall clock says nothing about a federation's. As in FedScale (Lai et al. 2022,
ICML), each client's round is timed instead: the mod measures the client's own work
and scales it by its profile (``fastest / speed``; the fastest declared profile runs
at the machine's speed), and the reply carries that *simulated* duration in a record of
its own (:data:`SIMULATION_RECORD`), which the server's round deadline
(:class:`strategies.deadline.RoundDeadline`) orders replies by. Seeded by client and
round (:class:`fedlora.core.profiles.Profiles`):

- an **offline** client (its availability, or diurnal pattern, says so this round)
  fails at once, without training;
- a **slow** client's simulated duration is its measured one times ``fastest / speed``;
- a client that **drops out** trains (and records its spend: its update was computed
  and noised before it was lost), then fails instead of replying.

Deployed SuperNodes never use it: there the fleet and the clock are real.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType

from fedlora.core.profiles import Profiles

FIT_CONFIG = "fitins.config"
SIMULATION_RECORD = "simulation"
SIMULATED_SECONDS = "simulated_s"


class SimulatedUnavailability(RuntimeError):
    """A simulated client that is offline this round or dropped out of it."""


def training_round(msg: Message) -> int:
    """The strategy's round number in a training instruction (Flower's group id restarts
    at 1 after a resume; ours does not)."""
    config = msg.content.config_records.get(FIT_CONFIG) or {}
    return int(config.get("server_round", msg.metadata.group_id or 0))


def simulated_seconds(msg: Message) -> float | None:
    """The simulated duration a reply carries (None: a reply from a real node)."""
    if not msg.has_content():
        return None
    record = msg.content.config_records.get(SIMULATION_RECORD)
    return None if record is None else float(record[SIMULATED_SECONDS])


def simulated_profiles_mod(profiles: Profiles):
    """The mod that enacts ``profiles`` on training messages (others pass untouched)."""
    fastest = max((p.speed for p in profiles.declared), default=1.0)

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        client = int(ctxt.node_config["partition-id"])
        server_round = training_round(msg)
        if not profiles.online(client, server_round):
            raise SimulatedUnavailability(f"client {client} is offline in round {server_round} "
                                          "(simulated: federation.profiles availability)")
        start = time.perf_counter()
        reply = call_next(msg, ctxt)
        took = (time.perf_counter() - start) * fastest / profiles.of(client).speed
        if profiles.drops(client, server_round):
            raise SimulatedUnavailability(f"client {client} dropped out of round {server_round} after training "
                                          "(simulated: federation.profiles dropout)")
        if reply.has_content():
            reply.content.config_records[SIMULATION_RECORD] = ConfigRecord({SIMULATED_SECONDS: took})
        return reply

    return mod
