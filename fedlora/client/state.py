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

A saved file is read whole or refused with a :class:`ClientStateError` naming the file,
the line and the reason; nothing of a refused file is used, and the client trains no
further in that experiment until the operator looks at it. Skipping a spend line would
understate the client's epsilon, so only a line a crash cut short is skipped: the last
bytes of the file without a newline, or a line the next append marked as such (that
update was never sent: its line is fsync'd before the reply leaves). Every other line
must be ``[noise_multiplier >= 0, 0 < sample_rate <= 1, steps >= 0, round >= 0]``.
"""

from __future__ import annotations

import io
import json
import math
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


def _parses(line: str) -> bool:
    try:
        _spend_line(line)
    except ValueError:
        return False
    return True


def extends(prefix: Sequence[Entry], history: Sequence[Entry]) -> bool:
    """Whether ``history`` starts with every entry of ``prefix``, in order."""
    return len(history) >= len(prefix) and all(_entry(a) == _entry(b) for a, b in zip(prefix, history))


def experiment_dir(root: Path | str, experiment_id: str) -> Path:
    """The folder of one experiment's client state under a node's state directory."""
    return Path(root) / (re.sub(r"[^A-Za-z0-9_.-]", "_", str(experiment_id)) or "experiment")


class ClientStateError(ValueError):
    """A client's saved file that is refused: the message names the file and the reason."""


# Written after a line a crash cut short, when the next entry is appended.
TORN_MARK = {"torn_line_above": "cut short by a crash mid-write; its update was never sent"}


def _spend_line(raw: str) -> Entry:
    """One spend line, checked: ValueError saying what is wrong."""
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"not JSON ({err})") from None
    if not isinstance(value, list) or len(value) != 4:
        raise ValueError("not a list [noise_multiplier, sample_rate, steps, round]")
    sigma, q, steps, rnd = value
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numbers or not all(math.isfinite(v) for v in (sigma, q)):
        raise ValueError("not four finite numbers")
    if sigma < 0 or not 0 < q <= 1:
        raise ValueError(f"noise_multiplier {sigma!r} or sample_rate {q!r} out of range")
    if not all(isinstance(v, int) and v >= 0 for v in (steps, rnd)):
        raise ValueError(f"steps {steps!r} and round {rnd!r} must be non-negative integers")
    return _entry(value)


class SpendLog:
    """Append-only JSON lines of one client's spend in one experiment."""

    def __init__(self, root: Path | str, experiment_id: str, client: int | str) -> None:
        self.path = experiment_dir(root, experiment_id) / f"client-{client}.jsonl"

    def history(self) -> list[Entry]:
        """Every entry of the record, or :class:`ClientStateError` (see the module docstring)."""
        if not self.path.is_file():
            return []
        try:
            text = self.path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ClientStateError(f"{self.path}: the privacy spend record is unreadable ({err})") from None
        lines = text.split("\n")
        torn_tail = lines[-1] != ""  # the file does not end with a newline
        if not torn_tail:
            lines = lines[:-1]
        mark = json.dumps(TORN_MARK)
        entries = []
        for number, line in enumerate(lines, start=1):
            if line == mark:
                continue  # checked with the line above it
            try:
                entries.append(_spend_line(line))
            except ValueError as err:
                cut_short = (number == len(lines) and torn_tail) or (number < len(lines) and lines[number] == mark)
                if cut_short:
                    continue
                raise ClientStateError(
                    f"{self.path} line {number}: {err}. The privacy spend record is refused rather than read in "
                    "part (a skipped line would understate this client's epsilon); restore the file or remove "
                    "the line once you know what it recorded") from None
        for number, line in enumerate(lines, start=1):
            if line == mark and (number == 1 or _parses(lines[number - 2])):
                raise ClientStateError(f"{self.path} line {number}: a torn-line mark below a complete entry")
        return entries

    def append(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(list(_entry(e))) + "\n" for e in entries)
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    # A crash cut the last line short: close it and mark it, so that the
                    # next entry is not glued to it and the reader knows why it is broken.
                    text = "\n" + json.dumps(TORN_MARK) + "\n" + text
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
        """The saved residual, zeros when there is none or its size no longer fits (the
        adapter changed); a file that is not a finite float vector is refused with a
        :class:`ClientStateError` (never unpickled)."""
        if not self.path.is_file():
            return np.zeros(size, np.float32)
        try:
            saved = np.load(io.BytesIO(self.path.read_bytes()), allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ClientStateError(f"{self.path}: the error-feedback residual is refused, not a readable .npy "
                                   f"without pickles ({err}); remove it to start from zeros") from None
        if not isinstance(saved, np.ndarray) or saved.dtype.kind != "f" or saved.ndim != 1:
            raise ClientStateError(f"{self.path}: the error-feedback residual is refused: expected a float vector, "
                                   f"found {getattr(saved, 'dtype', type(saved).__name__)} of shape "
                                   f"{getattr(saved, 'shape', '?')}; remove it to start from zeros")
        if not np.all(np.isfinite(saved)):
            raise ClientStateError(f"{self.path}: the error-feedback residual is refused: it holds NaN or inf; "
                                   "remove it to start from zeros")
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
