"""End to end on Flower's deployment engine: a SuperLink with TLS and SuperNode
authentication on 127.0.0.1, its Fleet-only gateway, SuperNodes as separate processes
that dial the gateway, ``flwr run`` against the SuperLink.

Every process is started in its own session and ended by PID (with its descendants)
when the module finishes, whatever happened.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import psutil
import pytest

from fedlora.deploy.launch import (
    flower_bin,
    flower_env,
    run_config_text,
    start,
    stop,
    wait_for_online,
    write_connection,
)
from fedlora.deploy.loopback import APP_DIR, CONNECTION, LoopbackFederation, free_port
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.record.checkpoint import CHECKPOINT

pytestmark = pytest.mark.integration

SMALL = (
    "model=tiny_bert data.max_train_samples=120 data.max_test_samples=40 train.batch_size=16 "
    "train.probe_steps=0 tracking=none"
)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = LoopbackFederation(tmp_path_factory.mktemp("deploy"), tmp_path_factory.getbasetemp())
    try:
        yield fed
    finally:
        fed.close()
        time.sleep(1.0)
        left = [p for p in psutil.process_iter(["pid", "cmdline"])
                if any(str(fed.root) in part for part in (p.info["cmdline"] or []))]
        for proc in left:
            proc.kill()
        assert not left, f"processes left running: {[p.info['cmdline'][:3] for p in left]}"


def _wait(proc: subprocess.Popen, fed: LoopbackFederation, name: str, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc.pid)
        pytest.fail(f"{name} did not finish in {timeout}s; log tail:\n{fed.log(name)[-3000:]}")


# The causal-LM task on a tiny random Llama (SmolLM2's tokenizer): the deployment is task-agnostic.
TINY_LM = ("experiment=lm model=tiny_llama data=finefood_instruct model.frozen_prefix_dir=null "
           "data.max_train_samples=120 data.max_test_samples=8 train.batch_size=16 tracking=none")


def test_tls_node_auth_end_to_end(federation, tmp_path):
    """2 registered SuperNodes, 2 rounds of sample-level DP through `flwr run`, on the
    causal-LM task."""
    federation.ensure_nodes(2, 2)
    run_dir = tmp_path / "e2e"
    proc = federation.flwr_run(f"{TINY_LM} federation.num_clients=2 federation.rounds=2 train.local_steps=2", run_dir,
                               log_name="e2e")
    _wait(proc, federation, "e2e", 420)
    res = json.loads((run_dir / "results.json").read_text())
    final = res["final"]
    assert final is not None, federation.log("e2e")[-3000:]
    assert final["rounds_completed"] == 2
    rounds = {r["round"]: r for r in res["rounds"]}
    assert {c["cid"] for c in rounds[1]["clients"]} == {0, 1}
    assert all(c["accepted"] for r in (1, 2) for c in rounds[r]["clients"])
    assert 0 < rounds[1]["epsilon"] < rounds[2]["epsilon"] <= res["config"]["privacy"]["target_epsilon"]
    ledger = PrivacyLedger.from_dict(res["privacy_ledger"])
    assert max(ledger.epsilons(res["config"]["privacy"]["accountant"]).values()) == pytest.approx(final["epsilon"])
    # The adapter is the PEFT adapter the server saved, and it moved away from the start.
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    from safetensors.numpy import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert lora_b and any(np.abs(b).max() > 0 for b in lora_b)  # B starts at zero
    assert (run_dir / CHECKPOINT).is_file() and (run_dir / "config.yaml").is_file()
    assert all(rounds[r]["perplexity"] > 1 for r in (0, 1, 2))
    assert json.loads((adapter / "answers.json").read_text()) == ["not great", "great"]
    assert len((run_dir / "generations.jsonl").read_text().splitlines()) == 3


def _flwr_json(args: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run([flower_bin("flwr"), *args, "--format", "json"], capture_output=True, text=True,
                          env=env, timeout=120, cwd=APP_DIR)
    return json.loads(proc.stdout[proc.stdout.find("{"):])


def test_control_api_is_not_reachable_where_supernodes_connect(federation, tmp_path):
    """A party holding only ca.crt, pointing flwr at the address the SuperNodes dial,
    can neither list nor start runs, nor reach the ServerAppIo API; the SuperNodes train
    through that address (test_tls_node_auth_end_to_end)."""
    import httpx

    federation.ensure_nodes(2, 2)
    cmdline = psutil.Process(federation.nodes[0].pid).cmdline()
    dialed = cmdline[cmdline.index("--superlink") + 1]
    outsider = tmp_path / "outsider"
    outsider.mkdir()
    ca = outsider / "ca.crt"
    ca.write_bytes(federation.creds.ca_cert.read_bytes())
    write_connection(outsider / "flwr-home", "outside", dialed, ca)
    env = flower_env(outsider / "flwr-home")

    runs_before = _flwr_json(["ls", CONNECTION], federation.env)
    assert runs_before["success"], runs_before  # the operator, on loopback, can
    listed = _flwr_json(["ls", "outside"], env)
    assert listed["success"] is False and "403" in listed["error-message"], listed
    started = _flwr_json(["run", str(APP_DIR), "outside", "--run-config", run_config_text(SMALL, tmp_path / "x")], env)
    assert started["success"] is False and "403" in started["error-message"], started
    assert _flwr_json(["ls", CONNECTION], federation.env)["runs"] == runs_before["runs"]  # no run was created
    assert not (tmp_path / "x").exists()
    # The Control, ServerAppIo and docs routes, and path tricks, never reach the SuperLink.
    with httpx.Client(base_url=f"https://{dialed}", verify=str(ca), timeout=30) as client:
        for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/acquire-task",
                     "/v1/fleet/../control/list-runs", "/v1/fleet/get-run?x=1", "/docs", "/openapi.json"):
            response = client.post(path, content=b"")
            assert response.status_code == 403, (path, response.status_code)
        assert client.get("/v1/fleet/get-run").status_code == 403


def test_unregistered_supernode_is_refused(federation):
    proc = federation.add_node(9, 2, register=False)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a SuperNode with an unregistered key was not refused within 60s")
    log = federation.log("supernode-9")
    assert code != 0
    assert "Failed to activate SuperNode" in log or "could not establish a connection" in log, log[-2000:]
    nodes = json.loads(subprocess.run(
        [flower_bin("flwr"), "supernode", "list", CONNECTION, "--format", "json"],
        capture_output=True, text=True, env=federation.env, timeout=60,
    ).stdout)["nodes"]
    assert len(nodes) == 2  # only the registered ones


def _clientapp_started(node: subprocess.Popen) -> bool:
    try:
        return any("flwr-clientapp" in " ".join(c.cmdline()) for c in psutil.Process(node.pid).children(recursive=True))
    except psutil.Error:
        return False


def test_round_completes_when_a_supernode_dies(federation, tmp_path):
    """3 SuperNodes, one is killed while it trains: the round ends with the other 2."""
    federation.ensure_nodes(3, 3)
    node = federation.nodes[2]
    run_dir = tmp_path / "death"
    proc = federation.flwr_run(
        f"{SMALL} federation.num_clients=3 federation.rounds=1 federation.min_fit_clients=2 "
        "federation.min_available_clients=3 federation.fraction_evaluate=0 train.local_steps=20",
        run_dir, log_name="death",
    )
    deadline = time.monotonic() + 180
    while not _clientapp_started(node) and time.monotonic() < deadline:
        assert proc.poll() is None, federation.log("death")[-3000:]
        time.sleep(0.2)
    assert _clientapp_started(node), "SuperNode 2 never started its ClientApp"
    stop(node.pid, grace_s=0)  # SIGKILL-level death of the node and its app processes
    assert node.wait(timeout=30) in (-signal.SIGTERM, -signal.SIGKILL, 0, 1)
    _wait(proc, federation, "death", 420)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["final"] is not None and res["stopped"] is None, federation.log("death")[-3000:]
    r1 = next(r for r in res["rounds"] if r["round"] == 1)
    assert r1["num_accepted"] == 2
    assert {c["cid"] for c in r1["clients"]} == {0, 1}
    assert len(r1["failures"]) == 1 and r1["failures"][0]["reason"]


def test_a_node_refuses_a_run_beyond_its_own_policy(federation, tmp_path):
    """SuperNode 1 spends at most epsilon 4 (its node config): a run asking epsilon 8 is
    refused on that node, with its reason, before it loads anything; node 0 trains."""
    federation.ensure_nodes(2, 2)
    stop(federation.nodes[1].pid)
    federation.add_node(1, 2, policy={"max-epsilon": 4.0})
    try:
        wait_for_online(CONNECTION, federation.env, 2, timeout_s=90)
        run_dir = tmp_path / "policy"
        proc = federation.flwr_run(
            f"{SMALL} federation.num_clients=2 federation.rounds=1 federation.min_fit_clients=2 "
            "federation.min_fit_results=1 federation.fraction_evaluate=0 train.local_steps=2", run_dir,
            log_name="policy")
        _wait(proc, federation, "policy", 300)
        res = json.loads((run_dir / "results.json").read_text())
        r1 = next(r for r in res["rounds"] if r["round"] == 1)
        assert [c["cid"] for c in r1["clients"] if c["accepted"]] == [0]
        assert {e.client for e in PrivacyLedger.from_dict(res["privacy_ledger"]).entries} == {"0"}
        assert len(r1["failures"]) == 1
        node_log = federation.log("supernode-1")
        assert "refuses the run" in r1["failures"][0]["reason"] + node_log
        assert "max-epsilon is 4" in r1["failures"][0]["reason"] + node_log
    finally:
        stop(federation.nodes[1].pid)  # the next test that needs it restarts it without the policy


def test_failed_round_below_minimum_stops_and_resumes(federation, tmp_path):
    """Fewer live SuperNodes than federation.min_fit_results: the round fails with a
    message naming the resume command and its spend stays in the ledger; once the node
    is back, resuming with the same overrides finishes the run, epsilon continuing."""
    run_dir = tmp_path / "resume"
    overrides = (f"{SMALL} federation.num_clients=3 federation.rounds=2 federation.min_available_clients=2 "
                 "federation.min_fit_clients=2 federation.min_fit_results=3 federation.fraction_evaluate=0 "
                 "train.local_steps=2")
    federation.ensure_nodes(2, 3)
    if 2 in federation.nodes and federation.nodes[2].poll() is None:
        stop(federation.nodes[2].pid)
    # 2 live nodes, 3 results required.
    proc = federation.flwr_run(overrides, run_dir, log_name="fail")
    _wait(proc, federation, "fail", 420)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["final"] is None
    assert "fewer than federation.min_fit_results=3" in res["stopped"]["reason"]
    assert "fedlora.deploy run --resume" in federation.log("fail")
    spent = PrivacyLedger.from_dict(res["privacy_ledger"])
    assert sorted({e.round for e in spent.entries}) == [1]  # the failed round's training counts
    accountant = res["config"]["privacy"]["accountant"]
    eps_failed_round = max(spent.epsilons(accountant).values())
    assert eps_failed_round > 0

    federation.ensure_nodes(3, 3)  # SuperNode 2 back, same key (registered once)
    proc = federation.flwr_run(overrides, run_dir, resume=True, log_name="resumed")
    _wait(proc, federation, "resumed", 420)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["final"] is not None, federation.log("resumed")[-3000:]
    assert res["final"]["resumed_from_round"] == 1 and res["final"]["rounds_completed"] == 2
    ledger = PrivacyLedger.from_dict(res["privacy_ledger"])
    assert sorted({e.round for e in ledger.entries}) == [1, 2]
    assert res["final"]["epsilon"] == pytest.approx(max(ledger.epsilons(accountant).values()))
    assert res["final"]["epsilon"] > eps_failed_round
    assert {c["cid"] for c in next(r for r in res["rounds"] if r["round"] == 2)["clients"]} == {0, 1, 2}


def _serverapp(fed: LoopbackFederation) -> psutil.Process | None:
    try:
        children = psutil.Process(fed.pids["superlink"]).children(recursive=True)
    except psutil.Error:
        return None
    return next((c for c in children if "flwr-serverapp" in " ".join(c.cmdline())), None)


def test_killed_server_resumes_with_epsilon_continuing(federation, tmp_path):
    """The ServerApp process is killed after round 1 of 2; a resumed `flwr run` ends at
    round 2 and every client's epsilon keeps composing from the checkpointed ledger."""
    from fedlora.record.checkpoint import load_checkpoint

    run_dir = tmp_path / "killed"
    # 2 of the 3 clients per round: each round's ClientApps are fresh processes, and the
    # machine that runs CI has 2 cores.
    overrides = (f"{SMALL} federation.num_clients=3 federation.rounds=2 federation.min_available_clients=3 "
                 "federation.fraction_fit=0.5 federation.fraction_evaluate=0 train.local_steps=2")
    federation.ensure_nodes(3, 3)
    proc = federation.flwr_run(overrides, run_dir, log_name="killed")
    deadline = time.monotonic() + 300
    # The checkpoint exists from round 0 on; wait for the first completed round.
    while not ((run_dir / CHECKPOINT).is_file() and load_checkpoint(run_dir / CHECKPOINT).round >= 1) \
            and time.monotonic() < deadline:
        assert proc.poll() is None, federation.log("killed")[-3000:]
        time.sleep(0.2)
    server = _serverapp(federation)
    assert server is not None, "no flwr-serverapp process under the SuperLink"
    server.kill()
    stop(proc.pid, grace_s=2)
    ckpt = load_checkpoint(run_dir / CHECKPOINT)
    assert ckpt.round == 1
    before = PrivacyLedger.from_dict(ckpt.state["privacy_ledger"])
    accountant = "rdp"
    eps_before = before.epsilons(accountant)

    proc = federation.flwr_run(overrides, run_dir, resume=True, log_name="killed-resumed")
    _wait(proc, federation, "killed-resumed", 420)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["final"] is not None, federation.log("killed-resumed")[-3000:]
    assert res["final"]["rounds_completed"] == 2 and res["final"]["resumed_from_round"] == ckpt.round
    assert res["config"]["privacy"]["accountant"] == accountant
    ledger = PrivacyLedger.from_dict(res["privacy_ledger"])
    assert sorted({e.round for e in ledger.entries}) == [1, 2]
    eps_after = ledger.epsilons(accountant)
    assert all(eps_after[c] >= eps_before[c] for c in eps_before)  # never reset
    # Clients that trained after the resume continued from their checkpointed spend.
    later = {e.client for e in ledger.entries if e.round > ckpt.round}
    assert later & set(eps_before) and all(eps_after[c] > eps_before[c] for c in later & set(eps_before))
    assert res["final"]["epsilon"] == pytest.approx(max(eps_after.values()))


def test_bad_override_is_reported_by_the_server(federation, tmp_path):
    proc = federation.flwr_run("strategy=no_such_rule", tmp_path / "bad", log_name="bad")
    _wait(proc, federation, "bad", 180)
    log = federation.log("bad")
    assert "Hydra rejected" in log and "no_such_rule" in log, log[-2000:]
    assert not (tmp_path / "bad" / "results.json").exists()

