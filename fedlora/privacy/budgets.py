"""Per-client (personalized) privacy budgets.

Data holders may want different guarantees (Boenisch et al. 2023, "Have it your way:
Individualized Privacy Assignment for DP-SGD"): a default budget plus overrides by
client id, or a seeded fraction of clients with another epsilon ("30% of clients have
epsilon=2"). Each client calibrates its own noise for its own budget.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from omegaconf import OmegaConf

from fedlora.core.errors import ConfigError
from fedlora.core.units import SAMPLE


def _budgets_cfg(privacy_cfg: Any) -> Any:
    return privacy_cfg.get("budgets") or {}


def fraction_clients(privacy_cfg: Any, num_clients: int) -> set[int]:
    """The seeded set of clients that get ``budgets.fraction_epsilon``."""
    b = _budgets_cfg(privacy_cfg)
    fraction = b.get("fraction")
    if not fraction:
        return set()
    if not 0 < float(fraction) <= 1:
        raise ConfigError("privacy.budgets.fraction", f"must lie in (0, 1], got {fraction}")
    if b.get("fraction_epsilon") is None:
        raise ConfigError("privacy.budgets.fraction_epsilon", "set it together with privacy.budgets.fraction")
    k = int(round(float(fraction) * num_clients))
    rng = np.random.default_rng(int(b.get("seed") or 0))
    return {int(i) for i in rng.choice(num_clients, size=k, replace=False)}


def client_epsilons(privacy_cfg: Any, clients: Any, num_clients: int) -> dict[int, float]:
    """Target epsilon of each of ``clients``: id override, else seeded fraction, else the
    default. The seeded fraction is drawn once for all of them (a federation of 10,000
    clients is planned in one pass)."""
    b = _budgets_cfg(privacy_cfg)
    overrides = {str(k): float(v) for k, v in dict(b.get("overrides") or {}).items()}
    drawn = fraction_clients(privacy_cfg, num_clients)
    default = float(privacy_cfg.target_epsilon)
    fraction_eps = float(b["fraction_epsilon"]) if drawn else default
    return {int(c): overrides.get(str(c), fraction_eps if int(c) in drawn else default) for c in clients}


def client_epsilon(privacy_cfg: Any, client: int, num_clients: int) -> float:
    """Target epsilon of ``client`` (:func:`client_epsilons`)."""
    return client_epsilons(privacy_cfg, [client], num_clients)[int(client)]


def check_budgets(privacy_cfg: Any, num_clients: int) -> None:
    """Overrides must name existing clients and positive epsilons."""
    b = _budgets_cfg(privacy_cfg)
    for key, eps in dict(b.get("overrides") or {}).items():
        if not str(key).isdigit() or int(key) >= num_clients:
            raise ConfigError(
                "privacy.budgets.overrides",
                f"client {key!r} does not exist; client ids are 0..{num_clients - 1}",
            )
        if not float(eps) > 0:
            raise ConfigError("privacy.budgets.overrides", f"client {key}: epsilon must be > 0, got {eps}")
    if b.get("fraction_epsilon") is not None and not float(b["fraction_epsilon"]) > 0:
        raise ConfigError("privacy.budgets.fraction_epsilon", f"must be > 0, got {b['fraction_epsilon']}")
    fraction_clients(privacy_cfg, num_clients)


def client_budgets(privacy_cfg: Any, num_clients: int) -> dict[str, float]:
    """Every client's target epsilon by client id (sample-level DP), for plots and audits.

    Empty without sample-level DP: client-level DP has one guarantee for every client
    (``privacy.target_epsilon``), and no DP has no budget.
    """
    if not privacy_cfg or privacy_cfg.get("unit") != SAMPLE or privacy_cfg.get("target_epsilon") is None:
        return {}
    if isinstance(privacy_cfg, dict):
        privacy_cfg = OmegaConf.create(privacy_cfg)
    return {str(c): eps for c, eps in client_epsilons(privacy_cfg, range(int(num_clients)), num_clients).items()}
