"""Compose the experiment config from the repository's Hydra tree (``conf/``).

Simulation runs go through ``@hydra.main``; deployed apps (``flwr run``) get the same
overrides as a string in the run config and compose the same tree here, so the same
presets drive both environments.
"""

from __future__ import annotations

import functools
import json
import math
import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedlora.core.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# A deployed run's Hydra overrides, kept in its run dir: a resume must use the same ones.
OVERRIDES_FILE = "overrides.txt"


def plain_config(cfg: Any) -> DictConfig:
    """A resolved copy with no interpolations left (safe to pickle to other processes)."""
    container = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    return OmegaConf.create(container)


def compose(overrides: list[str] | str = ()) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return plain_config(cfg)


@functools.lru_cache(maxsize=8)
def compose_cached(overrides: str) -> DictConfig:
    """``compose`` once per process for the same override string (deployed apps)."""
    return compose(overrides)


def compose_overrides(overrides: str) -> DictConfig:
    """``compose_cached`` with Hydra's rejection of an override (unknown key or group,
    bad syntax) as a ConfigError in one line instead of a stack trace."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose_cached(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError("overrides", f"Hydra rejected {overrides!r}: {first}") from None


def json_safe(value: Any) -> Any:
    """Plain JSON values: configs resolved, numpy scalars to Python, non-finite floats to
    null (strict JSON)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace: the same config gives the same text in every process
    (cache keys, the audit log's config hash)."""
    return json.dumps(json_safe(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def seed_for(*parts: int) -> int:
    """A 31-bit seed derived from (run seed, client, round...), stable across processes."""
    value = 0x9E3779B9
    for part in parts:
        value = (value * 1_000_003 + int(part) + 1) % (2**31 - 1)
    return value
