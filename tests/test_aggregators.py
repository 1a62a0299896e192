import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from strategies.aggregators import AGGREGATORS, fedavg, get_aggregator


def test_fedavg_equals_weighted_mean():
    rng = np.random.default_rng(1)
    updates = rng.normal(size=(7, 50)).astype(np.float32)
    weights = rng.integers(1, 100, size=7).astype(np.float64)
    expected = (weights[:, None] * updates.astype(np.float64)).sum(0) / weights.sum()
    np.testing.assert_allclose(fedavg(updates, weights), expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    row=arrays(np.float32, st.integers(1, 20), elements=st.floats(-1e3, 1e3, width=32)),
    n=st.integers(1, 6),
    weights=st.lists(st.floats(0.1, 1e3), min_size=6, max_size=6),
)
def test_fedavg_of_identical_updates_is_that_update(row, n, weights):
    updates = np.tile(row, (n, 1))
    out = fedavg(updates, np.asarray(weights[:n]))
    np.testing.assert_allclose(out, row, rtol=1e-5, atol=1e-3)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 8))
def test_fedavg_is_permutation_invariant(seed, n):
    rng = np.random.default_rng(seed)
    updates = rng.normal(size=(n, 13)).astype(np.float32)
    weights = rng.uniform(0.5, 5, size=n)
    perm = rng.permutation(n)
    np.testing.assert_allclose(fedavg(updates, weights), fedavg(updates[perm], weights[perm]), atol=1e-5)


def test_registry_and_dotted_path():
    assert get_aggregator("fedavg") is fedavg
    assert "fedavg" in AGGREGATORS
    assert get_aggregator("strategies.aggregators.fedavg") is fedavg
    with pytest.raises(KeyError, match="unknown aggregator"):
        get_aggregator("nope")


def test_fedavg_rejects_bad_shapes():
    with pytest.raises(ValueError):
        fedavg(np.zeros((0, 3), np.float32), np.zeros(0))
    with pytest.raises(ValueError):
        fedavg(np.zeros((2, 3), np.float32), np.ones(3))
