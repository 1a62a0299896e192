"""Reject malformed client updates before they reach an aggregator."""

from __future__ import annotations

import numpy as np

# The rules sum float32 rows: a wider float beyond this is finite here and inf there.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def validate_update(arrays: list[np.ndarray], expected: list[np.ndarray]) -> str | None:
    """``None`` when ``arrays`` matches ``expected`` tensor by tensor, else the reason."""
    if len(arrays) != len(expected):
        return f"expected {len(expected)} tensors, got {len(arrays)}"
    for i, (got, ref) in enumerate(zip(arrays, expected)):
        if not isinstance(got, np.ndarray):
            return f"tensor {i}: a {type(got).__name__}, not an array"
        if got.shape != ref.shape:
            return f"tensor {i}: shape {got.shape} != expected {ref.shape}"
        if not np.issubdtype(got.dtype, np.floating):
            return f"tensor {i}: dtype {got.dtype} is not floating point"
        if not np.all(np.isfinite(got)):
            return f"tensor {i}: contains NaN or Inf"
        if got.size and float(np.max(np.abs(got))) > FLOAT32_MAX:
            return f"tensor {i}: values beyond the float32 range (|x| > {FLOAT32_MAX:.4g})"
    return None
