import inspect

import numpy as np
import pytest
from flwr.server.strategy import aggregate as flwr_agg
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from strategies.aggregators import (
    AGGREGATORS,
    bulyan,
    centered_clipping,
    check_params,
    fedavg,
    get_aggregator,
    krum,
    median,
    min_clients,
    multi_krum,
    norm_bound,
    trimmed_mean,
    with_norm_bound,
)


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


# -- robust rules against Flower's reference implementations ------------------------------

LAYERS = [(3, 4), (5,), (2, 2, 3)]
D = sum(int(np.prod(s)) for s in LAYERS)
CASES = [(seed, n) for seed, n in enumerate([3, 4, 7, 10, 15, 23, 31, 48])]


def _updates(seed: int, n: int, d: int = D) -> tuple[np.ndarray, np.ndarray]:
    """Random rows sharing a common offset (as deltas from one global model do)."""
    rng = np.random.default_rng(seed)
    updates = rng.normal(size=(n, d)) * rng.uniform(0.1, 3) + rng.normal(size=d) * 4
    return updates.astype(np.float32), rng.integers(1, 100, size=n).astype(np.float64)


def _sorted_updates(seed: int, n: int, d: int = D) -> tuple[np.ndarray, np.ndarray]:
    """Rows in lexicographic order: Flower breaks exact Krum ties by list order and
    ours by row order, which then agree."""
    updates, weights = _updates(seed, n, d)
    order = np.lexsort(updates.T[::-1])
    return updates[order], weights[order]


def _results(updates: np.ndarray, weights: np.ndarray) -> list[tuple[list[np.ndarray], int]]:
    """The (layers, num_examples) list Flower's aggregate functions take."""
    results = []
    for row, w in zip(updates, weights, strict=True):
        layers, start = [], 0
        for shape in LAYERS:
            size = int(np.prod(shape))
            layers.append(row[start : start + size].reshape(shape).copy())
            start += size
        results.append((layers, int(w)))
    return results


def _flat(layers: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a).ravel() for a in layers])


@pytest.mark.parametrize("seed,n", CASES)
def test_median_equals_flower(seed, n):
    updates, weights = _updates(seed, n)
    expected = _flat(flwr_agg.aggregate_median(_results(updates, weights)))
    np.testing.assert_array_equal(median(updates, weights), expected)


@pytest.mark.parametrize("seed,n", CASES)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.25, 0.49])
def test_trimmed_mean_equals_flower(seed, n, beta):
    updates, weights = _updates(seed, n)
    expected = _flat(flwr_agg.aggregate_trimmed_avg(_results(updates, weights), proportiontocut=beta))
    np.testing.assert_allclose(trimmed_mean(updates, weights, beta=beta), expected, rtol=1e-5, atol=1e-5)


