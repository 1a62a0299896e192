"""Privacy-utility of the causal-LM task: non-DP federated tuning vs epsilon 8 and 3.

The same federation, data, rounds and recipe (``experiment=lm`` plus the overrides given
here), only the privacy setting changes (sample-level, delta=1e-5). Two floors: the base
model before tuning (each run's round-0 evaluation of the untouched model) and the
majority answer of the test split. The share of the non-DP gain over the base model
that a DP run keeps is ``(acc_dp - acc_base) / (acc_nodp - acc_base)``. Every epsilon is
read back from the run's ledger-backed results.json. Writes
``benchmarks/results/lm_utility.{json,md}`` and prints the table.

    python benchmarks/lm_utility.py [--epsilons 8 3] [extra Hydra overrides...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from _record import save

ROOT = Path(__file__).resolve().parents[1]


def run(overrides: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="lm_utility_"))
    cmd = [sys.executable, "-m", "simulations.run", "experiment=lm", "tracking=none", *overrides,
           f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    res = json.loads((run_dir / "results.json").read_text())
    rounds = {r["round"]: r for r in res["rounds"]}
    final = res["final"]
    last = rounds[max(rounds)]
    return {
        "overrides": overrides, "accuracy": final["accuracy"], "perplexity": last.get("perplexity"),
        "exact_match": last.get("exact_match"), "base_accuracy": rounds[0]["accuracy"],
        "base_perplexity": rounds[0].get("perplexity"), "epsilon": final["epsilon"], "delta": final["delta"],
        "mb_up": sum(r.get("bytes_up") or 0 for r in res["rounds"]) / 1e6,
        "mb_down": sum(r.get("bytes_down") or 0 for r in res["rounds"]) / 1e6,
        "wall_s": final["wall_s"], "run_dir": str(run_dir), "config": res["config"],
    }


def majority_share(config: dict) -> float:
    from omegaconf import OmegaConf

    from fedlora.tasks import get_task

    cfg = OmegaConf.create(config)
    labels = get_task(cfg.model).load_data(cfg.data, int(cfg.seed)).test["label"]
    return Counter(labels).most_common(1)[0][1] / len(labels)


def _f(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0])
    args, extra = parser.parse_known_args()
    rows = [{"setting": "no DP", **run(["privacy=none", *extra])}]
    for eps in args.epsilons:
        rows.append({"setting": f"eps={eps:g}", **run([f"privacy.target_epsilon={eps}", *extra])})
    base = rows[0]["base_accuracy"]
    majority = majority_share(rows[0]["config"])
    gain = rows[0]["accuracy"] - base
    lines = ["| setting | test accuracy | share of the non-DP gain kept | test perplexity | exact match | "
             "eps (sample-level, delta=1e-5) | MB up / down | wall time (s) |",
             "|---|---|---|---|---|---|---|---|",
             f"| base model (before tuning) | {base:.3f} | | {_f(rows[0]['base_perplexity'], '.2f')} | | | | |",
             f"| majority answer | {majority:.3f} | | | | | | |"]
    for r in rows:
        r.pop("config")
        kept = (r["accuracy"] - base) / gain if r["setting"] != "no DP" and gain > 0 else None
        r["gain_kept"] = kept
        lines.append(f"| {r['setting']} | {r['accuracy']:.3f} | {_f(kept, '.2f')} | {_f(r['perplexity'], '.2f')} | "
                     f"{_f(r['exact_match'], '.2f')} | {_f(r['epsilon'], '.3f')} | {r['mb_up']:.1f} / {r['mb_down']:.1f} "
                     f"| {r['wall_s']:.0f} |")
    save("lm_utility", "\n".join(lines), {"base_accuracy": base, "majority": majority, "rows": rows})


if __name__ == "__main__":
    main()
