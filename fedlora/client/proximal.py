"""FedProx's proximal term as an exact proximal step after every local optimiser step.

FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks",
https://arxiv.org/abs/1812.06127) adds ``mu/2 * ||w - w_global||^2`` to each client's
local objective so that clients with very different data (or step counts) drift less
from the global model. Here the term is handled by its proximal operator: after each
step with learning rate ``eta``, ``w <- (w + eta*mu*w_global) / (1 + eta*mu)``, the exact
minimiser of ``mu/2 ||v - w_global||^2 + 1/(2 eta) ||v - w||^2`` (proximal gradient
descent; for small ``eta*mu`` it is FedProx's gradient step on the term).

Why after the step and not inside the per-example gradient: the term does not depend
on any example, so under DP-SGD it needs no clipping and no noise. Folding it into each
per-example gradient would let clipping shrink it (the pull would vary with the data's
gradient norms), and a clipped sum would still not be private about anything more. As
an operation on the already-noised iterate it is post-processing: the accountant's
entries for the round are unchanged.
"""

from __future__ import annotations

import torch


class ProximalStep:
    """Pulls every parameter the optimiser trains towards its value at round start."""

    def __init__(self, optimizer: torch.optim.Optimizer, mu: float) -> None:
        if mu < 0:
            raise ValueError("train.proximal_mu must be >= 0")
        self.mu = float(mu)
        self.groups = optimizer.param_groups
        self.anchors = [[p.detach().clone() for p in g["params"]] for g in self.groups]

    @torch.no_grad()
    def __call__(self) -> None:
        for group, anchors in zip(self.groups, self.anchors):
            c = float(group["lr"]) * self.mu
            for p, anchor in zip(group["params"], anchors):
                p.add_(anchor - p, alpha=c / (1 + c))
