import math

import numpy as np
import pytest
from omegaconf import OmegaConf
from opacus.accountants import RDPAccountant

from fedlora.core.errors import ConfigError
from fedlora.privacy import epsilon_from_history, local_steps, plan_sample_dp

PRIV = OmegaConf.create(
    {"unit": "sample", "target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0,
     "accountant": "rdp", "max_noise_multiplier": 20.0}
)
TRAIN = OmegaConf.create({"batch_size": 64, "local_steps": None, "local_epochs": 1.0})


def test_local_steps():
    assert local_steps(640, TRAIN) == 10
    assert local_steps(650, TRAIN) == 11
    assert local_steps(10, TRAIN) == 1
    assert local_steps(100, OmegaConf.merge(TRAIN, {"local_steps": 7})) == 7


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("rounds", [1, 3, 10])
def test_calibrated_run_ends_at_or_below_target(accountant, rounds):
    plan = plan_sample_dp(900, TRAIN, OmegaConf.merge(PRIV, {"accountant": accountant}), rounds)
    eps = plan.planned_epsilon
    assert eps <= 3.0 + 1e-9
    assert eps >= 3.0 - 0.05, "calibration is needlessly loose"
    assert plan.planned_steps == rounds * math.ceil(900 / 64)


def test_epsilon_composes_over_rounds_like_one_accountant():
    sigma, q, steps, k = 1.1, 0.07, 15, 5
    single = RDPAccountant()
    running = []
    for r in range(1, k + 1):
        for _ in range(steps):
            single.step(noise_multiplier=sigma, sample_rate=q)
        history = [(sigma, q, steps)] * r
        running.append(epsilon_from_history(history, 1e-5))
        assert running[-1] == pytest.approx(single.get_epsilon(1e-5), rel=1e-9)
    assert all(b > a for a, b in zip(running, running[1:])), running
    # Not the last round alone:
    assert running[-1] > epsilon_from_history([(sigma, q, steps)], 1e-5) * 1.5


def test_noise_above_cap_is_refused_with_the_setting_named():
    with pytest.raises(ConfigError, match="privacy.max_noise_multiplier") as err:
        plan_sample_dp(900, TRAIN, OmegaConf.merge(PRIV, {"target_epsilon": 0.05}), 50)
    assert err.value.setting == "privacy.target_epsilon"


@pytest.mark.parametrize(
    "change, setting",
    [({"target_epsilon": 0.0}, "privacy.target_epsilon"), ({"target_epsilon": -1}, "privacy.target_epsilon"),
     ({"delta": 0.0}, "privacy.delta"), ({"delta": 1.0}, "privacy.delta"),
     ({"max_grad_norm": 0.0}, "privacy.max_grad_norm")],
)
def test_bad_budget(change, setting):
    with pytest.raises(ConfigError) as err:
        plan_sample_dp(900, TRAIN, OmegaConf.merge(PRIV, change), 2)
    assert err.value.setting == setting


def test_delta_must_be_below_one_over_client_size():
    with pytest.raises(ConfigError, match="1/n") as err:
        plan_sample_dp(900, TRAIN, OmegaConf.merge(PRIV, {"delta": 1 / 900}), 2)
    assert err.value.setting == "privacy.delta"
    plan_sample_dp(900, TRAIN, OmegaConf.merge(PRIV, {"delta": 1e-4}), 2)


def test_empty_history_is_zero():
    assert epsilon_from_history([], 1e-5) == 0.0
    assert np.isfinite(epsilon_from_history([(1.0, 0.1, 10)], 1e-5, "prv"))
