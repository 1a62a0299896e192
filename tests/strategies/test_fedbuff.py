"""FedBuff's buffer and staleness weights, and the combinations an asynchronous run refuses."""

import numpy as np
import pytest

from fedlora.core.errors import ConfigError
from strategies.fedbuff import FedBuffBuffer, staleness_weight
from strategies.preflight import preflight


def test_staleness_weight_is_polynomial_in_the_delay():
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)  # 1/sqrt(1+3)
    assert staleness_weight(3, exponent=1.0) == pytest.approx(0.25)
    assert staleness_weight(5, exponent=0.0) == 1.0  # no discount
    with pytest.raises(ValueError):
        staleness_weight(-1)


def test_buffer_fills_drains_and_refuses_stale_updates():
    buffer = FedBuffBuffer(size=2, max_staleness=2)
    assert buffer.refusal(2) is None
    assert "federation.max_staleness=2" in buffer.refusal(3)
    buffer.add("a", np.ones(3), 1.0, 2, staleness=0)
    assert not buffer.full
    buffer.add("b", np.ones(3), 1.0, 2, staleness=3)
    assert buffer.full
    items = buffer.drain()
    assert [b.cid for b in items] == ["a", "b"] and not buffer.items
    assert buffer.staleness_factors(items) == pytest.approx([1.0, 0.5])
    with pytest.raises(ValueError):
        FedBuffBuffer(size=0)


@pytest.mark.parametrize("overrides, setting, text", [
    (["federation.mode=asynchronous"], "federation.mode", "choose one of sync, async"),
    (["federation.mode=async", "secure=secaggplus"], "secure", "synchronous cohort"),
    (["federation.mode=async", "privacy=client"], "privacy", "Poisson"),
    (["federation.mode=async", "strategy=median", "federation.num_clients=3"], None, None),
    (["federation.mode=async", "strategy=centered_clipping"], "strategy", "fixed set"),
    (["federation.mode=async", "federation.round_timeout_s=30"], "federation.round_timeout_s", "no rounds"),
    (["federation.mode=async", "federation.buffer_size=3"], "federation.buffer_size", "num_clients=2"),
    (["federation.mode=async", "federation.buffer_size=2", "federation.concurrency=1"], "federation.concurrency",
     "[buffer_size=2"),
    (["federation.mode=async", "federation.max_staleness=-1"], "federation.max_staleness", ">= 0"),
])
def test_async_refuses_what_it_cannot_carry(tiny_cfg, overrides, setting, text):
    if setting is None:  # allowed
        assert preflight(tiny_cfg(*overrides)).cfg.federation.mode == "async"
        return
    with pytest.raises(ConfigError) as err:
        preflight(tiny_cfg(*overrides))
    assert err.value.setting == setting and text in str(err.value)
