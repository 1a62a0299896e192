"""Heterogeneous and adaptive LoRA ranks (pure numpy): which rank each client trains,
and how updates of different ranks become one global adapter.

The global adapter has rank ``R`` (the largest client rank). A client of rank ``r``
trains the first ``r`` components of every LoRA pair (rows of ``A``, columns of ``B``)
with the others held at zero, so its model is exactly a rank-``r`` LoRA model, and it
sends only those components. Every rank shares the scaling ``lora.alpha / lora.r``
(``lora.r`` is the reference rank), so a component means the same at every rank.

Aggregation (``lora.aggregation``):

- ``zero_padding``: HetLoRA (Cho et al. 2024, "Heterogeneous LoRA for Federated
  Fine-tuning of On-Device Foundation Models", EMNLP). Each update is padded with zeros
  to rank ``R`` and the configured rule aggregates the padded matrix; equal ranks reduce
  to the rule itself. Clients may prune their own rank (``lora.self_pruning``): after
  local training, trailing components holding less than that share of the adapter's
  energy are dropped for the next rounds.
- ``svd``: FlexLoRA (Bai et al. 2024, "Federated Fine-tuning of Large Language Models
  under Heterogeneous Tasks and Client Resources", NeurIPS). The server averages the
  full-size products ``B_k A_k`` (weighted as FedAvg weighs) and keeps the best rank-``R``
  factorisation of the mean (truncated SVD, Eckart-Young); as the global factors are in
  singular-value order, a client of rank ``r`` takes the first ``r`` components, which is
  FlexLoRA's redistribution.

FLoRA's stacking (Wang et al. 2024) is exact only while the global rank grows by the sum
of the clients' ranks every round and the stack is merged into every node's base
weights; neither fits a fixed-rank adapter that stock PEFT loads, so it is not offered.

Adaptive rank (``lora.adaptive_energy``): after every round the server keeps the
smallest rank whose components hold that share of the global ``B A``'s energy (its
squared singular values), per LoRA pair, and caps the next round's client ranks at the
largest of them; the global factors are kept in singular-value order so the cap drops
the weakest directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from omegaconf import OmegaConf

from fedlora.core.config import seed_for
from fedlora.core.errors import ConfigError

AGGREGATIONS = ("zero_padding", "svd")
RANK_SALT = 0x4A4C
# Fit-instruction key: the server's adaptive rank for this round (clients train at most it).
RANK_CAP_KEY = "rank_cap"


@dataclass(frozen=True)
class RankPlan:
    """Each client's declared rank and how ranks are aggregated and adapted."""

    reference_rank: int  # lora.r: the default rank, and the scaling alpha / r every rank uses
    client_ranks: tuple[int, ...]
    aggregation: str = "zero_padding"
    adaptive_energy: float | None = None
    self_pruning: float | None = None

    @property
    def global_rank(self) -> int:
        return max(self.client_ranks) if self.client_ranks else self.reference_rank

    @property
    def heterogeneous(self) -> bool:
        return len(set(self.client_ranks)) > 1

    @property
    def varies(self) -> bool:
        """Whether any update may carry fewer components than the global rank."""
        return self.heterogeneous or self.adaptive_energy is not None or self.self_pruning is not None

    def rank_of(self, client: int) -> int:
        return self.client_ranks[int(client)] if self.client_ranks else self.reference_rank

    @classmethod
    def from_config(cls, cfg: Any) -> "RankPlan":
        lora, fed = cfg.lora, cfg.get("federation") or {}
        n, r = int(fed.get("num_clients") or 1), int(lora.r)
        declared, choices = fed.get("client_ranks"), fed.get("client_rank_choices")
        if declared is not None and choices is not None:
            raise ConfigError("federation.client_ranks", "give client_ranks or client_rank_choices, not both")
        if declared is not None:
            ranks = [int(x) for x in (declared if isinstance(declared, (list, tuple)) or OmegaConf.is_list(declared)
                                      else [declared])]
            if not ranks or len(ranks) > n:
                raise ConfigError("federation.client_ranks", f"give one rank per client ({n}), or a shorter list "
                                  f"repeated over the clients; got {len(ranks)}")
            ranks = [ranks[i % len(ranks)] for i in range(n)]
        elif choices is not None:
            options = [int(x) for x in choices]
            if not options:
                raise ConfigError("federation.client_rank_choices", "give at least one rank")
            # Seeded: every node draws the same ranks from the experiment seed.
            seed = cfg.get("seed", 0)
            ranks = [options[int(np.random.default_rng(seed_for(seed, pid, RANK_SALT)).integers(len(options)))]
                     for pid in range(n)]
        else:
            ranks = []
        bad = [x for x in ranks if x < 1]
        if bad:
            raise ConfigError("federation.client_ranks", f"ranks must be >= 1, got {bad[0]}")
        aggregation = str(lora.get("aggregation") or "zero_padding")
        if aggregation not in AGGREGATIONS:
            raise ConfigError("lora.aggregation", f"unknown {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        energy = lora.get("adaptive_energy")
        if energy is not None and not 0 < float(energy) <= 1:
            raise ConfigError("lora.adaptive_energy", f"must lie in (0, 1] (or null), got {energy}")
        prune = lora.get("self_pruning")
        if prune is not None and not 0 < float(prune) < 1:
            raise ConfigError("lora.self_pruning", f"must lie in (0, 1) (or null), got {prune}")
        return cls(reference_rank=r, client_ranks=tuple(ranks), aggregation=aggregation,
                   adaptive_energy=None if energy is None else float(energy),
                   self_pruning=None if prune is None else float(prune))


@dataclass(frozen=True)
class LoRALayout:
    """Where the LoRA factors sit among the adapter's tensors (in their sorted order):
    ``pairs`` holds (index of A or None when A is frozen, index of B) per adapted layer."""

    pairs: tuple[tuple[int | None, int], ...]

    @classmethod
    def from_names(cls, names: Sequence[str]) -> "LoRALayout":
        index = {n: i for i, n in enumerate(names)}
        pairs = []
        for i, name in enumerate(names):
            if "lora_B" in name:
                pairs.append((index.get(name.replace("lora_B", "lora_A")), i))
        return cls(pairs=tuple(pairs))

    def axes(self) -> dict[int, int]:
        """Tensor index -> its rank axis (A: rows, B: columns); other tensors have none."""
        out = {}
        for a, b in self.pairs:
            if a is not None:
                out[a] = 0
            out[b] = 1
        return out


def _slice(array: np.ndarray, axis: int, r: int) -> np.ndarray:
    return array[:r] if axis == 0 else array[:, :r]


def truncate(arrays: Sequence[np.ndarray], layout: LoRALayout, r: int) -> list[np.ndarray]:
    """The first ``r`` components of every LoRA pair; other tensors unchanged."""
    axes = layout.axes()
    return [np.ascontiguousarray(_slice(a, axes[i], r)) if i in axes else a for i, a in enumerate(arrays)]


def pad(arrays: Sequence[np.ndarray], layout: LoRALayout, rank: int) -> list[np.ndarray]:
    """Every LoRA pair zero-padded to ``rank`` components (HetLoRA's padding)."""
    axes, out = layout.axes(), []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if i in axes:
            missing = rank - a.shape[axes[i]]
            widths = [(0, 0)] * a.ndim
            widths[axes[i]] = (0, missing)
            a = np.pad(a, widths)
        out.append(a)
    return out


def mask(arrays: Sequence[np.ndarray], layout: LoRALayout, r: int) -> list[np.ndarray]:
    """The arrays with every component from ``r`` on set to zero (shapes kept)."""
    return pad(truncate(arrays, layout, r), layout, rank_of_arrays(arrays, layout))


def rank_of_arrays(arrays: Sequence[np.ndarray], layout: LoRALayout) -> int:
    """The number of components the arrays carry (0 without LoRA pairs)."""
    return int(np.asarray(arrays[layout.pairs[0][1]]).shape[1]) if layout.pairs else 0


def component_energy(arrays: Sequence[np.ndarray], layout: LoRALayout) -> np.ndarray:
    """Per component j, the squared Frobenius norm of its contribution ``B[:, j] A[j]``
    summed over the LoRA pairs (``||B[:, j]||^2 ||A[j]||^2``; with A frozen, ``||B[:, j]||^2``)."""
    energy = np.zeros(rank_of_arrays(arrays, layout))
    for a, b in layout.pairs:
        col = np.square(np.asarray(arrays[b], dtype=np.float64)).sum(axis=0)
        row = np.ones_like(col) if a is None else np.square(np.asarray(arrays[a], dtype=np.float64)).sum(axis=1)
        energy += col * row
    return energy


def pruned_rank(arrays: Sequence[np.ndarray], layout: LoRALayout, threshold: float) -> int:
    """HetLoRA's rank self-pruning: drop trailing components while the last one holds less
    than ``threshold`` of the adapter's energy; never below 1."""
    energy = component_energy(arrays, layout)
    total = float(energy.sum())
    r = len(energy)
    while r > 1 and total > 0 and energy[r - 1] < threshold * total:
        r -= 1
    return r


def _product_svd(b: np.ndarray, a: np.ndarray):
    """SVD of ``B A`` through thin QR factors: O((m + n) r^2) instead of O(m n min(m, n))."""
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    return qb @ u, s, (qa @ vt.T).T


def _factor(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int):
    """(B, A) = (U sqrt(S), sqrt(S) V^T) at ``rank`` components, zero-padded if the product has fewer."""
    root = np.sqrt(s[:rank])
    b = np.zeros((u.shape[0], rank))
    a = np.zeros((rank, vt.shape[1]))
    k = len(root)
    b[:, :k] = u[:, :rank] * root
    a[:k] = root[:, None] * vt[:rank]
    return b, a


def svd_order(arrays: Sequence[np.ndarray], layout: LoRALayout) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The same products ``B A``, refactored in singular-value order (``B = U sqrt(S)``,
    ``A = sqrt(S) V^T``), and each pair's singular values."""
    out = [np.asarray(x, dtype=np.float32).copy() for x in arrays]
    spectra = []
    rank = rank_of_arrays(arrays, layout)
    for a, b in layout.pairs:
        u, s, vt = _product_svd(np.asarray(arrays[b], np.float64), np.asarray(arrays[a], np.float64))
        new_b, new_a = _factor(u, s, vt, rank)
        out[b], out[a] = new_b.astype(np.float32), new_a.astype(np.float32)
        spectra.append(s)
    return out, spectra


def energy_rank(spectra: Sequence[np.ndarray], share: float) -> int:
    """The smallest rank whose components hold ``share`` of each pair's energy (sum of
    squared singular values), the largest over the pairs; at least 1."""
    needed = 1
    for s in spectra:
        energy = np.square(np.asarray(s, dtype=np.float64))
        total = energy.sum()
        if total <= 0:
            continue
        cumulative = np.cumsum(energy) / total
        needed = max(needed, int(np.searchsorted(cumulative, share - 1e-12) + 1))
    return needed


def flexlora(global_arrays: Sequence[np.ndarray], updates: np.ndarray, weights: np.ndarray,
             ranks: Sequence[int], layout: LoRALayout) -> np.ndarray:
    """FlexLoRA's aggregate as a flat delta of the global adapter.

    Row k of ``updates`` is client k's delta padded to the global rank; its local factors
    are the global ones' first ``ranks[k]`` components plus that delta (the rest zero, as
    it trained them). The new global factors are the best rank-R factorisation of the
    weighted mean of the products ``B_k A_k``; every other tensor (the head) takes the
    weighted mean of its deltas.
    """
    shapes = [np.asarray(g).shape for g in global_arrays]
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    flat_global = np.concatenate([np.asarray(g, np.float64).ravel() for g in global_arrays])
    mean_delta = (w[:, None] * updates.astype(np.float64)).sum(axis=0)
    new = flat_global + mean_delta
    rank = rank_of_arrays(global_arrays, layout)

    def tensor(row: np.ndarray, i: int) -> np.ndarray:
        return row[offsets[i]:offsets[i + 1]].reshape(shapes[i])

    for a, b in layout.pairs:
        product = np.zeros((shapes[b][0], shapes[a][1]))
        for k in range(len(updates)):
            local = flat_global + updates[k].astype(np.float64)
            rk = int(ranks[k])
            product += w[k] * (tensor(local, b)[:, :rk] @ tensor(local, a)[:rk])
        u, s, vt = np.linalg.svd(product, full_matrices=False)
        new_b, new_a = _factor(u, s, vt, rank)
        new[offsets[b]:offsets[b + 1]] = new_b.ravel()
        new[offsets[a]:offsets[a + 1]] = new_a.ravel()
    return (new - flat_global).astype(np.float32)
