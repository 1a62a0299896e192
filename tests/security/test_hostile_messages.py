"""Hostile replies reach the server through Flower's own message types: oversized or
malformed updates, non-UTF-8 or huge metrics, replays, impostors and nodes that were
not asked. Each is rejected with its reason, the honest clients' round goes on, and
the record is written."""

import json

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedlora.record.results import RunRecorder
from strategies.fedlora_strategy import FedLoRAStrategy

SHAPES = [(4, 3), (2, 4)]
HONEST = [0, 1, 2]


class _Proxy(GridClientProxy):
    def __init__(self, node_id):
        super().__init__(node_id, None, 0)


def _delta(value, shapes=SHAPES):
    return [np.full(s, value, np.float32) for s in shapes]


def _fit(node, pid, arrays, n=10, **metrics):
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n,
                 {"partition_id": pid, "num_examples": n, **metrics})
    return _Proxy(node), res


def _setup(tmp_path, nodes=(100, 101, 102, 103)):
    recorder = RunRecorder(tmp_path, {}, privacy_unit="none", delta=None, num_rounds=3, echo=lambda s: None)
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(s, np.float32) for s in SHAPES], fraction_fit=1.0,
                               min_fit_clients=3, min_available_clients=3, recorder=recorder)
    manager = SimpleClientManager()
    proxies = {n: _Proxy(n) for n in nodes}
    for proxy in proxies.values():
        manager.register(proxy)
    return strategy, recorder, manager


def _round(strategy, manager, server_round, extra, honest_value=1.0):
    sent = strategy.configure_fit(server_round, ndarrays_to_parameters(strategy.global_arrays), manager)
    sampled = sorted(int(p.cid) for p, _ in sent)
    results = [_fit(node, pid, _delta(honest_value + 0.01 * server_round), server_round=server_round)
               for node, pid in zip(sampled[:3], HONEST)]
    before = [a.copy() for a in strategy.global_arrays]
    _, metrics = strategy.aggregate_fit(server_round, results + extra, [])
    moved = float(strategy.global_arrays[0].ravel()[0] - before[0].ravel()[0])
    return moved, metrics


