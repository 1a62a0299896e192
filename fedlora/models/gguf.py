"""GGUF checkpoints (llama.cpp's format) as ordinary transformers folders, converted once.

transformers reads a GGUF file by dequantizing every tensor (``gguf_file=``, needs the
``gguf`` package), which takes tens of seconds, and marks the model as quantized so it
cannot be saved as it is. The first load therefore builds a plain model from the GGUF
config, copies the dequantized weights into it, and saves model and tokenizer (with its
chat template) as safetensors under the cache; later loads read that folder in about a
second, and a PEFT adapter can name it as its ``base_model_name_or_path``.

The cache is ``$FEDLORA_CACHE`` (default ``~/.cache/fedlora``)/``gguf/<name>-<digest>``;
the digest covers the file's size and first MiB, so a changed file converts again.
Concurrent processes (simulated clients, the server) wait on one file lock and convert
once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

from fedlora.core.errors import ConfigError

CACHE_ENV = "FEDLORA_CACHE"
DONE = ".converted"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedlora")


def _digest(file: Path) -> str:
    h = hashlib.sha256(str(file.stat().st_size).encode())
    with file.open("rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def converted_folder(file: Path | str, setting: str = "model.name_or_path") -> str:
    """The transformers folder of GGUF ``file``, converting it on first use."""
    file = Path(file)
    if not file.is_file():
        raise ConfigError(setting, f"no such GGUF file: {file}")
    out = cache_root() / "gguf" / f"{file.stem}-{_digest(file)}"
    if (out / DONE).is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / DONE).is_file():
            _convert(file, out)
    return str(out)


def _convert(file: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise ConfigError("model.name_or_path", f"{file.name} is a GGUF file: pip install gguf ({err})") from err
    folder, name = str(file.parent), file.name
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # ``folder`` holds a GGUF file converted_folder found on this disk: transformers reads
    # it there and asks the hub for nothing, so there is no revision to pin.
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)  # nosec B615 # a local GGUF folder, not a hub id
    config = AutoConfig.from_pretrained(folder, gguf_file=name)  # nosec B615 # a local GGUF folder, not a hub id
    quantized = AutoModelForCausalLM.from_pretrained(  # nosec B615 # a local GGUF folder, not a hub id
        folder, gguf_file=name, dtype=torch.float32
    )
    # The dequantized model carries transformers' GGUF quantizer and refuses to save:
    # copy its weights into a plain model of the same config.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing = model.load_state_dict(quantized.state_dict(), strict=False)
    if missing.missing_keys:
        raise ConfigError("model.name_or_path", f"{file.name}: tensors missing after conversion: "
                          f"{missing.missing_keys[:5]}")
    model.generation_config = quantized.generation_config
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / DONE).write_text(f"{file}\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
