"""SecAgg+ through Flower's real workflow and mod, with toy clients (fixed LoRA-sized
deltas, no model) so the protocol itself is what runs: the sum equals plain FedAvg of
the same clipped deltas within the quantization error, and a client that drops out
after key sharing does not stop the round."""

import numpy as np
import pytest
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.simulation import run_simulation
from omegaconf import OmegaConf

from fedlora.client.app import secure_mod
from fedlora.core.arrays import clip_l2
from fedlora.core.errors import ConfigError
from fedlora.core.secure import (
    check_secure,
    prepare_update,
    quantization_error,
    secure_settings,
)
from fedlora.privacy.calibration import ClientDPPlan
from fedlora.privacy.dp_fedavg import poisson_sample
from fedlora.privacy.randomness import SERVER_SAMPLING, NoiseSource
from strategies.client_dp import ClientLevelDP
from strategies.fedlora_strategy import FedLoRAStrategy
from strategies.secagg import secagg_workflow

pytestmark = pytest.mark.integration

SHAPES = [(8, 64), (64, 8), (2, 64)]
SIZES = [40, 55, 70, 85]  # examples per client (the SecAgg+ weights)
CFG = OmegaConf.create({
    "privacy": {"unit": "none"},
    "strategy": {"aggregator": "fedavg", "norm_bound": None},
    "secure": {"name": "secaggplus", "num_shares": 3, "reconstruction_threshold": 2, "clipping_norm": 1.0,
               "default_clipping_norm": 50.0, "quantization_range": 2**22, "modulus_range": 2**32,
               "timeout": None},
})
SETTINGS = secure_settings(CFG, max(SIZES))


def _delta(pid):
    rng = np.random.default_rng(pid)
    return [rng.normal(scale=0.05 * (pid + 1), size=s).astype(np.float32) for s in SHAPES]


class _ToyClient(NumPyClient):
    def __init__(self, pid):
        self.pid = pid

    def fit(self, parameters, config):
        delta, _ = clip_l2(_delta(self.pid), SETTINGS.clipping_norm)
        err = quantization_error(delta, SIZES[self.pid], SETTINGS)
        return delta, SIZES[self.pid], {"partition_id": self.pid, "quantization_error": err}


def _drop_after_key_sharing(dropped):
    def mod(msg, ctxt, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        pid = int(ctxt.node_config["partition-id"])
        if pid in dropped and configs is not None and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS:
            raise RuntimeError(f"client {pid} dropped out")
        return call_next(msg, ctxt)

    return mod


def _run(dropped=(), rounds=1, client_fn=None, num_clients=len(SIZES), settings=SETTINGS, client_dp=None,
         noise=None, **strategy_kwargs):
    strategies = []

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedLoRAStrategy(initial_arrays=[np.zeros(s, np.float32) for s in SHAPES],
                                   min_fit_clients=num_clients, min_available_clients=num_clients,
                                   fraction_evaluate=0.0, **strategy_kwargs)
        if client_dp is not None:
            strategy = ClientLevelDP(strategy, client_dp, noise)
        strategies.append(strategy)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        workflow = secagg_workflow(settings, client_dp=client_dp is not None)
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)

    client = ClientApp(
        client_fn=client_fn or (lambda ctx: _ToyClient(int(ctx.node_config["partition-id"])).to_client()),
        mods=[_drop_after_key_sharing(set(dropped)), secure_mod],
    )
    run_simulation(server_app=server, client_app=client, num_supernodes=num_clients,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    return strategies[0]


def _fedavg(pids):
    w = np.asarray([SIZES[p] for p in pids], np.float64)
    rows = [np.concatenate([d.ravel() for d in clip_l2(_delta(p), 1.0)[0]]) for p in pids]
    return (w[:, None] * np.stack(rows)).sum(0) / w.sum(), max(
        quantization_error(clip_l2(_delta(p), 1.0)[0], SIZES[p], SETTINGS) for p in pids)


def _flat(strategy):
    return np.concatenate([a.ravel() for a in strategy.global_arrays])


def test_secagg_sum_equals_fedavg_within_quantization_error():
    strategy = _run()
    expected, qerr = _fedavg(range(len(SIZES)))
    got = _flat(strategy)
    assert np.abs(expected).max() > 100 * qerr  # the comparison is not vacuous
    assert np.abs(got - expected).max() <= 2 * qerr + 1e-7


def test_dropout_after_key_sharing_keeps_the_round_and_sums_the_survivors():
    strategy = _run(dropped={3}, rounds=2)
    expected, qerr = _fedavg([0, 1, 2])
    # Two rounds of the same deltas: the global adapter moved twice by the survivors' mean.
    got = _flat(strategy)
    assert np.abs(got - 2 * expected).max() <= 4 * qerr + 1e-7
    full, _ = _fedavg(range(len(SIZES)))
    assert np.abs(got - 2 * full).max() > 100 * qerr  # the dropped client is really absent


@pytest.mark.parametrize(
    "override,per_round,robust,setting,text",
    [
        ({"num_shares": 4}, 10, False, "secure.num_shares", "odd"),
        ({"num_shares": 1}, 10, False, "secure.num_shares", "odd and >= 3"),
        ({"reconstruction_threshold": 3}, 10, False, "secure.reconstruction_threshold", "< num_shares"),
        ({"num_shares": 5}, 4, False, "secure.num_shares", "at least 5 clients"),
        ({}, 10, True, "secure", "needs the individual updates"),
        ({"quantization_range": 2**30}, 10, False, "secure.quantization_range", "wrap around"),
    ],
)
def test_invalid_settings_are_refused(override, per_round, robust, setting, text):
    cfg = OmegaConf.merge(CFG, {"secure": override})
    with pytest.raises(ConfigError) as err:
        check_secure(cfg, per_round, robust=robust)
    assert err.value.setting == setting and text in str(err.value)


# Client-level DP with SecAgg+: clients clip to privacy.clipping_norm before masking.
DP_CFG = OmegaConf.merge(CFG, {"privacy": {"unit": "client", "clipping_norm": 0.5}, "secure": {"clipping_norm": None}})
DP_SETTINGS = secure_settings(DP_CFG, 1)


def _big_delta(pid):
    """An honest client whose raw update is far above the clipping norm (norm 10)."""
    raw = _delta(pid)
    norm = np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in raw))
    return [d * (10.0 / norm) for d in raw]


