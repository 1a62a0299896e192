"""Environment defaults for every process the project starts: no telemetry or update
checks (runs work offline, and nothing about a run leaves the machine), no tokenizer
thread pools fighting the training threads, every Ray worker's log lines kept.
A value the user set wins."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
}


def set_defaults(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """``DEFAULTS`` into ``env`` (default: this process's environment) where unset."""
    env = os.environ if env is None else env
    for key, value in DEFAULTS.items():
        env.setdefault(key, value)
    return env
