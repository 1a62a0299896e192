"""Privacy-utility of the default task: accuracy at privacy=none and at several epsilons.

Same data, partition, seeds and recipe (conf defaults); only the privacy setting
changes. Writes ``benchmarks/results/utility.json`` and ``utility.md`` and prints the
table. Every epsilon is read back from the run's ledger-backed results.json.

    python benchmarks/utility.py [--epsilons 1 3 8] [extra Hydra overrides...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def run(overrides: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="utility_"))
    cmd = [sys.executable, "-m", "simulations.run", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    final = results["final"]
    federated = results["rounds"][-1].get("federated_evaluation") or {}
    return {
        "overrides": overrides,
        "accuracy": final["accuracy"],
        "epsilon": final["epsilon"],
        "epsilon_by_accountant": final.get("epsilon_by_accountant", {}),
        "delta": final["delta"],
        "wall_s": final["wall_s"],
        # Clients' own validation accuracy as published (privacy.evaluation: plain, or
        # from noisy counts under dp).
        "federated_accuracy": federated.get("accuracy"),
        "federated_mode": federated.get("mode"),
        "run_dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    args, extra = parser.parse_known_args()
    rows = [{"setting": "no DP", **run(["privacy=none", *extra])}]
    for eps in args.epsilons:
        rows.append({"setting": f"eps={eps:g}", **run([f"privacy.target_epsilon={eps}", *extra])})
    base = rows[0]["accuracy"]
    lines = [
        "| setting | test accuracy | gap to no DP (points) | eps RDP (PRV) spent, delta=1e-5 | "
        "clients' validation accuracy (privacy.evaluation) | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = r["accuracy"]
        by = r["epsilon_by_accountant"]
        eps = "–" if r["epsilon"] is None else f"{by.get('rdp', r['epsilon']):.3f} ({by.get('prv', float('nan')):.3f})"
        fed = "–" if r["federated_accuracy"] is None else f"{r['federated_accuracy']:.3f} ({r['federated_mode']})"
        lines.append(f"| {r['setting']} | {acc:.3f} | {100 * (acc - base):+.1f} | {eps} | {fed} | {r['wall_s']:.0f} |")
    table = "\n".join(lines)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "utility.json").write_text(json.dumps(rows, indent=2))
    (OUT / "utility.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
