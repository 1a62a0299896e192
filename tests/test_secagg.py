"""SecAgg+ through Flower's real workflow and mod, with toy clients (fixed LoRA-sized
deltas, no model) so the protocol itself is what runs: the sum equals plain FedAvg of
the same clipped deltas within the quantization error, and a client that drops out
after key sharing does not stop the round."""

import numpy as np
import pytest
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.simulation import run_simulation
from omegaconf import OmegaConf

from fedlora.client_app import secure_mod
from fedlora.errors import ConfigError
from fedlora.secure import check_secure, clip_l2, quantization_error, secure_settings
from strategies.fedlora_strategy import FedLoRAStrategy
from strategies.server_app import secagg_workflow

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


def _run(dropped=(), rounds=1):
    strategies = []

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedLoRAStrategy(initial_arrays=[np.zeros(s, np.float32) for s in SHAPES],
                                   min_fit_clients=len(SIZES), min_available_clients=len(SIZES),
                                   fraction_evaluate=0.0)
        strategies.append(strategy)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=secagg_workflow(SETTINGS))(grid, legacy)

    client = ClientApp(
        client_fn=lambda ctx: _ToyClient(int(ctx.node_config["partition-id"])).to_client(),
        mods=[_drop_after_key_sharing(set(dropped)), secure_mod],
    )
    run_simulation(server_app=server, client_app=client, num_supernodes=len(SIZES),
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
