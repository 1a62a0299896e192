"""Append-only, hash-chained audit log of a run: ``audit.jsonl`` in the run dir.

``results.json`` is the run's current state and is rewritten every round; the audit
log is its history and is only ever appended to. One JSON object per line:

- ``run_started``: the config hash, the privacy settings (unit, target, delta,
  accountant, every client's budget), the aggregator, the malicious clients, and
  ``resumed_from`` (the checkpointed round) when a run continues;
- ``round``, once per evaluated round (round 0 is the initial evaluation): whom the
  server sampled and how, every client's fate (accepted, rejected or declined, with the
  reason), failures, each client's epsilon after the previous round and after this one
  (from the privacy ledger, named accountant and delta), the aggregation rule with its
  parameters and decisions by client id, test accuracy and loss;
- ``federated_evaluation``, after a round's line when clients evaluated: the mode
  (``privacy.evaluation``), the accuracy (from noisy counts under ``dp``) and, under DP,
  each releasing client's epsilon with the round's evaluation releases included;
- ``run_finished``: the final numbers and the SHA-256 of the saved adapter files.

Tampering is evident rather than impossible (Schneier and Kelsey 1999, "Secure Audit
Logs to Support Computer Forensics"): every line carries ``prev_sha256``, the SHA-256
of the previous line's bytes (without its newline; the first line chains to 64 zeros),
so editing, inserting or deleting a line breaks the chain at the next line.
:func:`verify_audit` checks the chain and the order of rounds. Someone who can rewrite
the whole file can rewrite the whole chain too; keep a copy of the last line's hash
elsewhere (e.g. in the experiment tracker) to pin it.

Each line is written with one ``write`` to a file opened in append mode, flushed and
fsync'd before the round goes on. A resumed run (``resume=...``) appends to the same
file; rounds the file already holds are not logged again.

    python -m fedlora.record.audit <run dir or audit.jsonl>     # verify; exit 1 if broken
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedlora.core.config import canonical_json as _canonical
from fedlora.core.config import json_safe as _plain
from fedlora.core.files import append_durable
from fedlora.core.units import NONE
from fedlora.privacy.budgets import client_budgets

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64
# How a run was started, not what it computes: a resumed run has the same config hash.
_NOT_HASHED = ("resume",)


def canonical_json(value: Any) -> bytes:
    """The bytes the audit log hashes (:func:`fedlora.core.config.canonical_json`, UTF-8)."""
    return _canonical(value).encode("utf-8")


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the resolved config (``resume`` left out)."""
    return hashlib.sha256(canonical_json({k: v for k, v in config.items() if k not in _NOT_HASHED})).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class AuditLog:
    """An append-only JSON-lines file whose lines are chained by SHA-256."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prev = GENESIS
        self._torn = False
        # What a resumed run needs from the lines already there.
        self.last_round: int | None = None
        self.last_config_sha256: str | None = None
        if self.path.is_file():
            self._scan()

    def _scan(self) -> None:
        data = self.path.read_bytes()
        if not data:
            return
        # A line cut by a crash mid-write is kept (append only) and closed with a newline
        # before the next one; verify_audit then reports it.
        self._torn = not data.endswith(b"\n")
        lines = data.split(b"\n")
        if not self._torn:
            lines = lines[:-1]
        self._prev = hashlib.sha256(lines[-1]).hexdigest()
        for raw in lines:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if record.get("event") == "round":
                self.last_round = int(record["round"])
            if record.get("event") == "run_started":
                self.last_config_sha256 = record.get("config_sha256")

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": _now(), **_plain(fields), "prev_sha256": self._prev}
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
        append_durable(self.path, (b"\n" if self._torn else b"") + line + b"\n")
        self._torn = False
        self._prev = hashlib.sha256(line).hexdigest()
        return record


def verify_audit(path: Path | str) -> list[str]:
    """Problems found in an audit log; an empty list means the chain and rounds are intact.

    Checks that every line is a JSON object, that its ``prev_sha256`` is the SHA-256 of
    the line before (64 zeros for the first), that the log starts with ``run_started``,
    that every ``round`` line carries the config hash of the ``run_started`` before it,
    that rounds strictly increase over the whole file (a resume continues after the
    last logged round), and that no round follows ``run_finished`` without a new
    ``run_started``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / AUDIT_FILE
    if not path.is_file():
        return [f"{path}: no audit log"]
    data = path.read_bytes()
    problems: list[str] = []
    if data and not data.endswith(b"\n"):
        last = data.count(b"\n") + 1
        problems.append(f"line {last}: no newline at the end (torn write or truncation)")
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines = lines[:-1]
    if not lines:
        return [f"{path}: empty audit log"]
    prev = GENESIS
    last_round: int | None = None
    run_config: str | None = None
    finished = False
    for number, raw in enumerate(lines, start=1):
        where = f"line {number}"
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError as err:
            problems.append(f"{where}: not a JSON object ({err}); edited or torn")
            prev = hashlib.sha256(raw).hexdigest()
            continue
        if record.get("prev_sha256") != prev:
            problems.append(f"{where}: prev_sha256 does not match the line before: the log was edited, "
                            "or lines were inserted or removed")
        prev = hashlib.sha256(raw).hexdigest()
        event = record.get("event")
        if number == 1 and event != "run_started":
            problems.append(f"{where}: the log must start with run_started, found {event!r}")
        if event == "run_started":
            run_config = record.get("config_sha256")
            finished = False
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
    return problems


