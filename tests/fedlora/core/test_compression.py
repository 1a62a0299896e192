"""Update compression: codecs' error bounds, error feedback's memory, a real client's
compressed reply decoded by the strategy, and bad settings."""

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.compat.grid_client_proxy import GridClientProxy
from omegaconf import OmegaConf

from fedlora.client.numpy_client import LoRAClient
from fedlora.client.state import Residual
from fedlora.core.compression import Codec
from fedlora.core.errors import ConfigError
from fedlora.plan import build_plan_cached
from strategies.fedlora_strategy import FedLoRAStrategy
from strategies.triage import payload_bytes, triage

SIZES = [300, 701]
RNG = np.random.default_rng(0)
X = (RNG.standard_normal(sum(SIZES)) * np.repeat([0.01, 3.0], SIZES)).astype(np.float32)


@pytest.mark.parametrize("name,levels", [("int8", 127), ("int4", 7)])
def test_quantisation_error_is_within_one_step_and_unbiased(name, levels):
    codec = Codec(name)
    rng = np.random.default_rng(1)
    scales = np.repeat([np.abs(X[:300]).max() / levels, np.abs(X[300:]).max() / levels], SIZES)
    draws = np.stack([codec.decode(codec.encode(X, SIZES, rng), SIZES) for _ in range(400)])
    assert np.all(np.abs(draws - X) < scales * (1 + 1e-5))
    # Stochastic rounding: the mean of many decodings converges to x (std of one <= s/2).
    assert np.all(np.abs(draws.mean(axis=0) - X) < 4 * 0.5 * scales / np.sqrt(400))


def test_bytes_on_the_wire():
    rng = np.random.default_rng(2)
    size = {n: sum(a.nbytes for a in Codec(n).encode(X, SIZES, rng)) for n in ("none", "int8", "int4", "topk")}
    assert size["none"] == 4 * X.size
    assert size["none"] / size["int8"] > 3.9 and size["none"] / size["int4"] > 7.8
    assert size["none"] / size["topk"] == pytest.approx(5.0, rel=0.01)  # 10% as (int32, float32) pairs


def test_topk_sends_the_largest_and_error_feedback_sends_the_rest_later():
    codec = Codec("topk", fraction=0.25)
    x = np.array([0.1, -5.0, 0.2, 3.0, -0.3, 0.05, 2.0, -1.0], np.float32)
    sent = codec.decode(codec.encode(x, [8], None), [8])
    np.testing.assert_array_equal(np.nonzero(sent)[0], [1, 3])
    # With the residual added back every round, the sum of what was sent approaches the
    # sum of the deltas: nothing is dropped for good.
    residual, total_sent = np.zeros(8, np.float32), np.zeros(8, np.float32)
    for _ in range(300):
        flat = x + residual
        out = codec.decode(codec.encode(flat, [8], None), [8])
        residual, total_sent = flat - out, total_sent + out
    np.testing.assert_allclose(total_sent + residual, 300 * x, rtol=1e-4)
    assert np.all(total_sent != 0)


def test_a_real_clients_compressed_update_is_decoded_by_the_strategy(tiny_cfg, tmp_path):
    cfg = tiny_cfg("privacy=none", "compression=topk", "compression.fraction=0.2")
    plan = build_plan_cached(cfg)
    client = LoRAClient(plan, 0, tmp_path)
    start = [p.copy() for p in client.get_parameters({})]
    config = {"server_round": 1, "experiment_id": "e"}
    sent, n, metrics = client.fit([p.copy() for p in start], config)
    assert [a.dtype for a in sent] == [np.int32, np.float32]
    residual = Residual(tmp_path, "e", 0)
    assert residual.path.is_file()
    first_residual = residual.load(sum(p.size for p in start))
    assert np.linalg.norm(first_residual) > 0
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(sent), n, metrics)
    batch = triage([(GridClientProxy(1, None, 0), res)], [], start, 0, plan.codec)
    assert batch.num_accepted == 1
    assert np.count_nonzero(batch.updates[0]) == sent[0].size
    # The next round's update carries the first round's unsent rest.
    client.fit([p.copy() for p in start], {"server_round": 2, "experiment_id": "e"})
    assert not np.allclose(residual.load(first_residual.size), first_residual)
    assert payload_bytes(res.parameters) < 0.45 * sum(p.nbytes for p in start)


def test_a_payload_that_does_not_decode_is_a_rejection():
    start = [np.zeros(4, np.float32)]
    bad = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.array([0, 9], np.int32),
                                                              np.ones(2, np.float32)]), 3, {"partition_id": 0})
    batch = triage([(GridClientProxy(1, None, 0), bad)], [], start, 0, Codec("topk"))
    assert batch.num_accepted == 0 and "could not be decoded" in batch.rejected[0]["reason"]
    strategy = FedLoRAStrategy(initial_arrays=start, codec=Codec("int8"))
    assert strategy.codec.name == "int8"


def test_settings_that_cannot_work_name_the_setting():
    with pytest.raises(ConfigError, match="compression"):
        Codec.from_config(OmegaConf.create({"compression": {"name": "zip"}}))
    with pytest.raises(ConfigError, match="compression.fraction"):
        Codec.from_config(OmegaConf.create({"compression": {"name": "topk", "fraction": 2}}))
    with pytest.raises(ConfigError, match="SecAgg"):
        Codec.from_config(OmegaConf.create({"compression": {"name": "int8"}, "secure": {"name": "secaggplus"}}))
