"""Per-round cost vs federation size: 10 to 10,000 clients, the same clients per round.

Every run samples the same number of clients per round (``--per-round``, default 10),
each holding the same number of training rows: the federation is built by seeded
replication of the packaged fine-food reviews (``partition=replicate``: each client
draws ``--examples`` rows without replacement by its own seed; clients share rows, so
this measures cost, not utility). What a round costs should then not depend on the
clients that did not take part. Measured per size:

- seconds per round: the mean over rounds 2..R of the record's elapsed time (round 1,
  reported apart, also pays each simulated-client process's start: model load, first
  encode), and its ratio to the 10-client run (target <= 1.2);
- peak RSS of the server (the simulation's driver process, where the ServerApp runs),
  of the simulated clients (Ray's ClientApp actors, summed), and of the whole process
  tree (driver, Ray's daemons and workers; target < 6 GB at 10,000 clients);
- bytes per round of the record: a round's entry in results.json and its lines in
  audit.jsonl (target: independent of the federation size).

    python benchmarks/scale.py                      # 10, 100, 1000, 5000, 10000 clients
    python benchmarks/scale.py --sizes 10 1000 --rounds 2 --privacy client
    python benchmarks/scale.py --full-round 1000    # one round in which 1,000 clients all train

``--full-round N``: one round with all N clients participating (1 local step, 40 rows
each), its wall time, peak RSS and the aggregation's own latency (the round record's
``aggregation_s``), against the target latency of ``benchmarks/aggregation.py`` for
n = N (stored as ``scale_full_round.{json,md}``).

Results: ``benchmarks/results/scale.json`` and ``.md`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = (10, 100, 1000, 5000, 10000)
TARGET_TIME_RATIO = 1.2
TARGET_RSS_GB = 6.0


class PeakRSS(threading.Thread):
    """Samples the RSS of a process tree every ``period`` seconds: the driver alone, the
    Ray ClientApp actors (summed), and the whole tree (summed); keeps the peaks."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak = {"server": 0, "clients": 0, "total": 0}
        self.done = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            server = clients = total = 0
            for proc in tree:
                try:
                    rss = proc.memory_info().rss
                    cmd = " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                total += rss
                if proc.pid == self.pid:
                    server = rss
                elif "ClientAppActor" in cmd or "ray::IDLE" in cmd:
                    clients += rss
            for key, value in (("server", server), ("clients", clients), ("total", total)):
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.period)


def record_bytes(run_dir: Path) -> tuple[float, float]:
    """Mean bytes per trained round: its entry in results.json, its audit.jsonl lines."""
    res = json.loads((run_dir / "results.json").read_text())
    rounds = [r for r in res["rounds"] if r["round"] > 0]
    results_bytes = sum(len(json.dumps(r)) for r in rounds) / max(1, len(rounds))
    audit = {}
    for line in (run_dir / "audit.jsonl").read_bytes().splitlines():
        rec = json.loads(line)
        if rec.get("round", 0) > 0:
            audit[rec["round"]] = audit.get(rec["round"], 0) + len(line) + 1
    return results_bytes, sum(audit.values()) / max(1, len(audit))


