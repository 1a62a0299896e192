"""Local training (plain or Opacus DP-SGD) and evaluation of a sequence classifier.

DP-SGD follows Abadi et al. 2016 ("Deep Learning with Differential Privacy"):
Poisson sampling of each example with probability ``sample_rate``, per-example
gradient clipping to ``max_grad_norm`` and Gaussian noise of std
``noise_multiplier * max_grad_norm`` on the sum. Opacus's three parts are used
directly (GradSampleModule, DPOptimizer, DPDataLoader) so the per-sample-gradient
wrapper can be built once per process and reused across rounds and clients.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedTokenizerBase

from fedlora.privacy import DPPlan

# Opacus's hooks see the embeddings' outputs (no input needs a gradient under LoRA);
# torch warns about that on every backward although the per-sample gradients are right.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> TensorDataset:
    enc = tokenizer(
        list(dataset["text"]),
        truncation=True,
        max_length=int(max_length),
        padding="max_length",
        return_tensors="pt",
    )
    labels = torch.as_tensor(list(dataset["label"]), dtype=torch.long)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)


def _trim(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Rows are padded to max_length; cut the batch to its longest real row.
    length = max(1, int(mask.sum(dim=1).max()))
    return input_ids[:, :length], mask[:, :length]


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


def _step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, clip: float | None = None
) -> tuple[float, int]:
    input_ids, mask, labels = batch
    if len(labels) == 0:  # only a Poisson (DP) batch can be empty
        noise_only_step(optimizer)
        return 0.0, 0
    input_ids, mask = _trim(input_ids, mask)
    out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    if clip:
        clip_batch_gradient((p for g in optimizer.param_groups for p in g["params"]), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach()) * len(labels), len(labels)


def _run_steps(model, optimizer, loader, steps: int, clip: float | None = None) -> TrainStats:
    model.train()
    done, loss_sum, seen = 0, 0.0, 0
    while done < steps:
        for batch in loader:
            loss, n = _step(model, optimizer, batch, clip)
            loss_sum, seen, done = loss_sum + loss, seen + n, done + 1
            if done >= steps:
                break
    return TrainStats(steps=done, loss=loss_sum / max(seen, 1), examples_seen=seen)


def train_plain(
    model: torch.nn.Module, data: TensorDataset, train_cfg: Any, steps: int, generator: torch.Generator
) -> TrainStats:
    loader = DataLoader(
        data, batch_size=min(int(train_cfg.batch_size), len(data)), shuffle=True, generator=generator
    )
    clip = train_cfg.get("max_grad_norm")
    return _run_steps(model, make_optimizer(model, train_cfg), loader, steps, clip=clip)


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
) -> TrainStats:
    """``steps`` DP-SGD steps with Poisson sampling at ``plan.sample_rate``; every one
    releases noise, an empty batch included."""
    optimizer, loader = _dp_parts(make_optimizer(gsm._module, train_cfg), data, plan, generators)
    # Opacus's hooks stay on the per-process model and also fire in plain passes, where
    # nothing clears them: per-sample gradients left over from another pass must not
    # join the first clipped sum.
    optimizer.zero_grad(set_to_none=True)
    try:
        return _run_steps(gsm, optimizer, loader, steps)
    finally:
        optimizer.zero_grad(set_to_none=True)


def _autocast(precision: str):
    """bf16 autocast for forward-only passes where the CPU/GPU supports it, else a no-op.

    Only evaluation and probe features use it: DP-SGD's per-sample gradients, clipping
    and noise stay in fp32.
    """
    if precision == "bf16" or (precision == "auto" and _bf16_supported()):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@torch.no_grad()
def embed_all(embed, data: TensorDataset, batch_size: int, precision: str = "auto") -> torch.Tensor:
    """Head inputs for every row of ``data`` under the current adapter (fp32)."""
    out = []
    with _autocast(precision):
        for input_ids, mask, _ in DataLoader(data, batch_size=int(batch_size)):
            input_ids, mask = _trim(input_ids, mask)
            out.append(embed(input_ids, mask).float())
    return torch.cat(out)


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


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: TensorDataset, batch_size: int, precision: str = "fp32"
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) over ``data``."""
    if len(data) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for input_ids, mask, labels in DataLoader(data, batch_size=int(batch_size)):
        input_ids, mask = _trim(input_ids, mask)
        with _autocast(precision):
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
    model.train(was_training)
    return loss_sum / len(data), correct / len(data)
