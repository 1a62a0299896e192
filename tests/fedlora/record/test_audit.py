"""The audit log: content per round, hash chain, tamper evidence, resume appends."""

import json

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedlora.privacy.randomness import NoiseSource
from fedlora.record.audit import (
    AUDIT_FILE,
    GENESIS,
    AuditLog,
    AuditTrail,
    config_hash,
    verify_audit,
)
from fedlora.record.results import RunRecorder
from strategies.client_dp import ClientLevelDP
from strategies.fedlora_strategy import FedLoRAStrategy

CONFIG = {
    "seed": 0,
    "resume": False,
    "federation": {"num_clients": 3},
    "privacy": {"unit": "sample", "target_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp",
                "budgets": {"overrides": {"2": 3.0}, "fraction": None, "fraction_epsilon": None, "seed": 0}},
    "strategy": {"name": "krum", "aggregator": "krum", "params": {"num_malicious": 0}},
}


def _client(cid, node, rnd, accepted=True, **extra):
    # A reply carries the client's whole own history; it trained in every round so far.
    history = [(1.2, 0.2, 5, r) for r in range(1, rnd + 1)]
    return {"cid": cid, "node_id": node, "accepted": accepted, "noise_multiplier": 1.2, "sample_rate": 0.2,
            "steps": 5, "delta": 1e-5, "epsilon": 0.5, "budget_epsilon": 3.0 if cid == 2 else 8.0,
            "dp_history": history, **extra}


def _round(rec, rnd, accuracy):
    rec.on_sample(rnd, ["101", "102", "103", "999"], method="uniform without replacement", fraction_fit=1.0)
    rec.on_aggregation(rnd, {"rule": "krum", "params": {"num_malicious": 0}, "updates": [0, 1],
                             "decisions": {"selected": [1], "scores": {"0": 2.0, "1": 1.0}}})
    clients = [_client(0, "101", rnd), _client(1, "102", rnd),
               _client(2, "103", rnd, accepted=False, reason="update has NaN")]
    rejected = [clients[2], {"cid": None, "node_id": "999", "accepted": False, "reason": "client crashed"}]
    rec.on_fit(rnd, clients, rejected, 0.01)
    rec.on_evaluate(rnd, 0.5, {"accuracy": accuracy})


def _run(tmp_path, rounds=2, resume_from=None):
    rec = RunRecorder(tmp_path, dict(CONFIG), privacy_unit="sample", delta=1e-5, num_rounds=3, echo=lambda _: None)
    trail = AuditTrail(tmp_path, rec.config)
    rec.listeners.append(trail)
    if resume_from is not None:
        payload = json.loads((tmp_path / "results.json").read_text())
        from fedlora.privacy.ledger import PrivacyLedger

        rec.restore(payload, PrivacyLedger.from_dict(payload["privacy_ledger"]), resume_from)
    trail.start(rec)
    first = 0 if resume_from is None else resume_from
    rec.on_evaluate(first, 0.7, {"accuracy": 0.5})  # the initial (or resumed) evaluation
    for rnd in range(first + 1, first + 1 + rounds):
        _round(rec, rnd, 0.5 + 0.1 * rnd)
    rec.finalize()
    return [json.loads(line) for line in (tmp_path / AUDIT_FILE).read_text().splitlines()]


