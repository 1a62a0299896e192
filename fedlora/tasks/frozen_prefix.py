"""The frozen prefix of a decoder, computed once per example.

When LoRA adapts only the top layers of a decoder (``lora.layers_to_transform``), every
layer below the lowest adapted one is frozen and unadapted: its output for an example
is the same in every step and every round. Training then needs only the input of the
lowest adapted layer, which is computed once per example and kept with the client's
shard; each DP-SGD step runs the adapted layers, the final norm and the vocabulary
projection. The loss and every per-example gradient are those of the whole model
(checked on the first rows when the cache is built), so the DP-SGD mechanism and its
accounting are unchanged; only the cost of a step falls, roughly by the share of
layers that are frozen. It is the feature-caching of private fine-tuning on frozen
features (Tramèr and Boneh 2021, "Differentially Private Learning Needs Better
Features"), applied to the frozen bottom of the network.

When every trained tensor lies in the MLP of the top layer, nothing trained mixes
positions: attention, the last place where one position reads another, is frozen in
every layer. The cache then holds, for the answer columns only, the residual stream
entering that MLP, and a step is ``lm_head(norm(h + mlp(post_attention_layernorm(h))))``
on those few columns: the cost of a step no longer grows with the prompt.

The cache holds activations of the client's own examples and stays with the client like
its tokenized shard: it is never sent. With ``model.frozen_prefix_dir`` set it is also
kept in that folder of the client's own disk (:func:`stored`), so that every process of
the client (simulation workers, later runs on the same data) computes it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import TensorDataset

from fedlora.core.errors import ConfigError
from fedlora.core.files import write_atomic

_LAYER = re.compile(r"\.layers\.(\d+)\.")
# fp32 reorders no sum between the two paths: the residual stream agrees to rounding.
TOLERANCE = 1e-4


class _Captured(Exception):
    """Stops the forward pass once the lowest adapted layer's input is known."""


class PrefixData(TensorDataset):
    """``(hidden, attention_mask, labels)``: the input of the lowest adapted layer of every
    position, in place of the token ids; for a top-layer MLP, the input of that MLP's
    residual block in the last columns only, with the mask and labels of those columns."""


def fingerprint(model: torch.nn.Module, data: tuple[torch.Tensor, ...], *parts: object) -> str:
    """A digest of the frozen weights, of the shard's tensors ``data`` and of ``parts``
    (the cache's shape): what a cached prefix depends on. Adapter (LoRA) tensors are
    left out, they never enter the prefix."""
    h = hashlib.sha256(repr(parts).encode())
    for t in data:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    with torch.no_grad():
        for name, p in _peft(model).named_parameters():
            if "lora_" not in name:
                h.update(name.encode())
                h.update(repr(float(p.detach().double().sum())).encode())
    return h.hexdigest()[:24]


def stored(directory: str | os.PathLike | None, key: str, build: Callable[[], PrefixData],
           check: Callable[[PrefixData], bool]) -> PrefixData:
    """The prefix of ``key`` from ``directory`` when present and ``check`` accepts it, else
    built and written there (atomically: concurrent workers of a client read whole files
    only). Without a directory, built."""
    if not directory:
        return build()
    file = Path(directory).expanduser() / f"{key}.pt"
    if file.is_file():
        try:
            cached = PrefixData(*torch.load(file, weights_only=True))
        except (OSError, RuntimeError, EOFError, TypeError):
            cached = None
        if cached is not None and check(cached):
            return cached
    data = build()
    buffer = io.BytesIO()
    torch.save(list(data.tensors), buffer)
    write_atomic(file, buffer.getvalue())
    return data


