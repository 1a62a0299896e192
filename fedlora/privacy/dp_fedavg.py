"""Client-level differential privacy on the server: DP-FedAvg's Gaussian mechanism.

McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
Language Models" (https://arxiv.org/abs/1710.06963). Each round:

1. every client is sampled independently with probability q (Poisson sampling, which
   is what the subsampled-Gaussian accountant assumes);
2. every returned delta is clipped to L2 norm C, so adding or removing one client
   changes the sum by at most C (the sensitivity);
3. N(0, (sigma * C)^2 I) is added to the sum of the clipped deltas;
4. the noisy sum is divided by the *expected* number of clients q * N (the paper's
   fixed-denominator estimator), not the realised count, which would itself depend
   on who took part.

Clients that drop out or whose updates are rejected simply contribute nothing to the
sum, which keeps the sensitivity at C. Pure numpy, no Flower: the strategy calls it.

Flower's ``DifferentialPrivacyServerSideFixedClipping`` is not reused because it
assumes clients return full weights (ours return deltas), samples a fixed number of
clients and scales the noise by the realised count; the accounting here needs Poisson
sampling and a fixed denominator to be exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlora.core.arrays import clip_rows


@dataclass(frozen=True)
class GaussianRelease:
    """What one round of the mechanism did (for the log and the ledger)."""

    aggregate: np.ndarray
    num_clients: int
    clipped: int
    noise_std: float


def poisson_sample(ids: list[str], sample_rate: float, rng: np.random.Generator) -> list[str]:
    """Each id independently with probability ``sample_rate`` (may be empty)."""
    keep = rng.random(len(ids)) < sample_rate
    return [i for i, k in zip(ids, keep) if k]


def gaussian_fedavg(
    updates: np.ndarray,
    clipping_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    rng: np.random.Generator,
) -> GaussianRelease:
    """Clip each row of ``updates`` (n, d) to ``clipping_norm``, sum, add Gaussian noise
    with std ``noise_multiplier * clipping_norm``, divide by ``expected_clients``.

    ``updates`` may have zero rows (nobody sampled or everyone dropped): the release is
    then noise alone, as the mechanism requires.
    """
    if updates.ndim != 2:
        raise ValueError(f"updates must be an (n, d) matrix, got shape {updates.shape}")
    if not expected_clients > 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
    clipped, norms = clip_rows(updates, clipping_norm)
    total = clipped.sum(axis=0, dtype=np.float64)
    std = float(noise_multiplier) * float(clipping_norm)
    total += rng.normal(0.0, std, size=updates.shape[1])
    return GaussianRelease(
        aggregate=(total / expected_clients).astype(np.float32),
        num_clients=len(updates),
        clipped=int((norms > clipping_norm).sum()),
        noise_std=std / expected_clients,
    )
