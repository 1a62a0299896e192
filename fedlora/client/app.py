"""Flower ClientApp: built from a config in simulation, from the run config when deployed."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedlora.client.numpy_client import make_client_fn
from fedlora.core.config import compose_overrides
from fedlora.plan import ExperimentPlan, build_plan_cached


def secure_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for rounds the server runs under SecAgg+, a pass-through
    otherwise, so one ClientApp serves both (the server's workflow decides)."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def make_client_app(plan: ExperimentPlan, state_dir: Path | str | None = None) -> ClientApp:
    """The ClientApp of a simulation: clients' spend records under ``state_dir``."""
    return ClientApp(client_fn=make_client_fn(plan, state_dir), mods=[secure_mod])


def _deployed_client_fn(context: Context):
    # The same plan the ServerApp built, rebuilt here from the same overrides.
    plan = build_plan_cached(compose_overrides(str(context.run_config.get("overrides", ""))))
    return make_client_fn(plan)(context)


# `flwr run .` entry point (pyproject [tool.flwr.app.components]).
app = ClientApp(client_fn=_deployed_client_fn, mods=[secure_mod])
