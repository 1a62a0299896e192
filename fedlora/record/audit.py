"""Append-only audit log of a run, hash-chained and MAC'd with a forward-secure key:
``audit.jsonl`` in the run dir.

``results.json`` is the run's current state and is rewritten every round; the audit
log is its history and is only ever appended to. One JSON object per line:

- ``run_started``: the config hash, the privacy settings (unit, target, delta,
  accountant, every client's budget), the aggregator, the malicious clients, the audit
  key's id and fingerprint (``audit_mac``), and ``resumed_from`` (the checkpointed
  round) when a run continues;
- ``round``, once per evaluated round (round 0 is the initial evaluation): whom the
  server sampled and how, every client's fate (accepted, rejected or declined, with the
  reason), failures, each client's epsilon after the previous round and after this one
  (from the privacy ledger, named accountant and delta), the aggregation rule with its
  parameters and decisions by client id, test accuracy and loss;
- ``federated_evaluation``, after a round's line when clients evaluated: the mode
  (``privacy.evaluation``), the accuracy (from noisy counts under ``dp``) and, under DP,
  each releasing client's epsilon with the round's evaluation releases included;
- ``run_finished``: the final numbers and the SHA-256 of the saved adapter files.

Tamper evidence has two layers.

*Hash chain* (Schneier and Kelsey 1999, "Secure Audit Logs to Support Computer
Forensics"): every line carries ``prev_sha256``, the SHA-256 of the previous line's
bytes (without its newline; the first line chains to 64 zeros), so editing, inserting
or deleting a line breaks the chain at the next line. Anyone can check it, but whoever
can write the file can recompute it whole.

*Forward-secure HMAC chain* (Bellare and Yee 1997, "Forward Integrity for Secure Audit
Logs"; Schneier and Kelsey 1999): every line ends with ``hmac_sha256``, the HMAC-SHA256
of the line's bytes without that field, under the key ``k_(i-1)`` for line ``i``.
``k_0`` is 32 bytes from ``os.urandom`` drawn when the log starts; after every line the
key evolves, ``k_(i+1) = SHA-256("fedlora-audit-key-evolve" 0x00 || k_i)``, and the old
key is overwritten. Whoever holds ``k_0`` recomputes every key and MAC: an edited,
removed, inserted, reordered or appended-by-an-outsider line fails at its line number.
Someone who takes the server after line ``t`` finds only ``k_t``; SHA-256 does not run
backwards, so lines 1..t stay as written. They can append lines after ``t`` or cut lines
off the end; any other change to lines 1..t shows.

Where the keys live:

- ``k_0`` is written once, owner-only (0600), to ``tracking.audit_key_path`` (a file, or
  an existing directory or a path ending in ``/`` to hold ``<key id>.key``), else
  ``$FEDLORA_AUDIT_KEY``, else ``~/.fedlora/audit-keys/<key id>.key``, and its location
  is printed. It is refused inside the run dir. It is the operator's: move it off the server. While it stays on
  the server, whoever takes the server can rewrite the whole log with it.
- The current key ``k_i`` lives in a state file (0600) in ``tracking.audit_state_dir``,
  else ``$FEDLORA_AUDIT_STATE``, else ``~/.fedlora/audit-state/``, as ``<key id>.json``
  with the number of lines and the last line's SHA-256, replaced atomically after every
  line. A resumed run continues from it. It holds only the current key, so resuming keeps
  forward integrity; re-deriving ``k_n`` from ``k_0`` and ``n`` would need ``k_0`` on the
  server for the whole run, the one thing forward integrity rules out. Before continuing,
  the state is checked against the log (line count, last line's hash, the MAC of any line
  written after the state was saved); a mismatch stops the run with an :class:`AuditError`
  rather than extend a log it cannot vouch for. Without a state file (another machine, a
  lost home), a run continues only if ``k_0`` is at the key path: every line is verified
  with it first, and the operator should take it away again afterwards.
- A line is appended and fsync'd before the state advances: after a crash in between the
  state is one line behind, and the resume verifies that line with the state's key and
  rolls forward. A line cut short by a crash still uses up one key.

What it cannot promise: Python cannot wipe every copy of an old key from freed memory,
and a filesystem or SSD may keep the blocks of a replaced state file; removing lines
from the end of the log is only caught against a pin held elsewhere. Each round's line
number and SHA-256 are pinned in ``results.json`` (``rounds[i].audit``, ``final.audit``,
``stopped.audit``); :func:`verify_audit` checks the pins of a ``results.json`` beside
the log. Pins in the same run dir only help while ``results.json`` was not rewritten
too: copy the final pin somewhere the server cannot write.

Each line is written with one ``write`` to a file opened in append mode, flushed and
fsync'd before the round goes on. A resumed run (``resume=...``) appends to the same
file; rounds the file already holds are not logged again. A log written before MACs
existed continues with its hash chain only.

    python -m fedlora.record.audit <run dir or audit.jsonl>               # hash chain, rounds, pins
    python -m fedlora.record.audit <run dir> --key <k_0 file>             # and every line's MAC
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedlora.core.config import canonical_json as _canonical
from fedlora.core.config import json_safe as _plain
from fedlora.core.files import append_durable, write_atomic
from fedlora.core.units import NONE
from fedlora.privacy.budgets import client_budgets

AUDIT_FILE = "audit.jsonl"
RESULTS_FILE = "results.json"
GENESIS = "0" * 64
MAC_FIELD = "hmac_sha256"
KEY_BYTES = 32
KEY_SETTING, KEY_ENV = "audit_key_path", "FEDLORA_AUDIT_KEY"
STATE_SETTING, STATE_ENV = "audit_state_dir", "FEDLORA_AUDIT_STATE"
DEFAULT_KEY_DIR = Path("~/.fedlora/audit-keys")
DEFAULT_STATE_DIR = Path("~/.fedlora/audit-state")
SCHEME = ("HMAC-SHA256 of each line without hmac_sha256, line i under k_(i-1); k_0 from os.urandom, "
          "k_(i+1) = SHA-256('fedlora-audit-key-evolve' 0x00 || k_i)")
_EVOLVE = b"fedlora-audit-key-evolve\x00"
_FINGERPRINT = b"fedlora-audit-key-fingerprint\x00"
# The MAC is the line's last field; what precedes it, closed by "}", is what it covers.
_MAC_SUFFIX = re.compile(rb',"hmac_sha256":"([0-9a-f]{64})"\}\Z')
_HEX64 = re.compile(r"[0-9a-f]{64}")
# A key id names files: no separators, no leading dot.
_KEY_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
# How a run was started, not what it computes: a resumed run has the same config hash.
_NOT_HASHED = ("resume",)


class AuditError(RuntimeError):
    """An audit log, key or key state that cannot be used or trusted; the message names
    the file, what is wrong and how to check it."""


def canonical_json(value: Any) -> bytes:
    """The bytes the audit log hashes (:func:`fedlora.core.config.canonical_json`, UTF-8)."""
    return _canonical(value).encode("utf-8")


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the resolved config (``resume`` left out)."""
    return hashlib.sha256(canonical_json({k: v for k, v in config.items() if k not in _NOT_HASHED})).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- keys -------------------------------------------------------------------------------
