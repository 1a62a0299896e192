"""Where the randomness of every DP mechanism comes from: secret unless asked otherwise.

A Gaussian mechanism protects only while its noise is unpredictable to whoever sees the
release, and amplification by subsampling only while the sample is secret. Seeding the
DP-SGD noise, the Poisson masks or the server's noise from the experiment seed would
let anyone who knows the config regenerate every noise vector and subtract it from a
client's update. So every generator that feeds a mechanism is seeded from fresh OS
entropy (``secrets``, i.e. ``os.urandom``) when it is created, and its state is never
written anywhere (NumPy's PCG64 can be stepped backwards as well as forwards, so a
saved state reveals past draws too). The experiment seed keeps everything else
reproducible: the split, the partition, the LoRA initialisation, the malicious
clients, evaluation.

``privacy.noise_seed`` is the research switch: with it, every mechanism's generator is
derived from (noise_seed, stream...) so a run can be repeated bit for bit for debugging
or a paper. Such a run is **not private** against anyone who knows the seed, and says so
wherever it reports an epsilon.

The generators themselves are torch's Mersenne Twister and NumPy's PCG64, seeded with
64 / 128 bits of OS entropy: neither is a cryptographically secure generator. Opacus's
own answer (``secure_mode`` with torchcsprng) needs torchcsprng, which was last released
in 2021 and does not build or import against torch 2.13; DP-SGD here therefore passes an
entropy-seeded generator to Opacus and uses ``secure_mode=True`` for its sampling of the
Gaussian (the sum-of-Gaussians construction against the floating-point attack of
Mironov 2012 / Jin et al. 2021, https://arxiv.org/abs/2107.10138), not its CSPRNG.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Streams of one client's round (DP-SGD noise and the Poisson masks are independent).
NOISE, SAMPLING = 1, 2
# Streams of the server's client-level mechanism, per round.
SERVER_SAMPLING, SERVER_NOISE = 3, 4
# A client's noisy-count evaluation release, per round.
EVALUATION_NOISE = 5


def _derived_seed(parts: tuple[int, ...]) -> int:
    """A 64-bit seed from ``parts`` through NumPy's SeedSequence (well mixed, stable)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class NoiseSource:
    """The generators of the DP mechanisms of one run.

    ``seed`` is ``privacy.noise_seed``: None (the default) draws every generator from OS
    entropy; an int derives them from ``(seed, *stream)``, reproducibly and publicly.
    """

    seed: int | None = None

    @classmethod
    def from_config(cls, privacy_cfg: Any) -> "NoiseSource":
        seed = privacy_cfg.get("noise_seed") if privacy_cfg is not None else None
        return cls(None if seed is None else int(seed))

    @property
    def private(self) -> bool:
        return self.seed is None

    def _seed(self, stream: tuple[int, ...]) -> int:
        if self.seed is None:
            return secrets.randbits(64)
        return _derived_seed((self.seed, *stream))

    def torch_generator(self, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator on ``device`` for one use (e.g. one client's DP-SGD noise in
        one round)."""
        return torch.Generator(device=device).manual_seed(self._seed(stream))

    def numpy_generator(self, *stream: int) -> np.random.Generator:
        """A fresh NumPy generator for one use (e.g. the server's noise in one round)."""
        if self.seed is None:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng([self.seed, *(int(s) for s in stream)])

    def describe(self) -> dict[str, Any]:
        """What a run records about its noise (results.json, audit log, model card)."""
        if self.seed is None:
            return {
                "source": "os_entropy",
                "private": True,
                "note": "every DP noise and sampling generator was seeded from fresh OS entropy "
                "(secrets) and its state was never written",
            }
        return {"source": "noise_seed", "seed": self.seed, "private": False, "warning": self.warning()}

    def warning(self) -> str:
        return (
            f"NOT PRIVATE: privacy.noise_seed={self.seed} makes every DP noise vector and sampling "
            "mask reproducible; anyone who knows the seed can regenerate the noise and remove it, so "
            "the reported epsilon does not hold against them. Use it for debugging and "
            "reproducible research only; unset privacy.noise_seed for a private run"
        )
