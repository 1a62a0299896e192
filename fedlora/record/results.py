"""Run record: per-round metrics and per-client privacy, written to ``results.json``.

The file is rewritten atomically (write, then rename) after every round, so a crash
leaves the last complete round on disk, never a torn file.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fedlora.core.files import append_durable, write_atomic
from fedlora.core.units import CLIENT, LABEL, NONE, SAMPLE, SCOPE
from fedlora.models.hub import revisions
from fedlora.privacy.evaluation import PLAIN
from fedlora.privacy.ledger import ACCOUNTANTS, EVERY_CLIENT, LedgerEntry, PrivacyLedger
from fedlora.privacy.release import INTERNAL_DIR, INTERNAL_NOTE, ReleasePolicy
from fedlora.record.checkpoint import resume_commands
from fedlora.reply import reported_float

GENERATIONS = "generations.jsonl"

# Sample-level: each client holds its own guarantee and the federation reports the
# worst; client-level: one guarantee covers every client.


def epsilon_text(epsilon: float | None, delta: float | None, unit: str) -> str:
    """An epsilon as it must always be shown: with its delta and its privacy unit."""
    if unit == NONE:
        return "no DP (epsilon = infinity)"
    if epsilon is None:
        return f"eps n/a ({LABEL[unit]})"
    return f"eps {epsilon:.3f} (delta={delta:g}, {LABEL[unit]}, {SCOPE[unit]})"


def write_json_atomic(path: Path, payload: Any) -> None:
    write_atomic(path, json.dumps(payload, indent=2, default=_json_default).encode())


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class InternalRecord:
    """``server_internal/rounds.jsonl``: what a round may not publish (participants,
    counts, single updates' facts under client-level DP), for the server's operator
    only. Appended once per round; a resume continues it."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / INTERNAL_DIR
        self.path = self.dir / "rounds.jsonl"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "README.txt").write_text(INTERNAL_NOTE)
        self.written = set()
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    self.written.add(int(json.loads(line)["round"]))
                except (ValueError, KeyError, TypeError):
                    continue

    def append(self, internal: dict[str, Any]) -> None:
        rnd = int(internal["round"])
        if rnd in self.written:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(internal, default=_json_default) + "\n")
        self.written.add(rnd)


