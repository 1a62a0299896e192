"""Reject malformed client updates before they reach an aggregator."""

from __future__ import annotations

import numpy as np


def validate_update(arrays: list[np.ndarray], expected: list[np.ndarray]) -> str | None:
    """``None`` when ``arrays`` matches ``expected`` tensor by tensor, else the reason."""
    if len(arrays) != len(expected):
        return f"expected {len(expected)} tensors, got {len(arrays)}"
    for i, (got, ref) in enumerate(zip(arrays, expected)):
        if got.shape != ref.shape:
            return f"tensor {i}: shape {got.shape} != expected {ref.shape}"
        if not np.issubdtype(got.dtype, np.floating):
            return f"tensor {i}: dtype {got.dtype} is not floating point"
        if not np.all(np.isfinite(got)):
            return f"tensor {i}: contains NaN or Inf"
    return None
