"""An asynchronous (FedBuff) simulation with stragglers: global steps every K updates,
stale updates discounted, slow clients never block a step, every spend in the ledger."""

import json
import subprocess
import sys

import pytest

from fedlora.privacy import epsilon_from_history
from fedlora.record.checkpoint import load_checkpoint

pytestmark = pytest.mark.integration

TINY = [
    "model=tiny_bert", "data.max_train_samples=180", "data.max_test_samples=40", "train.batch_size=16",
    "train.local_steps=2", "train.probe_steps=0", "tracking=none", "federation.client_resources.num_cpus=2",
]


def test_fedbuff_steps_without_waiting_for_stragglers(tmp_path):
    # Clients 2 and 5 are 100x slower: a synchronous round would wait for them.
    cmd = [sys.executable, "-m", "simulations.run", *TINY, "federation.num_clients=6", "federation.rounds=3",
           "federation.mode=async", "federation.buffer_size=3", "federation.concurrency=4",
           "federation.profiles=[{speed:1},{speed:1},{speed:0.01}]", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "asynchronous (FedBuff)" in proc.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    steps = [r for r in res["rounds"] if r["round"] > 0]
    assert [r["round"] for r in steps] == [1, 2, 3] and all("accuracy" in r for r in steps)
    clock = [r["round_clock"]["simulated_elapsed_s"] for r in steps]
    assert clock == sorted(clock)
    for rec in steps:
        fedbuff = rec["aggregation"]["fedbuff"]
        assert len(rec["aggregation"]["updates"]) == 3 == fedbuff["buffer_size"]
        assert fedbuff["staleness_weights"] == pytest.approx([(1 + t) ** -0.5 for t in fedbuff["staleness"]],
                                                             abs=1e-6)
        # No step waited for a slow client: its update would take 100x a fast one's.
        assert not {c["cid"] for c in rec["clients"] if c.get("accepted")} & {2, 5}
    assert steps[-1]["aggregation"]["fedbuff"]["staleness"] != [0, 0, 0]  # the buffer mixes versions
    # The slow clients were training when the run ended: counted as having spent.
    assert {c["reason"].split(" (")[0] for c in steps[-1]["cut_off"]} == {"the run ended"}
    ledger = load_checkpoint(tmp_path / "checkpoint.npz").state["privacy_ledger"]["entries"]
    for client, eps in res["final"]["client_epsilon"].items():
        mine = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger if e["client"] == client]
        assert eps == pytest.approx(epsilon_from_history(mine, 1e-5), rel=1e-9)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
