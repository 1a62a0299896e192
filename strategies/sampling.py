"""Who trains this round: uniform sampling of the clients with budget left,
power-of-choice over a uniform candidate set, or a resource- and availability-aware
draw from the clients' declared profiles; and each sampled client's own history
attached to its instruction after a resume.

(Client-level DP samples by Poisson instead: :mod:`strategies.client_dp`.)
"""

from __future__ import annotations

import json
import math

import numpy as np
from flwr.common import FitIns, GetPropertiesIns
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion

from fedlora.client.state import HISTORY_KEY


class Excluding(Criterion):
    """Sample only clients not in ``excluded`` (e.g. those whose budget is spent)."""

    def __init__(self, excluded: set[str]) -> None:
        self.excluded = excluded

    def select(self, client: ClientProxy) -> bool:
        return client.cid not in self.excluded


def how_many(fraction: float, minimum: int, available: int) -> int:
    """``fraction`` of ``available``, rounded up, and at least ``minimum``."""
    return max(math.ceil(fraction * available), minimum)


def uniform_sample(
    client_manager: ClientManager, fraction: float, min_clients: int, min_available: int, excluded: set[str],
    over_selection: float = 0.0,
) -> tuple[list[ClientProxy], int]:
    """``fraction`` of the eligible clients (not ``excluded``) uniformly without
    replacement, ``over_selection`` more of them on top (as many as there are), and
    how many were eligible; no clients when fewer than needed are."""
    # Nodes connect asynchronously (SuperNodes, simulation actors): wait for the minimum.
    client_manager.wait_for(min_available)
    eligible = client_manager.num_available() - len(excluded)
    n = how_many(fraction, min_clients, eligible)
    if n > eligible:
        return [], eligible
    n = min(eligible, math.ceil(n * (1.0 + over_selection)))
    return client_manager.sample(num_clients=n, min_num_clients=min_available, criterion=Excluding(excluded)), eligible


SELECTIONS = ("uniform", "power_of_choice", "resource_aware")


def power_of_choice(candidates: list[str], losses: dict[str, float], m: int) -> list[str]:
    """The ``m`` candidates of highest loss (Cho, Wang, Joshi 2022, "Towards Understanding
    Biased Client Selection in Federated Learning", AISTATS): a client whose loss is not
    known yet counts as highest, so every client is tried; ties keep the candidates' order."""
    order = sorted(range(len(candidates)), key=lambda i: (-losses.get(candidates[i], math.inf), i))
    return [candidates[i] for i in order[:m]]


def resource_aware(online: list[str], speeds: dict[str, float], m: int, rng: np.random.Generator) -> list[str]:
    """``m`` of the ``online`` clients without replacement, each draw with probability
    proportional to the client's declared speed: resource-aware selection in the spirit
    of FedCS (Nishio, Yonetani 2019, "Client Selection for Federated Learning with
    Heterogeneous Resources in Mobile Edge", ICC), which favours clients that finish a
    round sooner, softened to a weighted draw so that slow clients' data still
    contributes. Offline clients are never drawn."""
    if m >= len(online):
        return list(online)
    weights = np.asarray([speeds[c] for c in online], dtype=np.float64)
    picked = rng.choice(len(online), size=m, replace=False, p=weights / weights.sum())
    return [online[i] for i in sorted(picked)]


def client_id(proxy: ClientProxy, node_clients: dict[str, str], server_round: int) -> str:
    """The client id behind a node: known from its replies, else asked once
    (get_properties) and remembered in ``node_clients``."""
    cid = node_clients.get(proxy.cid)
    if cid is None:
        res = proxy.get_properties(GetPropertiesIns({}), timeout=None, group_id=server_round)
        cid = str(res.properties.get("partition_id", ""))
        node_clients[proxy.cid] = cid
    return cid


def attach_histories(
    instructions: list[tuple[ClientProxy, FitIns]],
    histories: dict[str, list[list[float]]],
    node_clients: dict[str, str],
    server_round: int,
) -> list[tuple[ClientProxy, FitIns]]:
    """Each sampled client's own ledger history in its own instruction (never another
    client's). A node's client id not yet known is asked once (get_properties) and
    remembered in ``node_clients``."""
    if not histories:
        return instructions
    out = []
    for proxy, ins in instructions:
        history = histories.get(client_id(proxy, node_clients, server_round))
        if history:
            ins = FitIns(ins.parameters, {**ins.config, HISTORY_KEY: json.dumps(history)})
        out.append((proxy, ins))
    return out
