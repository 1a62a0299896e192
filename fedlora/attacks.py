"""Byzantine clients for robustness experiments: model poisoning and data poisoning.

Model-poisoning attacks replace the client's honest delta (a flat float32 vector):

- ``sign_flip``: ``-scale * delta`` (reversed gradient; e.g. Damaskinos et al. 2018).
- ``scaling``: ``factor * delta`` (boosting; Bhagoji et al. 2019, "Analyzing Federated
  Learning through an Adversarial Lens", https://arxiv.org/abs/1811.12470).
- ``gaussian``: pure noise N(0, std^2) of the delta's size (Blanchard et al. 2017).
- ``alie``: "A Little Is Enough" (Baruch, Baruch, Goldberg 2019,
  https://arxiv.org/abs/1902.06156): ``mean - z * std`` coordinate-wise, small enough
  to hide inside the honest spread, with z from the paper's formula.
- ``ipm``: inner-product manipulation (Xie, Koyejo, Gupta 2020, "Fall of Empires",
  https://arxiv.org/abs/1903.03936): ``-epsilon * mean``.

ALIE and IPM need statistics of honest updates. They are implemented as *colluding*
attackers that estimate those statistics from their own honest training: every
malicious client trains an honest delta on each colluder's shard (the attackers
pool their data and computation, which colluders can do), then all send the same
crafted update. No attacker ever sees an honest client's update, so the threat model
stays realistic.

Data poisoning: ``label_flip`` maps label ``y`` to ``num_labels - 1 - y`` on the
malicious clients' own data (Fang et al. 2020; Tolpegin et al. 2020).

Pure numpy; the client applies these (see :mod:`fedlora.client`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import norm

from fedlora.errors import ConfigError

MODEL_POISONING = ("sign_flip", "scaling", "gaussian", "alie", "ipm")
DATA_POISONING = ("label_flip",)
ATTACKS = ("none",) + MODEL_POISONING + DATA_POISONING
COLLUDING = ("alie", "ipm")


def malicious_clients(attack_cfg: Any, num_clients: int) -> list[int]:
    """The malicious client ids: ``attack.clients`` if given, else a seeded
    ``attack.fraction`` of the federation (rounded to the nearest whole client)."""
    name = str(attack_cfg.get("name", "none"))
    if name not in ATTACKS:
        raise ConfigError("attack", f"unknown attack {name!r}; choose one of {ATTACKS}")
    if name == "none":
        return []
    explicit = attack_cfg.get("clients")
    if explicit is not None:
        ids = sorted({int(c) for c in explicit})
        bad = [c for c in ids if not 0 <= c < num_clients]
        if bad:
            raise ConfigError("attack.clients", f"clients {bad} do not exist; ids are 0..{num_clients - 1}")
        return ids
    fraction = float(attack_cfg.get("fraction", 0.0))
    if not 0 <= fraction < 1:
        raise ConfigError("attack.fraction", f"must lie in [0, 1), got {fraction}")
    k = int(round(fraction * num_clients))
    rng = np.random.default_rng(int(attack_cfg.get("seed") or 0))
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


def alie_z(num_clients: int, num_malicious: int) -> float:
    """Baruch et al. 2019, Sec. 3: s = floor(n/2 + 1) - m honest clients must be
    "won over"; z = Phi^-1((n - s) / n)."""
    s = num_clients // 2 + 1 - num_malicious
    return float(norm.ppf((num_clients - s) / num_clients))


def poison_delta(
    name: str,
    delta: np.ndarray,
    params: Any,
    rng: np.random.Generator,
    honest: np.ndarray | None = None,
) -> np.ndarray:
    """The update a malicious client sends instead of its honest ``delta`` (flat).

    ``honest`` is the (m, d) matrix of the colluders' honest deltas (ALIE, IPM).
    """
    if name == "sign_flip":
        return (-float(params.get("scale", 1.0)) * delta).astype(np.float32)
    if name == "scaling":
        return (float(params.get("factor", 10.0)) * delta).astype(np.float32)
    if name == "gaussian":
        return rng.normal(0.0, float(params.get("std", 1.0)), size=delta.shape).astype(np.float32)
    if name in COLLUDING:
        if honest is None or len(honest) == 0:
            raise ValueError(f"{name} needs the colluders' honest deltas")
        mean = honest.mean(axis=0)
        if name == "ipm":
            return (-float(params.get("epsilon", 0.5)) * mean).astype(np.float32)
        std = honest.std(axis=0)
        return (mean - float(params["z"]) * std).astype(np.float32)
    raise ValueError(f"{name!r} is not a model-poisoning attack; choose one of {MODEL_POISONING}")


def flip_labels(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Label-flipping data poisoning: y -> num_labels - 1 - y."""
    return (num_labels - 1 - np.asarray(labels)).astype(np.asarray(labels).dtype)