def _malicious_counts(n: int, bound: int) -> list[int]:
    """0, 1 and the largest f with n >= bound * f + 3 (deduplicated)."""
    return sorted({f for f in (0, 1, (n - 3) // bound) if bound * f + 3 <= n})


@pytest.mark.parametrize("seed,n", CASES)
def test_krum_equals_flower(seed, n):
    updates, weights = _sorted_updates(seed, n)
    for f in _malicious_counts(n, 2):
        expected = _flat(flwr_agg.aggregate_krum(_results(updates, weights), num_malicious=f, to_keep=0))
        np.testing.assert_array_equal(krum(updates, weights, num_malicious=f), expected)


@pytest.mark.parametrize("seed,n", CASES)
def test_multi_krum_equals_flower(seed, n):
    updates, weights = _sorted_updates(seed, n)
    for f in _malicious_counts(n, 2):
        for m in sorted({1, 2, (n - f + 1) // 2, n - f}):
            expected = _flat(flwr_agg.aggregate_krum(_results(updates, weights), num_malicious=f, to_keep=m))
            out = multi_krum(updates, weights, num_malicious=f, num_selected=m)
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(
            multi_krum(updates, weights, num_malicious=f),
            multi_krum(updates, weights, num_malicious=f, num_selected=n - f),
        )


@pytest.mark.parametrize("seed,n", CASES)
def test_bulyan_equals_flower(seed, n):
    updates, weights = _sorted_updates(seed, n)
    for f in _malicious_counts(n, 4):
        # Flower's Bulyan pops from the list it is given: hand it its own.
        expected = _flat(
            flwr_agg.aggregate_bulyan(
                _results(updates, weights), num_malicious=f, aggregation_rule=flwr_agg.aggregate_krum, to_keep=0
            )
        )
        np.testing.assert_allclose(bulyan(updates, weights, num_malicious=f), expected, rtol=1e-5, atol=1e-5)


def test_bulyan_equals_flower_with_clusters_duplicates_and_outliers():
    # Clustered rows make the iterated Krum's neighbour sets change as rows are picked.
    updates, weights = _updates(99, 60)
    updates[:20] = updates[0] + 0.01 * updates[:20]
    updates[7] = updates[8]
    updates[-4:] *= 25
    for f in (1, 7, 14):
        expected = _flat(
            flwr_agg.aggregate_bulyan(
                _results(updates, weights), num_malicious=f, aggregation_rule=flwr_agg.aggregate_krum, to_keep=0
            )
        )
        np.testing.assert_allclose(bulyan(updates, weights, num_malicious=f), expected, rtol=1e-5, atol=1e-5)


def test_krum_distances_survive_a_large_common_component():
    # Rows 1e4 away from the origin but 1e-2 apart: naive ||x||^2 + ||y||^2 - 2 x.y in
    # float32 would cancel the distances away; Flower's pairwise differences do not.
    updates, weights = _updates(5, 11, d=2000)
    updates = (1e4 + 1e-2 * updates).astype(np.float32)
    updates[3] += 0.5  # a clear outlier that must not win
    expected = _flat(flwr_agg.aggregate_krum(_results_flat(updates, weights), num_malicious=2, to_keep=0))
    np.testing.assert_array_equal(krum(updates, weights, num_malicious=2), expected)


def _results_flat(updates: np.ndarray, weights: np.ndarray) -> list[tuple[list[np.ndarray], int]]:
    return [([row.copy()], int(w)) for row, w in zip(updates, weights, strict=True)]


def test_krum_ignores_byzantine_rows():
    updates, weights = _updates(3, 12)
    updates[:3] = 100.0  # f = 3 colluding attackers
    out = krum(updates, weights, num_malicious=3)
    assert not np.allclose(out, 100.0)
    assert np.abs(multi_krum(updates, weights, num_malicious=3)).max() < 50


# -- properties -----------------------------------------------------------------------------

RULE_PARAMS = {
    "fedavg": {},
    "median": {},
    "trimmed_mean": {"beta": 0.2},
    "krum": {"num_malicious": 1},
    "multi_krum": {"num_malicious": 1, "num_selected": 3},
    "bulyan": {"num_malicious": 1},
    "centered_clipping": {"tau": 0.5, "iterations": 3},
    "fednova": {"momentum": 0.5},
}
finite32 = st.floats(-1e3, 1e3, width=32)


def test_every_registered_rule_has_params_here():
    assert set(RULE_PARAMS) == set(AGGREGATORS)


@pytest.mark.parametrize("name", sorted(RULE_PARAMS))
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(7, 16), d=st.integers(1, 40))
def test_rules_are_permutation_invariant(name, seed, n, d):
    updates, weights = _updates(seed, n, d)
    perm = np.random.default_rng(seed + 1).permutation(n)
    fn = get_aggregator(name)
    params = RULE_PARAMS[name]
    rows = {}
    if "local_steps" in inspect.signature(fn).parameters:  # FedNova: one step count per row
        rows["local_steps"] = np.random.default_rng(seed + 2).integers(1, 10, n).astype(np.float64)
    out = fn(updates, weights, **params, **rows)
    permuted = {k: v[perm] for k, v in rows.items()}
    np.testing.assert_allclose(fn(updates[perm], weights[perm], **params, **permuted), out, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    updates=arrays(np.float32, st.tuples(st.integers(1, 9), st.integers(1, 12)), elements=finite32),
    beta=st.floats(0, 0.49),
)
def test_median_and_trimmed_mean_lie_between_min_and_max(updates, beta):
    weights = np.ones(len(updates))
    low, high = updates.min(axis=0), updates.max(axis=0)
    for out in (median(updates, weights), trimmed_mean(updates, weights, beta=beta)):
        assert out.dtype == np.float32
        assert np.all(low <= out) and np.all(out <= high)


@settings(max_examples=60, deadline=None)
@given(
    updates=arrays(np.float32, st.tuples(st.integers(3, 12), st.integers(1, 10)), elements=finite32),
    f=st.integers(0, 4),
)
def test_krum_returns_one_of_its_rows(updates, f):
    f = min(f, (len(updates) - 3) // 2)
    out = krum(updates, np.ones(len(updates)), num_malicious=f)
    assert any(np.array_equal(out, row) for row in updates)


@settings(max_examples=50, deadline=None)
@given(
    row=arrays(np.float32, st.integers(1, 20), elements=finite32),
    n=st.integers(1, 9),
    beta=st.floats(0, 0.49),
)
def test_median_and_trimmed_mean_of_identical_updates_is_that_update(row, n, beta):
    updates = np.tile(row, (n, 1))
    weights = np.arange(1.0, n + 1)
    np.testing.assert_array_equal(median(updates, weights), row)
    np.testing.assert_array_equal(trimmed_mean(updates, weights, beta=beta), row)
    if n >= 3:
        np.testing.assert_array_equal(krum(updates, weights), row)
        np.testing.assert_array_equal(bulyan(updates, weights), row)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 10), d=st.integers(1, 30))
def test_centered_clipping_with_huge_tau_is_the_unweighted_mean(seed, n, d):
    updates, weights = _updates(seed, n, d)
    out = centered_clipping(updates, weights, tau=1e9, iterations=1)
    np.testing.assert_allclose(out, updates.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 10),
    d=st.integers(1, 30),
    tau=st.floats(1e-3, 10),
    iterations=st.integers(1, 4),
)
def test_centered_clipping_moves_at_most_tau_per_iteration(seed, n, d, tau, iterations):
    updates, weights = _updates(seed, n, d)
    reference = np.random.default_rng(seed).normal(size=d).astype(np.float32)
    out = centered_clipping(updates, weights, tau=tau, iterations=iterations, reference=reference)
    moved = np.linalg.norm(out.astype(np.float64) - reference)
    assert moved <= iterations * tau * (1 + 1e-5) + 1e-5 * (1 + np.linalg.norm(reference))


def test_centered_clipping_pulls_toward_the_honest_majority():
    updates, weights = _updates(4, 10, d=20)
    honest = updates[3:].mean(axis=0)
    updates[:3] = 1e3
    out = centered_clipping(updates, weights, tau=2.0, iterations=20, reference=honest)
    assert np.linalg.norm(out - honest) < 0.3 * 2.0 * 20


def test_centered_clipping_checks_reference_shape():
    updates, weights = _updates(0, 4, d=5)
    with pytest.raises(ValueError, match="reference must have shape"):
        centered_clipping(updates, weights, reference=np.zeros(6))


# -- preconditions -----------------------------------------------------------------------

VIOLATIONS = [
    ("krum", 4, {"num_malicious": 1}, "n >= 2f\\+3"),
    ("multi_krum", 6, {"num_malicious": 2}, "n >= 2f\\+3"),
    ("multi_krum", 7, {"num_malicious": 2, "num_selected": 6}, "num_selected <= n - f"),
    ("multi_krum", 7, {"num_malicious": 1, "num_selected": 0}, "num_selected >= 1"),
    ("bulyan", 10, {"num_malicious": 2}, "n >= 4f\\+3"),
    ("trimmed_mean", 10, {"beta": 0.5}, "0 <= beta < 0.5"),
    ("trimmed_mean", 10, {"beta": -0.1}, "0 <= beta < 0.5"),
    ("trimmed_mean", 4, {"beta": 0.1, "num_malicious": 2}, "f < n/2"),
    ("median", 6, {"num_malicious": 3}, "f < n/2"),
    ("krum", 10, {"num_malicious": -1}, "num_malicious >= 0"),
    ("centered_clipping", 5, {"tau": 0.0}, "tau > 0"),
    ("centered_clipping", 5, {"tau": 1.0, "iterations": 0}, "iterations >= 1"),
]


@pytest.mark.parametrize("name,n,params,message", VIOLATIONS)
def test_check_params_names_the_violated_precondition(name, n, params, message):
    with pytest.raises(ValueError, match=message):
        check_params(name, n, **params)


@pytest.mark.parametrize("name,n,params,message", VIOLATIONS)
def test_rules_check_their_preconditions_when_called(name, n, params, message):
    updates, weights = _updates(0, n, d=6)
    with pytest.raises(ValueError, match=message):
        get_aggregator(name)(updates, weights, **params)


@pytest.mark.parametrize(
    "name,params,expected",
    [
        ("fedavg", {"num_malicious": 3}, 1),
        ("median", {}, 1),
        ("median", {"num_malicious": 2}, 5),
        ("trimmed_mean", {"beta": 0.2, "num_malicious": 1}, 3),
        ("krum", {"num_malicious": 2}, 7),
        ("multi_krum", {"num_malicious": 1, "num_selected": 8}, 9),
        ("multi_krum", {"num_malicious": 1, "num_selected": None}, 5),
        ("bulyan", {"num_malicious": 2}, 11),
        ("centered_clipping", {"tau": 0.1, "iterations": 3, "num_malicious": 2}, 1),
    ],
)
def test_min_clients_is_the_smallest_valid_n(name, params, expected):
    assert min_clients(name, **params) == expected
    check_params(name, expected, **params)
    if expected > 1:
        with pytest.raises(ValueError):
            check_params(name, expected - 1, **params)
    updates, weights = _updates(1, expected, d=4)
    call = {k: v for k, v in params.items() if not (name in {"fedavg", "centered_clipping"} and k == "num_malicious")}
    assert get_aggregator(name)(updates, weights, **call).shape == (4,)


def test_unknown_params_raise_type_error():
    updates, weights = _updates(0, 5, d=3)
    with pytest.raises(TypeError):
        krum(updates, weights, num_malicous=1)
    with pytest.raises(TypeError):
        check_params("trimmed_mean", 5, betta=0.1)
    with pytest.raises(KeyError):
        check_params("nope", 5)


def test_user_rules_by_dotted_path_are_only_checked_for_one_update():
    check_params("strategies.aggregators.fedavg", 1)
    assert min_clients("numpy.mean") == 1
    with pytest.raises(ValueError, match="n >= 1"):
        check_params("numpy.mean", 0)


def test_robust_rules_are_registered_and_reachable_by_dotted_path():
    for name in RULE_PARAMS:
        assert get_aggregator(f"strategies.aggregators.{name}") is get_aggregator(name)


# -- norm bounding ---------------------------------------------------------------------


def test_norm_bound_scales_only_rows_over_the_bound():
    updates, _ = _updates(2, 6, d=50)
    updates[0] *= 1e-3
    norms = np.linalg.norm(updates, axis=1)
    out = norm_bound(updates, 1.0)
    new = np.linalg.norm(out.astype(np.float64), axis=1)
    assert np.all(new <= 1.0 + 1e-6)
    np.testing.assert_array_equal(out[0], updates[0])
    np.testing.assert_allclose(out[1:] / new[1:, None], updates[1:] / norms[1:, None], rtol=1e-5, atol=1e-7)
    assert not np.shares_memory(out, updates)


def test_norm_bound_in_place_and_empty():
    updates, _ = _updates(2, 4, d=8)
    same = norm_bound(updates, 0.5, inplace=True)
    assert same is updates and np.all(np.linalg.norm(updates, axis=1) <= 0.5 + 1e-6)
    assert norm_bound(np.zeros((0, 8), np.float32), 1.0).shape == (0, 8)
    with pytest.raises(ValueError, match="max_norm > 0"):
        norm_bound(updates, 0.0)


def test_with_norm_bound_bounds_first_and_keeps_the_signature():
    updates, weights = _updates(6, 9, d=12)
    before = updates.copy()
    bounded = with_norm_bound(centered_clipping, 0.1)
    assert "reference" in inspect.signature(bounded).parameters
    out = bounded(updates, weights, tau=10.0, iterations=1)
    np.testing.assert_allclose(out, norm_bound(updates, 0.1).mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(updates, before)
    assert np.array_equal(with_norm_bound(median, 1e9)(updates, weights), median(updates, weights))


# -- decisions reported for the audit log ------------------------------------------------


def _outlier_matrix(n=7, d=20, outliers=(5, 6), seed=0):
    rng = np.random.default_rng(seed)
    updates = rng.normal(scale=0.1, size=(n, d)).astype(np.float32)
    # Each outlier far away in its own direction, so outliers are not each other's neighbours.
    updates[list(outliers)] += rng.normal(scale=50.0, size=(len(outliers), d)).astype(np.float32)
    return updates, np.ones(n)


@pytest.mark.parametrize("rule", [krum, multi_krum, bulyan])
def test_selection_rules_report_rows_without_the_outliers(rule):
    updates, weights = _outlier_matrix(n=11 if rule is bulyan else 7)
    report: dict = {}
    out = rule(updates, weights, num_malicious=2, report=report)
    np.testing.assert_array_equal(out, rule(updates, weights, num_malicious=2))  # report changes nothing
    n = len(updates)
    assert report["selected"] and not {5, 6} & set(report["selected"])
    assert report["selected"] == sorted(report["selected"])
    if rule is krum:
        assert len(report["selected"]) == 1
        np.testing.assert_array_equal(out, updates[report["selected"][0]])
    if rule is multi_krum:
        assert len(report["selected"]) == n - 2
        np.testing.assert_allclose(out, updates[report["selected"]].mean(0), atol=1e-6)
    if rule is bulyan:
        assert len(report["selected"]) == report["theta"] == n - 4 and report["beta"] == n - 8
    if rule is not bulyan:
        scores = report["scores"]
        assert len(scores) == n and max(scores[5], scores[6]) > 10 * max(scores[:5])


def test_centered_clipping_reports_clipped_rows_per_iteration():
    updates, weights = _outlier_matrix()
    report: dict = {}
    centered_clipping(updates, weights, tau=1.0, iterations=2, report=report)
    # From v = 0 only the two shifted rows lie farther than tau = 1 (honest norms ~0.45).
    assert report["clipped_per_iteration"][0] == 2 and len(report["clipped_per_iteration"]) == 2
    assert {5, 6} <= set(report["clipped"]) and report["tau"] == 1.0 and report["iterations"] == 2


def test_trimmed_mean_and_norm_bound_report_what_they_cut():
    updates, weights = _outlier_matrix(n=10, outliers=(9,))
    report: dict = {}
    trimmed_mean(updates, weights, beta=0.2, report=report)
    assert report == {"beta": 0.2, "trimmed_per_end": 2, "kept": 6}
    nb: dict = {}
    norm_bound(updates, 5.0, report=nb)
    assert nb["clipped"] == [9] and nb["max_norm"] == 5.0
    assert nb["norms"][9] > 100 and max(nb["norms"][:9]) < 1


def test_norm_bounded_rule_reports_both_steps_and_label_rows_maps_to_clients():
    from strategies.aggregators import label_rows

    updates, weights = _outlier_matrix()
    report: dict = {}
    with_norm_bound(krum, 5.0)(updates, weights, num_malicious=2, report=report)
    assert report["norm_bound"]["clipped"] == [5, 6]
    ids = [10, 11, 12, 13, 14, 15, 16]
    labelled = label_rows(report, ids)
    assert labelled["norm_bound"]["clipped"] == [15, 16]
    assert labelled["selected"] == [ids[report["selected"][0]]]
    assert set(labelled["scores"]) == {str(i) for i in ids}
    assert report["selected"][0] < 5  # the original report is left as it was
