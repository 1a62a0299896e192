"""Local training (plain or Opacus DP-SGD) and evaluation of a sequence classifier.

DP-SGD follows Abadi et al. 2016 ("Deep Learning with Differential Privacy"):
Poisson sampling of each example with probability ``sample_rate``, per-example
gradient clipping to ``max_grad_norm`` and Gaussian noise of std
``noise_multiplier * max_grad_norm`` on the sum. Opacus's three parts are used
directly (GradSampleModule, DPOptimizer, DPDataLoader) so the per-sample-gradient
wrapper can be built once per process and reused across rounds and clients.
"""

from __future__ import annotations

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


def make_optimizer(params: list[torch.nn.Parameter], train_cfg: Any) -> torch.optim.Optimizer:
    name = str(train_cfg.optimizer).lower()
    lr, wd = float(train_cfg.lr), float(train_cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(train_cfg.momentum), weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise ValueError(f"train.optimizer: unknown optimizer {name!r}; choose sgd, adam or adamw")


@dataclass
class TrainStats:
    steps: int
    loss: float
    examples_seen: int


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch) -> tuple[float, int]:
    input_ids, mask, labels = batch
    if len(labels) == 0:
        return 0.0, 0
    input_ids, mask = _trim(input_ids, mask)
    out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach()) * len(labels), len(labels)


def _run_steps(model, optimizer, loader, steps: int) -> TrainStats:
    model.train()
    done, loss_sum, seen = 0, 0.0, 0
    while done < steps:
        for batch in loader:
            # An empty Poisson batch is still a step: the accountant counts it, which
            # can only over-state epsilon, never under-state it.
            loss, n = _step(model, optimizer, batch)
            loss_sum, seen, done = loss_sum + loss, seen + n, done + 1
            if done >= steps:
                break
    return TrainStats(steps=done, loss=loss_sum / max(seen, 1), examples_seen=seen)


def train_plain(
    model: torch.nn.Module, data: TensorDataset, train_cfg: Any, steps: int, generator: torch.Generator
) -> TrainStats:
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(
        data, batch_size=min(int(train_cfg.batch_size), len(data)), shuffle=True, generator=generator
    )
    return _run_steps(model, make_optimizer(params, train_cfg), loader, steps)


def train_dp(
    gsm: GradSampleModule,
    data: TensorDataset,
    train_cfg: Any,
    plan: DPPlan,
    steps: int,
    generator: torch.Generator,
) -> TrainStats:
    """``steps`` DP-SGD steps with Poisson sampling at ``plan.sample_rate``."""
    params = [p for p in gsm.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        make_optimizer(params, train_cfg),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=max(1, round(plan.sample_rate * len(data))),
        loss_reduction="mean",
    )
    loader = DPDataLoader(data, sample_rate=plan.sample_rate, generator=generator)
    try:
        return _run_steps(gsm, optimizer, loader, steps)
    finally:
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TensorDataset, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) over ``data``."""
    if len(data) == 0:
        return float("nan"), float("nan")
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for input_ids, mask, labels in DataLoader(data, batch_size=int(batch_size)):
        input_ids, mask = _trim(input_ids, mask)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
    model.train(was_training)
    return loss_sum / len(data), correct / len(data)
