"""Local training: plain or Opacus DP-SGD steps on the task's loss, and linear probing.

DP-SGD follows Abadi et al. 2016 ("Deep Learning with Differential Privacy"):
Poisson sampling of each example with probability ``sample_rate``, per-example
gradient clipping to ``max_grad_norm`` and Gaussian noise of std
``noise_multiplier * max_grad_norm`` on the sum. Opacus's three parts are used
directly (GradSampleModule, DPOptimizer, DPDataLoader) so the per-sample-gradient
wrapper can be built once per process and reused across rounds and clients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

from fedlora.client.proximal import ProximalStep
from fedlora.privacy import DPPlan

# Opacus's hooks see the embeddings' outputs (no input needs a gradient under LoRA);
# torch warns about that on every backward although the per-sample gradients are right.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


HEAD_KEYS = ("classifier", "score")


def make_optimizer(model: torch.nn.Module, train_cfg: Any) -> torch.optim.Optimizer:
    """Optimizer over the trainable tensors; the head may get its own ``train.head_lr``.

    A fresh head on frozen-ish features needs a much larger step than the LoRA
    factors (linear-probe learning rates), and under DP-SGD the number of steps is
    small, so one shared learning rate leaves the head near its initialisation.
    """
    name = str(train_cfg.optimizer).lower()
    lr, wd = float(train_cfg.lr), float(train_cfg.weight_decay)
    head_lr = train_cfg.get("head_lr")
    head, body = [], []
    for pname, p in model.named_parameters():
        if p.requires_grad:
            (head if any(k in pname for k in HEAD_KEYS) else body).append(p)
    groups = [{"params": body}] if body else []
    if head:
        groups.append({"params": head, "lr": float(head_lr) if head_lr is not None else lr})
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(train_cfg.momentum), weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    raise ValueError(f"train.optimizer: unknown optimizer {name!r}; choose sgd, adam or adamw")


@dataclass
class TrainStats:
    steps: int
    loss: float
    examples_seen: int


def clip_batch_gradient(params, max_norm: float | None) -> None:
    """Batch-level gradient-norm clipping of plain (non-DP) training, as HF's Trainer
    does: it keeps the large learning rates that DP-SGD's per-example clipping allows
    from diverging once that clipping is gone."""
    if max_norm:
        torch.nn.utils.clip_grad_norm_(list(params), float(max_norm))


@dataclass(frozen=True)
class DPGenerators:
    """The secret randomness of one client's DP-SGD round (see fedlora.privacy.randomness):
    the Gaussian noise and the Poisson sampling masks, independent streams."""

    noise: torch.Generator
    sampling: torch.Generator


def noise_only_step(optimizer: DPOptimizer) -> None:
    """The DP-SGD step of an empty Poisson batch: pure noise.

    The subsampled Gaussian that the accountant composes releases noise at every step,
    whatever the batch holds; skipping the step would release fewer noise draws than
    accounted. Opacus clips and sums zero per-example gradients to zero, adds the
    noise and steps.
    """
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


LossFn = Callable[[torch.nn.Module, tuple], torch.Tensor]


def _step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, loss_fn: LossFn, clip: float | None = None,
    after: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """One optimizer step on ``batch``; ``loss_fn`` is the task's (mean of per-example losses);
    ``after`` runs after the step (FedProx's proximal step), an empty batch's included."""
    n = len(batch[0])
    if n == 0:  # only a Poisson (DP) batch can be empty
        noise_only_step(optimizer)
        if after is not None:
            after()
        return 0.0, 0
    loss = loss_fn(model, batch)
    loss.backward()
    if clip:
        clip_batch_gradient((p for g in optimizer.param_groups for p in g["params"]), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if after is not None:
        after()
    return float(loss.detach()) * n, n


def _after_step(optimizer: torch.optim.Optimizer, train_cfg: Any,
                constraint: Callable[[], None] | None) -> Callable[[], None] | None:
    """What runs after every step: FedProx's proximal step, then ``constraint`` (a
    client's rank: its trailing LoRA components back to zero). Both act on the released
    parameters only, never on data, so under DP-SGD they are post-processing."""
    mu = float(train_cfg.get("proximal_mu") or 0.0)
    hooks = [h for h in (ProximalStep(optimizer, mu) if mu > 0 else None, constraint) if h is not None]
    if len(hooks) < 2:
        return hooks[0] if hooks else None

    def both() -> None:
        for hook in hooks:
            hook()

    return both


def _run_steps(model, optimizer, loader, steps: int, loss_fn: LossFn, clip: float | None = None,
               after: Callable[[], None] | None = None) -> TrainStats:
    model.train()
    done, loss_sum, seen = 0, 0.0, 0
    while done < steps:
        for batch in loader:
            loss, n = _step(model, optimizer, batch, loss_fn, clip, after)
            loss_sum, seen, done = loss_sum + loss, seen + n, done + 1
            if done >= steps:
                break
    return TrainStats(steps=done, loss=loss_sum / max(seen, 1), examples_seen=seen)


def train_plain(
    model: torch.nn.Module, data: TensorDataset, train_cfg: Any, steps: int, generator: torch.Generator,
    loss_fn: LossFn,
    constraint: Callable[[], None] | None = None,
) -> TrainStats:
    loader = DataLoader(
        data, batch_size=min(int(train_cfg.batch_size), len(data)), shuffle=True, generator=generator
    )
    clip = train_cfg.get("max_grad_norm")
    optimizer = make_optimizer(model, train_cfg)
    return _run_steps(model, optimizer, loader, steps, loss_fn, clip=clip,
                      after=_after_step(optimizer, train_cfg, constraint))


def _dp_parts(
    optimizer: torch.optim.Optimizer,
    data: TensorDataset,
    plan: DPPlan,
    generators: DPGenerators,
    secure_mode: bool = True,
) -> tuple[DPOptimizer, DPDataLoader]:
    """Opacus's DP optimizer (clip, noise, average) and Poisson-sampling loader for ``plan``.

    The noise comes from ``generators.noise`` (never torch's global generator, which the
    experiment seed sets) with ``secure_mode=True``: each draw is a sum of Gaussians,
    robust to the floating-point attack on the Gaussian sampler (Jin et al. 2021,
    https://arxiv.org/abs/2107.10138). Measured cost: benchmarks/results/secure_noise.json.
    """
    dp_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        loss_reduction="mean",
        generator=generators.noise,
        secure_mode=secure_mode,  # False only to measure what it costs (benchmarks/secure_noise.py)
    )
    return dp_optimizer, DPDataLoader(data, sample_rate=plan.sample_rate, generator=generators.sampling)


def train_dp(
    gsm: GradSampleModule,
    data: TensorDataset,
    train_cfg: Any,
    plan: DPPlan,
    steps: int,
    generators: DPGenerators,
    loss_fn: LossFn,
    constraint: Callable[[], None] | None = None,
) -> TrainStats:
    """``steps`` DP-SGD steps with Poisson sampling at ``plan.sample_rate``; every one
    releases noise, an empty batch included."""
    optimizer, loader = _dp_parts(make_optimizer(gsm._module, train_cfg), data, plan, generators)
    # Opacus's hooks stay on the per-process model and also fire in plain passes, where
    # nothing clears them: per-sample gradients left over from another pass must not
    # join the first clipped sum.
    optimizer.zero_grad(set_to_none=True)
    try:
        return _run_steps(gsm, optimizer, loader, steps, loss_fn, after=_after_step(optimizer, train_cfg, constraint))
    finally:
        optimizer.zero_grad(set_to_none=True)


def train_probe(
    head: torch.nn.Linear,
    features: torch.Tensor,
    labels: torch.Tensor,
    train_cfg: Any,
    plan: DPPlan | None,
    steps: int,
    generator: torch.Generator,
    dp_generators: DPGenerators | None = None,
) -> TrainStats:
    """Linear probing: (DP-)SGD on the linear head alone over fixed features.

    LP-FT (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and
    Underperform Out-of-Distribution", https://arxiv.org/abs/2202.10054); under DP,
    probing first spends the budget where the signal is (Ke et al. 2024, "On the
    Convergence of Differentially-Private Fine-tuning: To Linearly Probe or to Fully
    Fine-tune?", https://arxiv.org/abs/2402.18905). A probe step reads a Poisson sample
    at the same rate as any DP-SGD step and is accounted identically.

    Per-example gradients of softmax cross-entropy through a linear layer are exact in
    closed form, ``(p - y) x^T`` and ``p - y``; they are handed to Opacus's DPOptimizer
    as ``grad_sample`` (clipping and noise are Opacus's). A second GradSampleModule on
    the head would collide with the model-wide one that wraps the same parameters.

    ``generator`` shuffles the plain (non-DP) batches; under DP ``dp_generators`` give
    the secret noise and Poisson masks, and an empty batch still releases noise.
    """
    lr = train_cfg.head_lr if train_cfg.head_lr is not None else train_cfg.lr
    optimizer = torch.optim.SGD(head.parameters(), lr=float(lr), momentum=float(train_cfg.momentum))
    data = TensorDataset(features, labels)
    if plan is None:
        loader = DataLoader(data, batch_size=min(int(train_cfg.batch_size), len(data)), shuffle=True,
                            generator=generator)
    else:
        if dp_generators is None:
            raise ValueError("DP probing needs secret generators (dp_generators)")
        optimizer, loader = _dp_parts(optimizer, data, plan, dp_generators)
    done, loss_sum, seen = 0, 0.0, 0
    try:
        while done < steps:
            for x, y in loader:
                done += 1
                if not len(y):
                    noise_only_step(optimizer)  # only a Poisson (DP) batch can be empty
                else:
                    with torch.no_grad():
                        logits = head(x)
                        probs = logits.softmax(dim=-1)
                        err = probs - torch.nn.functional.one_hot(y, probs.shape[-1]).to(probs.dtype)
                        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                        seen += len(y)
                    per_example = {head.weight: err[:, :, None] * x[:, None, :], head.bias: err}
                    for param, grad in per_example.items():
                        if plan is None:
                            param.grad = grad.mean(dim=0)
                        else:
                            param.grad_sample = grad
                    if plan is None:
                        clip_batch_gradient(head.parameters(), train_cfg.get("max_grad_norm"))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if done >= steps:
                    break
    finally:
        optimizer.zero_grad(set_to_none=True)
    return TrainStats(steps=done, loss=loss_sum / max(seen, 1), examples_seen=seen)
