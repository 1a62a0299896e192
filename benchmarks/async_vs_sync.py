"""Time to accuracy, synchronous rounds vs asynchronous FedBuff, with stragglers.

The same federation (``--clients`` clients, ``--slow-fraction`` of them ``--slowdown``
times slower, declared by ``federation.profiles``) runs twice on the simulated clock
(:mod:`fedlora.client.heterogeneity`: each client's measured work scaled by its
profile, as a fleet of parallel devices would take): synchronous rounds of
``--per-round`` clients, then FedBuff with a buffer of the same size and twice as many
clients training at once. The target is the synchronous run's final test accuracy; the
result is the simulated seconds each run needs to reach it (first evaluated step at or
above it) and their ratio (target: async <= 0.6 x sync).

    python benchmarks/async_vs_sync.py [--rounds 6] [--async-rounds 12] [--model minilm]

Results: ``benchmarks/results/async_vs_sync.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.6


def run(mode: str, rounds: int, args: argparse.Namespace) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{mode}_"))
    slow = max(1, round(args.slow_fraction * 5))
    profiles = ",".join(["{speed:1}"] * (5 - slow) + [f"{{speed:{1 / args.slowdown:g}}}"] * slow)
    cmd = [
        sys.executable, "-m", "simulations.run", f"model={args.model}", f"privacy={args.privacy}",
        f"federation.num_clients={args.clients}", f"federation.fraction_fit={args.per_round / args.clients}",
        f"federation.rounds={rounds}", "federation.fraction_evaluate=0", f"federation.profiles=[{profiles}]",
        f"federation.mode={mode}", f"train.local_steps={args.local_steps}", f"train.batch_size={args.batch_size}",
        f"data.max_test_samples={args.test_rows}", "tracking=none", f"seed={args.seed}", f"hydra.run.dir={out}",
    ]
    if mode == "async":
        cmd += [f"federation.buffer_size={args.per_round}",
                f"federation.concurrency={min(args.clients, 2 * args.per_round)}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    curve = [(r["round"], r["round_clock"]["simulated_elapsed_s"], r["accuracy"])
             for r in res["rounds"] if r["round"] > 0 and "round_clock" in r and r.get("accuracy") is not None]
    return {"mode": mode, "rounds": rounds, "curve": curve, "final_accuracy": res["final"]["accuracy"],
            "run_dir": str(out), "wall_s": res["final"].get("wall_s")}


def time_to(curve: list, target: float) -> float | None:
    return next((t for _, t, acc in curve if acc >= target - 1e-12), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6, help="synchronous rounds")
    parser.add_argument("--async-rounds", type=int, default=12, help="asynchronous global steps (at most)")
    parser.add_argument("--slow-fraction", type=float, default=0.2)
    parser.add_argument("--slowdown", type=float, default=5.0)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--privacy", default="none")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-rows", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sync = run("sync", args.rounds, args)
    target = sync["final_accuracy"]
    asyn = run("async", args.async_rounds, args)
    t_sync, t_async = time_to(sync["curve"], target), time_to(asyn["curve"], target)
    ratio = None if t_sync is None or t_async is None else t_async / t_sync
    rows = "\n".join(
        f"| {r['mode']} | {r['rounds']} | {r['final_accuracy']:.4f} | "
        f"{'not reached' if t is None else f'{t:.1f}'} | {r['curve'][-1][1]:.1f} | "
        + " ".join(f"{acc:.3f}@{t_:.0f}s" for _, t_, acc in r["curve"]) + " |"
        for r, t in ((sync, t_sync), (asyn, t_async)))
    md = (f"Time to the synchronous run's final accuracy ({target:.4f}), simulated clock: {args.clients} clients, "
          f"{args.slow_fraction:.0%} of them {args.slowdown:g}x slower, {args.per_round} per round / buffer, "
          f"{args.model}, privacy={args.privacy}\n\n"
          "| mode | rounds / steps | final accuracy | s to target | s total | accuracy @ simulated s |\n"
          f"|---|---|---|---|---|---|\n{rows}\n\n"
          f"async / sync time to target: {'n/a' if ratio is None else f'{ratio:.2f}'} "
          f"(target <= {TARGET_RATIO})\n")
    save("async_vs_sync", md, {"settings": vars(args), "sync": sync, "async": asyn, "target_accuracy": target,
                               "seconds_to_target": {"sync": t_sync, "async": t_async}, "ratio": ratio,
                               "target_ratio": TARGET_RATIO})


if __name__ == "__main__":
    main()
