"""Aggregator speed and memory: ``strategies.aggregators`` vs ``flwr.server.strategy.aggregate``.

For each n, a seeded random float32 (n, d) matrix of updates (d = 74,498 is the
flattened LoRA adapter of the default model) goes through each of our rules (best of
``--repeat``) and through Flower's counterpart on the same input, given as one layer
per client. Flower's rules that take over a second run once. Flower's Bulyan re-runs
its pairwise Krum on every pick, O(n^3 d); when the estimate from its measured Krum
exceeds ``--skip-flower-above`` seconds it is not run and the estimate is reported,
marked ``~``. Peak extra memory of our rule is measured with ``tracemalloc`` (NumPy
reports its buffers to it) as a multiple of the (n, d) matrix.

    python benchmarks/aggregation.py [--n 100 1000] [--d 74498] [--repeat 3]
        [--skip-flower-above 600]

Writes benchmarks/results/aggregation.json and aggregation.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import flwr
import numpy as np
from flwr.server.strategy import aggregate as flwr_agg

from strategies.aggregators import check_params, get_aggregator

ROOT = Path(__file__).resolve().parents[1]

# Targets in ms by n (the ones stated for this 2-core machine); others have none.
TARGETS_MS = {
    100: dict.fromkeys(
        ["fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "centered_clipping"], 100.0
    ),
    1000: {"fedavg": 20.0, "median": 400.0, "trimmed_mean": 400.0, "krum": 1000.0, "multi_krum": 1000.0,
           "bulyan": 1000.0},
}
MIN_SPEEDUP = 3.0
# A Flower call slower than this is timed once, whatever --repeat says.
SLOW_S = 1.0


def cases(n: int) -> list[tuple[str, dict, Callable | None]]:
    """(rule, our params, Flower call on ``results``) with f chosen so every rule is valid."""
    f = n // 10
    f_bulyan = min(f, (n - 3) // 4)
    beta = 0.1
    return [
        ("fedavg", {}, flwr_agg.aggregate),
        ("median", {}, flwr_agg.aggregate_median),
        ("trimmed_mean", {"beta": beta}, lambda r: flwr_agg.aggregate_trimmed_avg(r, proportiontocut=beta)),
        ("krum", {"num_malicious": f}, lambda r: flwr_agg.aggregate_krum(r, num_malicious=f, to_keep=0)),
        ("multi_krum", {"num_malicious": f, "num_selected": n - f},
         lambda r: flwr_agg.aggregate_krum(r, num_malicious=f, to_keep=n - f)),
        ("bulyan", {"num_malicious": f_bulyan},
         lambda r: flwr_agg.aggregate_bulyan(
             list(r), num_malicious=f_bulyan, aggregation_rule=flwr_agg.aggregate_krum, to_keep=0)),
        ("centered_clipping", {"tau": 0.1, "iterations": 3}, None),
    ]


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Fastest of ``repeat`` runs in seconds (one run when the first is slow), and its result."""
    best, out = float("inf"), None
    for i in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
        if i == 0 and best > SLOW_S:
            break
    return best, out


def peak_memory(fn: Callable[[], object], matrix_bytes: int) -> float:
    """Peak traced allocation during ``fn`` beyond what was live before, in (n, d) matrices."""
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return (peak - before) / matrix_bytes


def flower_bulyan_estimate(krum_s: float, n: int, f: int) -> float:
    """Seconds for Flower's Bulyan from its Krum time at n: theta Krum calls on pools of
    n, n-1, ..., each quadratic in the pool size."""
    theta = n - 2 * f
    return krum_s * sum((pool / n) ** 2 for pool in range(n, n - theta, -1))


