import json

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedlora.record.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from strategies.fedlora_strategy import FedLoRAStrategy


def test_round_trip_and_atomic_replace(tmp_path):
    path = tmp_path / "checkpoint.npz"
    first = Checkpoint(round=1, global_arrays=[np.ones((2, 3), np.float32)], state={"a": [1, 2]})
    save_checkpoint(path, first)
    second = Checkpoint(round=2, global_arrays=[np.full((2, 3), 2.0, np.float32)], state={"big": 2**100},
                        arrays={"reference": np.arange(4, dtype=np.float32)})
    save_checkpoint(path, second)
    back = load_checkpoint(path)
    assert back.round == 2 and back.state == {"big": 2**100}
    np.testing.assert_array_equal(back.global_arrays[0], second.global_arrays[0])
    np.testing.assert_array_equal(back.arrays["reference"], np.arange(4))
    assert not (tmp_path / "checkpoint.npz.tmp").exists()


def test_strategy_state_survives_a_checkpoint_without_any_generator_state(tmp_path):
    saved = []
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)], experiment_id="exp-1",
                               on_round_end=lambda r, s: saved.append(s.checkpoint(r)))
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(3, np.float32)]), 4, {"partition_id": 0})
    strategy.aggregate_fit(1, [(GridClientProxy(1, None, 0), res)], [])
    strategy.exhausted.add("9")
    save_checkpoint(tmp_path / "c.npz", strategy.checkpoint(1))
    assert saved and saved[0].round == 1
    fresh = FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)])
    back = load_checkpoint(tmp_path / "c.npz")
    fresh.restore(back)
    np.testing.assert_array_equal(fresh.global_arrays[0], np.ones(3))
    assert fresh.exhausted == {"9"} and fresh.experiment_id == "exp-1" and fresh.round_offset == 1
    # Nothing from which a noise generator could be rebuilt (PCG64 steps backwards too).
    text = json.dumps(back.state)
    assert "bit_generator" not in text and "rng" not in back.state and "state" not in back.state


def test_a_started_round_is_never_run_again_after_a_resume(tmp_path):
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)])
    strategy.started_round = 3  # round 3 was sent to clients, then the server died
    fresh = FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)])
    fresh.restore(strategy.checkpoint(2))
    assert fresh.round_offset == 3 and fresh.completed_round == 2


def test_a_resumed_fedadam_run_equals_an_uninterrupted_one(tmp_path):
    from strategies.server_optimizers import ServerOptimizer

    deltas = [np.array([0.5, -1.0, 2.0], np.float32), np.array([0.1, 0.3, -0.2], np.float32),
              np.array([-0.4, 0.2, 0.0], np.float32)]

    def strategy():
        return FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)],
                               server_optimizer=ServerOptimizer("fedadam", lr=0.1))

    def fit(strat, rnd, delta):
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([delta]), 4, {"partition_id": 0})
        strat.aggregate_fit(rnd, [(GridClientProxy(1, None, 0), res)], [])

    whole = strategy()
    for rnd in (1, 2, 3):
        fit(whole, rnd, deltas[rnd - 1])
    first = strategy()
    fit(first, 1, deltas[0]), fit(first, 2, deltas[1])
    save_checkpoint(tmp_path / "c.npz", first.checkpoint(2))
    resumed = strategy()
    resumed.restore(load_checkpoint(tmp_path / "c.npz"))
    fit(resumed, 1, deltas[2])  # Flower counts from 1 again after a resume; the strategy continues at 3
    np.testing.assert_array_equal(resumed.global_arrays[0], whole.global_arrays[0])
    assert resumed.optimizer.steps == 3
    # Without the moments the third step would differ (Adam normalises by sqrt(v)).
    cold = strategy()
    cold.global_arrays = [a.copy() for a in first.global_arrays]
    fit(cold, 1, deltas[2])
    assert not np.allclose(cold.global_arrays[0], whole.global_arrays[0])


def test_only_numbers_are_saved(tmp_path):
    with pytest.raises(CheckpointError, match="not numeric"):
        save_checkpoint(tmp_path / "c.npz", Checkpoint(round=1, global_arrays=[np.array(["a"], dtype=object)]))
    assert not (tmp_path / "c.npz").exists()
