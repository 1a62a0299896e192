"""Client-level DP (DP-FedAvg): calibration, the server's Gaussian mechanism, Poisson
client sampling, the strategy path and the ledger."""

import numpy as np
import pytest
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from omegaconf import OmegaConf

from fedlora.core.errors import ConfigError
from fedlora.privacy import epsilon_from_history
from fedlora.privacy.calibration import plan_client_dp
from fedlora.privacy.dp_fedavg import gaussian_fedavg, poisson_sample
from fedlora.privacy.ledger import EVERY_CLIENT
from fedlora.privacy.randomness import NoiseSource
from fedlora.record.results import RunRecorder
from strategies.client_dp import ClientLevelDP
from strategies.fedlora_strategy import FedLoRAStrategy

PRIV = OmegaConf.create(
    {"unit": "client", "target_epsilon": 4.0, "delta": 1e-5, "clipping_norm": 1.0, "noise_multiplier": None,
     "accountant": "rdp", "max_noise_multiplier": 20.0}
)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_client_level_plan_meets_its_target(accountant):
    plan = plan_client_dp(OmegaConf.merge(PRIV, {"accountant": accountant}), 1000, 0.05, 50)
    assert plan.expected_clients == pytest.approx(50.0)
    assert 4.0 - 0.05 <= plan.planned_epsilon <= 4.0 + 1e-9
    # One round = one step of the subsampled Gaussian at the client sampling rate.
    eps = epsilon_from_history([(plan.noise_multiplier, 0.05, 50)], 1e-5, accountant)
    assert eps == pytest.approx(plan.planned_epsilon)


@pytest.mark.parametrize(
    "override,num_clients,setting",
    [
        ({"delta": 0.2}, 10, "privacy.delta"),
        ({"clipping_norm": 0.0}, 100, "privacy.clipping_norm"),
        ({"noise_multiplier": 0.3}, 100, "privacy.noise_multiplier"),  # spends more than eps 4
        ({"target_epsilon": 0.01, "max_noise_multiplier": 5.0}, 100, "privacy.target_epsilon"),
        ({"target_epsilon": -1.0}, 100, "privacy.target_epsilon"),
    ],
)
def test_bad_client_level_settings_are_refused(override, num_clients, setting):
    with pytest.raises(ConfigError) as err:
        plan_client_dp(OmegaConf.merge(PRIV, override), num_clients, 0.1, 20)
    assert err.value.setting == setting


def test_mechanism_without_noise_is_the_clipped_sum_over_the_expected_count():
    rng = np.random.default_rng(0)
    updates = np.stack([np.full(4, 0.1, np.float32), np.full(4, 10.0, np.float32)])
    out = gaussian_fedavg(updates, clipping_norm=1.0, noise_multiplier=0.0, expected_clients=4.0, rng=rng)
    clipped_big = np.full(4, 0.5)  # (10,10,10,10) scaled to norm 1
    np.testing.assert_allclose(out.aggregate, (np.full(4, 0.1) + clipped_big) / 4.0, rtol=1e-6)
    assert out.clipped == 1 and out.num_clients == 2


def test_one_client_moves_the_noiseless_aggregate_by_at_most_c_over_expected():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 50)).astype(np.float32)
    extra = (100 * rng.normal(size=(1, 50))).astype(np.float32)
    a = gaussian_fedavg(base, 0.7, 0.0, 3.0, rng).aggregate
    b = gaussian_fedavg(np.vstack([base, extra]), 0.7, 0.0, 3.0, rng).aggregate
    assert np.linalg.norm(b - a) <= 0.7 / 3.0 + 1e-5


def test_empty_round_releases_noise_of_the_calibrated_scale():
    rng = np.random.default_rng(2)
    out = gaussian_fedavg(np.zeros((0, 20000), np.float32), 0.5, 2.0, 10.0, rng)
    assert out.noise_std == pytest.approx(0.1)
    assert np.std(out.aggregate) == pytest.approx(0.1, rel=0.03)


def test_poisson_sampling_rate():
    rng = np.random.default_rng(3)
    ids = [str(i) for i in range(200)]
    sizes = [len(poisson_sample(ids, 0.1, rng)) for _ in range(300)]
    assert np.mean(sizes) == pytest.approx(20.0, rel=0.05)
    assert len(set(sizes)) > 5  # the count varies: it is not fixed-size sampling


def _fit(arrays, cid):
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 10, {"partition_id": cid})


