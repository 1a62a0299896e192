"""Per-process caches: the base model, tokenizer and LoRA wrapper are built once.

A simulation backend (Ray actor) or SuperNode process serves many client calls;
reloading a transformer per call would dominate the round time. The cache key is
everything that shapes the model, so different experiments in one process never
share a model.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from opacus import GradSampleModule
from peft import PeftModel
from torch.utils.data import TensorDataset
from transformers import PreTrainedTokenizerBase

from fedlora.core.config import canonical_json
from fedlora.models.lora import build_lora_model, trainable_names
from fedlora.models.ranks import LoRALayout, RankPlan
from fedlora.tasks import get_task


@dataclass
class ModelBundle:
    tokenizer: PreTrainedTokenizerBase
    model: PeftModel
    names: list[str]
    _gsm: GradSampleModule | None = None
    shards: OrderedDict = field(default_factory=OrderedDict)

    @functools.cached_property
    def layout(self) -> LoRALayout:
        """Where the LoRA factors sit among ``names``."""
        return LoRALayout.from_names(self.names)

    def grad_sample_module(self) -> GradSampleModule:
        """Opacus per-sample-gradient wrapper, built once (its hooks stay on the model)."""
        if self._gsm is None:
            self._gsm = GradSampleModule(self.model)
        return self._gsm


_BUNDLES: dict[str, ModelBundle] = {}
_MAX_SHARDS = 64


def model_key(cfg: Any, num_labels: int, rank: int) -> str:
    return canonical_json({"model": cfg.model, "lora": cfg.lora, "labels": num_labels, "seed": cfg.seed,
                           "rank": rank})


def get_bundle(cfg: Any, num_labels: int) -> ModelBundle:
    # The global LoRA rank (the largest client rank), derived once per call.
    rank = RankPlan.from_config(cfg).global_rank
    key = model_key(cfg, num_labels, rank)
    bundle = _BUNDLES.get(key)
    if bundle is None:
        task = get_task(cfg.model)
        tokenizer, base = task.load(cfg.model, num_labels, int(cfg.seed))
        base.to(task.device(cfg.model))  # on its device before PEFT wraps it (Opacus/PEFT pitfall)
        model = build_lora_model(base, cfg.lora, task.peft_task_type, rank=rank)
        model.train()
        bundle = ModelBundle(tokenizer=tokenizer, model=model, names=trainable_names(model))
        _BUNDLES.clear()  # one experiment per process at a time: bound the memory
        _BUNDLES[key] = bundle
    return bundle


def cached_shard(bundle: ModelBundle, key: Any, build) -> TensorDataset:
    """Tokenized data cached per process (LRU), e.g. one entry per client shard."""
    if key in bundle.shards:
        bundle.shards.move_to_end(key)
        return bundle.shards[key]
    value = build()
    bundle.shards[key] = value
    if len(bundle.shards) > _MAX_SHARDS:
        bundle.shards.popitem(last=False)
    return value
