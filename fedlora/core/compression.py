"""Compression of a client's update on the wire (pure numpy): the ``compression`` group.

A codec turns the flat delta into the few arrays that travel, and the server turns them
back (``decode``) before it validates and aggregates. Codecs:

- ``none``: the float32 delta as it is.
- ``int8`` / ``int4``: per-tensor scale ``s = max|x| / L`` (L = 127 or 7) and stochastic
  rounding ``q = floor(x/s + u)``, u ~ U[0, 1): unbiased, ``E[q s] = x``, each coordinate
  off by less than ``s`` (Alistarh et al. 2017, "QSGD"; Suresh et al. 2017). int4 packs
  two values per byte.
- ``topk``: the ``fraction`` of coordinates of largest magnitude as (int32 index, float32
  value) pairs, with error feedback (Stich, Cordonnier, Jaggi 2018, "Sparsified SGD with
  Memory"): what was not sent is added to the next round's delta, so every coordinate
  is sent eventually. The residual is client state kept on the client's disk.

With DP: the delta a client compresses is already noised under sample-level DP, so
compression (and the residual, built from noised deltas only) is post-processing;
under client-level DP the server decodes before it clips and noises, so the mechanism
sees the decoded update. SecAgg+ quantises on its own (fedlora.core.secure) and needs
float tensors of the adapter's shapes: only ``none`` runs under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlora.core.errors import ConfigError

CODECS = ("none", "int8", "int4", "topk")
LEVELS = {"int8": 127, "int4": 7}


@dataclass(frozen=True)
class Codec:
    """One codec with its parameters; ``sizes`` are the adapter's tensor sizes."""

    name: str = "none"
    fraction: float = 0.1  # topk: share of coordinates sent

    @classmethod
    def from_config(cls, cfg: Any) -> "Codec":
        comp = cfg.get("compression") or {}
        name = str(comp.get("name", "none"))
        if name not in CODECS:
            raise ConfigError("compression", f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
        fraction = float(comp.get("fraction", 0.1) or 0.1)
        if name == "topk" and not 0 < fraction <= 1:
            raise ConfigError("compression.fraction", f"must lie in (0, 1], got {fraction}")
        if name != "none" and str((cfg.get("secure") or {}).get("name", "none")) == "secaggplus":
            raise ConfigError(
                "compression", f"{name} cannot run under SecAgg+, which masks float tensors of the adapter's shapes "
                "and quantises them itself (secure.quantization_range); use compression=none with secure=secaggplus")
        return cls(name=name, fraction=fraction)

    @property
    def error_feedback(self) -> bool:
        return self.name == "topk"

    # -- client side -----------------------------------------------------------------
    def encode(self, flat: np.ndarray, sizes: list[int], rng: np.random.Generator) -> list[np.ndarray]:
        flat = np.asarray(flat, dtype=np.float32)
        if self.name == "none":
            return [flat]
        if self.name in LEVELS:
            return _quantize(flat, sizes, LEVELS[self.name], rng, packed=self.name == "int4")
        k = max(1, int(round(self.fraction * flat.size)))
        idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
        idx.sort()
        return [idx.astype(np.int32), flat[idx]]

    # -- server side -----------------------------------------------------------------
    def decode(self, arrays: list[np.ndarray], sizes: list[int]) -> np.ndarray:
        """The flat float32 delta; ValueError on a malformed payload."""
        d = int(sum(sizes))
        if self.name == "none":
            (flat,) = _expect(arrays, 1)
            return _shape(flat, d)
        if self.name in LEVELS:
            return _dequantize(arrays, sizes, packed=self.name == "int4")
        idx, values = _expect(arrays, 2)
        idx, values = np.asarray(idx), np.asarray(values, dtype=np.float32)
        if idx.ndim != 1 or idx.shape != values.shape or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError("topk payload needs equal-length integer indices and values")
        if idx.size and (idx.min() < 0 or idx.max() >= d or np.unique(idx).size != idx.size):
            raise ValueError(f"topk indices must be distinct and lie in [0, {d})")
        out = np.zeros(d, np.float32)
        out[idx] = values
        return out


def _expect(arrays: list[np.ndarray], n: int) -> list[np.ndarray]:
    if len(arrays) != n:
        raise ValueError(f"expected {n} arrays in the compressed update, got {len(arrays)}")
    return arrays


def _shape(flat: np.ndarray, d: int) -> np.ndarray:
    flat = np.asarray(flat)
    if flat.ndim != 1 or flat.size != d:
        raise ValueError(f"expected a flat update of {d} values, got shape {flat.shape}")
    if not np.issubdtype(flat.dtype, np.floating):
        raise ValueError(f"dtype {flat.dtype} is not floating point")
    return flat.astype(np.float32)


def _quantize(flat: np.ndarray, sizes: list[int], levels: int, rng: np.random.Generator,
              packed: bool) -> list[np.ndarray]:
    scales = np.empty(len(sizes), np.float32)
    q = np.empty(flat.size, np.int8)
    start = 0
    for i, size in enumerate(sizes):
        part = flat[start:start + size]
        peak = float(np.max(np.abs(part))) if size else 0.0
        scales[i] = peak / levels if peak > 0 else 1.0
        # Stochastic rounding: floor(x/s + u) is unbiased and never leaves [-L, L].
        q[start:start + size] = np.clip(np.floor(part / scales[i] + rng.random(size)), -levels, levels)
        start += size
    if packed:
        nibbles = (q + 8).astype(np.uint8)  # [-7, 7] -> [1, 15]
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(8))
        return [(nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8), scales]
    return [q, scales]


def _dequantize(arrays: list[np.ndarray], sizes: list[int], packed: bool) -> np.ndarray:
    codes, scales = _expect(arrays, 2)
    d = int(sum(sizes))
    scales = np.asarray(scales, dtype=np.float32)
    if scales.shape != (len(sizes),) or not np.all(np.isfinite(scales)):
        raise ValueError(f"expected {len(sizes)} finite per-tensor scales")
    codes = np.asarray(codes)
    if packed:
        if codes.dtype != np.uint8 or codes.size != (d + 1) // 2:
            raise ValueError(f"int4 payload needs {(d + 1) // 2} packed bytes")
        q = np.empty(codes.size * 2, np.int16)
        q[0::2], q[1::2] = codes & 0x0F, codes >> 4
        q = q[:d] - 8
    else:
        if codes.dtype != np.int8 or codes.size != d:
            raise ValueError(f"int8 payload needs {d} int8 codes")
        q = codes.astype(np.int16)
    return (q.astype(np.float32) * np.repeat(scales, sizes)).astype(np.float32)