def test_strategy_runs_the_mechanism_and_the_ledger_recomputes_epsilon(tmp_path):
    plan = plan_client_dp(PRIV, 100, 0.5, 3)
    ref = [np.zeros(8, np.float32)]
    rec = RunRecorder(tmp_path, {}, privacy_unit="client", delta=plan.delta, num_rounds=3)
    strategy = ClientLevelDP(FedLoRAStrategy(initial_arrays=ref, recorder=rec, min_available_clients=2), plan,
                             NoiseSource(0))
    manager = SimpleClientManager()
    proxies = {str(i): GridClientProxy(i, None, 0) for i in range(1, 11)}
    for p in proxies.values():
        manager.register(p)
    counts = []
    for rnd in (1, 2, 3):
        sampled = strategy.configure_fit(rnd, ndarrays_to_parameters(strategy.global_arrays), manager)
        counts.append(len(sampled))
        before = strategy.global_arrays[0].copy()
        results = [(proxy, _fit([np.full(8, 5.0, np.float32)], proxy.cid)) for proxy, _ in sampled]
        params, metrics = strategy.aggregate_fit(rnd, results, [])
        assert metrics["accepted"] == len(sampled)
        step = parameters_to_ndarrays(params)[0] - before
        # Each client contributes at most C / (qN); the rest is noise of std sigma*C/(qN).
        noiseless = len(sampled) * 1.0 / np.sqrt(8) / plan.expected_clients
        noise = plan.noise_multiplier * plan.clipping_norm / plan.expected_clients
        assert np.all(np.abs(step - noiseless) < 6 * noise)
    assert len(set(counts)) >= 1 and all(c <= 10 for c in counts)
    entries = rec.ledger.entries
    assert [e.round for e in entries] == [1, 2, 3]
    assert all(e.client == EVERY_CLIENT and e.unit == "client" and e.steps == 1 for e in entries)
    expected = epsilon_from_history([(plan.noise_multiplier, 0.5, 3)], plan.delta, "rdp")
    assert rec.epsilon() == pytest.approx(expected)
    assert rec.epsilon() <= plan.target_epsilon + 1e-9
    assert "client-level" in rec.eps_text(rec.epsilon())


def test_empty_poisson_sample_still_moves_the_model_by_noise(tmp_path):
    plan = plan_client_dp(OmegaConf.merge(PRIV, {"delta": 1e-3}), 10, 1e-6, 1)
    rec = RunRecorder(tmp_path, {}, privacy_unit="client", delta=plan.delta, num_rounds=1)
    strategy = ClientLevelDP(FedLoRAStrategy(initial_arrays=[np.zeros(4, np.float32)], recorder=rec,
                                             min_available_clients=1), plan)
    manager = SimpleClientManager()
    manager.register(GridClientProxy(1, None, 0))
    assert strategy.configure_fit(1, ndarrays_to_parameters(strategy.global_arrays), manager) == []
    assert np.any(strategy.global_arrays[0] != 0)
    assert len(rec.ledger.entries) == 1


def _client_dp_rounds(strategy, manager, rounds):
    for rnd in rounds:
        sampled = strategy.configure_fit(rnd, ndarrays_to_parameters(strategy.global_arrays), manager)
        results = [(proxy, _fit([np.full(8, 0.1, np.float32)], proxy.cid)) for proxy, _ in sampled]
        strategy.aggregate_fit(rnd, results, [])
    return strategy.global_arrays[0].copy()


@pytest.mark.parametrize("seed", [None, 3])
def test_a_resumed_run_draws_fresh_noise_unless_a_noise_seed_is_set(seed):
    """No generator state survives a checkpoint: after a resume the noise is fresh OS
    entropy, so it differs from what the uninterrupted run drew; only the (not private)
    noise_seed switch makes the two agree."""
    plan = plan_client_dp(PRIV, 100, 1.0, 2)
    manager = SimpleClientManager()
    for i in range(1, 5):
        manager.register(GridClientProxy(i, None, 0))

    def strategy():
        return ClientLevelDP(FedLoRAStrategy(initial_arrays=[np.zeros(8, np.float32)], min_available_clients=4),
                             plan, NoiseSource(seed))

    whole = strategy()
    _client_dp_rounds(whole, manager, [1])
    ckpt = whole.checkpoint(1)
    assert not any("rng" in k or "generator" in k for k in ckpt.state)
    uninterrupted = _client_dp_rounds(whole, manager, [2])
    resumed = strategy()
    resumed.restore(ckpt)
    after_resume = _client_dp_rounds(resumed, manager, [1])  # Flower counts from 1 again
    if seed is None:
        assert np.abs(after_resume - uninterrupted).min() > 0
    else:
        np.testing.assert_array_equal(after_resume, uninterrupted)
