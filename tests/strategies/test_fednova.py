"""FedNova (Wang et al. 2020): normalised averaging against values computed by hand."""

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.compat.grid_client_proxy import GridClientProxy

from strategies.aggregators import fedavg, fednova
from strategies.fedlora_strategy import FedLoRAStrategy

U = np.array([[1.0, 2.0], [3.0, -1.0], [0.0, 4.0]], np.float32)
W = np.array([1.0, 2.0, 1.0])


def test_equal_steps_is_fedavg():
    np.testing.assert_allclose(fednova(U, W, local_steps=np.array([5, 5, 5])), fedavg(U, W), rtol=1e-6)
    np.testing.assert_allclose(fednova(U, W, local_steps=np.array([5, 5, 5]), momentum=0.9), fedavg(U, W),
                               rtol=1e-6)


def test_unequal_steps_by_hand():
    steps = np.array([1.0, 4.0, 2.0])
    p = W / W.sum()
    tau_eff = float(p @ steps)  # 0.25 + 2 + 0.5 = 2.75
    expected = tau_eff * sum(p[i] * U[i] / steps[i] for i in range(3))
    np.testing.assert_allclose(fednova(U, W, local_steps=steps), expected, rtol=1e-6)
    # The client that ran 4 steps weighs less than under FedAvg.
    assert not np.allclose(expected, fedavg(U, W))


def test_momentum_normaliser_by_hand():
    rho, tau = 0.5, 3
    a = (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)  # = (3 - 0.875) / 0.5 = 4.25
    assert a == pytest.approx(4.25)
    got = fednova(U[:2], W[:2], local_steps=np.array([tau, 1]), momentum=rho)
    p = W[:2] / W[:2].sum()
    tau_eff = p[0] * a + p[1] * 1.0
    np.testing.assert_allclose(got, tau_eff * (p[0] * U[0] / a + p[1] * U[1]), rtol=1e-6)


def test_bad_steps_are_refused():
    with pytest.raises(ValueError, match="positive step count"):
        fednova(U, W, local_steps=np.array([1, 0, 2]))


def test_the_strategy_passes_each_reply_steps():
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(2, np.float32)], aggregator="fednova")
    results = []
    for pid, steps in enumerate((1, 4, 2)):
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([U[pid]]), int(W[pid]),
                     {"partition_id": pid, "steps": steps})
        results.append((GridClientProxy(pid + 1, None, 0), res))
    strategy.aggregate_fit(1, results, [])
    np.testing.assert_allclose(strategy.global_arrays[0], fednova(U, W, local_steps=np.array([1.0, 4.0, 2.0])),
                               rtol=1e-6)
