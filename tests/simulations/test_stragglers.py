"""A simulated heterogeneous fleet against a round deadline: slow clients are cut off on
the simulated clock, a dropout fails after training, the run goes on, and every client
that may have trained is in the ledger."""

import json
import subprocess
import sys

import pytest

from fedlora.privacy import epsilon_from_history
from fedlora.record.checkpoint import load_checkpoint

pytestmark = pytest.mark.integration

TINY = [
    "model=tiny_bert", "data.max_train_samples=180", "data.max_test_samples=40", "train.batch_size=16",
    "train.local_steps=2", "train.probe_steps=0", "federation.fraction_evaluate=0", "tracking=none",
    "federation.client_resources.num_cpus=2",
]


def test_deadline_cuts_slow_clients_and_counts_their_spend(tmp_path):
    # Clients 2 and 5 are 1000x slower than the rest: their simulated round is minutes long.
    profiles = "federation.profiles=[{speed:1},{speed:1,dropout:0.5},{speed:0.001}]"
    cmd = [sys.executable, "-m", "simulations.run", *TINY, "federation.num_clients=6", "federation.rounds=2",
           profiles, "federation.round_timeout_s=60", "federation.min_fit_results=2", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    trained = [r for r in res["rounds"] if r["round"] > 0]
    assert len(trained) == 2
    slow_nodes = set()
    for rec in trained:
        assert rec["round_clock"]["clock"] == "simulated" and rec["round_clock"]["training_s"] == 60
        cut = rec["cut_off"]
        assert len(cut) == 2 and all("round_timeout_s=60" in c["reason"] and c["assumed_spend"] for c in cut)
        slow_nodes |= {c["node_id"] for c in cut}
        replied = {c["cid"] for c in rec["clients"]}
        assert replied.isdisjoint({2, 5}) and replied <= {0, 1, 3, 4}
        # Everyone else replied or dropped out after training; nobody is lost silently.
        dropped = [f for f in rec["failures"] if "dropped out" in f["reason"]]
        assert len(replied) + len(dropped) + len(cut) == 6
    assert len(slow_nodes) == 2  # the same two nodes, every round
    assert trained[1]["round_clock"]["simulated_elapsed_s"] == 120
    # The ledger holds each slow node's planned rounds (its client not known: it never
    # replied in time), and every epsilon published is recomputable from it.
    ledger = load_checkpoint(tmp_path / "checkpoint.npz").state["privacy_ledger"]["entries"]
    for node in slow_nodes:
        mine = [e for e in ledger if e["client"] == f"node:{node}"]
        assert [e["round"] for e in mine] == [1, 2]
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in mine]
        assert res["final"]["client_epsilon"][f"node:{node}"] == pytest.approx(
            epsilon_from_history(history, mine[0]["delta"]), rel=1e-9)
    assert res["final"]["epsilon"] == pytest.approx(max(res["final"]["client_epsilon"].values()))
