"""Flower ClientApp: built from a config in simulation, from the run config when deployed."""

from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp

from fedlora.client import make_client_fn
from fedlora.config import compose_cached


def make_client_app(cfg: Any) -> ClientApp:
    return ClientApp(client_fn=make_client_fn(cfg))


def _deployed_client_fn(context: Context):
    cfg = compose_cached(str(context.run_config.get("overrides", "")))
    return make_client_fn(cfg)(context)


# `flwr run .` entry point (pyproject [tool.flwr.app.components]).
app = ClientApp(client_fn=_deployed_client_fn)
