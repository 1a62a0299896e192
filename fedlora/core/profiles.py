"""Client profiles (``federation.profiles``): what each data holder's device is like, for
resource- and availability-aware client selection and for simulating heterogeneous
fleets (stragglers, clients that are offline or drop out mid-round).

A profile has a relative ``speed`` (work per second against a speed-1 client; what a
device's compute and bandwidth allow), an ``availability`` (the probability that the
client is online in a round; or a ``diurnal`` pattern of it over rounds, as phones on
chargers at night: Bonawitz et al. 2019, "Towards Federated Learning at Scale: System
Design", SysML) and a ``dropout`` probability (a sampled, online client that trains and
then never delivers its update). The list in the config is repeated over the clients
(client i has profile ``i % len(profiles)``); null gives every client speed 1,
availability 1, dropout 0. Every draw (who is online, who drops) comes from the
experiment seed, the client and the round, so a run is reproducible and every process
agrees. In deployment these are declarations, never data: selecting by them reads
nothing private; a simulation also enacts them (:mod:`fedlora.client.heterogeneity`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.core.config import seed_for
from fedlora.core.errors import ConfigError

ONLINE_SALT = 0x0B11E
DROPOUT_SALT = 0xD209
PROFILE_KEYS = ("speed", "availability", "diurnal", "dropout")
DIURNAL_KEYS = ("period", "low", "high", "phase")


@dataclass(frozen=True)
class Diurnal:
    """Availability that follows a day: ``low`` at the trough, ``high`` at the peak, a
    cosine over ``period`` rounds, shifted by ``phase`` (a fraction of the period: 0.5
    puts a client's peak where another's trough is, as for a site in another time zone)."""

    period: float = 24.0
    low: float = 0.1
    high: float = 0.9
    phase: float = 0.0

    def at(self, server_round: int) -> float:
        wave = (1.0 + math.cos(2.0 * math.pi * (server_round / self.period + self.phase))) / 2.0
        return self.low + (self.high - self.low) * wave


@dataclass(frozen=True)
class Profile:
    speed: float = 1.0
    availability: float = 1.0
    dropout: float = 0.0
    diurnal: Diurnal | None = None

    def availability_at(self, server_round: int) -> float:
        return self.diurnal.at(server_round) if self.diurnal is not None else self.availability


def _draw(seed: int, client: int, server_round: int, salt: int) -> float:
    return float(np.random.default_rng(seed_for(seed, client, server_round, salt)).random())


@dataclass(frozen=True)
class Profiles:
    """Every client's profile, and the seed of who is online (and who drops) when."""

    declared: tuple[Profile, ...] = ()
    seed: int = 0

    def of(self, client: int) -> Profile:
        return self.declared[int(client) % len(self.declared)] if self.declared else Profile()

    def online(self, client: int, server_round: int) -> bool:
        """Whether ``client`` is online in ``server_round`` (seeded draw at its availability then)."""
        availability = self.of(client).availability_at(server_round)
        return availability >= 1.0 or _draw(self.seed, client, server_round, ONLINE_SALT) < availability

    def drops(self, client: int, server_round: int) -> bool:
        """Whether ``client``, sampled and online in ``server_round``, drops out before its
        update arrives (seeded draw at its dropout probability)."""
        dropout = self.of(client).dropout
        return dropout > 0.0 and _draw(self.seed, client, server_round, DROPOUT_SALT) < dropout

    @classmethod
    def from_config(cls, cfg: Any) -> "Profiles":
        raw = (cfg.get("federation") or {}).get("profiles")
        if raw is None:
            return cls(seed=int(cfg.get("seed", 0)))
        if hasattr(raw, "keys"):  # one profile for every client
            raw = [raw]
        profiles = [_profile(i, item) for i, item in enumerate(raw)]
        if not profiles:
            raise ConfigError("federation.profiles", "give at least one profile, or null")
        return cls(declared=tuple(profiles), seed=int(cfg.get("seed", 0)))


def _profile(i: int, item: Any) -> Profile:
    unknown = set(item.keys()) - set(PROFILE_KEYS)
    if unknown:
        raise ConfigError("federation.profiles", f"profile {i}: unknown key(s) {sorted(unknown)}; "
                          f"a profile has {', '.join(PROFILE_KEYS)}")
    speed, availability = float(item.get("speed", 1.0)), float(item.get("availability", 1.0))
    dropout = float(item.get("dropout", 0.0))
    if not speed > 0:
        raise ConfigError("federation.profiles", f"profile {i}: speed must be > 0, got {speed}")
    if not 0 < availability <= 1:
        raise ConfigError("federation.profiles", f"profile {i}: availability must lie in (0, 1], got {availability}")
    if not 0 <= dropout < 1:
        raise ConfigError("federation.profiles", f"profile {i}: dropout must lie in [0, 1), got {dropout}")
    diurnal = None
    if item.get("diurnal") is not None:
        if "availability" in item:
            raise ConfigError("federation.profiles", f"profile {i}: give availability or diurnal, not both")
        raw = item["diurnal"]
        unknown = set(raw.keys()) - set(DIURNAL_KEYS)
        if unknown:
            raise ConfigError("federation.profiles", f"profile {i}: diurnal has {', '.join(DIURNAL_KEYS)}; "
                              f"unknown {sorted(unknown)}")
        diurnal = Diurnal(**{k: float(raw[k]) for k in DIURNAL_KEYS if raw.get(k) is not None})
        if not diurnal.period > 0:
            raise ConfigError("federation.profiles", f"profile {i}: diurnal.period must be > 0 rounds")
        if not 0 < diurnal.low <= diurnal.high <= 1:
            raise ConfigError("federation.profiles", f"profile {i}: diurnal needs 0 < low <= high <= 1, got "
                              f"low={diurnal.low}, high={diurnal.high}")
    return Profile(speed=speed, availability=availability, dropout=dropout, diurnal=diurnal)
