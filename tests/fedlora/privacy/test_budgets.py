import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from omegaconf import OmegaConf

from fedlora.client.numpy_client import LoRAClient
from fedlora.core.errors import ConfigError
from fedlora.plan import build_plan_cached
from fedlora.privacy.budgets import check_budgets, client_epsilon, fraction_clients
from strategies.fedlora_strategy import FedLoRAStrategy
from strategies.preflight import preflight


def _priv(**budgets):
    return OmegaConf.create({"target_epsilon": 8.0, "delta": 1e-5,
                             "budgets": {"overrides": {}, "fraction": None, "fraction_epsilon": None,
                                         "seed": 0, **budgets}})


def test_overrides_and_seeded_fraction():
    p = _priv(overrides={"3": 1.5}, fraction=0.3, fraction_epsilon=2.0)
    chosen = fraction_clients(p, 10)
    assert len(chosen) == 3 and chosen == fraction_clients(p, 10)
    eps = [client_epsilon(p, c, 10) for c in range(10)]
    assert eps[3] == 1.5
    assert sorted(eps).count(2.0) == len(chosen - {3})
    assert sum(e == 8.0 for e in eps) == 10 - len(chosen | {3})


@pytest.mark.parametrize("budgets, setting", [
    ({"overrides": {"12": 1.0}}, "privacy.budgets.overrides"),
    ({"overrides": {"a": 1.0}}, "privacy.budgets.overrides"),
    ({"overrides": {"1": 0.0}}, "privacy.budgets.overrides"),
    ({"fraction": 1.5, "fraction_epsilon": 1.0}, "privacy.budgets.fraction"),
    ({"fraction": 0.5}, "privacy.budgets.fraction_epsilon"),
])
def test_bad_budgets(budgets, setting):
    with pytest.raises(ConfigError) as err:
        check_budgets(_priv(**budgets), 10)
    assert err.value.setting == setting


def test_each_client_is_calibrated_for_its_own_budget(tiny_cfg):
    plans = [c.dp for c in preflight(tiny_cfg("+privacy.budgets.overrides.1=2.0")).clients]
    assert plans[0].target_epsilon == 8.0 and plans[1].target_epsilon == 2.0
    assert plans[1].noise_multiplier > plans[0].noise_multiplier
    assert plans[1].planned_epsilon <= 2.0


def test_client_declines_once_its_budget_would_be_exceeded(tiny_cfg, tmp_path):
    cfg = tiny_cfg("+privacy.budgets.overrides.0=3.0")
    params = LoRAClient(build_plan_cached(cfg), 0, tmp_path).get_parameters({})
    steps = []
    for rnd in range(1, cfg.federation.rounds + 3):  # two rounds past the plan
        _, n, m = LoRAClient(build_plan_cached(cfg), 0, tmp_path).fit(params, {"server_round": rnd, "experiment_id": "e"})
        steps.append(m["steps"])
        if rnd <= cfg.federation.rounds:
            assert n > 0 and not m.get("declined")
        else:
            assert n == 0 and m["declined"] and "budget" in m["reason"]
        assert m["epsilon"] <= 3.0
    hist = LoRAClient(build_plan_cached(cfg), 0, tmp_path).spend_log({"experiment_id": "e"}).history()
    assert len(hist) == cfg.federation.rounds  # no steps after the budget ran out
    assert steps[cfg.federation.rounds:] == [0, 0]


def test_strategy_stops_sampling_a_declined_client():
    ref = [np.zeros(3, np.float32)]
    strategy = FedLoRAStrategy(initial_arrays=ref, min_fit_clients=1, min_available_clients=1)
    manager = SimpleClientManager()
    proxies = [GridClientProxy(i, None, 0) for i in (1, 2, 3)]
    for p in proxies:
        manager.register(p)
    declined = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(ref), 0,
                      {"partition_id": 0, "declined": True, "reason": "privacy budget"})
    ok = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(3, np.float32)]), 5, {"partition_id": 1})
    params, metrics = strategy.aggregate_fit(1, [(proxies[0], declined), (proxies[1], ok)], [])
    assert metrics["accepted"] == 1 and metrics["rejected"] == 0
    assert strategy.exhausted == {"1"}
    sampled = strategy.configure_fit(2, params, manager)
    assert {c.cid for c, _ in sampled} == {"2", "3"}


def test_client_budgets_by_id_only_under_sample_level_dp():
    from fedlora.privacy.budgets import client_budgets

    priv = {"unit": "sample", "target_epsilon": 8.0, "delta": 1e-5,
            "budgets": {"overrides": {"1": 2.0}, "fraction": None, "fraction_epsilon": None, "seed": 0}}
    assert client_budgets(priv, 3) == {"0": 8.0, "1": 2.0, "2": 8.0}
    assert client_budgets(OmegaConf.create(priv), 3) == {"0": 8.0, "1": 2.0, "2": 8.0}
    assert client_budgets({"unit": "client", "target_epsilon": 4.0}, 3) == {}
    assert client_budgets({"unit": "none"}, 3) == {}
