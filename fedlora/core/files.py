"""Crash-safe file writes: write a temporary file next to the target, then rename.

A reader (or a run resumed after a crash) sees the old file or the new one, never a
torn one: ``os.replace`` is atomic on one filesystem.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, private: bool = False) -> Path:
    """Replace ``path`` with ``data`` (fsync'd); ``private`` makes it owner-only (keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path
