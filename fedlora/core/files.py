"""Crash-safe file writes: replace a file whole (write a temporary file next to it, then
rename), or append to a log durably.

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
    # One temporary file per process: concurrent writers of the same path never share one.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def append_durable(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` and fsync before returning: an append-only log whose
    lines survive a crash of the process right after (spend records, the audit log)."""
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