def evolve_key(key: bytes | bytearray) -> bytes:
    """``k_(i+1) = SHA-256(label || k_i)``: one way, so a later key reveals no earlier one."""
    return hashlib.sha256(_EVOLVE + bytes(key)).digest()


def key_fingerprint(key: bytes | bytearray) -> str:
    """A public name of ``k_0`` for the log's first line: tells a wrong key file from a
    rewritten log, and reveals nothing of the key (a different, labelled SHA-256)."""
    return hashlib.sha256(_FINGERPRINT + bytes(key)).hexdigest()


def line_mac(key: bytes | bytearray, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def split_mac(raw: bytes) -> tuple[bytes, str] | None:
    """(the bytes the MAC covers, the MAC) of a line, or None when it ends without one."""
    match = _MAC_SUFFIX.search(raw)
    if match is None:
        return None
    return raw[: match.start()] + b"}", match.group(1).decode("ascii")


def mac_problem(raw: bytes, key: bytes | bytearray) -> str | None:
    """Why ``raw`` is not a line MAC'd under ``key``, or None when it is."""
    parts = split_mac(raw)
    if parts is None:
        return f"no {MAC_FIELD} at the end of the line: written without the key, cut short, or rewritten"
    body, mac = parts
    if not hmac.compare_digest(line_mac(key, body), mac):
        return (f"{MAC_FIELD} does not match: the line was edited, moved, or written by someone without the "
                "key of its place in the log")
    return None


def read_key(path: Path | str) -> bytes:
    """``k_0`` from the file the run wrote (64 lowercase hex characters)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise AuditError(f"{path}: cannot read the audit key ({err})") from None
    if not _HEX64.fullmatch(text):
        raise AuditError(f"{path}: not an audit key file (expected the 64 hex characters the run wrote)")
    return bytes.fromhex(text)


def _write_new_key(path: Path, key: bytes) -> None:
    """Create ``path`` owner-only with ``key``; never replaces a key already there."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        raise AuditError(f"{path}: a file is already there; an audit key is never overwritten (choose another "
                         f"tracking.{KEY_SETTING} or ${KEY_ENV})") from None
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key.hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _setting(config: dict[str, Any], name: str, env: str) -> str | None:
    value = (config.get("tracking") or {}).get(name)
    if value in (None, ""):
        value = os.environ.get(env) or None
    return None if value is None else str(value)


def key_path(config: dict[str, Any], key_id: str) -> Path:
    """Where ``k_0`` of ``key_id`` is written (and looked for when a resume has no state)."""
    chosen = _setting(config, KEY_SETTING, KEY_ENV)
    if chosen is None:
        return DEFAULT_KEY_DIR.expanduser() / f"{key_id}.key"
    path = Path(chosen).expanduser()
    return path / f"{key_id}.key" if path.is_dir() or chosen.endswith(("/", os.sep)) else path


def state_dir(config: dict[str, Any]) -> Path:
    """The folder of the key states (the current key of each chain)."""
    chosen = _setting(config, STATE_SETTING, STATE_ENV)
    return Path(chosen).expanduser() if chosen else DEFAULT_STATE_DIR.expanduser()


def state_path(config: dict[str, Any], key_id: str) -> Path:
    """The file holding the current key of ``key_id``'s chain."""
    return state_dir(config) / f"{key_id}.json"


def _state_of(log: Path, folder: Path) -> Path | None:
    """A key state in ``folder`` that names ``log``: the log was MAC'd."""
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("log") == str(log):
                return path
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _refuse_inside(path: Path, run_dir: Path, what: str, setting: str, env: str) -> None:
    if path.resolve().is_relative_to(run_dir.resolve()):
        raise AuditError(f"the {what} {path} would be inside the run dir {run_dir}: whoever can rewrite the log "
                         f"could read it there. Choose a path outside it (tracking.{setting} or ${env})")


class ChainKey:
    """The current key ``k_i`` of a log's HMAC chain, held in memory, and its state file.

    The key is a ``bytearray`` overwritten in place when it evolves; the state file is
    replaced atomically (owner-only) after every line.
    """

    def __init__(self, key: bytes | bytearray, index: int, key_id: str, fingerprint: str, state: Path,
                 log: Path) -> None:
        self._key = bytearray(key)
        self.index = index  # lines MAC'd so far: the next line is MAC'd with k_index
        self.key_id = key_id
        self.fingerprint = fingerprint
        self.state = state
        self.log = log

    def mac(self, body: bytes) -> str:
        return line_mac(self._key, body)

    def advance(self, head: str) -> None:
        """After a line: evolve the key, overwrite the old one, save the state."""
        self._key[:] = evolve_key(self._key)
        self.index += 1
        self.save(head)

    def save(self, head: str) -> None:
        payload = {"key_id": self.key_id, "key_fingerprint": self.fingerprint, "log": str(self.log),
                   "lines": self.index, "head_sha256": head, "key": self._key.hex()}
        self.state.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.state, json.dumps(payload).encode("utf-8"), private=True)

    def describe(self) -> dict[str, Any]:
        """What ``run_started`` says of the key (public: its id and fingerprint)."""
        return {"scheme": SCHEME, "key_id": self.key_id, "key_fingerprint": self.fingerprint}


