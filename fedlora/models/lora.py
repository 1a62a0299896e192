"""LoRA adapters with PEFT, and the adapter <-> NumPy arrays bridge.

Only trainable tensors travel between server and clients: the LoRA factors and the
classification head. With FFA-LoRA (Sun et al. 2024, "Improving LoRA in
Privacy-preserving Federated Learning", ICLR) every A is frozen at an initialisation
drawn from ``lora.seed``, identical on all nodes, so only B and the head are trained
and sent: averaging B is then exact (the mean of products B_i A equals the product of
the mean) and the update is half the size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel

from fedlora.core.errors import ConfigError


def resolve_layers(layers: Any, num_layers: int | None) -> list[int] | None:
    """``lora.layers_to_transform`` as PEFT's layer indices: negative ones count from the
    top (-1 = the last layer), so one recipe fits models of any depth."""
    if not layers:
        return None
    out = []
    for index in (int(i) for i in layers):
        if index < 0:
            if num_layers is None:
                raise ConfigError("lora.layers_to_transform", f"layer {index} counts from the top, but the model "
                                  "does not say how many layers it has; give non-negative indices")
            index += num_layers
        if index < 0 or (num_layers is not None and index >= num_layers):
            raise ConfigError("lora.layers_to_transform", f"layer {index} does not exist in a model of "
                              f"{num_layers} layers")
        out.append(index)
    return sorted(set(out))


def lora_config(lora_cfg: Any, task_type: TaskType = TaskType.SEQ_CLS, num_layers: int | None = None) -> LoraConfig:
    if int(lora_cfg.r) < 1:
        raise ConfigError("lora.r", f"must be >= 1, got {lora_cfg.r}")
    return LoraConfig(
        task_type=task_type,
        r=int(lora_cfg.r),
        lora_alpha=float(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules=list(lora_cfg.target_modules),
        # Adapting only the top layers stops backpropagation below them: a step then
        # costs little more than a forward pass, and fewer tensors carry DP noise.
        layers_to_transform=resolve_layers(lora_cfg.get("layers_to_transform"), num_layers),
    )


def build_lora_model(base: PreTrainedModel, lora_cfg: Any, task_type: TaskType = TaskType.SEQ_CLS,
                     rank: int | None = None) -> PeftModel:
    """Wrap ``base`` (already on its device) with LoRA for PEFT's ``task_type``; A is
    seeded, so identical everywhere. ``rank`` (default ``lora.r``) is the global rank of
    heterogeneous clients (:mod:`fedlora.models.ranks`); the scaling stays ``alpha / lora.r``."""
    # Seed just before PEFT draws A so that every process gets the same factors.
    torch.manual_seed(int(lora_cfg.seed))
    config = lora_config(lora_cfg, task_type, getattr(base.config, "num_hidden_layers", None))
    if rank is not None and rank != config.r:
        # PEFT scales by lora_alpha / r: keep alpha / lora.r at every rank.
        config.lora_alpha = config.lora_alpha * rank / config.r
        config.r = int(rank)
    # A layer holds a rank up to the smaller of its sizes. A rank no weight matrix can
    # hold is refused before PEFT allocates rank x width factors (a typo such as 10**9
    # asks for terabytes); preflight checks each adapted layer after this.
    limit = max((min(p.shape) for p in base.parameters() if p.ndim == 2), default=0)
    if config.r > limit:
        setting = "lora.r" if rank is None or rank == lora_cfg.r else "federation.client_ranks"
        raise ConfigError(setting, f"rank {config.r} exceeds what any weight matrix of the model can hold (min of "
                          f"its input and output sizes: at most {limit}); lower the rank to at most {limit}")
    try:
        model = get_peft_model(base, config)
    except ValueError as err:
        raise ConfigError("lora.target_modules", str(err)) from err
    if lora_cfg.freeze_a:
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the tensors that travel, in a fixed (sorted) order."""
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


def get_arrays(model: torch.nn.Module, names: list[str]) -> list[np.ndarray]:
    params = dict(model.named_parameters())
    return [params[n].detach().cpu().numpy().astype(np.float32, copy=True) for n in names]


def set_arrays(model: torch.nn.Module, names: list[str], arrays: list[np.ndarray]) -> None:
    params = dict(model.named_parameters())
    if len(arrays) != len(names):
        raise ValueError(f"expected {len(names)} adapter arrays, got {len(arrays)}")
    with torch.no_grad():
        for name, array in zip(names, arrays):
            target = params[name]
            if tuple(array.shape) != tuple(target.shape):
                raise ValueError(
                    f"adapter tensor {name}: shape {tuple(array.shape)} != {tuple(target.shape)}"
                )
            target.copy_(torch.as_tensor(np.asarray(array), dtype=target.dtype))


def rank_constraint(model: torch.nn.Module, names: list[str], rank: int) -> Callable[[], None]:
    """A callable that sets every LoRA component from ``rank`` on (rows of A, columns of B)
    to zero: the model is then exactly a rank-``rank`` LoRA model. With both factors of a
    component zero its gradients are zero too, so per-example clipping sees only the
    rank-``rank`` model; the DP noise Opacus adds to the zeroed components is discarded."""
    params = dict(model.named_parameters())
    tails = []
    for name in names:
        if "lora_A" in name:
            tails.append(params[name][rank:])
        elif "lora_B" in name:
            tails.append(params[name][:, rank:])

    def zero() -> None:
        with torch.no_grad():
            for tail in tails:
                tail.zero_()

    return zero
