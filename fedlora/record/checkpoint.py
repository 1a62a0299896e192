"""Crash-safe server checkpoints: one file per run, replaced atomically every round.

A checkpoint holds everything the server needs to continue: the global adapter, the
last completed round, the privacy ledger (never reset by a resume), the strategy's
state (e.g. the centered-clipping reference, clients out of budget) and the state of
the server's random generator. Arrays go into an ``.npz``; the rest is JSON stored
inside it, so one ``os.replace`` switches from one complete round to the next.

A checkpoint is refused whole, with a :class:`CheckpointError` naming the file and the
reason, rather than loaded half-way: :func:`load_checkpoint` reads every member and
checks it before returning anything. The file must be a zip archive of ``.npy`` members
(a bare ``.npy``, a pickle or anything else is refused); members are read with
``allow_pickle=False``, so an object array is refused before anything is unpickled (a
pickle runs code when loaded: the reason NumPy's loader refuses it, and why nothing here
ever allows it); the member ``sha256`` must equal the SHA-256 of every other member's
name, dtype, shape and bytes, so an edited array or JSON state, or a member added or
removed, is refused; the JSON state must have the shape :func:`save_checkpoint` writes,
and its privacy ledger must be one :meth:`PrivacyLedger.from_dict` accepts.

The digest shows corruption and edits by anyone who does not recompute it. Someone who
can write the run dir can recompute it too: against them the run's record is the audit
log's MAC chain (:mod:`fedlora.record.audit`), whose rounds a checkpoint cannot rewrite.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.core.files import write_atomic
from fedlora.privacy.ledger import PrivacyLedger

CHECKPOINT = "checkpoint.npz"
DIGEST = "sha256"
META = "meta"
_ZIP_MAGIC = b"PK\x03\x04"
# Numbers only: bool, signed and unsigned ints, floats, complex.
_NUMERIC = "biufc"


class CheckpointError(ValueError):
    """A checkpoint that is refused: the message names the file and what is wrong."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: checkpoint refused, nothing of it was loaded: {reason}")


@dataclass
class Checkpoint:
    round: int
    global_arrays: list[np.ndarray]
    state: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def content_digest(members: dict[str, np.ndarray]) -> str:
    """SHA-256 over every member (sorted by name): its name, dtype, shape and C-order
    bytes, each framed by its length so no two different contents hash alike."""
    digest = hashlib.sha256()
    for name in sorted(members):
        array = np.ascontiguousarray(members[name])
        header = json.dumps([name, array.dtype.str, list(array.shape)]).encode("utf-8")
        data = array.tobytes()
        digest.update(len(header).to_bytes(8, "big") + header + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically (write a temp file, fsync, rename)."""
    meta = json.dumps({"round": ckpt.round, "num_global": len(ckpt.global_arrays), "state": ckpt.state})
    payload = {f"global_{i}": np.asarray(a) for i, a in enumerate(ckpt.global_arrays)}
    payload.update({f"array_{k}": np.asarray(v) for k, v in ckpt.arrays.items()})
    payload[META] = np.frombuffer(meta.encode(), dtype=np.uint8)
    for name, array in payload.items():
        if array.dtype.kind not in _NUMERIC:
            raise CheckpointError(path, f"{name} is not numeric ({array.dtype}); a checkpoint holds numbers only")
    payload[DIGEST] = np.frombuffer(content_digest(payload).encode("ascii"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **payload)
    write_atomic(Path(path), buffer.getvalue())


def _read_members(path: Path) -> dict[str, np.ndarray]:
    """Every member of the archive, read without pickle; refuses what is not an npz."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(path, f"cannot read it ({err})") from None
    if not data.startswith(_ZIP_MAGIC):
        raise CheckpointError(path, "not an npz archive (no zip header): a bare .npy, a pickle or another file")
    members: dict[str, np.ndarray] = {}
    name = None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            for name in archive.files:
                value = archive[name]
                if not isinstance(value, np.ndarray):
                    raise CheckpointError(path, f"member {name!r} is not an .npy array")
                members[name] = value
    except CheckpointError:
        raise
    except ValueError as err:
        if "pickle" in str(err) or "Object arrays" in str(err):
            raise CheckpointError(path, f"member {name!r} holds Python objects (a pickle); it was not unpickled "
                                        "and is refused") from None
        raise CheckpointError(path, f"member {name!r} is not a valid array ({err})") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, RuntimeError, zlib.error) as err:
        raise CheckpointError(path, f"the archive is damaged or truncated ({type(err).__name__}: {err})") from None
    return members


def _meta(path: Path, raw: np.ndarray) -> dict[str, Any]:
    try:
        meta = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(path, f"its JSON state is unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(path, "its JSON state is not an object")
    for key in ("round", "num_global"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(path, f"{key} is not a non-negative integer: {value!r}")
    if not isinstance(meta.get("state"), dict):
        raise CheckpointError(path, f"state is not an object: {type(meta.get('state')).__name__}")
    return meta


def load_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at ``path``, checked whole (see the module docstring); a
    :class:`CheckpointError` names what is wrong, and nothing of a refused file is used."""
    path = Path(path)
    members = _read_members(path)
    if DIGEST not in members or META not in members:
        missing = [m for m in (DIGEST, META) if m not in members]
        raise CheckpointError(path, f"member(s) {missing} missing: not a checkpoint of this version, or stripped")
    stored = members.pop(DIGEST)
    try:
        stored_text = bytes(stored).decode("ascii") if stored.dtype == np.uint8 else ""
    except UnicodeDecodeError:
        stored_text = ""
    if stored_text != content_digest(members):
        raise CheckpointError(path, "its contents do not match their SHA-256 digest: an array or the JSON state "
                                    "was edited, or a member added or removed")
    meta = _meta(path, members[META])
    unknown = sorted(n for n in members if n != META and not n.startswith(("global_", "array_")))
    if unknown:
        raise CheckpointError(path, f"unknown member(s) {unknown}")
    expected = {f"global_{i}" for i in range(meta["num_global"])}
    present = {n for n in members if n.startswith("global_")}
    if present != expected:
        raise CheckpointError(path, f"it should hold {meta['num_global']} global arrays, holds {sorted(present)}")
    for name, array in members.items():
        if array.dtype.kind not in _NUMERIC:
            raise CheckpointError(path, f"member {name!r} is not numeric ({array.dtype})")
    ledger = meta["state"].get("privacy_ledger")
    if ledger is not None:
        try:
            PrivacyLedger.from_dict(ledger)
        except ValueError as err:
            raise CheckpointError(path, f"its privacy ledger is malformed: {err}") from None
    return Checkpoint(
        round=meta["round"],
        global_arrays=[members[f"global_{i}"] for i in range(meta["num_global"])],
        state=meta["state"],
        arrays={n[len("array_"):]: a for n, a in members.items() if n.startswith("array_")},
    )


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