def _read_state(path: Path, key_id: str, fingerprint: Any) -> tuple[bytes, int, str]:
    """(current key, lines MAC'd, SHA-256 of the last) from a state file, checked."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AuditError(f"{path}: the audit key state is unreadable ({err})") from None
    problems = []
    if not isinstance(state, dict):
        state, problems = {}, ["not a JSON object"]
    if state.get("key_id") != key_id or state.get("key_fingerprint") != fingerprint:
        problems.append(f"it belongs to key {state.get('key_id')!r}, the log names {key_id!r}")
    lines = state.get("lines")
    if not isinstance(lines, int) or isinstance(lines, bool) or lines < 0:
        problems.append(f"lines is not a count: {lines!r}")
    for field in ("key", "head_sha256"):
        if not isinstance(state.get(field), str) or not _HEX64.fullmatch(state[field]):
            problems.append(f"{field} is not 64 hex characters")
    if problems:
        raise AuditError(f"{path}: not a usable audit key state: {'; '.join(problems)}")
    return bytes.fromhex(state["key"]), lines, state["head_sha256"]


# -- the log ----------------------------------------------------------------------------
def _lines(data: bytes) -> list[bytes]:
    """The file's lines without newlines; a last line without one (torn) is kept."""
    lines = data.split(b"\n")
    return lines[:-1] if lines and lines[-1] == b"" else lines


