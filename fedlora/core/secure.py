"""Secure aggregation settings and the client side of it (no masking here: Flower's
``secaggplus_mod`` masks, our client only prepares what it hands over).

SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", https://eprint.iacr.org/2020/704) sums
integer vectors. Flower's implementation multiplies each client's vector by its weight
``num_examples / max_weight``, clips every coordinate to ``[-R, R]``, quantizes it to
``quantization_range`` levels with stochastic rounding and masks it modulo
``modulus_range``. An L2-clipped delta (norm <= C) has every coordinate in [-C, C], so
with R = C nothing is clipped by the quantizer and the masked sum cannot overflow as
long as #clients * quantization_range <= modulus_range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedlora.core.arrays import clip_l2
from fedlora.core.errors import ConfigError
from fedlora.core.units import CLIENT, unit_of


@dataclass(frozen=True)
class SecAggSettings:
    num_shares: int
    reconstruction_threshold: int
    clipping_norm: float
    quantization_range: int
    modulus_range: int
    max_weight: float
    timeout: float | None

    @property
    def clipping_range(self) -> float:
        return self.clipping_norm

    @property
    def quantization_step(self) -> float:
        """Width of one quantization level in weighted-delta units."""
        return 2.0 * self.clipping_range / self.quantization_range


def secure_enabled(cfg: Any) -> bool:
    return str(cfg.get("secure", {}).get("name", "none")) == "secaggplus"


def secure_clipping_norm(cfg: Any) -> float:
    """The L2 norm every client clips its delta to before masking (= the quantizer's
    range). Under client-level DP it never exceeds ``privacy.clipping_norm``: the
    server's noise is calibrated for that sensitivity, and SecAgg+ hands the server only
    the sum, where a single client's contribution can no longer be clipped (a larger
    ``secure.clipping_norm`` is refused by :func:`check_secure`)."""
    s = cfg.secure
    if unit_of(cfg) == CLIENT:
        privacy_norm = float(cfg.privacy.clipping_norm)
        return privacy_norm if s.get("clipping_norm") is None else min(float(s.clipping_norm), privacy_norm)
    if s.get("clipping_norm") is not None:
        return float(s.clipping_norm)
    if cfg.strategy.get("norm_bound") is not None:
        return float(cfg.strategy.norm_bound)
    return float(s.default_clipping_norm)


def secure_settings(cfg: Any, max_examples: int) -> SecAggSettings:
    """Settings of one run; ``max_examples`` is the largest FedAvg weight of any client
    (an example count; 1 under client-level DP, where every client weighs the same)."""
    s = cfg.secure
    return SecAggSettings(
        num_shares=int(s.num_shares),
        reconstruction_threshold=int(s.reconstruction_threshold),
        clipping_norm=secure_clipping_norm(cfg),
        quantization_range=int(s.quantization_range),
        modulus_range=int(s.modulus_range),
        max_weight=float(max(1, max_examples)),
        timeout=None if s.get("timeout") is None else float(s.timeout),
    )


def check_secure(cfg: Any, clients_per_round: int, robust: bool) -> None:
    """Refuse settings under which SecAgg+ fails or silently never trains."""
    if not secure_enabled(cfg):
        name = str(cfg.get("secure", {}).get("name", "none"))
        if name != "none":
            raise ConfigError("secure", f"unknown secure aggregation {name!r}; choose none or secaggplus")
        return
    if robust:
        raise ConfigError(
            "secure",
            f"robust aggregator {cfg.strategy.aggregator!r} cannot run under SecAgg+: robust aggregation "
            "needs the individual updates, which SecAgg+ hides from the server (it only learns their "
            "sum). Use strategy=fedavg with secure=secaggplus, or secure=none with a robust aggregator",
        )
    s = cfg.secure
    shares, threshold = int(s.num_shares), int(s.reconstruction_threshold)
    if shares < 3 or shares % 2 == 0:
        raise ConfigError(
            "secure.num_shares",
            f"must be odd and >= 3, got {shares} (with an even value Flower's clients fail while "
            "the run still ends normally and the model never trains)",
        )
    if not 1 < threshold < shares:
        raise ConfigError(
            "secure.reconstruction_threshold", f"must satisfy 1 < threshold < num_shares={shares}, got {threshold}"
        )
    if clients_per_round < shares:
        raise ConfigError(
            "secure.num_shares",
            f"{shares} shares need at least {shares} clients per round, but {clients_per_round} are "
            "sampled; sample more clients or lower secure.num_shares",
        )
    if unit_of(cfg) == CLIENT and s.get("clipping_norm") is not None and (
        float(s.clipping_norm) > float(cfg.privacy.clipping_norm)
    ):
        raise ConfigError(
            "secure.clipping_norm",
            f"{float(s.clipping_norm):g} exceeds privacy.clipping_norm={float(cfg.privacy.clipping_norm):g}: under "
            "client-level DP the server's noise covers one client's contribution only up to "
            "privacy.clipping_norm, and under SecAgg+ the server cannot clip inside the masked sum; leave "
            "secure.clipping_norm unset (it then equals privacy.clipping_norm) or set it lower",
        )
    if not secure_clipping_norm(cfg) > 0:
        raise ConfigError("secure.clipping_norm", f"must be > 0, got {secure_clipping_norm(cfg)}")
    q, mod = int(s.quantization_range), int(s.modulus_range)
    if mod & (mod - 1) or not q < mod <= 2**32:
        raise ConfigError("secure.modulus_range", f"must be a power of 2 in (quantization_range, 2**32], got {mod}")
    if clients_per_round * q > mod:
        raise ConfigError(
            "secure.quantization_range",
            f"{clients_per_round} clients x {q} levels exceed the modulus {mod}: the masked sum would wrap "
            "around; lower secure.quantization_range",
        )


def prepare_update(delta: list[np.ndarray], settings: SecAggSettings) -> list[np.ndarray]:
    """A delta ready for masking: clipped so that it stays within the sensitivity.

    Stochastic rounding moves each coordinate by less than one quantization step, i.e.
    the dequantized vector lies within ``step * sqrt(d)`` of the clipped one in L2. The
    delta is clipped to ``clipping_norm - step * sqrt(d)`` so that what reaches the sum
    has norm at most ``clipping_norm``: the sensitivity the server's noise covers under
    client-level DP holds after quantization, not only before it.
    """
    d = sum(int(np.asarray(a).size) for a in delta)
    bound = settings.clipping_norm - settings.quantization_step * math.sqrt(d)
    if not bound > 0:
        raise ConfigError(
            "secure.quantization_range",
            f"{settings.quantization_range} levels are too coarse for {d} coordinates at clipping norm "
            f"{settings.clipping_norm:g}; raise secure.quantization_range",
        )
    return clip_l2(delta, bound)[0]


def quantization_error(delta: list[np.ndarray], num_examples: int, settings: SecAggSettings) -> float:
    """Largest absolute error (in delta units) that SecAgg+'s weighting + quantization
    put on this client's delta, measured by quantizing and dequantizing it locally."""
    ratio = num_examples / settings.max_weight
    weighted = [ratio * np.asarray(d, dtype=np.float64) for d in delta]
    back = dequantize(
        quantize(weighted, settings.clipping_range, settings.quantization_range),
        settings.clipping_range,
        settings.quantization_range,
    )
    if ratio == 0:
        return 0.0
    return float(max(np.max(np.abs(b - w)) for b, w in zip(back, weighted)) / ratio)