def _client_status(info: dict[str, Any]) -> dict[str, Any]:
    status = "declined" if info.get("declined") else "accepted" if info.get("accepted") else "rejected"
    out = {"cid": info.get("cid"), "status": status}
    for key in ("reason", "attack", "num_examples", "update_norm", "steps"):
        if info.get(key) is not None:
            out[key] = info[key]
    return out


class AuditTrail:
    """A :class:`fedlora.record.results.RunRecorder` listener that writes ``audit.jsonl``."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        self.log = AuditLog(Path(run_dir) / AUDIT_FILE)
        self.config = config
        self.config_sha256 = config_hash(config)

    def start(self, recorder: Any) -> dict[str, Any]:
        """The ``run_started`` line; call after a resume has restored the recorder."""
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
        if recorder.resumed_from is not None:
            fields["resumed_from"] = recorder.resumed_from
            fields["config_matches_previous"] = self.config_sha256 == self.log.last_config_sha256
        return self.log.append("run_started", **fields)

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

    def on_stop(self, stopped: dict[str, Any], recorder: Any) -> None:
        """A failed round ends the run before its evaluation: log the round (who was
        sampled, who failed, what privacy was spent) and why the run stopped."""
        rnd = int(stopped["after_round"])
        published = {int(r["round"]): r for r in recorder.published_rounds()}
        if rnd in published:
            self.on_round(published[rnd], recorder)
        self.log.append("run_stopped", config_sha256=self.config_sha256, **stopped)

    def on_finish(self, final: dict[str, Any], recorder: Any) -> None:
        adapter = Path(recorder.run_dir) / "adapter"
        hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted(adapter.glob("*")) if p.is_file()} if adapter.is_dir() else {}
        keep = ("accuracy", "loss", "epsilon", "delta", "privacy_unit", "rounds_completed", "wall_s",
                "client_epsilon", "epsilon_by_accountant", "resumed_from_round")
        self.log.append("run_finished", config_sha256=self.config_sha256, accountant=recorder.accountant,
                        **{k: final.get(k) for k in keep}, adapter_sha256=hashes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify a run's audit.jsonl (hash chain, round order).")
    parser.add_argument("path", type=Path, help="run dir or audit.jsonl")
    args = parser.parse_args(argv)
    problems = verify_audit(args.path)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{args.path}: audit log intact")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