def test_lines_hold_sampling_fates_epsilon_and_decisions(tmp_path):
    lines = _run(tmp_path)
    assert [(x["event"], x.get("round")) for x in lines] == [
        ("run_started", None), ("round", 0), ("round", 1), ("round", 2), ("run_finished", None)]
    start = lines[0]
    assert start["config_sha256"] == config_hash(CONFIG) and start["prev_sha256"] == GENESIS
    assert start["privacy"]["client_budgets"] == {"0": 8.0, "1": 8.0, "2": 3.0}
    assert start["privacy"]["accountant"] == "rdp" and start["privacy"]["delta"] == 1e-5
    r1, r2 = lines[2], lines[3]
    assert r1["sampled"]["clients"] == [0, 1, 2, "node 999"] and r1["sampled"]["method"].startswith("uniform")
    assert [(c["cid"], c["status"]) for c in r1["clients"]] == [(0, "accepted"), (1, "accepted"), (2, "rejected")]
    assert r1["clients"][2]["reason"] == "update has NaN"
    assert r1["failures"] == [{"node": "999", "reason": "client crashed"}]
    assert r1["aggregation"]["decisions"]["selected"] == [1]
    p1, p2 = r1["privacy"]["clients"], r2["privacy"]["clients"]
    assert set(p1) == {"0", "1", "2"}  # a rejected client trained: it spent budget too
    assert p1["0"]["epsilon_before"] == 0 and p1["0"]["epsilon_after"] > 0
    assert p2["0"]["epsilon_before"] == pytest.approx(p1["0"]["epsilon_after"])
    assert p2["0"]["epsilon_after"] > p2["0"]["epsilon_before"]
    assert p2["0"]["epsilon_increase"] == pytest.approx(p2["0"]["epsilon_after"] - p2["0"]["epsilon_before"])
    assert p1["2"]["budget"] == 3.0 and p1["0"]["unit"] == "sample" and p1["0"]["delta"] == 1e-5
    # The federation's epsilon as results.json has it: from the ledger, not the clients' claims (0.5).
    assert r2["privacy"]["epsilon"] == pytest.approx(max(v["epsilon_after"] for v in p2.values()))
    assert lines[-1]["rounds_completed"] == 2 and lines[-1]["accuracy"] == pytest.approx(0.7)
    assert verify_audit(tmp_path) == []


def test_editing_an_earlier_line_is_detected(tmp_path):
    _run(tmp_path)
    path = tmp_path / AUDIT_FILE
    lines = path.read_text().splitlines()
    record = json.loads(lines[2])
    record["clients"][2]["status"] = "accepted"  # hide a rejection
    lines[2] = json.dumps(record, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    problems = verify_audit(path)
    assert len(problems) == 1 and problems[0].startswith("line 4: prev_sha256")


def test_deleting_or_reordering_lines_is_detected(tmp_path):
    _run(tmp_path)
    path = tmp_path / AUDIT_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # drop round 1
    assert any("line 3: prev_sha256" in p for p in verify_audit(path))
    path.write_text("\n".join([lines[0], lines[1], lines[3], lines[2], lines[4]]) + "\n")
    problems = verify_audit(path)
    assert any("round 1 after round 2" in p for p in problems)


def test_resume_appends_to_the_same_log_and_keeps_the_chain(tmp_path):
    _run(tmp_path, rounds=1)
    path = tmp_path / AUDIT_FILE
    before = path.read_bytes()
    lines = _run(tmp_path, rounds=2, resume_from=1)
    assert path.read_bytes().startswith(before)  # never truncated or rewritten
    events = [(x["event"], x.get("round")) for x in lines]
    # The resumed run re-evaluates round 1; the log already holds it.
    assert events == [("run_started", None), ("round", 0), ("round", 1), ("run_finished", None),
                      ("run_started", None), ("round", 2), ("round", 3), ("run_finished", None)]
    assert lines[4]["resumed_from"] == 1 and lines[4]["config_matches_previous"] is True
    assert verify_audit(path) == []


def test_torn_last_line_is_kept_closed_and_reported(tmp_path):
    log = AuditLog(tmp_path / AUDIT_FILE)
    log.append("run_started", config_sha256="x")
    with open(log.path, "ab") as fh:
        fh.write(b'{"event":"round","rou')  # a crash mid-write
    assert any("no newline" in p for p in verify_audit(log.path))
    AuditLog(log.path).append("round", round=1, config_sha256="x")
    problems = verify_audit(log.path)
    assert len(problems) == 1 and "line 2: not a JSON object" in problems[0]


def test_config_hash_is_canonical_and_ignores_resume():
    reordered = {k: CONFIG[k] for k in reversed(list(CONFIG))}
    assert config_hash(reordered) == config_hash(CONFIG)
    assert config_hash({**CONFIG, "resume": True}) == config_hash(CONFIG)
    assert config_hash({**CONFIG, "seed": 1}) != config_hash(CONFIG)


def _fit(value, cid):
    arrays = [np.full(6, value, np.float32)]
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 10, {"partition_id": cid})