class AuditLog:
    """An append-only JSON-lines file whose lines are chained by SHA-256 and, with a
    :class:`ChainKey`, MAC'd under a key that evolves after every line."""

    def __init__(self, path: Path, chain: ChainKey | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.chain = chain
        self._prev = GENESIS
        self._torn = False
        self.lines = 0  # lines in the file, a torn one included: each used up one key
        self.maced = False  # whether any line carries a MAC
        self.first: dict[str, Any] | None = None
        # What a resumed run needs from the lines already there.
        self.last_round: int | None = None
        self.last_config_sha256: str | None = None
        if self.path.is_file():
            self._scan()

    @property
    def head(self) -> str:
        """SHA-256 of the last line (64 zeros for an empty log)."""
        return self._prev

    @property
    def torn(self) -> bool:
        return self._torn

    def raw_lines(self) -> list[bytes]:
        return _lines(self.path.read_bytes()) if self.path.is_file() else []

    def _scan(self) -> None:
        data = self.path.read_bytes()
        if not data:
            return
        # A line cut by a crash mid-write is kept (append only) and closed with a newline
        # before the next one; verify_audit then reports it.
        self._torn = not data.endswith(b"\n")
        lines = _lines(data)
        self.lines = len(lines)
        self._prev = _sha256(lines[-1])
        self.maced = any(split_mac(raw) is not None for raw in lines)
        for number, raw in enumerate(lines, start=1):
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            if number == 1:
                self.first = record
            if record.get("event") == "round":
                self.last_round = int(record["round"])
            if record.get("event") == "run_started":
                self.last_config_sha256 = record.get("config_sha256")

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": _now(), **_plain(fields), "prev_sha256": self._prev}
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
        if self.chain is not None:
            if self.chain.index != self.lines:
                raise AuditError(f"{self.path}: the key is at line {self.chain.index + 1}, the log at line "
                                 f"{self.lines + 1}; refusing to MAC a line with the key of another place")
            record[MAC_FIELD] = self.chain.mac(line)
            line = line[:-1] + b',"' + MAC_FIELD.encode() + b'":"' + record[MAC_FIELD].encode() + b'"}'
        append_durable(self.path, (b"\n" if self._torn else b"") + line + b"\n")
        self._torn = False
        self._prev = _sha256(line)
        self.lines += 1
        if self.chain is not None:
            # Only after the line is on disk: a crash before this leaves the state a line
            # behind, which a resume rolls forward after checking the line's MAC.
            self.chain.advance(self._prev)
        return record


def _pins(results: Path) -> tuple[list[tuple[str, Any]], str | None]:
    """(what, pin) for each audit pin in ``results.json``; a note when it is unreadable."""
    try:
        payload = json.loads(results.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [], f"{results} is unreadable ({err}); its audit pins were not checked"
    if not isinstance(payload, dict):
        return [], f"{results} is not a JSON object; its audit pins were not checked"
    pins = [(f"round {r.get('round')}", r["audit"]) for r in payload.get("rounds") or []
            if isinstance(r, dict) and "audit" in r]
    pins += [(key, payload[key]["audit"]) for key in ("stopped", "final")
             if isinstance(payload.get(key), dict) and "audit" in payload[key]]
    return pins, None


def _check_pins(results: Path, lines: list[bytes]) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    pins, note = _pins(results)
    for what, pin in pins:
        line = pin.get("line") if isinstance(pin, dict) else None
        digest = pin.get("sha256") if isinstance(pin, dict) else None
        if not isinstance(line, int) or isinstance(line, bool) or line < 1 or not isinstance(digest, str):
            problems.append(f"{results.name}: the audit pin of {what} is malformed: {pin!r}")
        elif line > len(lines):
            problems.append(f"{results.name} pins line {line} for {what}, but the log has {len(lines)} lines: "
                            "lines were removed from its end")
        elif _sha256(lines[line - 1]) != digest:
            problems.append(f"line {line}: its SHA-256 is not the one {results.name} pinned for {what}: the line "
                            "was edited, or the log or results.json was replaced")
    notes = [note] if note else []
    if pins:
        notes.append(f"{len(pins)} pin(s) in {results.name} checked")
    return problems, notes


def audit_report(path: Path | str, key: bytes | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes) of an audit log: see :func:`verify_audit`; the notes say what was
    and was not checked."""
    path = Path(path)
    if path.is_dir():
        path = path / AUDIT_FILE
    if not path.is_file():
        return [f"{path}: no audit log"], []
    data = path.read_bytes()
    problems: list[str] = []
    notes: list[str] = []
    if data and not data.endswith(b"\n"):
        last = data.count(b"\n") + 1
        problems.append(f"line {last}: no newline at the end (torn write or truncation)")
    lines = _lines(data)
    if not lines:
        return [f"{path}: empty audit log"], []
    key_id = None
    if key is not None:
        named = _named_key(lines[0])
        if named is None:
            problems.append("line 1: run_started names no audit key (audit_mac): the log was written without one, "
                            "or rewritten")
        else:
            key_id = named.get("key_id")
            if named.get("key_fingerprint") != key_fingerprint(key):
                problems.append(f"line 1: the key given (fingerprint {key_fingerprint(key)[:12]}...) is not the key "
                                f"this log names ({str(named.get('key_fingerprint'))[:12]}...): another run's key, "
                                "or the log was rewritten with a new one")
    current = None if key is None else bytes(key)
    prev = GENESIS
    last_round: int | None = None
    run_config: str | None = None
    finished = False
    for number, raw in enumerate(lines, start=1):
        where = f"line {number}"
        mac = None if current is None else mac_problem(raw, current)
        if current is not None:
            current = evolve_key(current)
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError as err:
            problems.append(f"{where}: not a JSON object ({err}); edited or torn")
            prev = _sha256(raw)
            continue
        if mac is not None:
            problems.append(f"{where}: {mac}")
        if record.get("prev_sha256") != prev:
            problems.append(f"{where}: prev_sha256 does not match the line before: the log was edited, "
                            "or lines were inserted or removed")
        prev = _sha256(raw)
        event = record.get("event")
        if number == 1 and event != "run_started":
            problems.append(f"{where}: the log must start with run_started, found {event!r}")
        if event == "run_started":
            run_config = record.get("config_sha256")
            finished = False
            named = record.get("audit_mac")
            if key_id is not None and number > 1 and isinstance(named, dict) and named.get("key_id") != key_id:
                problems.append(f"{where}: run_started names audit key {named.get('key_id')!r}, line 1 names "
                                f"{key_id!r}")
        elif event == "round":
            rnd = record.get("round")
            if not isinstance(rnd, int):
                problems.append(f"{where}: round is not an integer: {rnd!r}")
                continue
            if last_round is not None and rnd <= last_round:
                problems.append(f"{where}: round {rnd} after round {last_round}; rounds must increase")
            if finished:
                problems.append(f"{where}: round {rnd} after run_finished without a new run_started")
            if record.get("config_sha256") != run_config:
                problems.append(f"{where}: config_sha256 differs from its run_started")
            last_round = rnd
        elif event == "run_finished":
            finished = True
    results = path.parent / RESULTS_FILE
    if results.is_file():
        pin_problems, pin_notes = _check_pins(results, lines)
        problems += pin_problems
        notes += pin_notes
    if key is not None:
        notes.append(f"HMAC chain checked with key {key_fingerprint(key)[:12]}... over {len(lines)} lines")
    elif any(split_mac(raw) is not None for raw in lines):
        notes.append("MACs were not checked (no --key): the hash chain alone cannot show a log rewritten whole")
    else:
        notes.append("the log carries no MACs (written without an audit key): hash chain only")
    return problems, notes


def _named_key(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    named = record.get("audit_mac") if isinstance(record, dict) else None
    return named if isinstance(named, dict) else None


def verify_audit(path: Path | str, key: bytes | None = None) -> list[str]:
    """Problems found in an audit log; an empty list means it is intact.

    Checks that every line is a JSON object, that its ``prev_sha256`` is the SHA-256 of
    the line before (64 zeros for the first), that the log starts with ``run_started``,
    that every ``round`` line carries the config hash of the ``run_started`` before it,
    that rounds strictly increase over the whole file (a resume continues after the
    last logged round), that no round follows ``run_finished`` without a new
    ``run_started``, and that the pins of a ``results.json`` beside the log match its
    lines. With ``key`` (``k_0``) it also checks that the key is the one the log names
    and every line's ``hmac_sha256`` under its evolved key.
    """
    return audit_report(path, key)[0]


def _client_status(info: dict[str, Any]) -> dict[str, Any]:
    status = "declined" if info.get("declined") else "accepted" if info.get("accepted") else "rejected"
    out = {"cid": info.get("cid"), "status": status}
    for key in ("reason", "attack", "num_examples", "update_norm", "steps"):
        if info.get(key) is not None:
            out[key] = info[key]
    return out


def _key_id(experiment_id: str, fingerprint: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(experiment_id))[:64]
    name = name if _KEY_ID.fullmatch(name or "-") else "run"
    return f"{name}-{fingerprint[:12]}"


class AuditTrail:
    """A :class:`fedlora.record.results.RunRecorder` listener that writes ``audit.jsonl``
    and pins its head in ``results.json``."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.log = AuditLog(self.run_dir / AUDIT_FILE)
        self.config = config
        self.config_sha256 = config_hash(config)

    def start(self, recorder: Any) -> dict[str, Any]:
        """The ``run_started`` line; call after a resume has restored the recorder.

        A new log draws its key and writes it out; a log already there continues its
        chain from the key state (or ``k_0``), after checking the log against it."""
        self._open_chain(recorder)
        privacy = dict(self.config.get("privacy") or {"unit": recorder.privacy_unit})
        num_clients = int((self.config.get("federation") or {}).get("num_clients", 0))
        fields: dict[str, Any] = {
            "config_sha256": self.config_sha256,
            "privacy": {**privacy, "accountant": recorder.accountant, "delta": recorder.delta,
                        "client_budgets": client_budgets(privacy, num_clients)},
            # Where the DP noise came from (OS entropy, or a noise_seed: not private).
            "noise": recorder.noise,
            "strategy": self.config.get("strategy"),
            "attack": recorder.attack,
            "num_clients": num_clients,
            "num_rounds": recorder.num_rounds,
        }
        if self.log.chain is not None:
            fields["audit_mac"] = self.log.chain.describe()
        if recorder.resumed_from is not None:
            fields["resumed_from"] = recorder.resumed_from
            fields["config_matches_previous"] = self.config_sha256 == self.log.last_config_sha256
        return self.log.append("run_started", **fields)

    # -- the key ------------------------------------------------------------------------
    def _open_chain(self, recorder: Any) -> None:
        echo = getattr(recorder, "echo", print)
        if self.log.lines == 0:
            self.log.chain = self._new_chain(str(getattr(recorder, "experiment_id", "") or ""), echo)
        elif not self.log.maced:
            state = _state_of(self.log.path.resolve(), state_dir(self.config))
            if state is not None:
                raise AuditError(f"{self.log.path} carries no MACs, yet the key state {state} was written for it: "
                                 f"its MACs were removed. Check it with `python -m fedlora.record.audit "
                                 f"{self.run_dir} --key <key file>`")
            echo(f"audit log {self.log.path} was written without an audit key: it continues with its hash chain "
                 "only (no MACs)")
        else:
            named = _named_key(self.log.raw_lines()[0])
            if named is None or not _KEY_ID.fullmatch(str(named.get("key_id"))):
                raise AuditError(f"{self.log.path}: line 1 does not name a usable audit key (audit_mac), yet the "
                                 f"log carries MACs: it was edited. Check it with `python -m fedlora.record.audit "
                                 f"{self.run_dir} --key <key file>`")
            self.log.chain = self._continue_chain(str(named["key_id"]), named.get("key_fingerprint"), echo)

    def _new_chain(self, experiment_id: str, echo) -> ChainKey:
        first = os.urandom(KEY_BYTES)
        fingerprint = key_fingerprint(first)
        key_id = _key_id(experiment_id, fingerprint)
        path, state = key_path(self.config, key_id), state_path(self.config, key_id)
        _refuse_inside(path, self.run_dir, "audit key", KEY_SETTING, KEY_ENV)
        _refuse_inside(state, self.run_dir, "audit key state", STATE_SETTING, STATE_ENV)
        _write_new_key(path, first)
        chain = ChainKey(first, 0, key_id, fingerprint, state, self.log.path.resolve())
        del first
        chain.save(GENESIS)
        echo(f"audit key: {path} (owner-only). Move it off this machine and keep it: `python -m "
             f"fedlora.record.audit {self.run_dir} --key <that file>` then proves that no line of the audit log "
             "was edited, removed or added; whoever holds it can rewrite the whole log")
        return chain

    def _continue_chain(self, key_id: str, fingerprint: Any, echo) -> ChainKey:
        raw = self.log.raw_lines()
        state, path = state_path(self.config, key_id), key_path(self.config, key_id)
        _refuse_inside(path, self.run_dir, "audit key", KEY_SETTING, KEY_ENV)
        _refuse_inside(state, self.run_dir, "audit key state", STATE_SETTING, STATE_ENV)
        check = f"check it with `python -m fedlora.record.audit {self.run_dir} --key <key file>`"
        if state.is_file():
            key, start, head = _read_state(state, key_id, fingerprint)
            if start > len(raw):
                raise AuditError(f"{self.log.path}: {len(raw)} lines, but its key state {state} says {start} were "
                                 f"written: lines were removed from the end; {check}")
            if start and _sha256(raw[start - 1]) != head:
                raise AuditError(f"{self.log.path}: line {start} is not the line its key state {state} recorded: "
                                 f"the log was edited; {check}")
        else:
            if not path.is_file():
                raise AuditError(
                    f"{self.log.path} is MAC'd with audit key {key_id}, whose current state is not at {state} and "
                    f"whose initial key is not at {path}: resume on the machine that ran it, or put the initial "
                    f"key there (or name it with tracking.{KEY_SETTING} / ${KEY_ENV}) so that the log is verified "
                    "and its chain continued")
            key, start = read_key(path), 0
            if key_fingerprint(key) != fingerprint:
                raise AuditError(f"{path} is not the audit key {self.log.path} names (fingerprint differs)")
            echo(f"WARNING: the audit log's initial key {path} is on this machine: the log was verified with it "
                 "and continues; take it off again, whoever holds it can rewrite the whole log")
        for index in range(start, len(raw)):
            # A line a crash cut short still used up its key (the state never saw it).
            if not (index == len(raw) - 1 and self.log.torn):
                problem = mac_problem(raw[index], key)
                if problem is not None:
                    raise AuditError(f"{self.log.path} line {index + 1}: {problem}. The run does not extend an "
                                     f"audit log it cannot vouch for; {check}")
            key = evolve_key(key)
        chain = ChainKey(key, len(raw), key_id, str(fingerprint), state, self.log.path.resolve())
        del key
        chain.save(self.log.head)
        return chain

    def _pin(self, recorder: Any, holder: dict[str, Any] | None) -> None:
        """The log's head (line number, SHA-256) into ``results.json``, rewritten now."""
        if holder is None:
            return
        holder["audit"] = {"line": self.log.lines, "sha256": self.log.head}
        recorder.write()

    # -- the lines ----------------------------------------------------------------------
    def on_round(self, record: dict[str, Any], recorder: Any) -> None:
        rnd = int(record["round"])
        if self.log.last_round is not None and rnd <= self.log.last_round:
            # A resume re-evaluates its checkpointed round, which the log already holds.
            return
        fields: dict[str, Any] = {
            "round": rnd,
            "config_sha256": self.config_sha256,
            "accuracy": record.get("accuracy"),
            "loss": record.get("loss"),
            **({"elapsed_s": record["elapsed_s"]} if "elapsed_s" in record else {}),
        }
        if rnd > 0:
            fields["fit_recorded"] = bool(record.get("fit_recorded"))
            # Under client-level DP the record holds no participants (server_internal/ does).
            if "sampled" in record:
                fields["sampled"] = {k: v for k, v in record["sampled"].items() if k != "nodes"}
            if "clients" in record:
                fields["clients"] = [_client_status(c) for c in record["clients"]]
            if "failures" in record:
                fields["failures"] = [{"node": f.get("node_id"), "reason": f.get("reason")} for f in record["failures"]]
            fields["privacy"] = self._privacy(rnd, record, recorder)
            for key in ("aggregation", "client_dp", "aggregation_error"):
                if key in record:
                    fields[key] = record[key]
        self.log.append("round", **fields)
        self.log.last_round = rnd
        self._pin(recorder, getattr(recorder, "rounds", {}).get(rnd))

    def _privacy(self, rnd: int, record: dict[str, Any], recorder: Any) -> dict[str, Any]:
        """Each client's epsilon after the previous round and after this one, from the ledger.

        The increase is a difference of cumulative epsilons: under RDP or PRV, epsilons of
        rounds do not add up, their histories compose.
        """
        ledger, accountant = recorder.ledger, recorder.accountant
        budgets = {str(c.get("cid")): c.get("budget_epsilon") for c in record.get("clients", [])}
        clients: dict[str, Any] = {}
        this_round = {e.client for e in ledger.entries if e.round == rnd}
        for client in [c for c in ledger.clients() if c in this_round]:
            after = ledger.epsilon(client, accountant, rnd)
            before = ledger.epsilon(client, accountant, rnd - 1) if ledger.history(client, rnd - 1) else 0.0
            unit = next(e.unit for e in ledger.entries if e.client == client and e.round == rnd)
            clients[client] = {
                "unit": unit,
                "epsilon_before": before,
                "epsilon_after": after,
                "epsilon_increase": after - before,
                "delta": ledger.delta(client),
                **({"budget": budgets[client]} if budgets.get(client) is not None else {}),
            }
        return {
            "unit": recorder.privacy_unit,
            "accountant": accountant,
            "delta": recorder.delta,
            "epsilon": record.get("epsilon"),
            "clients": clients,
        }

    def on_federated_evaluation(self, record: dict[str, Any], recorder: Any) -> None:
        """Clients' evaluation of a round, after its ``round`` line: the mode, the result
        and, under ``privacy.evaluation=dp``, what the noisy releases spent (each
        releasing client's epsilon from the ledger, this round's releases included)."""
        rnd = int(record["round"])
        evaluation = dict(record.get("federated_evaluation") or {})
        fields: dict[str, Any] = {"round": rnd, "config_sha256": self.config_sha256, **evaluation}
        if recorder.privacy_unit != NONE:
            fields["privacy"] = self._privacy(rnd, record, recorder)
        self.log.append("federated_evaluation", **fields)
        self._pin(recorder, getattr(recorder, "rounds", {}).get(rnd))

    def on_stop(self, stopped: dict[str, Any], recorder: Any) -> None:
        """A failed round ends the run before its evaluation: log the round (who was
        sampled, who failed, what privacy was spent) and why the run stopped."""
        rnd = int(stopped["after_round"])
        published = {int(r["round"]): r for r in recorder.published_rounds()}
        if rnd in published:
            self.on_round(published[rnd], recorder)
        self.log.append("run_stopped", config_sha256=self.config_sha256,
                        **{k: v for k, v in stopped.items() if k != "audit"})
        self._pin(recorder, stopped)

    def on_finish(self, final: dict[str, Any], recorder: Any) -> None:
        adapter = Path(recorder.run_dir) / "adapter"
        hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(adapter.glob("*")) if p.is_file()} if adapter.is_dir() else {}
        keep = ("accuracy", "loss", "epsilon", "delta", "privacy_unit", "rounds_completed", "wall_s",
                "client_epsilon", "epsilon_by_accountant", "resumed_from_round")
        self.log.append("run_finished", config_sha256=self.config_sha256, accountant=recorder.accountant,
                        **{k: final.get(k) for k in keep}, adapter_sha256=hashes)
        self._pin(recorder, final)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Verify a run's audit.jsonl: hash chain, round order, results.json pins and, with --key, "
                    "every line's MAC.")
    parser.add_argument("path", type=Path, help="run dir or audit.jsonl")
    parser.add_argument("--key", type=Path, default=None,
                        help="the run's initial audit key file (k_0), as the run printed its location")
    args = parser.parse_args(argv)
    key = None
    if args.key is not None:
        try:
            key = read_key(args.key)
        except AuditError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    problems, notes = audit_report(args.path, key)
    for problem in problems:
        print(problem)
    for note in notes:
        print(f"note: {note}")
    if not problems:
        print(f"{args.path}: audit log intact")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
