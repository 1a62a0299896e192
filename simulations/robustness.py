"""Attack x aggregator table: final test accuracy of each defence under each attack.

Every cell is a real simulation (``python -m simulations.run experiment=robustness
strategy=<aggregator> attack=<attack>``) in its own run dir under ``--out``; a cell
whose run dir already holds a finished ``results.json`` is read, not rerun, so an
interrupted sweep resumes where it stopped. Writes ``robustness.json`` and
``robustness.md`` into ``--out`` and prints the markdown table; ``python -m
simulations.report <--out dir>`` prints the same grid from the run dirs, with one row
per run.

    python -m simulations.robustness [--out outputs/robustness] \\
        [--aggregators fedavg median ...] [--attacks none sign_flip ...] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from simulations.report import pivot_table

AGGREGATORS = ["fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "centered_clipping"]
ATTACKS = ["none", "sign_flip", "scaling", "gaussian", "label_flip", "alie", "ipm", "weight_inflation",
           "metric_poisoning"]
# What an attack needs to act at all: metric poisoning lies in federated evaluation.
ATTACK_OVERRIDES = {"metric_poisoning": ["federation.fraction_evaluate=1.0"]}


def finished(run_dir: Path) -> dict | None:
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    return payload if payload.get("final") else None


def run_cell(aggregator: str, attack: str, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{aggregator}__{attack}"
    payload = finished(run_dir)
    if payload is None:
        cmd = [sys.executable, "-m", "simulations.run", "experiment=robustness", f"strategy={aggregator}",
               f"attack={attack}", *ATTACK_OVERRIDES.get(attack, []), *extra, f"hydra.run.dir={run_dir}"]
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            print(f"{aggregator} x {attack}: failed: {' '.join(tail)}", file=sys.stderr)
            return {"aggregator": aggregator, "attack": attack, "accuracy": None, "error": tail[-1] if tail else ""}
        payload = finished(run_dir)
        print(f"{aggregator} x {attack}: {payload['final']['accuracy']:.4f} ({time.time() - start:.0f} s)",
              flush=True)
    final = payload["final"]
    rounds = payload.get("rounds") or []
    reported = [r["federated_evaluation"] for r in rounds if r.get("federated_evaluation")]
    return {
        "aggregator": aggregator,
        "attack": attack,
        "accuracy": final["accuracy"],
        "malicious_clients": payload.get("attack", {}).get("clients", []),
        # The clients' own evaluation (their median) in the last round, and how many
        # rounds flagged an outlier report.
        "client_reported_accuracy": reported[-1].get("accuracy") if reported else None,
        "rounds_with_outliers": sum(1 for r in rounds if r.get("evaluation_outliers")),
        "weights_bounded": sum(len(r.get("weights_bounded") or []) for r in rounds),
        "wall_s": final["wall_s"],
        "run_dir": str(run_dir),
    }


def table(cells: list[dict], aggregators: list[str], attacks: list[str]) -> str:
    """Final accuracy, aggregator x attack (the same pivot ``simulations.report`` prints)."""
    acc = {(c["aggregator"], c["attack"]): c["accuracy"] for c in cells}
    return pivot_table(acc, aggregators, attacks, "aggregator")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/robustness"))
    parser.add_argument("--aggregators", nargs="+", default=AGGREGATORS)
    parser.add_argument("--attacks", nargs="+", default=ATTACKS)
    args, extra = parser.parse_known_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cells = [run_cell(g, a, args.out, extra) for a in args.attacks for g in args.aggregators]
    text = table(cells, args.aggregators, args.attacks)
    (args.out / "robustness.json").write_text(json.dumps({"overrides": extra, "cells": cells}, indent=2))
    (args.out / "robustness.md").write_text(
        "Final test accuracy, 15 clients, 3 malicious (20%), 3 rounds, no DP "
        "(`python -m simulations.robustness`)\n\n" + text + "\n"
    )
    print(text)
    return 0 if all(c["accuracy"] is not None for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
