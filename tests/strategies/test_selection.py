"""Client selection: power-of-choice (Cho, Wang, Joshi 2022) from the clients' losses."""

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedlora.core.config import compose
from fedlora.core.errors import ConfigError
from fedlora.privacy.evaluation import NOISY_CORRECT, NOISY_EXAMPLES
from strategies.fedlora_strategy import FedLoRAStrategy
from strategies.preflight import check_selection
from strategies.sampling import power_of_choice


def test_the_highest_losses_win_and_unknown_clients_go_first():
    losses = {"a": 0.2, "b": 0.9, "c": 0.5}
    assert power_of_choice(["a", "b", "c"], losses, 2) == ["b", "c"]
    assert power_of_choice(["a", "b", "d"], losses, 2) == ["d", "b"]
    assert power_of_choice(["a", "c"], losses, 5) == ["c", "a"]


class _Proxy(GridClientProxy):
    def __init__(self, node_id: int) -> None:
        super().__init__(node_id, None, 0)


def _manager(n):
    manager = SimpleClientManager()
    proxies = [_Proxy(100 + i) for i in range(n)]
    for proxy in proxies:
        manager.register(proxy)
    return manager, proxies


@pytest.mark.parametrize("evaluation", ["plain", "dp"])
def test_the_strategy_trains_the_clients_that_evaluated_worst(evaluation):
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(2, np.float32)], fraction_fit=0.5, min_fit_clients=2,
                               selection="power_of_choice", selection_candidates=4, evaluation=evaluation)
    manager, proxies = _manager(4)
    errors = [0.1, 0.6, 0.3, 0.8]  # nodes 100..103
    results = []
    for proxy, err in zip(proxies, errors):
        if evaluation == "plain":
            res = EvaluateRes(Status(Code.OK, ""), err, 10, {"accuracy": 1 - err})
        else:
            res = EvaluateRes(Status(Code.OK, ""), 0.0, 1, {NOISY_CORRECT: 100 * (1 - err), NOISY_EXAMPLES: 100.0,
                                                             "partition_id": proxy.node_id - 100})
        results.append((proxy, res))
    strategy.aggregate_evaluate(1, results, [])
    sent = strategy.configure_fit(2, ndarrays_to_parameters(strategy.global_arrays), manager)
    assert sorted(p.cid for p, _ in sent) == ["101", "103"]


def test_power_of_choice_needs_losses_it_may_read():
    base = ["federation.selection=power_of_choice"]
    check_selection(compose(base))  # sample-level DP, noisy evaluation: fine
    for extra, needle in ((["privacy=client", "privacy.delta=1e-3"], "client-level"),
                          (["privacy.evaluation=off"], "fraction_evaluate"),
                          (["federation.fraction_evaluate=0"], "fraction_evaluate")):
        with pytest.raises(ConfigError, match="federation.selection") as err:
            check_selection(compose(base + extra))
        assert needle in str(err.value)
    with pytest.raises(ConfigError, match="federation.selection"):
        check_selection(compose(["federation.selection=loudest"]))


def test_resource_aware_draws_online_clients_by_speed():
    from strategies.sampling import resource_aware
    rng = np.random.default_rng(0)
    counts = {"fast": 0, "slow": 0, "mid": 0}
    for _ in range(3000):
        for c in resource_aware(["fast", "slow", "mid"], {"fast": 8.0, "slow": 1.0, "mid": 1.0}, 1, rng):
            counts[c] += 1
    assert counts["fast"] > 5 * counts["slow"] and counts["slow"] > 0 and counts["mid"] > 0
    assert resource_aware(["a", "b"], {"a": 1.0, "b": 1.0}, 5, rng) == ["a", "b"]  # fewer online than wanted


def test_profiles_are_seeded_and_repeated_over_the_clients():
    from fedlora.core.profiles import Profiles
    cfg = compose(["federation.num_clients=6", "federation.profiles=[{speed:4,availability:1},{speed:1,availability:0.3}]"])
    profiles = Profiles.from_config(cfg)
    assert profiles.of(2).speed == 4 and profiles.of(3).availability == 0.3
    assert all(profiles.online(0, r) for r in range(1, 50))
    online = [profiles.online(1, r) for r in range(1, 400)]
    assert 0.2 < np.mean(online) < 0.4
    assert online == [Profiles.from_config(cfg).online(1, r) for r in range(1, 400)]
    for bad in ("[{speed:0}]", "[{availability:1.5}]", "[{cores:4}]"):
        with pytest.raises(ConfigError, match="federation.profiles"):
            Profiles.from_config(compose([f"federation.profiles={bad}"]))


class _NamedProxy(_Proxy):
    def get_properties(self, ins, timeout, group_id):
        from flwr.common import GetPropertiesRes
        return GetPropertiesRes(Status(Code.OK, ""), {"partition_id": self.node_id - 100})


def test_the_strategy_samples_only_online_clients_and_records_how():
    from fedlora.core.profiles import Profile, Profiles
    # Clients 0 and 1 always online; 2 and 3 never (availability close to 0).
    profiles = Profiles(declared=(Profile(1.0, 1.0), Profile(2.0, 1.0), Profile(1.0, 1e-9), Profile(1.0, 1e-9)))
    seen = []

    class Recorder:
        def on_sample(self, server_round, nodes, **how):
            seen.append(how)

    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(2, np.float32)], fraction_fit=0.5, min_fit_clients=2,
                               selection="resource_aware", profiles=profiles, recorder=Recorder())
    manager = SimpleClientManager()
    for i in range(4):
        manager.register(_NamedProxy(100 + i))
    for server_round in (1, 2, 3):
        sent = strategy.configure_fit(server_round, ndarrays_to_parameters(strategy.global_arrays), manager)
        assert sorted(p.cid for p, _ in sent) == ["100", "101"]
    assert seen[0]["online"] == 2 and seen[0]["method"].startswith("resource-aware")
    strategy.min_fit_clients = 3
    strategy.fraction_fit = 0.75
    assert strategy.configure_fit(4, ndarrays_to_parameters(strategy.global_arrays), manager) == []


def test_resource_aware_is_refused_under_client_level_dp():
    check_selection(compose(["federation.selection=resource_aware"]))
    with pytest.raises(ConfigError, match="federation.selection") as err:
        check_selection(compose(["federation.selection=resource_aware", "privacy=client", "privacy.delta=1e-3"]))
    assert "Poisson" in str(err.value)