def run_n(n: int, d: int, repeat: int, skip_above: float, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    updates = rng.standard_normal((n, d), dtype=np.float32)
    # Rows in lexicographic order (the first column is distinct): exact Krum score ties
    # then go to the same row in Flower (first in list) and ours (lexicographically first).
    updates = updates[np.argsort(updates[:, 0])]
    weights = rng.integers(1, 100, size=n).astype(np.float64)
    results = [([row], int(w)) for row, w in zip(updates, weights, strict=True)]
    rows, flower_krum_s = [], None
    for name, params, flower in cases(n):
        check_params(name, n, **params)
        call = functools.partial(get_aggregator(name), updates, weights, **params)
        ours_s, ours = best_of(call, repeat)
        memory = peak_memory(call, updates.nbytes)
        row = {"n": n, "d": d, "aggregator": name, "params": params, "ours_ms": ours_s * 1e3,
               "peak_extra_memory_x": memory, "flower_ms": None, "flower_estimated": False,
               "max_abs_diff": None}
        if flower is not None:
            estimate = (flower_bulyan_estimate(flower_krum_s, n, params["num_malicious"])
                        if name == "bulyan" and flower_krum_s is not None else 0.0)
            if estimate > skip_above:
                row.update(flower_ms=estimate * 1e3, flower_estimated=True)
            else:
                flower_s, theirs = best_of(functools.partial(flower, results), repeat)
                row.update(flower_ms=flower_s * 1e3,
                           max_abs_diff=float(np.abs(ours - np.asarray(theirs[0])).max()))
                if name == "krum":
                    flower_krum_s = flower_s
        target = TARGETS_MS.get(n, {}).get(name)
        row["target_ms"] = target
        row["speedup"] = row["flower_ms"] / row["ours_ms"] if row["flower_ms"] else None
        row["pass"] = (target is None or row["ours_ms"] < target) and (
            row["speedup"] is None or row["speedup"] >= MIN_SPEEDUP)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = ("| n | aggregator | ours ms | flower ms | speedup | target | peak extra mem (x matrix) "
          "| max abs diff | pass |\n|---|---|---|---|---|---|---|---|---|")


def format_row(row: dict) -> str:
    approx = "~" if row["flower_estimated"] else ""
    flower = f"{approx}{row['flower_ms']:.1f}" if row["flower_ms"] is not None else "–"
    speedup = f"{approx}{row['speedup']:.1f}x" if row["speedup"] is not None else "–"
    target = f"< {row['target_ms']:g} ms" if row["target_ms"] is not None else "–"
    if row["speedup"] is not None:
        target += f", >= {MIN_SPEEDUP:g}x"
    diff = f"{row['max_abs_diff']:.1e}" if row["max_abs_diff"] is not None else "–"
    verdict = "pass" if row["pass"] else "FAIL"
    return (f"| {row['n']} | {row['aggregator']} | {row['ours_ms']:.1f} | {flower} | {speedup} | {target} "
            f"| {row['peak_extra_memory_x']:.2f} | {diff} | {verdict} |")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "flwr": flwr.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--d", type=int, default=74498)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-flower-above", type=float, default=600.0,
                        help="estimate instead of running Flower's Bulyan when it would take longer (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, numpy {info['numpy']}, flwr {info['flwr']}")
    print(HEADER)
    rows = [row for n in args.n for row in run_n(n, args.d, args.repeat, args.skip_flower_above, args.seed)]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aggregation.json").write_text(json.dumps(
        {"machine": info, "d": args.d, "repeat": args.repeat, "seed": args.seed,
         "skip_flower_above_s": args.skip_flower_above, "rows": rows}, indent=2) + "\n")
    notes = (
        f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, numpy {info['numpy']}, "
        f"flwr {info['flwr']}. float32 updates, d = {args.d}, seed {args.seed}; ours: best of "
        f"{args.repeat}; Flower: best of {args.repeat}, or one run when over {SLOW_S:g} s. "
        "f = n // 10 (Bulyan: the largest f <= n // 10 with n >= 4f + 3), trimmed mean beta = 0.1, "
        "multi-Krum keeps n - f, centered clipping tau = 0.1 with 3 iterations (no Flower "
        "counterpart). `~`: Flower's Bulyan not run, estimated from its measured Krum time as "
        "theta Krum calls on pools shrinking from n. Peak extra memory: tracemalloc peak during "
        "one call of our rule, in multiples of the (n, d) input. Max abs diff: ours vs Flower's "
        "output on the same input.\n"
    )
    table = "\n".join([HEADER] + [format_row(r) for r in rows])
    (args.out / "aggregation.md").write_text(
        f"# Aggregation benchmark\n\n`python benchmarks/aggregation.py --n {' '.join(map(str, args.n))} "
        f"--d {args.d} --repeat {args.repeat}`\n\n{table}\n\n{notes}")


if __name__ == "__main__":
    main()
