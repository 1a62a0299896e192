"""Client profiles (``federation.profiles``): what each data holder declares about its
device, for resource- and availability-aware client selection.

A profile has a relative ``speed`` (work per second against a speed-1 client; what a
device's compute and bandwidth allow) and an ``availability`` (the probability that the
client is online in a round). The list in the config is repeated over the clients
(client i has profile ``i % len(profiles)``); null gives every client speed 1 and
availability 1. Who is online in a round is drawn from the experiment seed, so a run
is reproducible and every node agrees. These are declarations, never data: selecting by
them reads nothing private.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.core.config import seed_for
from fedlora.core.errors import ConfigError

ONLINE_SALT = 0x0B11E


@dataclass(frozen=True)
class Profile:
    speed: float = 1.0
    availability: float = 1.0


@dataclass(frozen=True)
class Profiles:
    """Every client's profile, and the seed of who is online when."""

    declared: tuple[Profile, ...] = ()
    seed: int = 0

    def of(self, client: int) -> Profile:
        return self.declared[int(client) % len(self.declared)] if self.declared else Profile()

    def online(self, client: int, server_round: int) -> bool:
        """Whether ``client`` is online in ``server_round`` (seeded draw at its availability)."""
        availability = self.of(client).availability
        if availability >= 1.0:
            return True
        return bool(np.random.default_rng(seed_for(self.seed, client, server_round, ONLINE_SALT)).random()
                    < availability)

    @classmethod
    def from_config(cls, cfg: Any) -> "Profiles":
        raw = (cfg.get("federation") or {}).get("profiles")
        if raw is None:
            return cls(seed=int(cfg.get("seed", 0)))
        if hasattr(raw, "keys"):  # one profile for every client
            raw = [raw]
        profiles = []
        for i, item in enumerate(raw):
            unknown = set(item.keys()) - {"speed", "availability"}
            if unknown:
                raise ConfigError("federation.profiles", f"profile {i}: unknown key(s) {sorted(unknown)}; "
                                  "a profile has speed and availability")
            speed, availability = float(item.get("speed", 1.0)), float(item.get("availability", 1.0))
            if not speed > 0:
                raise ConfigError("federation.profiles", f"profile {i}: speed must be > 0, got {speed}")
            if not 0 < availability <= 1:
                raise ConfigError("federation.profiles", f"profile {i}: availability must lie in (0, 1], "
                                  f"got {availability}")
            profiles.append(Profile(speed=speed, availability=availability))
        if not profiles:
            raise ConfigError("federation.profiles", "give at least one profile, or null")
        return cls(declared=tuple(profiles), seed=int(cfg.get("seed", 0)))