HOSTILE = {
    "far more floats than the model has": lambda node: _fit(node, 3, _delta(5.0, [(4000, 3), (2, 4)])),
    "one tensor too many": lambda node: _fit(node, 3, _delta(5.0) + [np.ones(3, np.float32)]),
    "NaN in the update": lambda node: _fit(node, 3, [np.full(s, np.nan, np.float32) for s in SHAPES]),
    "int64 tensors": lambda node: _fit(node, 3, [np.ones(s, np.int64) for s in SHAPES]),
    "non-UTF-8 bytes as a label": lambda node: _fit(node, 3, _delta(5.0), attack=b"\xff\xfe\x00"),
    "a megabyte reason": lambda node: _fit(node, 3, _delta(5.0), reason="x" * 1_000_000),
    "a history nested 10^5 deep": lambda node: _fit(node, 3, _delta(5.0),
                                                    dp_history="[" * 100_000 + "]" * 100_000),
    "a history of the wrong shape": lambda node: _fit(node, 3, _delta(5.0), dp_history=json.dumps([["a", 1]])),
    "a partition id that is bytes": lambda node: _fit(node, b"\x00\x01", _delta(5.0)),
    "a float example count": lambda node: _fit(node, 3, _delta(5.0), num_examples=float("nan")),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_reply_is_rejected_and_the_round_goes_on(tmp_path, name):
    strategy, recorder, manager = _setup(tmp_path)
    sent = strategy.configure_fit(1, ndarrays_to_parameters(strategy.global_arrays), manager)
    nodes = sorted(int(p.cid) for p, _ in sent)
    results = [_fit(node, pid, _delta(1.0), server_round=1) for node, pid in zip(nodes[:3], HONEST)]
    _, metrics = strategy.aggregate_fit(1, results + [HOSTILE[name](nodes[3])], [])
    assert metrics["accepted"] == 3 and metrics["rejected"] == 1
    np.testing.assert_allclose(strategy.global_arrays[0], 1.0)  # the honest mean, untouched
    recorder.write()
    saved = json.loads((tmp_path / "results.json").read_text())  # the record is valid JSON
    reasons = [c.get("reason", "") for c in recorder.rounds[1]["clients"] + recorder.rounds[1]["failures"]
               if not c.get("accepted")]
    assert len(reasons) == 1 and reasons[0]
    assert len(json.dumps(saved)) < 100_000  # nothing oversized was copied into the record


def test_a_replayed_reply_from_an_earlier_round_is_refused(tmp_path):
    strategy, recorder, manager = _setup(tmp_path)
    _round(strategy, manager, 1, [])
    sent = strategy.configure_fit(2, ndarrays_to_parameters(strategy.global_arrays), manager)
    node = sorted(int(p.cid) for p, _ in sent)[3]
    moved, metrics = _round(strategy, manager, 2, [_fit(node, 3, _delta(50.0), server_round=1)])
    assert metrics["rejected"] == 1
    failure = recorder.rounds[2]["failures"][0]
    assert "not round 2" in failure["reason"] and failure["claimed_client"] == "3"


def test_a_node_that_was_not_sampled_cannot_answer(tmp_path):
    strategy, recorder, manager = _setup(tmp_path)
    stranger = _fit(999, 3, _delta(50.0), server_round=1)
    moved, metrics = _round(strategy, manager, 1, [stranger])
    assert metrics["rejected"] == 1 and moved == pytest.approx(1.01)
    assert "not sampled" in recorder.rounds[1]["failures"][0]["reason"]


def test_a_node_cannot_answer_as_another_client(tmp_path):
    strategy, recorder, manager = _setup(tmp_path)
    _round(strategy, manager, 1, [_fit(103, 3, _delta(1.0), server_round=1)])
    # Node 103 was client 3; now it claims client 0's id (whose own reply also arrives).
    _, metrics = _round(strategy, manager, 2, [_fit(103, 0, _delta(50.0), server_round=2)])
    assert metrics["rejected"] >= 1
    reasons = " ".join(f["reason"] for f in recorder.rounds[2]["failures"])
    assert "claims to be client 0" in reasons


def test_two_replies_for_one_client_in_a_round(tmp_path):
    strategy, recorder, manager = _setup(tmp_path)
    sent = strategy.configure_fit(1, ndarrays_to_parameters(strategy.global_arrays), manager)
    nodes = sorted(int(p.cid) for p, _ in sent)
    results = [_fit(n, 0, _delta(1.0), server_round=1) for n in nodes[:2]]
    _, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["accepted"] == 1
    assert "already replied" in recorder.rounds[1]["failures"][0]["reason"]


def test_a_malformed_evaluation_release_is_left_out_whole(tmp_path):
    recorder = RunRecorder(tmp_path, {}, privacy_unit="sample", delta=1e-5, num_rounds=1, echo=lambda s: None)
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)], recorder=recorder, evaluation="dp")
    good = {"noisy_correct": 70.0, "noisy_examples": 100.0, "partition_id": 0, "privacy_unit": "sample",
            "delta": 1e-5, "dp_history": json.dumps([[2.0, 1.0, 1, 1]])}
    bad = {**good, "partition_id": 1, "noisy_correct": 1e9, "noisy_examples": 1e9, "dp_history": "{not json"}
    results = [(_Proxy(100 + i), EvaluateRes(Status(Code.OK, ""), 0.0, 1, m)) for i, m in enumerate([good, bad])]
    _, metrics = strategy.aggregate_evaluate(1, results, [])
    assert metrics["accuracy"] == pytest.approx(0.7)
    assert recorder.rounds[1]["federated_evaluation"]["clients"] == 1
