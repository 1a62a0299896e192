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
