"""Byzantine clients for robustness experiments: a registry of attacks, like the
aggregators' (:mod:`strategies.aggregators`).

An :class:`Attack` says what a malicious client does: replace its honest delta
(model poisoning; ``colluding`` attacks also get the colluders' honest deltas),
poison its own rows before training (data poisoning), claim another example count
than it has (weight inflation), or lie in what it reports (metric poisoning). Built-in attacks are in
:mod:`fedlora.attacks.poisoning`; a user's own attack registers with :func:`register`
or is named by dotted path (``attack.name=my_pkg.my_module.MY_ATTACK``), an
:class:`Attack` or a plain function ``(delta, params, rng, honest) -> delta``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.core.errors import ConfigError

# (flat honest delta, attack config, generator, colluders' honest deltas (m, d) or None)
PoisonDelta = Callable[[np.ndarray, Any, np.random.Generator, "np.ndarray | None"], np.ndarray]
# (labels, number of labels) -> poisoned labels
PoisonLabels = Callable[[np.ndarray, int], np.ndarray]
# (its real example count, attack config) -> the count it claims
ClaimExamples = Callable[[int, Any], int]
# (what it would report honestly, attack config) -> what it reports
PoisonReport = Callable[[dict[str, Any], Any], dict[str, Any]]


@dataclass(frozen=True)
class Attack:
    """One attack: any of its poisons may be unset."""

    name: str
    poison_delta: PoisonDelta | None = None
    poison_labels: PoisonLabels | None = None
    colluding: bool = False
    claim_examples: ClaimExamples | None = None
    poison_report: PoisonReport | None = None

    @property
    def poisons_model(self) -> bool:
        return self.poison_delta is not None

    @property
    def poisons_data(self) -> bool:
        return self.poison_labels is not None

    def claimed_examples(self, real: int, params: Any) -> int:
        """The example count the client sends (its real one unless the attack lies)."""
        return real if self.claim_examples is None else int(self.claim_examples(real, params))

    def report(self, honest: dict[str, Any], params: Any) -> dict[str, Any]:
        """What the client reports (metrics, its epsilon) instead of ``honest``."""
        return honest if self.poison_report is None else self.poison_report(dict(honest), params)


ATTACKS: dict[str, Attack] = {}
NO_ATTACK = Attack("none")


def register(attack: Attack) -> Attack:
    ATTACKS[attack.name] = attack
    return attack


def get_attack(name: str) -> Attack:
    """A registered attack by name, or a user's by dotted path (``pkg.mod.OBJ``)."""
    if name == NO_ATTACK.name:
        return NO_ATTACK
    if name in ATTACKS:
        return ATTACKS[name]
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError("attack.name", f"cannot import {name!r}: {err}") from err
        if isinstance(obj, Attack):
            return obj
        if callable(obj):
            return Attack(name, poison_delta=obj)
        raise ConfigError("attack.name", f"{name!r} is neither an Attack nor a function")
    raise ConfigError("attack", f"unknown attack {name!r}; choose one of {sorted(ATTACKS) + ['none']} "
                      "or give a dotted path to your own")


def malicious_clients(attack_cfg: Any, num_clients: int) -> list[int]:
    """The malicious client ids: ``attack.clients`` if given, else a seeded
    ``attack.fraction`` of the federation (rounded to the nearest whole client)."""
    name = str(attack_cfg.get("name", "none"))
    if get_attack(name) is NO_ATTACK:
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


from fedlora.attacks import poisoning  # noqa: E402,F401  (registers the built-in attacks)
from fedlora.attacks.poisoning import alie_z, flip_labels, poison_delta  # noqa: E402

__all__ = ["ATTACKS", "Attack", "NO_ATTACK", "alie_z", "flip_labels", "get_attack", "malicious_clients",
           "poison_delta", "register"]
