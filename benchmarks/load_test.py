"""Load test of a real deployment on loopback: many SuperNodes, a quarter of them killed
and restarted while the run goes on.

A SuperLink with TLS and node authentication, its Fleet-only gateway and ``--nodes``
registered SuperNodes (separate processes, :class:`fedlora.deploy.loopback.LoopbackFederation`)
run ``--rounds`` rounds of ``--per-round`` clients (tiny model, sample-level DP, a round
deadline of ``--timeout`` s so a dead node cannot hold a round, ``--over-selection``
more clients sampled than the round needs; or ``--mode async``). Once round 1 is
recorded, ``--kill-fraction`` of the SuperNodes are killed (SIGKILL, with their ClientApp
processes) and started again ``--down`` seconds later. Measured: whether the run
finishes, each round's latency (results.json ``elapsed_s``), its failures and cut-off
clients, and whether anything of the privacy ledger was lost: every spend a client
recorded on its own disk must be in the server's ledger (under its client id, or under
its node while the server did not know the node's client).

    python benchmarks/load_test.py [--nodes 20] [--rounds 4] [--per-round 10]
    python benchmarks/load_test.py --mode async --tag _async     # FedBuff on the real clock

Results: ``benchmarks/results/load_test.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import save  # noqa: E402

from fedlora.client.state import STATE_DIR_DEFAULT  # noqa: E402
from fedlora.deploy.launch import stop  # noqa: E402
from fedlora.deploy.loopback import LoopbackFederation  # noqa: E402

SMALL = ("model=tiny_bert data.max_test_samples=40 train.batch_size=16 train.probe_steps=0 tracking=none "
         "partition=replicate partition.examples_per_client=40 train.local_steps=2 federation.fraction_evaluate=0")


def _rounds_recorded(run_dir: Path) -> int:
    try:
        res = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return 0
    return max((r["round"] for r in res.get("rounds", []) if r.get("fit_recorded")), default=0)


def _wait_for(predicate, timeout_s: float, proc) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(1.0)
    return False


def lost_spends(res: dict, state_root: Path) -> tuple[int, int]:
    """(client-recorded spends, of them missing from the server's ledger)."""
    ledger = res["privacy_ledger"]["entries"]
    by_client = {(e["client"], e["round"]) for e in ledger}
    placeholders = {e["round"] for e in ledger if e["client"].startswith("node:")}
    recorded = missing = 0
    for path in state_root.glob(f"{res['experiment_id']}/client-*.jsonl"):
        cid = path.stem.split("-", 1)[1]
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if not isinstance(entry, list):
                continue  # a torn-line mark
            recorded += 1
            rnd = int(entry[3])
            missing += (cid, rnd) not in by_client and rnd not in placeholders
    return recorded, missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--kill-fraction", type=float, default=0.25)
    parser.add_argument("--down", type=float, default=20.0, help="seconds the killed SuperNodes stay down")
    parser.add_argument("--timeout", type=float, default=180.0, help="federation.round_timeout_s")
    parser.add_argument("--over-selection", type=float, default=0.2, help="federation.over_selection")
    parser.add_argument("--mode", choices=["sync", "async"], default="sync", help="federation.mode")
    parser.add_argument("--tag", default="")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedlora-load-"))
    runs_root = root / "runs"
    run_dir = runs_root / "load"
    fed = LoopbackFederation(root / "federation", runs_root)
    started = time.monotonic()
    try:
        fed.ensure_nodes(args.nodes, args.nodes, timeout_s=600)
        online_s = time.monotonic() - started
        overrides = (f"{SMALL} federation.num_clients={args.nodes} federation.rounds={args.rounds} "
                     f"federation.fraction_fit={args.per_round / args.nodes} "
                     f"federation.min_fit_clients={args.per_round} federation.min_available_clients={args.per_round} "
                     f"federation.min_fit_results=2 seed={args.seed} federation.mode={args.mode}")
        if args.mode == "sync":
            overrides += (f" federation.round_timeout_s={args.timeout:g} "
                          f"federation.over_selection={args.over_selection:g}")
        proc = fed.flwr_run(overrides, run_dir, log_name="load")
        if not _wait_for(lambda: _rounds_recorded(run_dir) >= 1, 900, proc):
            raise SystemExit(f"round 1 never finished:\n{fed.log('load')[-3000:]}")
        victims = sorted(np.random.default_rng(args.seed).choice(
            args.nodes, size=max(1, int(args.kill_fraction * args.nodes)), replace=False).tolist())
        killed_at = time.monotonic()
        for i in victims:
            stop(fed.nodes[i].pid, grace_s=0)
        time.sleep(args.down)
        for i in victims:
            fed.add_node(i, args.nodes)
        restarted_at = time.monotonic()
        finished = _wait_for(lambda: proc.poll() is not None, 900 * args.rounds, proc)
        res = json.loads((run_dir / "results.json").read_text())
    finally:
        fed.close()
        time.sleep(1.0)
        for p in psutil.process_iter(["cmdline"]):
            if any(str(root) in part for part in (p.info["cmdline"] or [])):
                p.kill()
    rounds = [r for r in res["rounds"] if r["round"] > 0]
    times = {r["round"]: r["elapsed_s"] for r in res["rounds"] if "elapsed_s" in r}
    latency = [round(times[r] - times[r - 1], 1) for r in range(1, len(rounds) + 1) if r in times and r - 1 in times]
    recorded, missing = lost_spends(res, root / "federation" / "flwr-home" / STATE_DIR_DEFAULT)
    payload = {
        "settings": vars(args), "finished": bool(finished and res.get("final")), "victims": victims,
        "nodes_online_after_s": round(online_s, 1), "killed_after_run_start_s": round(killed_at - started, 1),
        "restarted_after_s": round(restarted_at - started, 1),
        "rounds_completed": (res.get("final") or {}).get("rounds_completed"),
        "round_latency_s": latency,
        "accepted_per_round": [r.get("num_accepted") for r in rounds],
        "failures_per_round": [len(r.get("failures", [])) for r in rounds],
        "cut_off_per_round": [len(r.get("cut_off", [])) for r in rounds],
        "client_recorded_spends": recorded, "spends_missing_from_ledger": missing,
        "final_epsilon": (res.get("final") or {}).get("epsilon"),
    }
    how = (f"{args.per_round} clients per round over-selected by {args.over_selection:g}, {args.rounds} rounds, "
           f"deadline {args.timeout:g} s" if args.mode == "sync" else
           f"asynchronous (FedBuff, buffer {args.per_round}), {args.rounds} global steps")
    md = (f"Load test: {args.nodes} SuperNodes (TLS, node auth, gateway) on loopback, {how}; after round 1, "
          f"SuperNodes {victims} killed (SIGKILL) and restarted {args.down:g} s later\n\n"
          "| finished | rounds | round latency s | accepted / round | failures / round | cut off / round | "
          "client-recorded spends | missing from ledger |\n|---|---|---|---|---|---|---|---|\n"
          f"| {payload['finished']} | {payload['rounds_completed']} | {latency} | {payload['accepted_per_round']} | "
          f"{payload['failures_per_round']} | {payload['cut_off_per_round']} | {recorded} | {missing} |\n")
    save(f"load_test{args.tag}", md, payload)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
