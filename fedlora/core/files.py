"""Crash-safe file writes: replace a file whole (write a temporary file next to it, then
rename), or append to a log durably.

A reader (or a run resumed after a crash) sees the old file or the new one, never a
torn one: ``os.replace`` is atomic on one filesystem.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, private: bool = False) -> Path:
    """Replace ``path`` with ``data`` (fsync'd); ``private`` makes it owner-only (keys).

    A private file is created with mode 0600 (``os.open`` with ``O_CREAT | O_EXCL``):
    a key is never readable by other users, not even for the moment between writing it
    and restricting it, and a file or symlink planted at the temporary name is removed
    (or, planted again in between, refused by ``O_EXCL``), never written through.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One temporary file per process: concurrent writers of the same path never share one.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    if private:
        tmp.unlink(missing_ok=True)  # a leftover of this PID's crashed write
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if private else os.O_TRUNC)
    fd = os.open(tmp, flags | getattr(os, "O_CLOEXEC", 0), 0o600 if private else 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def append_durable(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` and fsync before returning: an append-only log whose
    lines survive a crash of the process right after (spend records, the audit log)."""
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