def test_strategy_reports_sampling_and_krum_choice_by_client_id(tmp_path):
    rec = RunRecorder(tmp_path, {}, privacy_unit="none", delta=None, num_rounds=1, echo=lambda _: None)
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(6, np.float32)], aggregator="krum",
                               aggregator_params={"num_malicious": 1}, norm_bound=10.0, recorder=rec,
                               min_fit_clients=5, min_available_clients=5)
    manager = SimpleClientManager()
    for node in range(101, 106):
        manager.register(GridClientProxy(node, None, 0))
    sampled = strategy.configure_fit(1, ndarrays_to_parameters(strategy.global_arrays), manager)
    # Partition ids differ from node ids; client 3 (node 104) sends an outlier.
    results = [(proxy, _fit(100.0 if proxy.cid == "104" else 1.0 + 0.01 * int(proxy.cid), int(proxy.cid) - 101))
               for proxy, _ in sampled]
    strategy.aggregate_fit(1, results, [])
    rnd = rec.rounds[1]
    assert sorted(rnd["sampled"]["clients"]) == [0, 1, 2, 3, 4] and rnd["sampled"]["eligible"] == 5
    agg = rnd["aggregation"]
    assert agg["rule"] == "krum" and agg["params"] == {"num_malicious": 1} and agg["norm_bound"] == 10.0
    assert agg["decisions"]["norm_bound"]["clipped"] == [3]
    assert len(agg["decisions"]["selected"]) == 1 and agg["decisions"]["selected"][0] != 3
    assert set(agg["decisions"]["scores"]) == {"0", "1", "2", "3", "4"}


def test_client_level_dp_audit_holds_every_client_epsilon_and_no_participant(tmp_path):
    """Under client-level DP who was sampled is secret: the audit log has the mechanism
    and the every-client epsilon; the Poisson draw and the per-client decisions are only
    in the server-internal record."""
    from omegaconf import OmegaConf

    from fedlora.privacy.calibration import plan_client_dp

    priv = OmegaConf.create({"unit": "client", "target_epsilon": 8.0, "delta": 1e-3, "clipping_norm": 0.5,
                             "noise_multiplier": None, "accountant": "rdp", "max_noise_multiplier": 20.0})
    plan = plan_client_dp(priv, 10, 0.5, 2)
    config = {"privacy": OmegaConf.to_container(priv), "federation": {"num_clients": 10}}
    rec = RunRecorder(tmp_path, config, privacy_unit="client", delta=plan.delta, num_rounds=2, echo=lambda _: None)
    trail = AuditTrail(tmp_path, config)
    rec.listeners.append(trail)
    trail.start(rec)
    strategy = ClientLevelDP(FedLoRAStrategy(initial_arrays=[np.zeros(6, np.float32)], recorder=rec,
                                             min_available_clients=2), plan, NoiseSource(0))
    manager = SimpleClientManager()
    for node in range(101, 111):
        manager.register(GridClientProxy(node, None, 0))
    for rnd in (1, 2):
        sampled = strategy.configure_fit(rnd, ndarrays_to_parameters(strategy.global_arrays), manager)
        strategy.aggregate_fit(rnd, [(proxy, _fit(1.0, int(proxy.cid) - 101)) for proxy, _ in sampled], [])
        rec.on_evaluate(rnd, 0.5, {"accuracy": 0.6})
    lines = [json.loads(line) for line in (tmp_path / AUDIT_FILE).read_text().splitlines()]
    r1, r2 = lines[1], lines[2]
    for line in (r1, r2):
        assert not {"sampled", "clients", "failures", "aggregation"} & set(line), sorted(line)
        assert "clipped_updates" not in line["client_dp"] and line["client_dp"]["sample_rate"] == 0.5
    internal = [json.loads(x) for x in (tmp_path / "server_internal" / "rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in internal] == [1, 2]
    assert internal[0]["sampled"]["method"] == "poisson" and internal[0]["sampled"]["sample_rate"] == 0.5
    assert sorted(internal[0]["sampled"]["clients"]) == sorted(c["cid"] for c in internal[0]["clients"])
    assert internal[0]["aggregation"]["rule"].startswith("gaussian_fedavg")
    assert "clipped_count" in internal[0]["aggregation"]["decisions"]
    every = r2["privacy"]["clients"]["all"]
    assert every["unit"] == "client" and every["delta"] == 1e-3
    assert every["epsilon_before"] == pytest.approx(r1["privacy"]["clients"]["all"]["epsilon_after"])
    assert every["epsilon_after"] == pytest.approx(rec.epsilon()) and every["epsilon_after"] <= 8.0
    assert verify_audit(tmp_path) == []
