"""The task interface: everything about the model and its data that training, the
client, the strategy and the record must not know.

A task owns loading the base model and tokenizer, turning rows into model inputs, the
loss, evaluation, which parameters train and travel (through its PEFT task type and
LoRA targets), an optional separable head for linear probing, and exporting the final
model. Adding a task (e.g. causal-LM instruction tuning) is adding one module that
implements :class:`Task` and registering it in :mod:`fedlora.tasks`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from peft import TaskType
from torch.utils.data import TensorDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from fedlora.data.sources import TaskData


class Task(ABC):
    """One kind of fine-tuning. Stateless: one instance serves every process."""

    #: Name in ``model.task``.
    name: str
    #: PEFT's task type: which wrapper, and which extra modules (a head) train and travel.
    peft_task_type: TaskType
    #: The evaluation metric reported as the run's (and the report's) headline number.
    metric: str = "accuracy"

    # -- data ------------------------------------------------------------------------
    def load_data(self, data_cfg: Any, seed: int) -> "TaskData":
        """The configured dataset as this task's rows (loaded once per process)."""
        from fedlora.data.sources import load_task_data_cached

        return load_task_data_cached(data_cfg, seed)

    def load_node_data(self, path: str, data_cfg: Any, label_names: list[str]) -> Dataset:
        """A SuperNode's own file (``--node-config data-path=...``) as training rows."""
        from fedlora.data.sources import load_node_data

        return load_node_data(path, data_cfg, label_names)

    def check(self, tokenizer: PreTrainedTokenizerBase, data: "TaskData", cfg: Any) -> None:
        """Refuse data this model cannot learn from, before the federation starts
        (raise :class:`fedlora.core.errors.ConfigError` naming the setting)."""

    def canaries(self, data: "TaskData", count: int, seed: int) -> Dataset:
        """``count`` canary rows for the one-run privacy audit (``audit.canaries``), in this
        task's row shape: examples only memorisation can fit (:mod:`fedlora.leakage.canaries`)."""
        from fedlora.core.errors import ConfigError

        raise ConfigError("audit.canaries", f"the {self.name} task has no canaries; set audit.canaries=0")

    # -- model -------------------------------------------------------------------------
    def device(self, model_cfg: Any) -> torch.device:
        """Where the model trains (the noise generator of DP-SGD follows it)."""
        return torch.device("cpu")

    @abstractmethod
    def load(self, model_cfg: Any, num_labels: int, seed: int) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        """(tokenizer, base model), the head initialised from ``seed`` where it is fresh."""

    @abstractmethod
    def encode(self, rows: Dataset, tokenizer: PreTrainedTokenizerBase, model_cfg: Any) -> TensorDataset:
        """Rows (``text``, ``label``) as model inputs; the last tensor is the target."""

    def encode_eval(self, rows: Dataset, tokenizer: PreTrainedTokenizerBase, model_cfg: Any,
                    label_names: list[str]) -> TensorDataset:
        """The server's held-out rows, with what evaluation needs besides the inputs."""
        return self.encode(rows, tokenizer, model_cfg)

    def training_data(self, model: torch.nn.Module, data: TensorDataset, model_cfg: Any,
                      batch_size: int) -> TensorDataset:
        """A client's encoded training shard in the form its training steps read; a task may
        precompute there what no step changes (kept in the client's process only)."""
        return data

    @abstractmethod
    def per_example_loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(batch,) each example's own loss: what training averages, and what membership
        inference and the canary audit score."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The mean over the batch's examples of each example's own loss: what Opacus's
        ``loss_reduction="mean"`` assumes, so per-example gradients are exact."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, data: TensorDataset, batch_size: int,
                 precision: str = "fp32") -> dict[str, float]:
        """``{"loss": ..., self.metric: ...}`` over ``data``."""

    def generations(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, data: TensorDataset,
                    count: int, max_new_tokens: int) -> tuple[float, list[dict[str, str]]] | None:
        """(exact match, a few prompts with reference and generated answers) for generative
        tasks; None for tasks that do not generate."""
        return None

    def probe_inputs(self, model: torch.nn.Module, data: TensorDataset, batch_size: int,
                     precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
        """(features, targets, trainable linear head) for linear probing under the current
        adapter. Tasks without a separable head refuse it (``train.probe_steps``)."""
        from fedlora.core.errors import ConfigError

        raise ConfigError("train.probe_steps", f"the {self.name} task has no separable head to probe; "
                          "set train.probe_steps=0")

    @abstractmethod
    def export(self, model: torch.nn.Module, out_dir: Path, model_cfg: Any, label_names: list[str]) -> None:
        """Write the final model (adapter and what loading it needs) to ``out_dir``."""

    @abstractmethod
    def load_trained(self, run_dir: Path, cfg: Any) -> tuple[PreTrainedTokenizerBase, torch.nn.Module, list[str]]:
        """(tokenizer, model with the run's final adapter, label names) of a finished run."""


def autocast(precision: str):
    """bf16 autocast for forward-only passes where the CPU supports it, else a no-op.

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


def trim(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows are padded to max_length: cut the batch to its longest real row."""
    length = max(1, int(mask.sum(dim=1).max()))
    return input_ids[:, :length], mask[:, :length]
