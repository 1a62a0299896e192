"""Per-round cost vs federation size: 10 clients at 100% vs 200 clients at 5%.

Both sample 10 clients per round with the same local steps, so a round should cost
about the same: the client side caches the model per process and touches only the
sampled clients' shards. Prints seconds per round, the ratio, and the peak resident
memory of the simulated-client processes (Ray actors).

    python benchmarks/scale.py [--rounds 2] [--model minilm|tiny_bert]
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

ROOT = Path(__file__).resolve().parents[1]


def _actor_rss(stop: threading.Event, peak: dict) -> None:
    while not stop.is_set():
        for proc in psutil.process_iter(["cmdline", "memory_info"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
                if "ClientAppActor" in cmd or "ray::IDLE" in cmd:
                    peak["rss"] = max(peak.get("rss", 0), proc.info["memory_info"].rss)
            except (psutil.Error, TypeError):
                continue
        time.sleep(0.5)


def run(num_clients: int, fraction: float, rounds: int, model: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"scale{num_clients}_"))
    cmd = [
        sys.executable, "-m", "simulations.run", f"model={model}",
        f"federation.num_clients={num_clients}", f"federation.fraction_fit={fraction}",
        "federation.fraction_evaluate=0", f"federation.rounds={rounds}",
        "federation.min_fit_clients=2", "federation.min_available_clients=2",
        "data.max_test_samples=100", "model.max_length=64", "train.batch_size=16",
        "train.local_steps=2", f"hydra.run.dir={out}",
    ]
    stop, peak = threading.Event(), {}
    watcher = threading.Thread(target=_actor_rss, args=(stop, peak), daemon=True)
    watcher.start()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    stop.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    res = json.loads((out / "results.json").read_text())
    times = {r["round"]: r["elapsed_s"] for r in res["rounds"]}
    per_round = [(times[r] - times[r - 1]) for r in range(1, rounds + 1)]
    sampled = [len(r.get("clients", [])) for r in res["rounds"] if r["round"] > 0]
    return {
        "num_clients": num_clients, "fraction_fit": fraction, "sampled_per_round": sampled,
        "seconds_per_round": per_round, "mean_seconds_per_round": sum(per_round) / rounds,
        "peak_actor_rss_mb": round(peak.get("rss", 0) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="minilm")
    args = parser.parse_args()
    small = run(10, 1.0, args.rounds, args.model)
    large = run(200, 0.05, args.rounds, args.model)
    for r in (small, large):
        print(json.dumps(r))
    ratio = large["mean_seconds_per_round"] / small["mean_seconds_per_round"]
    print(f"seconds/round: 10 clients @100% = {small['mean_seconds_per_round']:.2f}, "
          f"200 clients @5% = {large['mean_seconds_per_round']:.2f}, ratio = {ratio:.2f}")
    print(f"peak client-process RSS: {small['peak_actor_rss_mb']} MB vs {large['peak_actor_rss_mb']} MB")


if __name__ == "__main__":
    main()