def _peft(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_module", model)  # under Opacus, the wrapped PEFT model


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """(the decoder stack, its list of layers) of a PEFT-wrapped causal LM."""
    base = _peft(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    decoder = base.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError("model.cache_frozen_prefix", f"{type(decoder).__name__} has no list of decoder layers to "
                          "cache below; set model.cache_frozen_prefix=false")
    return decoder, layers


def first_trained_layer(model: torch.nn.Module) -> int | None:
    """The lowest decoder layer that holds a trained tensor, or None when something below
    every layer trains (embeddings) or nothing lies frozen under it."""
    indices = []
    for name, param in _peft(model).named_parameters():
        if param.requires_grad:
            match = _LAYER.search(name)
            if match is None:
                return None
            indices.append(int(match.group(1)))
    start = min(indices, default=0)
    return start or None


def top_mlp_only(model: torch.nn.Module) -> bool:
    """Whether every trained tensor lies in the MLP of the top decoder layer."""
    _, layers = decoder_layers(model)
    inside = f".layers.{len(layers) - 1}.mlp."
    names = [name for name, param in _peft(model).named_parameters() if param.requires_grad]
    return bool(names) and all(inside in name for name in names)


def _mlp_norm(layer: torch.nn.Module) -> torch.nn.Module:
    norm = getattr(layer, "post_attention_layernorm", None)
    if norm is None or not hasattr(layer, "mlp"):
        raise ConfigError("model.cache_frozen_prefix", f"{type(layer).__name__} has no post_attention_layernorm "
                          "before its mlp to cache at; set model.cache_frozen_prefix=false")
    return norm


@contextlib.contextmanager
def _from_layer(decoder: torch.nn.Module, layers: torch.nn.ModuleList, start: int):
    """The decoder with layers ``start:`` only, for a forward from their input."""
    decoder.layers = torch.nn.ModuleList(list(layers)[start:])
    try:
        yield
    finally:
        decoder.layers = layers


@torch.no_grad()
def layer_inputs(model: torch.nn.Module, start: int, input_ids: torch.Tensor, mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
    """The input of decoder layer ``start`` for every position (the layers above never run)."""
    _, layers = decoder_layers(model)
    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Captured

    handle = layers[start].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _peft(model)(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def mlp_inputs(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
               keep: int) -> torch.Tensor:
    """The residual stream entering the top layer's MLP block, in the last ``keep`` columns."""
    _, layers = decoder_layers(model)
    seen: list[torch.Tensor] = []

    def grab(module, args):
        seen.append(args[0][:, -keep:].detach())
        raise _Captured

    handle = _mlp_norm(layers[-1]).register_forward_pre_hook(grab)
    try:
        _peft(model)(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen[0]


def logits_from_mlp_input(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of every cached column: the top layer's MLP block, the final norm and the
    vocabulary projection. Called through the submodules, so Opacus's hooks on the
    adapted MLP projections see the step."""
    base = _peft(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    decoder, layers = decoder_layers(model)
    layer = layers[-1]
    norm = _mlp_norm(layer)
    hidden = hidden.to(norm.weight.dtype)
    out = hidden + layer.mlp(norm(hidden))
    return base.get_output_embeddings()(decoder.norm(out))


def logits_from_cache(model: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor,
                      position_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` columns from whichever cache the trained tensors call for."""
    if top_mlp_only(model):
        return logits_from_mlp_input(model, hidden[:, -keep:])
    return logits_from(model, first_trained_layer(model), hidden, mask, position_ids, keep)


def logits_from(model: torch.nn.Module, start: int, hidden: torch.Tensor, mask: torch.Tensor,
                position_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` columns, running layers ``start:`` from their cached input.
    ``model`` may be Opacus's GradSampleModule: its hooks sit on the adapted layers."""
    decoder, layers = decoder_layers(model)
    with _from_layer(decoder, layers, start):
        return model(inputs_embeds=hidden, attention_mask=mask, position_ids=position_ids,
                     logits_to_keep=keep, use_cache=False).logits


def agrees(full: torch.Tensor, cached: torch.Tensor) -> bool:
    """Whether losses from the cache equal the whole model's, to fp32 rounding."""
    gap = float((full.float() - cached.float()).abs().max())
    return gap <= TOLERANCE * max(1.0, float(full.float().abs().max()))


def check_exact(full: torch.Tensor, cached: torch.Tensor) -> None:
    """Refuse an architecture whose decoder transforms its input before the first layer
    (e.g. Gemma's embedding scale): a forward from the cache would not be the model's."""
    if not agrees(full, cached):
        gap = float((full.float() - cached.float()).abs().max())
        raise ConfigError("model.cache_frozen_prefix", f"a forward from the cached frozen layers differs from the "
                          f"whole model's by {gap:.3g} on this architecture; set model.cache_frozen_prefix=false")