class RunRecorder:
    """Collects what the strategy reports and writes ``results.json``."""

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        privacy_unit: str,
        delta: float | None,
        num_rounds: int,
        accountant: str = "rdp",
        echo=print,
        noise: dict[str, Any] | None = None,
        experiment_id: str = "",
        release: ReleasePolicy | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "results.json"
        self.config = config
        self.privacy_unit = privacy_unit
        self.delta = delta
        self.num_rounds = num_rounds
        self.accountant = accountant
        self.echo = echo
        # Where the mechanisms' randomness came from (NoiseSource.describe()).
        self.noise = noise or {}
        self.experiment_id = experiment_id
        # What may be published; the rest of a round goes to server_internal/ only.
        self.release = release or ReleasePolicy(unit=privacy_unit)
        self.internal = InternalRecord(self.run_dir) if not self.release.participation_public else None
        self.rounds: dict[int, dict[str, Any]] = {}
        # The simulated clock's total (seconds of every round's training on it so far).
        self.simulated_s = 0.0
        self.ledger = PrivacyLedger()
        self.final: dict[str, Any] | None = None
        # Which clients were malicious and how (robustness experiments), for auditing.
        self.attack: dict[str, Any] = {"name": "none", "clients": []}
        self.resumed_from: int | None = None
        # Why the run stopped early (a failed round), with the command to continue it.
        self.stopped: dict[str, Any] | None = None
        # Where the run is tracked (e.g. the W&B run's id, mode and local dir).
        self.tracking: dict[str, Any] = {}
        self.start = time.time()
        # Observers of the run (tracking, audit, progress display): each may define
        # ``on_round(record, recorder)`` (after every evaluated round, results.json
        # already written), ``on_stop(stopped, recorder)`` (a failed round ended the run)
        # and ``on_finish(final, recorder)``.
        self.listeners: list[Any] = []
        # Flower node id -> client (partition) id, learned from replies: the sampler only
        # knows nodes, the audit log speaks of clients.
        self.node_clients: dict[str, Any] = {}

    def _notify(self, event: str, *args: Any) -> None:
        for listener in self.listeners:
            handler = getattr(listener, event, None)
            if handler is not None:
                handler(*args, self)

    def restore(self, payload: dict[str, Any], ledger: PrivacyLedger, up_to_round: int) -> None:
        """Continue a run: its ``results.json`` rounds up to the checkpoint and the
        checkpoint's ledger (never reset; every epsilon comes from it)."""
        self.rounds = {int(r["round"]): r for r in payload.get("rounds", []) if int(r["round"]) <= up_to_round}
        self.ledger = ledger
        self.attack = payload.get("attack", self.attack)
        self.resumed_from = up_to_round
        clocks = [r["round_clock"] for r in self.rounds.values() if "simulated_elapsed_s" in r.get("round_clock", {})]
        self.simulated_s = max((c["simulated_elapsed_s"] for c in clocks), default=0.0)

    def _round(self, server_round: int) -> dict[str, Any]:
        return self.rounds.setdefault(server_round, {"round": server_round})

    def client_epsilons(self) -> dict[str, float]:
        """Each client's own (sample-level) epsilon, from the ledger."""
        return {c: self.ledger.epsilon(c, self.accountant) for c in self.ledger.clients() if c != EVERY_CLIENT}

    def epsilon(self) -> float | None:
        """The federation's epsilon in its unit, from the ledger: sample-level, the largest
        over clients (each holds its own); client-level, the server's guarantee for every
        client."""
        if not self.ledger.entries or self.privacy_unit == NONE:
            return None
        if self.privacy_unit == CLIENT:
            return self.ledger.epsilon(EVERY_CLIENT, self.accountant)
        return max(self.client_epsilons().values(), default=None)

    def on_client_dp(self, server_round: int, plan: Any, clipped: int) -> None:
        """One round of the server's client-level Gaussian mechanism, for every client."""
        self.ledger.add(
            LedgerEntry(
                client=EVERY_CLIENT,
                round=int(server_round),
                unit=CLIENT,
                noise_multiplier=float(plan.noise_multiplier),
                sample_rate=float(plan.sample_rate),
                steps=1,
                delta=float(plan.delta),
            )
        )
        rec = self._round(server_round)
        rec["client_dp"] = {
            "clipping_norm": plan.clipping_norm,
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "clipped_updates": clipped,
        }

    def on_sample(self, server_round: int, nodes: list[Any], **how: Any) -> None:
        """Whom configure_fit sampled (Flower node ids) and how (method, rate, pool)."""
        self._round(server_round)["sampled"] = {"nodes": [str(n) for n in nodes], **how}

    def on_secagg_halted(self, server_round: int) -> None:
        """SecAgg+ could not finish this round; it was collected unmasked (client-level DP)."""
        self._round(server_round)["secagg_halted"] = True

    def on_ranks(self, server_round: int, ranks: dict[str, Any]) -> None:
        """Heterogeneous / adaptive LoRA ranks: the global rank, the aggregation and the
        rank cap the server chose for the next round (public: from the released aggregate)."""
        self._round(server_round)["lora_ranks"] = ranks

    def on_weights(self, server_round: int, bounded: list[dict[str, Any]]) -> None:
        """The claimed example counts the server bounded (``strategy.weighting``)."""
        self._round(server_round)["weights_bounded"] = bounded

    def on_aggregation(self, server_round: int, decisions: dict[str, Any]) -> None:
        """The aggregation rule, its parameters and its decisions by client id."""
        self._round(server_round)["aggregation"] = decisions

    def on_round_closed(self, server_round: int, seconds: float, simulated: bool,
                        elapsed_s: float | None = None) -> None:
        """When the round's training closed: seconds after its start, on the real clock or
        the simulated one, and the simulated clock's total so far (``elapsed_s`` where
        the caller keeps the clock itself, as an asynchronous run does)."""
        clock = "simulated" if simulated else "real"
        if simulated:
            self.simulated_s = float(elapsed_s) if elapsed_s is not None else self.simulated_s + float(seconds)
        self._round(server_round)["round_clock"] = {
            "clock": clock, "training_s": float(seconds),
            **({"simulated_elapsed_s": self.simulated_s} if simulated else {})}

    def on_cut_off(self, server_round: int, cut: list[dict[str, Any]]) -> None:
        """Sampled clients a round closed without (deadline or quorum). Under sample-level
        DP each is counted as having spent its planned round (its update may still have
        left it), under its client id or, while the node's client is unknown, as
        ``node:<id>`` (renamed when the node first replies; its own record then merges
        without counting the round twice)."""
        self._round(server_round)["cut_off"] = [
            {"node_id": c["node_id"], "client": c.get("cid"), "reason": c["reason"],
             "assumed_spend": c.get("planned_spend") is not None} for c in cut]
        for c in cut:
            spend = c.get("planned_spend")
            if spend is None or self.privacy_unit != SAMPLE:
                continue
            sigma, q, steps = spend
            self.ledger.add(LedgerEntry(client=str(c.get("cid") or f"node:{c['node_id']}"), round=int(server_round),
                                        unit=SAMPLE, noise_multiplier=float(sigma), sample_rate=float(q),
                                        steps=int(steps), delta=float(self.delta)))
        self.ledger.entries.sort(key=lambda e: e.round)

    def on_fit(
        self,
        server_round: int,
        clients: list[dict],
        rejected: list[dict],
        agg_s: float,
        aggregation_error: str | None = None,
    ) -> None:
        for info in clients:
            if info.get("node_id") is not None:
                self.ledger.rename(f"node:{info['node_id']}", str(info["cid"]))
        for info in clients:
            # A client that trained spent budget whether or not its update was accepted.
            # Its reply carries its whole own record: rounds the ledger lacks (trained in a
            # round the server did not finish) join it, so the ledger is the union.
            history = info.pop("dp_history", None)
            if history:
                self._merge_history(str(info["cid"]), history, info)
                # The ledger is the one source of epsilon: the record shows its value, and
                # flags a client whose own claim differs from it.
                claimed = info.get("epsilon")
                info["epsilon"] = self.ledger.epsilon(str(info["cid"]), self.accountant, server_round)
                if claimed is not None and not math.isclose(reported_float(claimed), info["epsilon"], rel_tol=1e-3):
                    info["claimed_epsilon"] = claimed
        rec = self._round(server_round)
        rec["fit_recorded"] = True
        rec["clients"] = clients
        rec["failures"] = [r for r in rejected if r.get("cid") is None]
        for info in clients:
            if info.get("node_id") is not None:
                self.node_clients[str(info["node_id"])] = info["cid"]
        if "sampled" in rec:
            # A sampled node that never replied stays a node id (its client is unknown).
            rec["sampled"]["clients"] = [self.node_clients.get(n, f"node {n}") for n in rec["sampled"]["nodes"]]
        rec["num_accepted"] = sum(bool(c.get("accepted")) for c in clients)
        rec["num_rejected"] = len(rejected)
        rec["aggregation_s"] = agg_s
        # Payload bytes of the adapter tensors each way, as the strategy counted them.
        for key in ("bytes_up", "bytes_down"):
            rec[key] = sum(int(c.get(key) or 0) for c in clients + rec["failures"])
        if aggregation_error:
            rec["aggregation_error"] = aggregation_error

    def _merge_history(self, cid: str, history: list[list[float]], info: dict[str, Any]) -> None:
        """Add the entries of a client's own record that the ledger lacks (by round, and by
        occurrence within a round, should a round ever have been trained twice)."""
        known = Counter(e.round for e in self.ledger.entries if e.client == cid)
        for sigma, q, steps, rnd in history:
            if known[int(rnd)] > 0:
                known[int(rnd)] -= 1
            else:
                self.ledger.add(
                    LedgerEntry(
                        client=cid,
                        round=int(rnd),
                        unit=str(info.get("privacy_unit", self.privacy_unit)),
                        noise_multiplier=float(sigma),
                        sample_rate=float(q),
                        steps=int(steps),
                        delta=float(info["delta"]),
                    )
                )
        self.ledger.entries.sort(key=lambda e: e.round)

    def on_evaluate(self, server_round: int, loss: float, metrics: dict[str, Any]) -> None:
        rec = self._round(server_round)
        rec["loss"] = _finite(float(loss))
        rec["accuracy"] = _finite(float(metrics.get("accuracy", math.nan)))
        # A task's further metrics (causal LM: perplexity, exact match of generation).
        for key, value in metrics.items():
            if key not in rec and isinstance(value, (int, float)):
                rec[key] = _finite(float(value))
        rec["epsilon"] = self.epsilon()
        rec["privacy_unit"] = LABEL[self.privacy_unit]
        rec["elapsed_s"] = round(time.time() - self.start, 3)
        public, internal = self.release.split_round(rec)
        self.echo(self._progress_line(public))
        self.write()
        if self.internal is not None and internal:
            self.internal.append(internal)
        self._notify("on_round", public)

    def on_generations(self, server_round: int, samples: list[dict[str, Any]]) -> None:
        """A few held-out prompts with the reference and the model's greedy answer, one
        line per round in ``generations.jsonl`` (the server's own test data: public)."""
        if not samples:
            return
        line = json.dumps({"round": server_round, "samples": samples}, ensure_ascii=False) + "\n"
        append_durable(Path(self.run_dir) / GENERATIONS, line.encode())
        self._notify("on_generations", server_round, samples)

    def on_federated_evaluate(self, server_round: int, loss: float | None, accuracy: float | None, n: int,
                              mode: str = PLAIN, clients: list[dict[str, Any]] = (),
                              outliers: list[str] = ()) -> None:
        """Clients' evaluation on their validation data: what they report, their median
        (``strategies.client_reports``) and the clients whose report is an outlier.
        ``mode`` is ``privacy.evaluation``: under ``dp`` each accuracy comes from noisy
        counts, there is no loss, and each client's record (``dp_history``) brings the
        releases' spend into the ledger."""
        for info in clients:
            self._merge_history(str(info["cid"]), info["dp_history"], info)
        rec = self._round(server_round)
        rec["federated_evaluation"] = {"loss": None if loss is None else _finite(loss),
                                       "accuracy": None if accuracy is None else _finite(accuracy),
                                       "clients": n, "mode": mode, "aggregation": "median",
                                       "reported_by": "clients"}
        if outliers:
            rec["evaluation_outliers"] = list(outliers)
        if clients:
            rec["epsilon"] = self.epsilon()
        self.write()
        self._notify("on_federated_evaluation", self.release.split_round(rec)[0])

    def eps_text(self, epsilon: float | None) -> str:
        return epsilon_text(epsilon, self.delta, self.privacy_unit)

    def _progress_line(self, rec: dict[str, Any]) -> str:
        acc = rec.get("accuracy")
        acc_text = "n/a" if acc is None else f"{acc:.4f}"
        parts = [f"round {rec['round']}/{self.num_rounds}", f"test accuracy {acc_text}", f"loss {rec.get('loss') or float('nan'):.4f}"]
        for key, name in (("perplexity", "perplexity"), ("exact_match", "exact match")):
            if rec.get(key) is not None:
                parts.append(f"{name} {rec[key]:.4g}")
        if rec["round"] > 0:
            parts.append(self.eps_text(rec.get("epsilon")))
            if "num_accepted" in rec:  # not published under client-level DP
                parts.append(f"clients ok {rec.get('num_accepted', 0)}, rejected {rec.get('num_rejected', 0)}")
        if "elapsed_s" in rec:  # not published under client-level DP (it grows with the draw)
            parts.append(f"{rec['elapsed_s']:.1f}s")
        return " | ".join(parts)

    def stop(self, reason: str) -> None:
        """The run ends early after its last checkpointed round; it can be resumed."""
        self.stopped = {
            "reason": reason,
            "after_round": max(self.rounds, default=0),
            "run_dir": str(self.run_dir),
        }
        self.echo(f"run stopped: {reason}; its checkpoint and privacy ledger are in {self.run_dir}; "
                  f"continue with {resume_commands(self.run_dir)}")
        self.write()
        self._notify("on_stop", self.stopped)

    def finalize(self, **extra: Any) -> dict[str, Any]:
        last = self.rounds[max(self.rounds)] if self.rounds else {}
        self.final = {
            "accuracy": last.get("accuracy"),
            "loss": last.get("loss"),
            "epsilon": self.epsilon(),
            "delta": self.delta if self.privacy_unit != NONE else None,
            "privacy_unit": self.privacy_unit,
            "rounds_completed": self.rounds_completed(),
            "wall_s": round(time.time() - self.start, 3),
            "client_epsilon": self.client_epsilons(),
            "epsilon_by_accountant": self.epsilon_by_accountant(),
            "resumed_from_round": self.resumed_from,
            "evaluation": self.evaluation_statement(),
            **extra,
        }
        self.write()
        self._notify("on_finish", self.final)
        return self.final

    def rounds_completed(self) -> int:
        return max((r for r in self.rounds if self.rounds[r].get("fit_recorded")), default=0)

    def published_rounds(self) -> list[dict[str, Any]]:
        """Every round as the run publishes it (results.json, audit, plots, W&B)."""
        return [self.release.split_round(self.rounds[r])[0] for r in sorted(self.rounds)]

    def privacy_statement(self) -> dict[str, Any]:
        """The guarantee the run's model was trained under, as the model card states it."""
        return {
            "unit": self.privacy_unit,
            "unit_label": LABEL[self.privacy_unit],
            "scope": SCOPE.get(self.privacy_unit, ""),
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "accountant": self.accountant,
            "rounds_completed": self.rounds_completed(),
            "noise": self.noise,
            "evaluation": self.evaluation_statement(),
        }

    def evaluation_statement(self) -> dict[str, Any]:
        """How clients' validation data was evaluated (``privacy.evaluation``) and whether
        the run's epsilon covers what that released."""
        return {"mode": self.release.evaluation, "covered": self.release.evaluation_covered}

    def epsilon_by_accountant(self) -> dict[str, float | None]:
        """The federation's epsilon (max over clients) recomputed from the ledger."""
        if not self.ledger.entries:
            return {}
        return {a: max(self.ledger.epsilons(a).values()) for a in ACCOUNTANTS}

    def payload(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "experiment_id": self.experiment_id,
            "noise": self.noise,
            "rounds": self.published_rounds(),
            "final": self.final,
            "attack": self.attack,
            "privacy_ledger": self.ledger.to_dict(),
            "stopped": self.stopped,
            "tracking": self.tracking,
            # What the model and data were loaded at (fedlora.models.hub.revisions).
            "revisions": revisions(self.config),
        }

    def write(self) -> None:
        write_json_atomic(self.path, self.payload())
