"""The audit log: content per round, hash chain, forward-secure MAC chain, pins in
results.json, tamper evidence, resume appends."""

import hashlib
import json
import os
import stat

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedlora.privacy.randomness import NoiseSource
from fedlora.record.audit import (
    AUDIT_FILE,
    GENESIS,
    KEY_ENV,
    MAC_FIELD,
    STATE_ENV,
    AuditError,
    AuditLog,
    AuditTrail,
    config_hash,
    evolve_key,
    key_fingerprint,
    line_mac,
    main,
    read_key,
    split_mac,
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


@pytest.fixture(autouse=True)
def keys(tmp_path_factory, monkeypatch):
    """Audit keys and their state in a folder of their own, outside every run dir."""
    base = tmp_path_factory.mktemp("audit")
    monkeypatch.setenv(KEY_ENV, str(base / "keys") + "/")
    monkeypatch.setenv(STATE_ENV, str(base / "state"))
    return base


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
    # The chain breaks at the next line; results.json pinned round 1's line.
    assert problems[0].startswith("line 4: prev_sha256") and len(problems) == 2
    assert problems[1].startswith("line 3: its SHA-256 is not the one results.json pinned for round 1")


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


# -- the forward-secure MAC chain ---------------------------------------------------------
def _light(run_dir, rounds=2, resume_from=None, config=None, echo=None):
    """A run without DP (no accounting): start, evaluations, finish."""
    rec = RunRecorder(run_dir, config or {"federation": {"num_clients": 2}}, privacy_unit="none", delta=None,
                      num_rounds=rounds, echo=echo or (lambda _: None), experiment_id="exp-1")
    trail = AuditTrail(run_dir, rec.config)
    rec.listeners.append(trail)
    if resume_from is not None:
        from fedlora.privacy.ledger import PrivacyLedger

        rec.restore(json.loads((run_dir / "results.json").read_text()), PrivacyLedger(), resume_from)
    trail.start(rec)
    first = resume_from or 0
    for rnd in range(first, first + rounds + 1):
        rec.on_evaluate(rnd, 1.0, {"accuracy": 0.5})
    rec.finalize()
    return trail


def _key(keys):
    (path,) = (keys / "keys").glob("exp-1-*.key")
    return path, read_key(path)


def test_the_initial_key_is_written_once_owner_only_and_every_line_is_maced(tmp_path, keys):
    said = []
    trail = _light(tmp_path / "run", echo=said.append)
    path, k0 = _key(keys)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(k0) == 32
    assert any(str(path) in line and "--key" in line for line in said)
    lines = (tmp_path / "run" / AUDIT_FILE).read_bytes().splitlines()
    first = json.loads(lines[0])
    assert first["audit_mac"]["key_fingerprint"] == key_fingerprint(k0)
    assert path.name == f"{first['audit_mac']['key_id']}.key"
    key = k0
    for raw in lines:  # line i under k_(i-1), k evolving by SHA-256
        body, mac = split_mac(raw)
        assert line_mac(key, body) == mac and json.loads(raw)[MAC_FIELD] == mac
        key = evolve_key(key)
    # The server keeps only the current key, owner-only; k_0 is nowhere in it.
    state_file = keys / "state" / f"{first['audit_mac']['key_id']}.json"
    state = json.loads(state_file.read_text())
    assert stat.S_IMODE(os.stat(state_file).st_mode) == 0o600
    assert state["key"] == key.hex() and state["lines"] == len(lines) == trail.log.lines
    assert k0.hex() not in state_file.read_text()
    assert verify_audit(tmp_path / "run", k0) == []


def test_a_key_inside_the_run_dir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    config = {"tracking": {"audit_key_path": str(run_dir / "audit.key")}}
    with pytest.raises(AuditError, match="inside the run dir"):
        _light(run_dir, config=config)
    assert not (run_dir / "audit.key").exists() and not (run_dir / AUDIT_FILE).exists()


def test_the_current_key_cannot_rewrite_earlier_lines(tmp_path, keys):
    """Forward integrity: whoever takes the server after line t holds k_t (the state
    file); a line before t re-MAC'd with it fails, a line appended after t does not."""
    run_dir = tmp_path / "run"
    trail = _light(run_dir)
    _, k0 = _key(keys)
    stolen = bytes.fromhex(json.loads(trail.log.chain.state.read_text())["key"])
    path = run_dir / AUDIT_FILE
    original = path.read_bytes()
    lines = original.splitlines()

    def forge(body):
        return body[:-1] + b',"hmac_sha256":"' + line_mac(stolen, body).encode() + b'"}'

    body, _ = split_mac(lines[2])
    lines[2] = forge(body.replace(b'"accuracy":0.5', b'"accuracy":0.9'))
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert any(p.startswith(f"line 3: {MAC_FIELD} does not match") for p in verify_audit(path, k0))
    # The limit: with k_t a line after t can be forged.
    prev = hashlib.sha256(original.splitlines()[-1]).hexdigest()
    body = json.dumps({"event": "run_stopped", "reason": "forged", "prev_sha256": prev},
                      separators=(",", ":")).encode()
    path.write_bytes(original + forge(body) + b"\n")
    assert verify_audit(path, k0) == []


def test_a_resume_continues_the_chain_from_the_saved_key(tmp_path, keys):
    run_dir = tmp_path / "run"
    _light(run_dir, rounds=1)
    before = (run_dir / AUDIT_FILE).read_bytes()
    _light(run_dir, rounds=1, resume_from=1)
    assert (run_dir / AUDIT_FILE).read_bytes().startswith(before)
    lines = [json.loads(x) for x in (run_dir / AUDIT_FILE).read_text().splitlines()]
    assert [x["event"] for x in lines] == ["run_started", "round", "round", "run_finished", "run_started", "round",
                                           "run_finished"]
    assert lines[4]["audit_mac"] == lines[0]["audit_mac"]
    assert verify_audit(run_dir, _key(keys)[1]) == []


def test_a_resume_after_a_crash_between_line_and_state_rolls_forward(tmp_path, keys):
    run_dir = tmp_path / "run"
    trail = _light(run_dir, rounds=1)
    state = trail.log.chain.state
    saved = state.read_bytes()
    trail.log.append("run_stopped", reason="crash")  # the line is on disk...
    state.write_bytes(saved)  # ...its state never was
    _light(run_dir, rounds=1, resume_from=1)
    assert verify_audit(run_dir, _key(keys)[1]) == []


def test_a_resume_refuses_a_log_edited_since_its_state(tmp_path):
    run_dir = tmp_path / "run"
    _light(run_dir, rounds=1)
    path = run_dir / AUDIT_FILE
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"accuracy":0.5', b'"accuracy":0.6'))
    with pytest.raises(AuditError, match="line 4 is not the line its key state"):
        _light(run_dir, rounds=1, resume_from=1)
    path.write_bytes(b"\n".join(data.splitlines()[:2]) + b"\n")  # the tail cut
    with pytest.raises(AuditError, match="lines were removed from the end"):
        _light(run_dir, rounds=1, resume_from=1)
    assert path.read_bytes() == b"\n".join(data.splitlines()[:2]) + b"\n"  # nothing appended


def test_a_resume_without_the_state_needs_the_initial_key(tmp_path, keys):
    run_dir = tmp_path / "run"
    trail = _light(run_dir, rounds=1)
    trail.log.chain.state.unlink()
    key_file, k0 = _key(keys)
    said = []
    _light(run_dir, rounds=1, resume_from=1, echo=said.append)  # verified with k_0, then continued
    assert any("WARNING" in line and str(key_file) in line for line in said)
    assert verify_audit(run_dir, k0) == []
    next((keys / "state").glob("*.json")).unlink()
    key_file.rename(tmp_path / "offline.key")  # the operator took it away
    with pytest.raises(AuditError, match="initial key is not at"):
        _light(run_dir, rounds=1, resume_from=2)


def test_a_torn_line_uses_up_its_key(tmp_path, keys):
    run_dir = tmp_path / "run"
    _light(run_dir, rounds=1)
    with open(run_dir / AUDIT_FILE, "ab") as fh:
        fh.write(b'{"event":"round","rou')  # a crash mid-write
    _light(run_dir, rounds=1, resume_from=1)
    problems = verify_audit(run_dir, _key(keys)[1])
    assert len(problems) == 1 and problems[0].startswith("line 5: not a JSON object")


def test_results_json_pins_catch_a_cut_tail(tmp_path):
    run_dir = tmp_path / "run"
    _light(run_dir, rounds=2)
    results = json.loads((run_dir / "results.json").read_text())
    lines = (run_dir / AUDIT_FILE).read_bytes().splitlines()
    assert results["final"]["audit"]["line"] == len(lines) == 5
    assert [r["audit"]["line"] for r in results["rounds"]] == [2, 3, 4]
    (run_dir / AUDIT_FILE).write_bytes(b"\n".join(lines[:3]) + b"\n")  # rounds 1 and 2 and the end gone
    problems = verify_audit(run_dir)
    assert any("pins line 4 for round 2, but the log has 3 lines" in p for p in problems)


def test_a_log_written_without_a_key_continues_without_macs(tmp_path):
    run_dir = tmp_path / "run"
    AuditLog(run_dir / AUDIT_FILE).append("run_started", config_sha256=config_hash({}))
    said = []
    _light(run_dir, rounds=1, config={}, echo=said.append)
    assert any("without an audit key" in line for line in said)
    assert b"hmac_sha256" not in (run_dir / AUDIT_FILE).read_bytes() and verify_audit(run_dir) == []


def test_a_log_whose_macs_were_stripped_is_not_continued(tmp_path):
    run_dir = tmp_path / "run"
    _light(run_dir, rounds=1)
    path = run_dir / AUDIT_FILE
    prev, out = GENESIS, []
    for raw in path.read_bytes().splitlines():  # the MACs removed, the hash chain recomputed
        record = {k: v for k, v in json.loads(raw).items() if k not in (MAC_FIELD, "audit_mac")}
        record["prev_sha256"] = prev
        out.append(json.dumps(record, separators=(",", ":")).encode())
        prev = hashlib.sha256(out[-1]).hexdigest()
    path.write_bytes(b"\n".join(out) + b"\n")
    with pytest.raises(AuditError, match="its MACs were removed"):
        _light(run_dir, rounds=1, resume_from=1)


def test_the_command_checks_macs_with_the_key_and_says_when_it_did_not(tmp_path, keys, capsys):
    run_dir = tmp_path / "run"
    _light(run_dir, rounds=1)
    key_file, _ = _key(keys)
    assert main([str(run_dir)]) == 0
    assert "MACs were not checked" in capsys.readouterr().out
    assert main([str(run_dir), "--key", str(key_file)]) == 0
    assert "HMAC chain checked" in capsys.readouterr().out
    path = run_dir / AUDIT_FILE
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join(lines[:2] + lines[3:]) + b"\n")  # round 1 deleted, no other trace
    assert main([str(run_dir), "--key", str(key_file)]) == 1
    out = capsys.readouterr().out
    assert f"line 3: {MAC_FIELD} does not match" in out
    (tmp_path / "bad.key").write_text("not a key")
    assert main([str(run_dir), "--key", str(tmp_path / "bad.key")]) == 2
    assert "not an audit key file" in capsys.readouterr().err
