"""Canaries in the plan: each included with probability 1/2 into the auditing clients'
training data, the same in every process, and refused where they would move a client's
sampling past the plan."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.core.config import compose
from fedlora.core.errors import ConfigError
from fedlora.leakage.canaries import exposure, secret_alternatives, secret_canaries
from fedlora.plan import build_plan

TINY = ["model=tiny_bert", "data.max_train_samples=400", "data.max_test_samples=40", "tracking=none",
        "federation.num_clients=2"]


def test_canaries_are_split_half_and_half_among_the_auditing_clients():
    plan = build_plan(compose([*TINY, "audit.canaries=40", "audit.clients=[1]", "audit.max_fraction=0.3"]))
    c = plan.canaries
    assert c.count == 40 and len(c.rows) == 40 and set(c.rows.column_names) == {"text", "label"}
    assert 8 < c.included.sum() < 32  # Binomial(40, 1/2)
    assert plan.client(0).canaries == () and plan.client(1).canaries == c.of_client(1)
    assert set(plan.client(1).canaries) == set(np.flatnonzero(c.included))
    # Every process that rebuilds the plan agrees on the canaries and their inclusion.
    again = build_plan(compose([*TINY, "audit.canaries=40", "audit.clients=[1]", "audit.max_fraction=0.3"])).canaries
    assert (again.included == c.included).all() and again.rows["text"] == c.rows["text"]
    # The canaries are random strings with random labels, not rows of the dataset.
    assert not set(c.rows["text"]) & set(plan.task_data().train["text"])
    # Without DP a client's FedAvg weight counts the canaries it trains on.
    no_dp = build_plan(compose([*TINY, "privacy=none", "audit.canaries=40", "audit.clients=[1]",
                                "audit.max_fraction=0.3"]))
    assert no_dp.client(1).num_examples == len(no_dp.client(1).train_indices) + len(no_dp.client(1).canaries)
    assert build_plan(compose(TINY)).canaries is None


@pytest.mark.parametrize("overrides, setting", [
    (["audit.canaries=100"], "audit.canaries"),  # 50 per client of 180: past max_fraction 0.1
    (["audit.canaries=1"], "audit.canaries"),
    (["audit.canaries=-3"], "audit.canaries"),
    (["audit.canaries=10", "audit.clients=[5]"], "audit.clients"),
])
def test_bad_canary_settings_name_the_setting(overrides, setting):
    with pytest.raises(ConfigError) as err:
        build_plan(compose([*TINY, *overrides]))
    assert err.value.setting == setting
    if overrides == ["audit.canaries=100"]:
        assert "audit.max_fraction" in str(err.value) and "expected batch" in str(err.value)


def test_secret_canaries_and_their_exposure():
    rows = secret_canaries(5, seed=0)
    assert len(set(rows["response"])) == 5 and all(len(r) == 6 and r.isdigit() for r in rows["response"])
    alt = secret_alternatives(rows[0], 20, seed=1)
    assert rows[0]["response"] not in alt["response"] and set(alt["prompt"]) == {rows[0]["prompt"]}
    # The likeliest of 20 + 1 secrets has the full log2(21) bits; the median about 1.
    assert exposure(0.1, np.linspace(1, 2, 20)) == pytest.approx(np.log2(21))
    assert exposure(1.5, np.linspace(1, 2, 20)) == pytest.approx(np.log2(21) - np.log2(11))