def run(num_clients: int, args: argparse.Namespace, fraction: float | None = None) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"scale{num_clients}_"))
    fraction = args.per_round / num_clients if fraction is None else fraction
    privacy = {"sample": [], "client": ["privacy=client", "privacy.clipping_norm=1.0"], "none": ["privacy=none"]}
    cmd = [
        sys.executable, "-m", "simulations.run", f"model={args.model}", "train.probe_steps=0",
        "partition=replicate", f"partition.examples_per_client={args.examples}",
        f"federation.num_clients={num_clients}", f"federation.fraction_fit={fraction}",
        "federation.fraction_evaluate=0", f"federation.rounds={args.rounds}",
        "federation.min_fit_clients=2", "federation.min_available_clients=2",
        f"data.max_test_samples={args.test_rows}", "train.batch_size=32",
        f"train.local_steps={args.local_steps}", f"strategy={args.aggregator}", f"hydra.run.dir={out}",
        *privacy[args.privacy],
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = PeakRSS(proc.pid)
    watcher.start()
    log, _ = proc.communicate()
    watcher.done.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{num_clients} clients failed:\n{log[-4000:]}")
    res = json.loads((out / "results.json").read_text())
    times = {r["round"]: r["elapsed_s"] for r in res["rounds"]}
    per_round = [times[r] - times[r - 1] for r in range(1, args.rounds + 1)]
    steady = per_round[1:] or per_round
    results_bytes, audit_bytes = record_bytes(out)
    sampled = [int((r.get("sampled") or {}).get("count", len(r.get("clients", []))))
               for r in res["rounds"] if r["round"] > 0]
    return {
        "num_clients": num_clients, "fraction_fit": fraction, "privacy": args.privacy,
        "sampled_per_round": sampled,
        "seconds_per_round": [round(t, 2) for t in per_round],
        "first_round_seconds": round(per_round[0], 2),
        "mean_seconds_per_round": round(sum(steady) / len(steady), 3),
        "peak_server_rss_mb": round(watcher.peak["server"] / 2**20, 1),
        "peak_clients_rss_mb": round(watcher.peak["clients"] / 2**20, 1),
        "peak_total_rss_mb": round(watcher.peak["total"] / 2**20, 1),
        "results_json_bytes_per_round": round(results_bytes),
        "audit_bytes_per_round": round(audit_bytes),
        "results_json_bytes": (out / "results.json").stat().st_size,
        "audit_bytes": (out / "audit.jsonl").stat().st_size,
        "aggregation_s": [r.get("aggregation_s") for r in res["rounds"] if r["round"] > 0],
        "final_accuracy": res.get("final", {}).get("accuracy"),
        "run_dir": str(out),
    }


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        "| clients | sampled/round | round 1 s | s/round (2..R) | ratio to smallest | server RSS MB | clients RSS MB | total RSS MB | "
        "results.json B/round | audit B/round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["mean_seconds_per_round"] / base["mean_seconds_per_round"]
        lines.append(
            f"| {r['num_clients']} | {min(r['sampled_per_round'])}-{max(r['sampled_per_round'])} | "
            f"{r['first_round_seconds']:.2f} | {r['mean_seconds_per_round']:.2f} | {ratio:.2f} | {r['peak_server_rss_mb']:.0f} | "
            f"{r['peak_clients_rss_mb']:.0f} | {r['peak_total_rss_mb']:.0f} | "
            f"{r['results_json_bytes_per_round']} | {r['audit_bytes_per_round']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled per round at every size")
    parser.add_argument("--examples", type=int, default=400, help="training rows per client (replicated)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--model", default="tiny_bert")
    parser.add_argument("--privacy", choices=["sample", "client", "none"], default="sample")
    parser.add_argument("--aggregator", default="fedavg", help="conf/strategy preset")
    parser.add_argument("--full-round", type=int, default=None, metavar="N",
                        help="instead: one round in which all N clients train")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.full_round:
        return full_round(args)
    rows = []
    for n in args.sizes:
        rows.append(run(n, args))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows:
        r["time_ratio_to_smallest"] = round(r["mean_seconds_per_round"] / base["mean_seconds_per_round"], 3)
        r["record_bytes_ratio_to_smallest"] = round(
            r["results_json_bytes_per_round"] / max(1, base["results_json_bytes_per_round"]), 3)
    md = (f"Per-round cost vs federation size ({args.model}, {args.per_round} clients per round, "
          f"{args.examples} replicated rows per client, {args.local_steps} local steps, {args.rounds} rounds, "
          f"privacy={args.privacy})\n\n{table(rows)}\n\n"
          f"Targets: s/round within {TARGET_TIME_RATIO}x of the {base['num_clients']}-client run; total RSS "
          f"< {TARGET_RSS_GB:g} GB at 10,000 clients; bytes per round independent of the federation size.\n")
    save(f"scale{args.tag}", md, {"settings": vars(args), "runs": rows,
                                  "targets": {"time_ratio": TARGET_TIME_RATIO, "total_rss_gb": TARGET_RSS_GB}})


# benchmarks/aggregation.py's targets (ms) at n = 1000, by rule.
AGGREGATION_TARGET_MS_1000 = {"fedavg": 20, "median": 400, "trimmed_mean": 400, "krum": 1000, "multi_krum": 1000,
                              "bulyan": 1000}


def full_round(args: argparse.Namespace) -> None:
    n = args.full_round
    args.examples, args.local_steps, args.rounds = 40, 1, 1
    r = run(n, args, fraction=1.0)
    target = AGGREGATION_TARGET_MS_1000.get(args.aggregator) if n == 1000 else None
    agg_ms = 1000 * float(r["aggregation_s"][0])
    r["aggregation_ms"], r["aggregation_target_ms"] = round(agg_ms, 2), target
    md = (f"One round with all {n} clients training ({args.model}, {args.examples} replicated rows each, 1 local "
          f"step, privacy={args.privacy}, strategy={args.aggregator})\n\n"
          "| clients trained | round s | aggregation ms | target ms (benchmarks/aggregation.py) | server RSS MB | "
          "clients RSS MB | total RSS MB | results.json B/round |\n|---|---|---|---|---|---|---|---|\n"
          f"| {r['sampled_per_round'][0]} | {r['seconds_per_round'][0]:.1f} | {agg_ms:.1f} | {target or '-'} | "
          f"{r['peak_server_rss_mb']:.0f} | {r['peak_clients_rss_mb']:.0f} | {r['peak_total_rss_mb']:.0f} | "
          f"{r['results_json_bytes_per_round']} |\n")
    save(f"scale_full_round{args.tag}", md, {"settings": vars(args), "run": r})


if __name__ == "__main__":
    main()
