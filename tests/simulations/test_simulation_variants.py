"""Real Flower simulations of the tiny model: client-level DP, and a robust aggregator
under attack. Each run is a subprocess, like a user's command line."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from fedlora.privacy import epsilon_from_history
from fedlora.record.checkpoint import load_checkpoint

pytestmark = pytest.mark.integration

TINY = [
    "model=tiny_bert", "data.max_train_samples=160", "data.max_test_samples=40",
    "train.batch_size=16", "train.local_steps=2", "train.probe_steps=0", "federation.fraction_evaluate=0",
    "tracking=none",  # W&B is tested in test_tracking / test_simulation; these test the mechanisms
    # One backend actor with both cores: on a 2-core machine one process importing the
    # model stack instead of two; clients train one after another.
    "federation.client_resources.num_cpus=2",
]


def _kill_tree(proc):
    """SIGKILL a simulation and every process it started (Ray workers included)."""
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in family:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    proc.wait()


def _run(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "simulations.run", *TINY, *overrides, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The console: our lines on stdout, Flower's log on stderr.
    return proc.stdout + proc.stderr, json.loads((tmp_path / "results.json").read_text())


@pytest.fixture(scope="module")
def client_dp_run(tmp_path_factory):
    """One client-level DP run (Poisson sampling, 3 rounds, W&B offline) for the tests
    of the mechanism and of what it publishes."""
    run_dir = tmp_path_factory.mktemp("client_dp")
    out, res = _run(
        run_dir, "privacy=client", "federation.num_clients=6", "federation.fraction_fit=0.5",
        "federation.min_fit_clients=1", "federation.rounds=3", "privacy.target_epsilon=6", "privacy.delta=1e-3",
        "tracking=wandb",
    )
    return run_dir, out, res


def test_client_level_dp_run(client_dp_run):
    tmp_path, out, res = client_dp_run
    assert "client-level" in out and "FINAL" in out
    rounds = [r for r in res["rounds"] if r["round"] > 0]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    eps = [r["epsilon"] for r in rounds]
    assert all(r["privacy_unit"] == "client-level" for r in rounds)
    assert eps == sorted(eps) and eps[0] > 0
    entries = res["privacy_ledger"]["entries"]
    assert [(e["client"], e["unit"], e["steps"], e["sample_rate"]) for e in entries] == [("all", "client", 1, 0.5)] * 3
    sigma = entries[0]["noise_multiplier"]
    recomputed = epsilon_from_history([(sigma, 0.5, 3)], entries[0]["delta"], "rdp")
    assert res["final"]["epsilon"] == pytest.approx(recomputed)
    assert res["final"]["epsilon"] <= 6.0
    # The client-level mechanism ran every round (clipping norm and noise recorded).
    assert all(r["client_dp"]["noise_multiplier"] == sigma for r in rounds)
    ckpt = load_checkpoint(tmp_path / "checkpoint.npz")
    assert ckpt.round == 3 and ckpt.state["privacy_ledger"] == res["privacy_ledger"]
    assert sum(a.size for a in ckpt.global_arrays) == res["final"]["trainable_parameters"]


def test_krum_under_sign_flip_records_the_attack(tmp_path):
    _, res = _run(
        tmp_path, "privacy=none", "strategy=krum", "strategy.num_malicious=1", "attack=sign_flip",
        "attack.clients=[2]", "federation.num_clients=5", "federation.min_fit_clients=5", "federation.rounds=2",
    )
    assert res["attack"]["name"] == "sign_flip" and res["attack"]["clients"] == [2]
    for r in (r for r in res["rounds"] if r["round"] > 0):
        by_cid = {c["cid"]: c for c in r["clients"]}
        assert len(by_cid) == 5 and by_cid[2]["attack"] == "sign_flip"
        assert not any("attack" in c for cid, c in by_cid.items() if cid != 2)
        assert r["num_accepted"] == 5 and "aggregation_error" not in r
    ckpt = load_checkpoint(tmp_path / "checkpoint.npz")
    assert ckpt.round == 2 and all(np.isfinite(a).all() for a in ckpt.global_arrays)


def test_secaggplus_with_client_level_dp(tmp_path):
    out, res = _run(
        tmp_path, "secure=secaggplus", "privacy=client", "privacy.noise_seed=0", "federation.num_clients=4",
        "federation.rounds=2",
    )
    # The quantization error is published as its bound from the settings, not per client.
    assert "SecAgg+: deltas clipped to L2 norm 0.5" in out and "per coordinate" in out
    rounds = [r for r in res["rounds"] if r["round"] > 0]
    for r in rounds:
        assert "clients" not in r and "num_accepted" not in r  # who took part is secret
        assert r["client_dp"]["clipping_norm"] == 0.5
    internal = [json.loads(x) for x in (tmp_path / "server_internal" / "rounds.jsonl").read_text().splitlines()]
    assert [len(x["clients"]) for x in internal] == [4, 4]  # q = 1: everyone, every round
    assert all(set(c) <= {"cid", "partition_id", "privacy_unit", "steps", "probe_steps", "num_examples", "node_id",
                          "server_round", "bytes_up", "bytes_down", "accepted"} for x in internal for c in x["clients"])
    assert res["final"]["epsilon"] > 0 and len(res["privacy_ledger"]["entries"]) == 2


def test_client_level_dp_publishes_no_participant_anywhere(client_dp_run):
    """Under client-level DP the Poisson draw is secret: results.json, the audit log,
    the W&B history and the console hold no per-round participant list or count; the
    server-internal record holds them."""
    tmp_path, out, res = client_dp_run
    internal = [json.loads(x) for x in (tmp_path / "server_internal" / "rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in internal] == [1, 2, 3]
    drawn = [x["sampled"]["clients"] for x in internal]
    assert all(x["sampled"]["method"] == "poisson" for x in internal)
    assert "SERVER-INTERNAL" in (tmp_path / "server_internal" / "README.txt").read_text()
    for r in res["rounds"]:
        assert not {"clients", "sampled", "failures", "num_accepted", "num_rejected", "bytes_up", "bytes_down",
                    "aggregation"} & set(r), sorted(r)
        assert "clipped_updates" not in r.get("client_dp", {})
    for line in (tmp_path / "audit.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert not {"clients", "sampled", "failures", "aggregation"} & set(record), record["event"]
    wandb_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb_files
    for path in wandb_files:
        data = path.read_bytes()
        assert b"clients/" not in data and b"traffic/" not in data and b"server/aggregation_s" not in data
        assert b"privacy/epsilon_client_level" in data  # the file is readable and holds the rounds
    assert not (tmp_path / "participation.png").exists()
    for phrase in ("strategy sampled", "received", "clients ok", "rejected update", "client failure"):
        assert phrase not in out, phrase
    # Only the public banner (federation size, expected clients per round) counts clients.
    console = "\n".join(x for x in out.splitlines() if "clients x" not in x and "clients/round" not in x)
    assert not re.search(r"\b\d+ (clients?|results|failures)\b", console), re.findall(r".*\d+ clients?.*", console)
    assert any(drawn)
def test_killed_server_resumes_and_epsilon_continues(tmp_path):
    cmd = [sys.executable, "-m", "simulations.run", *TINY, "federation.num_clients=2", "federation.rounds=2",
           f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt_path = tmp_path / "checkpoint.npz"
    try:
        deadline = time.time() + 300
        # The checkpoint exists from round 0 on; wait for the first completed round.
        while not (ckpt_path.exists() and load_checkpoint(ckpt_path).round >= 1) and time.time() < deadline \
                and proc.poll() is None:
            time.sleep(0.1)
        assert ckpt_path.exists() and load_checkpoint(ckpt_path).round >= 1, "no checkpoint after round 1"
    finally:
        _kill_tree(proc)
    killed_at = load_checkpoint(ckpt_path).round
    assert killed_at == 1

    out, res = _run(tmp_path, f"resume={tmp_path}")
    assert f"resuming after round {killed_at}" in out
    final = res["final"]
    assert final["rounds_completed"] == 2 and final["resumed_from_round"] == killed_at
    assert load_checkpoint(ckpt_path).round == 2
    entries = res["privacy_ledger"]["entries"]
    for cid in ("0", "1"):
        mine = [e for e in entries if e["client"] == cid]
        assert [e["round"] for e in mine] == [1, 2]
        # The client's own epsilon after the resume covers both rounds: its
        # accountant continued from the ledger instead of starting again.
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in mine]
        recomputed = epsilon_from_history(history, mine[0]["delta"], "rdp")
        assert final["client_epsilon"][cid] == pytest.approx(recomputed, rel=1e-6)
        restarted = epsilon_from_history(history[killed_at:], mine[0]["delta"], "rdp")
        assert final["client_epsilon"][cid] > restarted
    # The audit log kept growing across the kill: one run_started per start, every
    # round once, the hash chain intact.
    from fedlora.record.audit import verify_audit

    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    starts = [a for a in audit if a["event"] == "run_started"]
    assert len(starts) == 2 and starts[1]["resumed_from"] == killed_at and starts[1]["config_matches_previous"]
    assert [a["round"] for a in audit if a["event"] == "round"] == [0, 1, 2]
    assert audit[-1]["event"] == "run_finished" and verify_audit(tmp_path) == []


def _adapter_sha(run_dir):
    import hashlib

    return hashlib.sha256((run_dir / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_dp_noise_is_secret_unless_a_noise_seed_is_set(tmp_path):
    """Two runs of one config under sample-level DP differ (the noise is fresh OS
    entropy, not a function of the config); two runs with the same noise_seed are
    identical, and that run says it is not private everywhere it reports."""
    small = ["federation.num_clients=2", "federation.rounds=1", "data.max_train_samples=128"]
    outs, shas = {}, {}
    for name, extra in [("a", []), ("b", []), ("s1", ["privacy.noise_seed=7"]), ("s2", ["privacy.noise_seed=7"])]:
        run_dir = tmp_path / name
        outs[name], res = _run(run_dir, *small, *extra)
        shas[name] = _adapter_sha(run_dir)
        card = (run_dir / "adapter" / "README.md").read_text()
        audit = json.loads((run_dir / "audit.jsonl").read_text().splitlines()[0])
        assert "## Differential privacy" in card and "sample-level" in card
        if extra:
            assert res["noise"]["source"] == "noise_seed" and res["noise"]["private"] is False
            assert "NOT PRIVATE" in outs[name] and "NOT PRIVATE" in card and "NOT PRIVATE" in audit["noise"]["warning"]
        else:
            assert res["noise"] == {**res["noise"], "source": "os_entropy", "private": True}
            assert "NOT PRIVATE" not in outs[name] + card and "OS entropy" in card
    assert shas["a"] != shas["b"]
    assert shas["s1"] == shas["s2"]


def test_a_server_killed_before_aggregating_cannot_make_clients_forget_their_spend(tmp_path):
    """Clients train one after another (one backend actor). The server is killed after a
    client replied in round 2 and before the round was aggregated: that client's spend
    is on its own disk only. The resume does not run round 2 again, the client composes
    over it, and the final ledger is the union: every client's epsilon equals the
    recomputation from its own record and stays within its budget."""
    from fedlora.client.state import CLIENT_STATE_DIR

    sequential = ["federation.num_clients=2", "federation.rounds=3", "federation.client_resources.num_cpus=2",
                  "federation.backend_num_cpus=2", "train.local_steps=20"]
    cmd = [sys.executable, "-m", "simulations.run", *TINY, *sequential, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def logs():
        return {p.name: [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
                for p in (tmp_path / CLIENT_STATE_DIR).glob("*/client-*.jsonl")}

    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if any(e[3] == 2 for entries in logs().values() for e in entries):
                break
            time.sleep(0.02)
    finally:
        _kill_tree(proc)
    ckpt = load_checkpoint(tmp_path / "checkpoint.npz")
    assert ckpt.round == 1 and ckpt.state["started_round"] == 2, "not killed between reply and aggregation"
    spent_in_2 = {name for name, entries in logs().items() if any(e[3] == 2 for e in entries)}
    assert len(spent_in_2) == 1  # one client replied, the other was still training

    out, res = _run(tmp_path, f"resume={tmp_path}")
    assert "resuming after round 1" in out and "not run again" in out
    final = res["final"]
    ledger = res["privacy_ledger"]["entries"]
    for name, entries in logs().items():
        cid = name.removeprefix("client-").removesuffix(".jsonl")
        mine = [e for e in ledger if e["client"] == cid]
        # The ledger is the union, entry for entry the client's own record.
        assert [(e["noise_multiplier"], e["sample_rate"], e["steps"], e["round"]) for e in mine] == \
            [tuple(e) for e in entries]
        assert [e[3] for e in entries] == ([1, 2, 3] if name in spent_in_2 else [1, 3])
        recomputed = epsilon_from_history([tuple(e[:3]) for e in entries], mine[0]["delta"], "rdp")
        assert final["client_epsilon"][cid] == pytest.approx(recomputed, rel=1e-9)
        assert final["client_epsilon"][cid] <= 8.0


def test_heterogeneous_ranks_with_flexlora_and_an_adaptive_rank(tmp_path):
    """Clients of ranks 2 and 8 under sample-level DP, FlexLoRA's SVD aggregation and an
    adaptive cap, chosen by resource-aware selection: every update carries its client's
    rank, the cap of every round is recorded, and the exported adapter loads with stock
    PEFT at the global rank."""
    from peft import PeftConfig

    _, res = _run(
        tmp_path, "privacy=sample", "federation.num_clients=3", "federation.rounds=2",
        "+federation.client_ranks=[2,8,8]", "lora.r=8", "lora.aggregation=svd", "lora.adaptive_energy=0.5",
        # Resource-aware selection asks each simulated node for its client id.
        "federation.selection=resource_aware", "federation.profiles=[{speed:2,availability:1}]",
    )
    for r in (r for r in res["rounds"] if r["round"] > 0):
        ranks = {c["cid"]: c["lora_rank"] for c in r["clients"]}
        assert ranks[0] == 2 and r["num_accepted"] == 3
        assert r["sampled"]["method"].startswith("resource-aware") and r["sampled"]["online"] == 3
        assert r["lora_ranks"]["global_rank"] == 8 and r["lora_ranks"]["aggregation"] == "svd"
        assert 1 <= r["lora_ranks"]["next_rank_cap"] <= 8
    first, second = (r for r in res["rounds"] if r["round"] > 0)
    # The second round's ranks are capped by the first round's choice.
    assert max(c["lora_rank"] for c in second["clients"]) <= first["lora_ranks"]["next_rank_cap"]
    assert PeftConfig.from_pretrained(str(tmp_path / "adapter")).r == 8
