import numpy as np
import pytest
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedlora.core.arrays import flatten, unflatten
from strategies.fedlora_strategy import FedLoRAStrategy
from strategies.validation import validate_update

REF = [np.zeros((4, 3), np.float32), np.zeros(5, np.float32)]


def test_valid_update_passes():
    assert validate_update([np.ones((4, 3), np.float32), np.ones(5, np.float32)], REF) is None


def test_rejects_nan_inf_shape_count_dtype():
    nan = [np.ones((4, 3), np.float32), np.array([0, 1, np.nan, 0, 0], np.float32)]
    assert "NaN" in validate_update(nan, REF)
    inf = [np.full((4, 3), np.inf, np.float32), np.ones(5, np.float32)]
    assert "Inf" in validate_update(inf, REF)
    assert "shape" in validate_update([np.ones((3, 4), np.float32), np.ones(5, np.float32)], REF)
    assert "expected 2 tensors" in validate_update([np.ones((4, 3), np.float32)], REF)
    assert "dtype" in validate_update([np.ones((4, 3), np.int64), np.ones(5, np.float32)], REF)


def test_flatten_round_trip():
    arrays = [np.arange(12, dtype=np.float32).reshape(4, 3), np.arange(5, dtype=np.float32)]
    back = unflatten(flatten(arrays), arrays)
    for a, b in zip(arrays, back):
        np.testing.assert_array_equal(a, b)


class _Recorder:
    def __init__(self):
        self.fits = []

    def on_fit(self, rnd, clients, rejected, agg_s, aggregation_error=None):
        self.fits.append((rnd, clients, rejected))


def _res(arrays, n, cid):
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {"partition_id": cid})


def test_strategy_rejects_malformed_update_and_round_goes_on():
    rec = _Recorder()
    strategy = FedLoRAStrategy(initial_arrays=REF, recorder=rec)
    good1 = [np.ones((4, 3), np.float32), np.ones(5, np.float32)]
    good2 = [np.full((4, 3), 3.0, np.float32), np.full(5, 3.0, np.float32)]
    bad = [np.full((4, 3), np.nan, np.float32), np.ones(5, np.float32)]
    results = [
        (GridClientProxy(1, None, 0), _res(good1, 10, 0)),
        (GridClientProxy(2, None, 0), _res(bad, 10, 1)),
        (GridClientProxy(3, None, 0), _res(good2, 30, 2)),
    ]
    params, metrics = strategy.aggregate_fit(1, results, [RuntimeError("client crashed")])
    assert params is not None
    new = parameters_to_ndarrays(params)
    # weighted mean of the two valid deltas: (10*1 + 30*3) / 40 = 2.5
    np.testing.assert_allclose(new[0], np.full((4, 3), 2.5), rtol=1e-6)
    assert metrics["accepted"] == 2 and metrics["rejected"] == 2
    _, clients, rejected = rec.fits[0]
    by_cid = {c["cid"]: c for c in clients}
    assert by_cid[1]["accepted"] is False and "NaN" in by_cid[1]["reason"]
    assert by_cid[0]["accepted"] and by_cid[2]["accepted"]
    assert any("client crashed" in r["reason"] for r in rejected)


def test_strategy_keeps_global_when_every_update_is_bad():
    strategy = FedLoRAStrategy(initial_arrays=REF, server_lr=1.0)
    bad = [np.ones((2, 2), np.float32), np.ones(5, np.float32)]
    params, metrics = strategy.aggregate_fit(1, [(GridClientProxy(1, None, 0), _res(bad, 5, 0))], [])
    assert params is None
    assert metrics["accepted"] == 0
    np.testing.assert_array_equal(strategy.global_arrays[0], REF[0])


def test_failure_reason_is_one_short_line():
    from strategies.triage import failure_reason

    err = RuntimeError("Traceback ...\\n  File x\\nValueError: the real cause")
    assert failure_reason(err) == "ValueError: the real cause"
    assert len(failure_reason(RuntimeError("x" * 5000))) == 400


def test_aggregator_with_too_few_updates_fails_the_round_not_the_run():
    rec = _Recorder()
    strategy = FedLoRAStrategy(initial_arrays=REF, aggregator="krum", aggregator_params={"num_malicious": 1},
                               recorder=rec)
    good = [np.ones((4, 3), np.float32), np.ones(5, np.float32)]
    results = [(GridClientProxy(i, None, 0), _res(good, 10, i)) for i in range(3)]
    params, metrics = strategy.aggregate_fit(1, results, [])
    assert params is None and "2f+3" in metrics["aggregation_error"]
    np.testing.assert_array_equal(strategy.global_arrays[0], REF[0])


def test_centered_clipping_reference_carries_across_rounds():
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(4, np.float32)], aggregator="centered_clipping",
                               aggregator_params={"tau": 1.0, "iterations": 1})
    far = [np.full(4, 10.0, np.float32)]
    results = [(GridClientProxy(i, None, 0), _res(far, 10, i)) for i in range(3)]
    strategy.aggregate_fit(1, results, [])
    first = strategy.reference.copy()
    assert np.linalg.norm(first) == pytest.approx(1.0, rel=1e-5)  # one clipped step of radius tau
    strategy.aggregate_fit(2, results, [])
    # The second round starts from the first round's aggregate, so it moves further.
    assert np.linalg.norm(strategy.reference) == pytest.approx(2.0, rel=1e-5)


def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in():
    """Float sums depend on their order: the rows are taken in client order, so a run
    with a fixed noise_seed repeats bit for bit however the clients' replies race."""
    rng = np.random.default_rng(3)
    updates = {cid: [rng.normal(size=(4, 3)).astype(np.float32) * 10.0 ** rng.integers(-3, 3),
                     rng.normal(size=5).astype(np.float32)] for cid in range(7)}
    finals, orders = [], [list(range(7)), [6, 2, 0, 5, 1, 4, 3], [3, 4, 1, 5, 0, 2, 6]]
    for order in orders:
        rec = _Recorder()
        strategy = FedLoRAStrategy(initial_arrays=REF, recorder=rec)
        results = [(GridClientProxy(100 + cid, None, 0), _res(updates[cid], 10 + cid, cid)) for cid in order]
        strategy.aggregate_fit(1, results, [])
        finals.append(flatten(strategy.global_arrays))
        assert [c["cid"] for c in rec.fits[0][1]] == list(range(7))
    assert all(np.array_equal(finals[0], f) for f in finals[1:])
    # The orders do give different float sums when not sorted (the test can fail).
    unsorted = [sum(np.float32(10 + c) / np.float32(sum(range(10, 17))) * flatten(updates[c]) for c in order)
                for order in orders]
    assert not all(np.array_equal(unsorted[0], u) for u in unsorted[1:])
