"""The one-run audit's bound (Steinke, Nasr, Jagielski 2023): its closed form where one
exists, that it never certifies more than a simulated eps-DP mechanism spends, and that
it certifies its maximum when every guess is right."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.leakage.one_run import audit, epsilon_lower_bound, max_certifiable, p_value


def test_all_correct_with_no_delta_matches_the_closed_form():
    # P[Binomial(r, q) >= r] = q^r = 0.05  =>  eps = log(q / (1 - q)), q = 0.05^(1/r)
    for r in (10, 50, 200):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)


def test_p_value_falls_with_eps_and_delta_only_loosens_it():
    ps = [p_value(100, 60, 45, eps, 0.0) for eps in (0.0, 0.5, 1.0, 2.0)]
    assert ps == sorted(ps)  # more eps allows more correct guesses: larger p
    assert p_value(100, 60, 45, 0.5, 1e-3) > p_value(100, 60, 45, 0.5, 0.0)
    assert epsilon_lower_bound(100, 60, 30, 1e-5) == 0.0  # chance level certifies nothing
    with pytest.raises(ValueError):
        p_value(10, 5, 6, 1.0, 0.0)


def randomized_response_scores(eps: float, m: int, rng: np.random.Generator):
    """Canary scores from an eps-DP mechanism: each inclusion bit, reported truthfully
    with probability e^eps / (1 + e^eps), plus a tie-breaking jitter."""
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < 1 / (1 + math.exp(-eps))
    reported = np.where(truthful, included, ~included)
    return reported + 0.01 * rng.random(m), included


@pytest.mark.parametrize("eps", [1.0, 4.0])
def test_the_bound_stays_below_the_epsilon_of_a_dp_mechanism(eps):
    rng = np.random.default_rng(7)
    bounds = [audit(*randomized_response_scores(eps, 1000, rng), delta=0.0).epsilon_lower_bound for _ in range(40)]
    # At 95% confidence at most about 5% of audits may exceed the truth.
    assert np.mean(np.array(bounds) > eps) <= 0.1
    # ...and a strong mechanism is detected: the bound is clearly above 0.
    assert np.median(bounds) > 0.5 * eps if eps >= 4 else np.median(bounds) > 0.2


def test_perfect_guesses_certify_the_maximum_and_chance_certifies_nothing():
    rng = np.random.default_rng(0)
    included = rng.random(200) < 0.5
    perfect = audit(included.astype(float) + 0.01 * rng.random(200), included, delta=1e-5)
    # Every guess right; the bound is that of r all-correct guesses at 95% split over the
    # four guess counts, and no count can certify more than max_certifiable.
    assert perfect.correct == perfect.guesses >= 80
    r = perfect.guesses
    assert perfect.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(200, r, r, 1e-5, 1 - 0.05 / 4))
    assert perfect.epsilon_lower_bound <= perfect.max_certifiable == max_certifiable(200, 1e-5)
    noise = audit(rng.random(200), included, delta=1e-5)
    assert noise.epsilon_lower_bound < 0.5
    # More canaries can certify more.
    assert max_certifiable(1000, 1e-5) > max_certifiable(100, 1e-5)
