"""Flower ClientApp: built from a config in simulation, from the run config when deployed.

A deployed ClientApp takes its whole experiment from the run config, which whoever
submits the run writes; the node's own policy (:mod:`fedlora.client.policy`, from its
``--node-config``) is checked against it before any data or model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedlora.client.heterogeneity import simulated_profiles_mod
from fedlora.client.numpy_client import make_client_fn, node_identity
from fedlora.client.policy import NodePolicy, PolicyRefusal
from fedlora.core.config import compose_overrides
from fedlora.core.secure import secure_enabled
from fedlora.core.units import CLIENT, unit_of
from fedlora.plan import ExperimentPlan, build_plan_cached


def secagg_expected(cfg: Any) -> bool:
    """Whether every training message of ``cfg``'s run comes with the SecAgg+ setup. Under
    client-level DP a halted SecAgg+ round is replayed unmasked by design
    (:class:`strategies.secagg.ClientDPSecAggPlusWorkflow`): the server adding the noise
    is trusted with single updates there."""
    return secure_enabled(cfg) and unit_of(cfg) != CLIENT


def secagg_mod(required: Callable[[Context], bool]):
    """Flower's ``secaggplus_mod`` for messages that carry the SecAgg+ setup; a training
    message without it passes only where ``required(context)`` is false: a server that
    leaves the setup out never gets a plain update from a node that needs masking."""

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            return secaggplus_mod(msg, ctxt, call_next)
        if msg.metadata.message_type == MessageType.TRAIN and required(ctxt):
            raise PolicyRefusal("secure", "refusing a training message without the SecAgg+ setup: this node "
                                "sends its update only masked (node-config require-secagg or secure=secaggplus)")
        return call_next(msg, ctxt)

    return mod


def node_requires_secagg(ctxt: Context) -> bool:
    return NodePolicy.from_node_config(ctxt.node_config).require_secagg


# A ClientApp whose node policy alone decides (the run's own plan is not known to it).
secure_mod = secagg_mod(node_requires_secagg)


def make_client_app(plan: ExperimentPlan, state_dir: Path | str | None = None) -> ClientApp:
    """The ClientApp of a simulation: clients' spend records under ``state_dir``."""
    expected = secagg_expected(plan.cfg)
    mods = [secagg_mod(lambda ctxt: expected or node_requires_secagg(ctxt))]
    if plan.secagg is None:
        # Each client's round on the simulated clock, its profile enacted (round deadlines
        # and over-selection order replies by it). SecAgg+ stages keep Flower's own flow.
        mods.append(simulated_profiles_mod(plan.profiles))
    return ClientApp(client_fn=make_client_fn(plan, state_dir), mods=mods)


def admitted_config(ctxt: Context) -> Any:
    """The run config's experiment, once this node's policy admits it (PolicyRefusal
    otherwise, before any data or model is loaded)."""
    cfg = compose_overrides(str(ctxt.run_config.get("overrides", "")))
    client, _ = node_identity(ctxt.node_config, int(cfg.federation.num_clients))
    NodePolicy.from_node_config(ctxt.node_config).check(cfg, client)
    return cfg


def _deployed_client_fn(context: Context):
    # The same plan the ServerApp built, rebuilt here from the same overrides.
    plan = build_plan_cached(admitted_config(context))
    return make_client_fn(plan)(context)


def _deployed_requires_secagg(ctxt: Context) -> bool:
    return node_requires_secagg(ctxt) or secagg_expected(admitted_config(ctxt))


# `flwr run .` entry point (pyproject [tool.flwr.app.components]).
app = ClientApp(client_fn=_deployed_client_fn, mods=[secagg_mod(_deployed_requires_secagg)])
