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

Lying about the reply rather than the update:

- ``weight_inflation``: a sign-flipped update that claims ``claimed_examples`` (10^9)
  training examples, so that example-weighted FedAvg gives it all the weight (the
  server's answer is :mod:`strategies.weighting`).
- ``metric_poisoning``: an honest update, but federated evaluation reports loss 0 and
  accuracy 1.0 (under ``privacy.evaluation=dp``: noisy correct = noisy examples) and
  the fit reply a low epsilon (``claimed_epsilon``), to move the federation's reported
  validation numbers and privacy (the server reports its own evaluation and the ledger's
  epsilon, and aggregates client reports by their median).

Pure numpy; each is registered in :mod:`fedlora.attacks`, and the client applies them
(see :mod:`fedlora.client.numpy_client`).
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import numpy as np

from fedlora.attacks import ATTACKS, Attack, get_attack, register
from fedlora.privacy.evaluation import NOISY_CORRECT, NOISY_EXAMPLES


def alie_z(num_clients: int, num_malicious: int) -> float:
    """Baruch et al. 2019, Sec. 3: s = floor(n/2 + 1) - m honest clients must be
    "won over"; z = Phi^-1((n - s) / n)."""
    s = num_clients // 2 + 1 - num_malicious
    p = (num_clients - s) / num_clients
    if not 0 < p < 1:  # a malicious majority (or a lone client): the quantile is infinite
        return float("inf") if p >= 1 else float("-inf")
    return NormalDist().inv_cdf(p)


def _honest_mean(name: str, honest: np.ndarray | None) -> np.ndarray:
    if honest is None or len(honest) == 0:
        raise ValueError(f"{name} needs the colluders' honest deltas")
    return honest.mean(axis=0)


def sign_flip(delta: np.ndarray, params: Any, rng: np.random.Generator, honest=None) -> np.ndarray:
    return (-float(params.get("scale", 1.0)) * delta).astype(np.float32)


def scaling(delta: np.ndarray, params: Any, rng: np.random.Generator, honest=None) -> np.ndarray:
    return (float(params.get("factor", 10.0)) * delta).astype(np.float32)


def gaussian(delta: np.ndarray, params: Any, rng: np.random.Generator, honest=None) -> np.ndarray:
    return rng.normal(0.0, float(params.get("std", 1.0)), size=delta.shape).astype(np.float32)


def alie(delta: np.ndarray, params: Any, rng: np.random.Generator, honest=None) -> np.ndarray:
    mean = _honest_mean("alie", honest)
    return (mean - float(params["z"]) * honest.std(axis=0)).astype(np.float32)


def ipm(delta: np.ndarray, params: Any, rng: np.random.Generator, honest=None) -> np.ndarray:
    return (-float(params.get("epsilon", 0.5)) * _honest_mean("ipm", honest)).astype(np.float32)


def claim_examples(real: int, params: Any) -> int:
    return int(float(params.get("claimed_examples", 1e9)))


def poison_report(honest: dict[str, Any], params: Any) -> dict[str, Any]:
    """Perfect validation numbers and a small epsilon, whatever the client measured."""
    out = dict(honest)
    if "loss" in out:
        out["loss"] = float(params.get("loss", 0.0))
    if "accuracy" in out:
        out["accuracy"] = float(params.get("accuracy", 1.0))
    if NOISY_CORRECT in out and NOISY_EXAMPLES in out:
        out[NOISY_CORRECT] = float(params.get("accuracy", 1.0)) * float(out[NOISY_EXAMPLES])
    if out.get("epsilon") is not None:
        out["epsilon"] = float(params.get("claimed_epsilon", 0.01))
    return out


def flip_labels(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Label-flipping data poisoning: y -> num_labels - 1 - y."""
    return (num_labels - 1 - np.asarray(labels)).astype(np.asarray(labels).dtype)


for _attack in (
    Attack("sign_flip", poison_delta=sign_flip),
    Attack("scaling", poison_delta=scaling),
    Attack("gaussian", poison_delta=gaussian),
    Attack("alie", poison_delta=alie, colluding=True),
    Attack("ipm", poison_delta=ipm, colluding=True),
    Attack("label_flip", poison_labels=flip_labels),
    Attack("weight_inflation", poison_delta=sign_flip, claim_examples=claim_examples),
    Attack("metric_poisoning", poison_report=poison_report),
):
    register(_attack)

MODEL_POISONING = tuple(n for n, a in ATTACKS.items() if a.poisons_model)


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
    attack = get_attack(name)
    if not attack.poisons_model:
        raise ValueError(f"{name!r} is not a model-poisoning attack; choose one of {MODEL_POISONING}")
    return attack.poison_delta(delta, params, rng, honest)
