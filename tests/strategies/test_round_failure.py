"""A round with fewer valid updates than federation.min_fit_results fails after it is
recorded and checkpointed; clients that declined for budget do not make it fail."""

import json

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedlora.core.config import compose
from fedlora.plan import min_fit_results
from fedlora.record.results import RunRecorder
from strategies.fedlora_strategy import FedLoRAStrategy, RoundFailed

REF = [np.zeros(3, np.float32)]


def _fit(pid, value=1.0, n=5, **metrics):
    # A client that trained in round 1 replies with its own history; one that declined trained nothing.
    history = [] if metrics.get("declined") else [[1.0, 0.1, 2, 1]]
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(3, value, np.float32)]), n,
                 {"partition_id": pid, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 2,
                  "delta": 1e-5, "epsilon": 0.5, "dp_history": json.dumps(history), **metrics})
    return GridClientProxy(pid, None, 0), res


def _strategy(tmp_path, minimum):
    saved = []
    recorder = RunRecorder(tmp_path, {}, privacy_unit="sample", delta=1e-5, num_rounds=3, echo=lambda s: None)
    strategy = FedLoRAStrategy(initial_arrays=REF, min_fit_results=minimum, recorder=recorder,
                               on_round_end=lambda r, s: saved.append((r, [a.copy() for a in s.global_arrays])))
    return strategy, recorder, saved


def test_below_minimum_fails_after_recording_and_checkpointing(tmp_path):
    strategy, recorder, saved = _strategy(tmp_path, 3)
    died = RuntimeError("node 7 went offline")
    with pytest.raises(RoundFailed, match="1 valid update.*min_fit_results=3.*went offline"):
        strategy.aggregate_fit(1, [_fit(0)], [died, died])
    # Checkpointed with the adapter unchanged; the trained client's spend is in the ledger.
    assert saved and saved[0][0] == 1 and np.array_equal(saved[0][1][0], REF[0])
    assert [(e.client, e.round) for e in recorder.ledger.entries] == [("0", 1)]
    rec = recorder.rounds[1]
    assert "min_fit_results=3" in rec["aggregation_error"] and len(rec["failures"]) == 2
    recorder.stop("round 1 failed")
    assert recorder.payload()["stopped"]["after_round"] == 1


def test_at_minimum_the_round_proceeds_with_failures_recorded(tmp_path):
    strategy, recorder, _ = _strategy(tmp_path, 2)
    params, metrics = strategy.aggregate_fit(1, [_fit(0), _fit(1, 3.0)], [RuntimeError("lost")])
    assert metrics["accepted"] == 2 and params is not None
    assert np.allclose(strategy.global_arrays[0], 2.0)  # mean of the two survivors
    assert recorder.rounds[1]["failures"][0]["reason"] == "lost"


def test_declined_clients_do_not_fail_the_round(tmp_path):
    strategy, _, _ = _strategy(tmp_path, 2)
    _, metrics = strategy.aggregate_fit(1, [_fit(0), _fit(1, declined=True, reason="privacy budget")], [])
    assert metrics["accepted"] == 1
    with pytest.raises(RoundFailed):  # a decline does not excuse a crash
        strategy.aggregate_fit(2, [_fit(0), _fit(2, declined=True, reason="privacy budget")], [RuntimeError("x")])


def test_minimum_follows_the_mechanism():
    assert min_fit_results(compose(["privacy=none"])) == 2  # min_fit_clients by default
    assert min_fit_results(compose(["privacy=none", "federation.min_fit_results=1"])) == 1
    assert min_fit_results(compose(["privacy=client", "federation.num_clients=10"])) is None
    assert min_fit_results(compose(["privacy=none", "secure=secaggplus", "federation.num_clients=4"])) is None


def test_a_stopped_run_audits_the_failed_round(tmp_path):
    from fedlora.record.audit import AuditTrail, verify_audit

    strategy, recorder, _ = _strategy(tmp_path, 2)
    audit = AuditTrail(tmp_path, recorder.config)
    recorder.listeners.append(audit)
    audit.start(recorder)
    with pytest.raises(RoundFailed) as err:
        strategy.aggregate_fit(1, [_fit(0)], [RuntimeError("node lost")])
    recorder.stop(str(err.value))
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [entry["event"] for entry in lines] == ["run_started", "round", "run_stopped"]
    assert lines[1]["failures"][0]["reason"] == "node lost" and "0" in lines[1]["privacy"]["clients"]
    assert "min_fit_results=2" in lines[2]["reason"]
    assert verify_audit(tmp_path / "audit.jsonl") == []
