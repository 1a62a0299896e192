"""Crash-safe server checkpoints: one file per run, replaced atomically every round.

A checkpoint holds everything the server needs to continue: the global adapter, the
last completed round, the privacy ledger (never reset by a resume), the strategy's
state (e.g. the centered-clipping reference, clients out of budget) and the state of
the server's random generator. Arrays go into an ``.npz``; the rest is JSON stored
inside it, so one ``os.replace`` switches from one complete round to the next.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.core.files import write_atomic

CHECKPOINT = "checkpoint.npz"


@dataclass
class Checkpoint:
    round: int
    global_arrays: list[np.ndarray]
    state: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically (write a temp file, fsync, rename)."""
    meta = json.dumps({"round": ckpt.round, "num_global": len(ckpt.global_arrays), "state": ckpt.state})
    payload = {f"global_{i}": a for i, a in enumerate(ckpt.global_arrays)}
    payload.update({f"array_{k}": v for k, v in ckpt.arrays.items()})
    payload["meta"] = np.frombuffer(meta.encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **payload)
    write_atomic(Path(path), buffer.getvalue())


def load_checkpoint(path: Path) -> Checkpoint:
    with np.load(Path(path), allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        arrays = [data[f"global_{i}"] for i in range(meta["num_global"])]
        extra = {k[len("array_"):]: data[k] for k in data.files if k.startswith("array_")}
    return Checkpoint(round=int(meta["round"]), global_arrays=arrays, state=meta["state"], arrays=extra)


def resume_commands(run_dir: Path | str) -> str:
    """How a user continues the run in ``run_dir``, in either environment."""
    return (f"`python -m simulations.run resume={run_dir}` (simulation) or "
            f"`python -m fedlora.deploy run --resume --run-dir {run_dir} ...` (deployment)")


def run_config(run_dir: Path):
    """The resolved config of the run in ``run_dir`` (its ``config.yaml``), to resume it
    with exactly the settings it started with."""
    from omegaconf import OmegaConf

    from fedlora.core.errors import ConfigError

    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file() or not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            "resume", f"no {CHECKPOINT} and config.yaml in {run_dir}; point resume at the run dir of the run "
            f"to continue: {resume_commands('<run dir>')}"
        )
    saved = OmegaConf.load(run_dir / "config.yaml")
    saved.resume = True
    return saved
