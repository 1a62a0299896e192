"""LoRA adapters with PEFT, and the adapter <-> NumPy arrays bridge.

Only trainable tensors travel between server and clients: the LoRA factors and the
classification head. With FFA-LoRA (Sun et al. 2024, "Improving LoRA in
Privacy-preserving Federated Learning", ICLR) every A is frozen at an initialisation
drawn from ``lora.seed``, identical on all nodes, so only B and the head are trained
and sent: averaging B is then exact (the mean of products B_i A equals the product of
the mean) and the update is half the size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel

from fedlora.core.errors import ConfigError


def lora_config(lora_cfg: Any, task_type: TaskType = TaskType.SEQ_CLS) -> LoraConfig:
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
        layers_to_transform=(
            list(lora_cfg.layers_to_transform) if lora_cfg.get("layers_to_transform") else None
        ),
    )


def build_lora_model(base: PreTrainedModel, lora_cfg: Any, task_type: TaskType = TaskType.SEQ_CLS) -> PeftModel:
    """Wrap ``base`` (already on its device) with LoRA for PEFT's ``task_type``; A is
    seeded, so identical everywhere."""
    # Seed just before PEFT draws A so that every process gets the same factors.
    torch.manual_seed(int(lora_cfg.seed))
    try:
        model = get_peft_model(base, lora_config(lora_cfg, task_type))
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
