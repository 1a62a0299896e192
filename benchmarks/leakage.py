"""Privacy leakage of the default classification task: membership inference and the
one-run canary audit (``python -m fedlora.leakage``) for no DP, eps 8 and eps 1, beside
the accountant's eps; plus ``experiment=memorise`` without DP (the tiny model, long local
training) where leakage must show.

Every run trains with ``audit.canaries`` canaries (default 200: 50 per client of the
default experiment's 4) and is then analysed. Writes ``benchmarks/results/leakage.{json,md}``.

    python benchmarks/leakage.py [--canaries 200] [--epsilons 8 1] [extra Hydra overrides...]
    python benchmarks/leakage.py --name leakage_lm --no-memorise --canaries 80 --examples 200 \
        --exposure-candidates 20 experiment=lm

``--examples`` and ``--exposure-candidates`` go to ``python -m fedlora.leakage`` (members
and as many non-members scored; random strings each canary's exposure is ranked against).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _record import save

ROOT = Path(__file__).resolve().parents[1]

def run(overrides: list[str], analysis: list[str] = ()) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="leakage_"))
    start = time.perf_counter()
    for cmd in ([sys.executable, "-m", "simulations.run", "tracking=none", *overrides, f"hydra.run.dir={run_dir}"],
                [sys.executable, "-m", "fedlora.leakage", str(run_dir), *analysis]):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    leak = json.loads((run_dir / "leakage.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    return {"overrides": overrides, "run_dir": str(run_dir), "wall_s": time.perf_counter() - start,
            "test_accuracy": results["final"]["accuracy"], **leak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--canaries", type=int, default=200)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 1.0])
    parser.add_argument("--name", default="leakage", help="results file name (e.g. leakage_lm)")
    parser.add_argument("--no-memorise", action="store_true", help="skip the experiment=memorise row")
    parser.add_argument("--examples", type=int, help="python -m fedlora.leakage --examples")
    parser.add_argument("--exposure-candidates", type=int, help="python -m fedlora.leakage --exposure-candidates")
    args, extra = parser.parse_known_args()
    canaries = [f"audit.canaries={args.canaries}"]
    analysis = [f"--{name.replace('_', '-')}={value}" for name, value in
                (("examples", args.examples), ("exposure_candidates", args.exposure_candidates)) if value is not None]
    rows = [{"setting": "no DP", **run(["privacy=none", *canaries, *extra], analysis)}]
    for eps in args.epsilons:
        rows.append({"setting": f"eps={eps:g}",
                     **run([f"privacy.target_epsilon={eps}", *canaries, *extra], analysis)})
    if not args.no_memorise:
        rows.append({"setting": "no DP, memorising (experiment=memorise)",
                     **run(["experiment=memorise", "privacy=none"])})
    exposure = any("exposure" in r["canary_audit"] for r in rows)
    lines = ["| setting | test accuracy | MIA AUC (loss / calibrated) | TPR @ 1% FPR (loss / calibrated) | "
             "canary eps lower bound (95%) | canaries (right / guesses) | "
             + ("exposure bits, included / excluded | " if exposure else "")
             + "accountant eps | unit | wall time (s) |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if exposure else "")]
    for r in rows:
        m, a, acc = r["membership_inference"], r["canary_audit"], r["accountant"]
        eps = "–" if acc["epsilon"] is None else f"{acc['epsilon']:.3f}"
        lines.append(
            f"| {r['setting']} | {r['test_accuracy']:.3f} | {m['loss_threshold']['auc']:.3f} / "
            f"{m['reference_calibrated']['auc']:.3f} | {m['loss_threshold']['tpr_at_0.01_fpr']:.3f} / "
            f"{m['reference_calibrated']['tpr_at_0.01_fpr']:.3f} | {a['epsilon_lower_bound']:.3f} (max "
            f"{a['max_certifiable']:.2f}) | {a['canaries']} ({a['correct']} / {a['guesses']}) | "
            + (f"{a['exposure']['mean_included']:.2f} / {a['exposure']['mean_excluded']:.2f} | " if exposure else "")
            + f"{eps} | {acc['privacy_unit']} | {r['wall_s']:.0f} |")
    save(args.name, "\n".join(lines), {"rows": rows, "analysis": analysis})


if __name__ == "__main__":
    main()
