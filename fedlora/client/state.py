"""A client's own record of its privacy spend, on its own disk.

Sample-level DP is the client's guarantee, so the client keeps the record that
enforces it: before an update leaves the client, the round's ``(noise_multiplier,
sample_rate, steps, round)`` is appended to a JSON-lines file and fsync'd. A server
that dies mid-round (after the clients replied, before it aggregated and checkpointed)
cannot make the client forget what it spent: on resume the client still composes over
every update it released, and the server's ledger becomes the union of its checkpoint
and what the clients report.

The file lives under the node's state directory (``--node-config "state-dir=<dir>"``,
default ``$FLWR_HOME/fedlora-client-state``, FLWR_HOME defaulting to ``~/.flwr``; in a
simulation, ``<run dir>/client_state``), one folder per experiment (the id the server
sends with every fit instruction), one file per client id.

A history sent by the server (after a resume, for a client that lost its disk) is taken
only if it extends the client's own, entry by entry: a server cannot rewrite what the
client spent, only tell it about rounds it has no record of. Entries a server adds can
only raise epsilon (composition never lowers it).
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fedlora.core.files import append_durable, write_atomic

Entry = tuple[float, float, int, int]  # noise_multiplier, sample_rate, steps, round

# Fit-instruction keys: the experiment the server runs (names the client's spend record)
# and the client's own history [[sigma, q, steps, round], ...] (a reply carries it too;
# after a resume the server's instruction may).
EXPERIMENT_KEY = "experiment_id"
HISTORY_KEY = "dp_history"
STATE_DIR_KEY = "state-dir"
STATE_DIR_DEFAULT = "fedlora-client-state"
# A simulation's clients keep theirs in the run dir, under this folder.
CLIENT_STATE_DIR = "client_state"


def default_state_dir() -> Path:
    """``$FLWR_HOME/fedlora-client-state`` (Flower's own home, ``~/.flwr`` by default)."""
    home = os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
    return Path(home) / STATE_DIR_DEFAULT


def state_dir(node_config: Mapping[str, Any], fallback: Path | str | None = None) -> Path:
    """The node's state directory: ``state-dir`` in its node config, else ``fallback``
    (a simulation's run dir), else :func:`default_state_dir`."""
    if node_config.get(STATE_DIR_KEY):
        return Path(str(node_config[STATE_DIR_KEY]))
    return Path(fallback) if fallback is not None else default_state_dir()


def _entry(raw: Sequence[Any]) -> Entry:
    return (float(raw[0]), float(raw[1]), int(raw[2]), int(raw[3]))


def extends(prefix: Sequence[Entry], history: Sequence[Entry]) -> bool:
    """Whether ``history`` starts with every entry of ``prefix``, in order."""
    return len(history) >= len(prefix) and all(_entry(a) == _entry(b) for a, b in zip(prefix, history))


def experiment_dir(root: Path | str, experiment_id: str) -> Path:
    """The folder of one experiment's client state under a node's state directory."""
    return Path(root) / (re.sub(r"[^A-Za-z0-9_.-]", "_", str(experiment_id)) or "experiment")


class SpendLog:
    """Append-only JSON lines of one client's spend in one experiment."""

    def __init__(self, root: Path | str, experiment_id: str, client: int | str) -> None:
        self.path = experiment_dir(root, experiment_id) / f"client-{client}.jsonl"


    def history(self) -> list[Entry]:
        if not self.path.is_file():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            try:
                entries.append(_entry(json.loads(line)))
            except (ValueError, IndexError, TypeError):
                # A line torn by a crash mid-write: the update it would record was never
                # sent (the line is fsync'd before the reply leaves).
                continue
        return entries

    def append(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(list(_entry(e))) + "\n" for e in entries)
        append_durable(self.path, text.encode("utf-8"))

    def adopt(self, server_history: Sequence[Sequence[Any]] | None) -> tuple[list[Entry], str | None]:
        """The client's history after considering the server's: (history, refusal reason).

        The server's is taken only if it extends the client's own; if it is merely shorter
        (the server lost rounds the client remembers) the client's own stands; anything else
        is refused, with the reason, and the client's own record stands.
        """
        own = self.history()
        if not server_history:
            return own, None
        theirs = [_entry(e) for e in server_history]
        if extends(own, theirs):
            self.append(theirs[len(own):])
            return theirs, None
        if extends(theirs, own):
            return own, None
        return own, (
            f"the server's privacy history ({len(theirs)} entries) does not extend this client's own "
            f"record ({len(own)} entries, {self.path}); it was refused and the client's own record is used"
        )


class Residual:
    """Error feedback's memory (top-k compression): what the client has not sent yet,
    one float32 vector on its own disk, replaced atomically every round."""

    def __init__(self, root: Path | str, experiment_id: str, client: int | str) -> None:
        self.path = experiment_dir(root, experiment_id) / f"client-{client}-residual.npy"

    def load(self, size: int) -> np.ndarray:
        if self.path.is_file():
            saved = np.load(self.path, allow_pickle=False)
            if saved.shape == (size,):
                return saved.astype(np.float32)
        return np.zeros(size, np.float32)

    def save(self, residual: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(residual, dtype=np.float32), allow_pickle=False)
        write_atomic(self.path, buffer.getvalue())


class OwnRank:
    """A client's own LoRA rank after HetLoRA's self-pruning, kept on its disk: one integer,
    replaced atomically whenever it changes."""

    def __init__(self, root: Path | str, experiment_id: str, client: int | str) -> None:
        self.path = experiment_dir(root, experiment_id) / f"client-{client}-rank.json"

    def load(self, default: int) -> int:
        if self.path.is_file():
            try:
                return max(1, int(json.loads(self.path.read_text())["rank"]))
            except (ValueError, KeyError, TypeError):
                pass
        return int(default)

    def save(self, rank: int) -> None:
        write_atomic(self.path, json.dumps({"rank": int(rank)}).encode("utf-8"))