class _DPClient(NumPyClient):
    def __init__(self, pid):
        self.pid = pid

    def fit(self, parameters, config):
        return prepare_update(_big_delta(self.pid), DP_SETTINGS), 1, {"partition_id": self.pid}


def _noiseless_plan(num_clients, sample_rate=1.0):
    return ClientDPPlan(sample_rate=sample_rate, noise_multiplier=0.0, clipping_norm=0.5, num_clients=num_clients,
                        planned_rounds=1, target_epsilon=1.0, delta=1e-5, accountant="rdp")


def _dp_sum(num_clients):
    strategy = _run(client_fn=lambda ctx: _DPClient(int(ctx.node_config["partition-id"])).to_client(),
                    num_clients=num_clients, settings=DP_SETTINGS, client_dp=_noiseless_plan(num_clients))
    # The noiseless release divides the sum by the expected count q * N = N.
    return _flat(strategy) * num_clients


def test_one_client_moves_the_secagg_sum_by_at_most_the_privacy_clipping_norm():
    """The sensitivity the server's noise is calibrated for holds through SecAgg+'s
    quantization: adding one client (raw update norm 10) to four moves the unmasked,
    pre-noise sum by at most privacy.clipping_norm = 0.5."""
    four, five = _dp_sum(4), _dp_sum(5)
    d = sum(int(np.prod(s)) for s in SHAPES)
    rounding = 2 * 4 * DP_SETTINGS.quantization_step * np.sqrt(d)  # the other four, rounded afresh
    change = np.linalg.norm(five - four)
    assert 0.4 < change <= 0.5 + rounding, change
    assert np.linalg.norm(four) > 0.8  # four clipped updates (norm 0.5, random directions) are in the sum


def test_a_larger_secure_clipping_norm_is_refused_under_client_level_dp():
    with pytest.raises(ConfigError) as err:
        check_secure(OmegaConf.merge(DP_CFG, {"secure": {"clipping_norm": 5.0}}), 10, robust=False)
    assert err.value.setting == "secure.clipping_norm" and "privacy.clipping_norm" in str(err.value)
    assert DP_SETTINGS.clipping_norm == 0.5


def test_a_round_secagg_cannot_run_still_releases_the_mechanism():
    """A Poisson draw of one client: Flower's SecAgg+ halts (it needs two), the round is
    collected without masking and released; the ledger would hold it like any other."""
    ids = [str(i) for i in range(4)]  # the draw depends only on the number of nodes
    seed = next(s for s in range(1000)
                if len(poisson_sample(ids, 0.3, NoiseSource(s).numpy_generator(SERVER_SAMPLING, 1))) == 1)
    strategy = _run(client_fn=lambda ctx: _DPClient(int(ctx.node_config["partition-id"])).to_client(),
                    num_clients=4, settings=DP_SETTINGS, client_dp=_noiseless_plan(4, 0.3), noise=NoiseSource(seed))
    assert strategy.completed_round == strategy.started_round == 1
    released = _flat(strategy) * 0.3 * 4
    assert 0.45 < np.linalg.norm(released) <= 0.5 + 1e-6  # one clipped update, released
