"""Federated optimisation methods on one non-IID task: what each buys.

The default task split over ``--clients`` clients (default 10) by Dirichlet(alpha=0.3)
on the label, same seeds and rounds for every row; one row per method: final test
accuracy, adapter bytes each client sends per round (as results.json counts them), wall
time, and the test loss of every round (it should fall as accuracy rises). Writes
``benchmarks/results/fedopt.{json,md}``.

    python benchmarks/fedopt.py [--clients 10] [--rounds 3] [--only fedavg int8] [extra Hydra overrides...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _record import save

ROOT = Path(__file__).resolve().parents[1]

# Rows: label -> overrides on top of the shared ones.
METHODS: dict[str, list[str]] = {
    "FedAvg": [],
    "int8": ["compression=int8"],
    "top-k 10% + error feedback": ["compression=topk", "compression.fraction=0.1"],
    "ranks {2,4,8,16}, zero-padding (HetLoRA)": ["+federation.client_ranks=[2,4,8,16]"],
    "ranks {2,4,8,16}, SVD (FlexLoRA)": ["+federation.client_ranks=[2,4,8,16]", "lora.aggregation=svd"],
    "adaptive rank (90% energy, r <= 8)": ["lora.adaptive_energy=0.9"],
    "FedAdam (server lr 0.01)": ["strategy.server_optimizer=fedadam", "strategy.server_lr=0.01"],
    "FedYogi (server lr 0.01)": ["strategy.server_optimizer=fedyogi", "strategy.server_lr=0.01"],
    "FedAvgM (momentum 0.9)": ["strategy.server_optimizer=fedavgm"],
    "FedProx (mu 0.1)": ["train.proximal_mu=0.1"],
    "FFA-LoRA (A frozen)": ["lora.freeze_a=true"],
    "FedNova": ["strategy=fednova"],
    "int4": ["compression=int4"],
    "power-of-choice selection (half the clients)": ["federation.selection=power_of_choice",
                                                     "federation.fraction_fit=0.5"],
}


def run(overrides: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="fedopt_"))
    cmd = [sys.executable, "-m", "simulations.run", "tracking=none", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    rounds = [r for r in results["rounds"] if r["round"] > 0]
    # Bytes each client sent per round: the round's total over the clients that replied.
    per_client = [r["bytes_up"] / max(1, len(r.get("clients") or [])) for r in rounds if r.get("bytes_up")]
    losses = [r.get("loss") for r in results["rounds"] if r.get("loss") is not None]
    caps = [(r.get("lora_ranks") or {}).get("next_rank_cap") for r in rounds]
    return {"overrides": overrides, "run_dir": str(run_dir), "accuracy": results["final"]["accuracy"],
            "loss_by_round": losses, "rank_caps": caps if any(c is not None for c in caps) else None,
            "epsilon": results["final"]["epsilon"], "wall_s": results["final"]["wall_s"],
            "bytes_up_per_client_round": sum(per_client) / len(per_client) if per_client else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--only", nargs="+", help="labels (or their first word) of the rows to run")
    args, extra = parser.parse_known_args()
    shared = [f"federation.num_clients={args.clients}", f"federation.rounds={args.rounds}",
              "partition=dirichlet", f"partition.alpha={args.alpha}", *extra]
    chosen = {k: v for k, v in METHODS.items()
              if not args.only or any(k == o or k.split()[0] == o for o in args.only)}
    rows = []
    for label, overrides in chosen.items():
        rows.append({"method": label, **run([*shared, *overrides])})
        # Stored after every row: a long table is never lost to an interruption.
        save("fedopt", table(rows), {"shared": shared, "rows": rows})


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["method"] == "FedAvg"), None)
    lines = ["| method | test accuracy | vs FedAvg (points) | test loss by round | KB up per client per round | "
             "vs FedAvg bytes | epsilon | wall time (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kb = r["bytes_up_per_client_round"]
        gap = "–" if base is None else f"{100 * (r['accuracy'] - base['accuracy']):+.1f}"
        ratio = ("–" if base is None or not kb or not base["bytes_up_per_client_round"]
                 else "baseline" if r is base else f"{base['bytes_up_per_client_round'] / kb:.2f}x fewer")
        eps = "–" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        losses = " → ".join(f"{x:.3f}" for x in r["loss_by_round"])
        if r.get("rank_caps"):
            losses += f" (rank caps {r['rank_caps']})"
        kb_text = "–" if kb is None else f"{kb / 1e3:.1f}"
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {gap} | {losses} | {kb_text} | "
                     f"{ratio} | {eps} | {r['wall_s']:.0f} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
