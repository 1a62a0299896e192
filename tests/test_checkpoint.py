import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedlora.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
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


def test_strategy_state_survives_a_checkpoint(tmp_path):
    saved = []
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)], noise_seed=7,
                               on_round_end=lambda r, s: saved.append(s.checkpoint(r)))
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(3, np.float32)]), 4, {"partition_id": 0})
    strategy.aggregate_fit(1, [(GridClientProxy(1, None, 0), res)], [])
    strategy.exhausted.add("9")
    save_checkpoint(tmp_path / "c.npz", strategy.checkpoint(1))
    assert saved and saved[0].round == 1
    expected_draw = strategy.rng.random()
    fresh = FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)])
    fresh.restore(load_checkpoint(tmp_path / "c.npz"))
    np.testing.assert_array_equal(fresh.global_arrays[0], np.ones(3))
    assert fresh.exhausted == {"9"}
    assert fresh.rng.random() == pytest.approx(expected_draw)
