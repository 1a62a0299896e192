"""Sequence classification: an encoder (or any transformer) with a classification head.

``model.pooling=model`` uses the architecture's own head
(``AutoModelForSequenceClassification``): the adapter then loads with stock
transformers + PEFT. ``model.pooling=mean`` puts a linear head on the masked mean of
the token states (:class:`fedlora.tasks.heads.MeanPoolingClassifier`, for
sentence-embedding encoders such as the default all-MiniLM-L6-v2), which also allows
linear probing; its adapter loads through :meth:`SequenceClassification.load_trained`
(what ``python -m fedlora.predict`` uses). PEFT's sequence-classification task trains
and saves the head with the LoRA factors (``modules_to_save``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel, TaskType
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerBase,
)

from fedlora.core.errors import ConfigError
from fedlora.models.hub import exported_revision, load_tokenizer, model_revision, note_model_commit, resolve_model_path
from fedlora.tasks.base import Task, autocast, trim
from fedlora.tasks.heads import MeanPoolingClassifier

LABELS_FILE = "labels.json"


def load_classifier(model_cfg: Any, num_labels: int, seed: int):
    """A sequence-classification model with a fresh ``num_labels`` head (seeded, so every
    process builds the same one); ``model.random_init`` builds a randomly initialised
    model of the same family, for tests of the mechanics."""
    revision = model_revision(model_cfg)
    path = resolve_model_path(model_cfg.name_or_path)
    trust = bool(model_cfg.trust_remote_code)
    pooling = str(model_cfg.get("pooling", "model"))
    if pooling not in ("model", "mean"):
        raise ConfigError("model.pooling", f"unknown pooling {pooling!r}; choose model or mean")
    auto = AutoModel if pooling == "mean" else AutoModelForSequenceClassification
    labels = {} if pooling == "mean" else {"num_labels": num_labels}
    torch.manual_seed(seed)
    try:
        if model_cfg.random_init:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust, revision=revision, **labels)
            note_model_commit(model_cfg, config)
            for key, value in dict(model_cfg.random_init).items():
                setattr(config, key, value)
            model = auto.from_config(config, trust_remote_code=trust)
        else:
            model = auto.from_pretrained(path, trust_remote_code=trust, revision=revision, **labels)
            note_model_commit(model_cfg, model.config)
        if pooling == "mean":
            model = MeanPoolingClassifier(model, num_labels, bool(model_cfg.get("normalize", True)))
    except (OSError, ValueError) as err:
        raise ConfigError(
            "model.name_or_path",
            f"cannot load a sequence-classification model from {model_cfg.name_or_path!r}: {err}",
        ) from err
    return model


class SequenceClassification(Task):
    name = "classification"
    peft_task_type = TaskType.SEQ_CLS
    metric = "accuracy"

    def load(self, model_cfg, num_labels, seed):
        tokenizer = load_tokenizer(model_cfg)
        model = load_classifier(model_cfg, num_labels, seed)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return tokenizer, model

    def encode(self, rows: Dataset, tokenizer: PreTrainedTokenizerBase, model_cfg: Any) -> TensorDataset:
        enc = tokenizer(list(rows["text"]), truncation=True, max_length=int(model_cfg.max_length),
                        padding="max_length", return_tensors="pt")
        labels = torch.as_tensor(list(rows["label"]), dtype=torch.long)
        return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)

    def canaries(self, data, count, seed):
        from fedlora.leakage.canaries import word_canaries

        return word_canaries(data.train["text"], data.num_labels, count, seed)

    def per_example_loss(self, model, batch):
        input_ids, mask, labels = batch
        input_ids, mask = trim(input_ids, mask)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        return torch.nn.functional.cross_entropy(logits, labels.to(logits.device), reduction="none")

    def loss(self, model, batch):
        # One label per example: the batch mean of per-example losses (what Opacus assumes).
        return self.per_example_loss(model, batch).mean()

    @torch.no_grad()
    def evaluate(self, model, data, batch_size, precision="fp32"):
        if len(data) == 0:
            return {"loss": float("nan"), self.metric: float("nan")}
        was_training = model.training
        model.eval()
        loss_sum, correct = 0.0, 0
        for input_ids, mask, labels in DataLoader(data, batch_size=int(batch_size)):
            input_ids, mask = trim(input_ids, mask)
            with autocast(precision):
                logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == labels).sum())
        model.train(was_training)
        return {"loss": loss_sum / len(data), self.metric: correct / len(data)}

    def probe_inputs(self, model: PeftModel, data, batch_size, precision="auto"):
        """Features of a mean-pooling model and its head. The head is PEFT's trainable
        copy inside ``modules_to_save``, the very tensors that travel, so probing updates
        the adapter in place."""
        inner = model.get_base_model()
        if not isinstance(inner, MeanPoolingClassifier):
            raise ConfigError("train.probe_steps", "linear probing needs model.pooling=mean (a separable head)")
        head = inner.classifier
        head = head.modules_to_save[model.active_adapter] if hasattr(head, "modules_to_save") else head
        return embed_all(inner.embed, data, batch_size, precision), data.tensors[-1], head

    def export(self, model, out_dir, model_cfg, label_names):
        # Name the base so PEFT's own loaders find it: the hub id or folder as configured,
        # a package model's folder on this machine.
        model.peft_config[model.active_adapter].base_model_name_or_path = resolve_model_path(model_cfg.name_or_path)
        model.peft_config[model.active_adapter].revision = exported_revision(model_cfg)
        model.save_pretrained(str(out_dir))
        (Path(out_dir) / LABELS_FILE).write_text(json.dumps(list(label_names)))

    def load_trained(self, run_dir, cfg):
        adapter = Path(run_dir) / "adapter"
        labels = json.loads((adapter / LABELS_FILE).read_text())
        tokenizer, base = self.load(cfg.model, len(labels), int(cfg.seed))
        model = PeftModel.from_pretrained(base, str(adapter))
        model.eval()
        return tokenizer, model, labels


@torch.no_grad()
def embed_all(embed, data: TensorDataset, batch_size: int, precision: str = "auto") -> torch.Tensor:
    """Head inputs for every row of ``data`` under the current adapter (fp32): the
    features a linear probe trains on."""
    out = []
    with autocast(precision):
        for input_ids, mask, _ in DataLoader(data, batch_size=int(batch_size)):
            input_ids, mask = trim(input_ids, mask)
            out.append(embed(input_ids, mask).float())
    return torch.cat(out)
