"""Server optimisers (Reddi et al. 2021; Hsu et al. 2019) against steps computed by hand."""

import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedlora.core.errors import ConfigError
from strategies.server_optimizers import ServerOptimizer, from_config

D1 = np.array([0.5, -2.0, 0.0])
D2 = np.array([1.0, 1.0, -4.0])


def test_fedavg_is_the_scaled_aggregate():
    opt = ServerOptimizer("fedavg", lr=0.5)
    np.testing.assert_allclose(opt.step(D1), [0.25, -1.0, 0.0])
    assert opt.moments == {}


def test_fedavgm_accumulates_momentum():
    opt = ServerOptimizer("fedavgm", lr=0.1, momentum=0.5)
    np.testing.assert_allclose(opt.step(D1), 0.1 * D1, rtol=1e-6)
    # m_2 = 0.5 * D1 + D2 = [1.25, 0, -4]
    np.testing.assert_allclose(opt.step(D2), [0.125, 0.0, -0.4], rtol=1e-6)


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_adaptive_steps_by_hand(name):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 0.001
    opt = ServerOptimizer(name, lr=lr, beta1=b1, beta2=b2, tau=tau)
    got = [opt.step(D1), opt.step(D2)]
    for i in range(3):
        m, v = 0.0, tau * tau
        for t, d in enumerate((D1[i], D2[i])):
            m = b1 * m + (1 - b1) * d
            if name == "fedadagrad":
                v = v + d * d
            elif name == "fedadam":
                v = b2 * v + (1 - b2) * d * d
            else:
                v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
            assert got[t][i] == pytest.approx(lr * m / (math.sqrt(v) + tau), rel=1e-5), (name, t, i)


def test_yogi_forgets_a_spike_additively_where_adam_forgets_it_geometrically():
    adam, yogi = ServerOptimizer("fedadam"), ServerOptimizer("fedyogi")
    for d in [np.array([10.0])] + [np.array([0.1])] * 20:
        adam.step(d), yogi.step(d)
    # Adam: v -= (1 - beta2)(v - Delta^2); Yogi: v -= (1 - beta2) Delta^2 while v > Delta^2.
    assert yogi.moments["v"][0] > adam.moments["v"][0] > 0


def test_state_round_trips_and_continues_the_same_trajectory():
    a = ServerOptimizer("fedadam", lr=0.05)
    a.step(D1)
    b = ServerOptimizer("fedadam", lr=0.05)
    b.restore(a.state(), a.state_arrays())
    np.testing.assert_array_equal(a.step(D2), b.step(D2))
    assert b.steps == 2
    with pytest.raises(ConfigError, match="strategy.server_optimizer"):
        ServerOptimizer("fedyogi").restore(a.state(), a.state_arrays())


def test_config_and_bad_input_name_the_setting():
    cfg = OmegaConf.create({"server_optimizer": "fedavgm", "server_lr": 0.3,
                            "server_optimizer_params": {"momentum": 0.7, "tau": None}})
    opt = from_config(cfg)
    assert (opt.name, opt.lr, opt.momentum) == ("fedavgm", 0.3, 0.7)
    assert from_config(OmegaConf.create({"server_lr": 1.0})).name == "fedavg"
    with pytest.raises(ConfigError, match="strategy.server_optimizer"):
        from_config(OmegaConf.create({"server_optimizer": "fedsgdx", "server_lr": 1.0}))
    with pytest.raises(ConfigError, match="strategy.server_optimizer_params"):
        from_config(OmegaConf.create({"server_optimizer": "fedadam", "server_optimizer_params": {"eps": 1}}))
    with pytest.raises(ConfigError, match="strategy.server_optimizer_params.beta2"):
        from_config(OmegaConf.create({"server_optimizer": "fedadam", "server_optimizer_params": {"beta2": 1.0}}))
