"""Secret randomness of the DP mechanisms: DP-SGD noise that whoever knows the config
cannot regenerate, noise on every planned step (empty Poisson batches included), no
generator state in a checkpoint, and a client's own spend record that a server cannot
rewrite.

The spread tests compare two fits of one client from the same global adapter with the
same experiment seed: only the DP randomness differs. With plain SGD (no momentum or
weight decay) the difference of the two deltas is exactly
``-lr * (sum of the noise of run 1 - that of run 2) - lr * (difference of the clipped
gradient sums)``; the first part has per-coordinate variance
``2 * steps * (lr * sigma * C / B)^2``. So ``S = ||diff||^2 / that`` is chi-square with d
degrees of freedom up to the gradient part, which a large clipping norm (gradients far
below it, noise std proportional to it) makes negligible; the test measures that part's
size from a noiseless run and allows for it. Bounds are the chi-square quantiles at
1e-6 on each side: a correct implementation fails with probability below 2e-6.
"""

import json

import numpy as np
import pytest
from scipy import stats

from fedlora.client.numpy_client import LoRAClient
from fedlora.client.state import SpendLog, extends
from fedlora.core.arrays import flatten
from fedlora.plan import build_plan_cached
from fedlora.privacy import epsilon_from_history
from fedlora.privacy.randomness import SAMPLING, NoiseSource

FALSE_FAILURE = 1e-6  # per side of the chi-square test
SGD = ["train.optimizer=sgd", "train.momentum=0", "train.weight_decay=0", "train.lr=0.001", "train.head_lr=null",
       "privacy.max_grad_norm=100", "privacy.target_epsilon=1"]


def _fit(cfg, state, experiment, pid=0):
    client = LoRAClient(build_plan_cached(cfg), pid, state)
    delta, _, metrics = client.fit(_start(client), {"server_round": 1, "experiment_id": experiment})
    return flatten(delta).astype(np.float64), metrics


_STARTS = {}


def _start(client):
    """The same global adapter every time (the per-process model is trained in place)."""
    key = id(client._bundle())
    if key not in _STARTS:
        _STARTS.clear()
        _STARTS[key] = client.get_parameters({})
    return _STARTS[key]


def _spread_ratio(tiny_cfg, tmp_path, *overrides):
    """(observed / predicted noise energy of the difference of two fits, d, its bounds)."""
    cfg = tiny_cfg(*SGD, *overrides)
    a, m = _fit(cfg, tmp_path, "run-a")
    b, _ = _fit(cfg, tmp_path, "run-b")
    d = a.size
    std_step = float(cfg.train.lr) * m["noise_multiplier"] * float(cfg.privacy.max_grad_norm) / int(cfg.train.batch_size)
    predicted = 2 * m["steps"] * std_step**2  # per coordinate, both runs' noise
    # The gradient part, measured without noise: a plain run of the same steps.
    train_only = [o for o in SGD if not o.startswith("privacy.")]
    plain, _ = _fit(tiny_cfg(*train_only, *overrides, "privacy=none", "train.max_grad_norm=null"), tmp_path, "plain")
    allowance = 2 * 3 * np.linalg.norm(plain)  # both runs, x3 for Poisson batch sizes
    assert allowance < 0.01 * np.sqrt(predicted * d), "the gradient part would blur the test"
    root = np.linalg.norm(a - b)
    lo = np.sqrt(stats.chi2.ppf(FALSE_FAILURE, d) * predicted) - allowance
    hi = np.sqrt(stats.chi2.ppf(1 - FALSE_FAILURE, d) * predicted) + allowance
    return root, lo, hi, a, b


def test_two_fits_with_one_config_differ_by_the_noise_the_plan_predicts(tiny_cfg, tmp_path):
    root, lo, hi, a, b = _spread_ratio(tiny_cfg, tmp_path, "train.batch_size=8", "train.local_steps=4")
    assert not np.array_equal(a, b)
    assert lo <= root <= hi, (lo, root, hi)


def test_the_same_noise_seed_gives_the_same_delta(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*SGD, "privacy.noise_seed=11")
    a, m = _fit(cfg, tmp_path, "seeded-a")
    b, _ = _fit(cfg, tmp_path, "seeded-b")
    np.testing.assert_array_equal(a, b)
    c, _ = _fit(tiny_cfg(*SGD, "privacy.noise_seed=12"), tmp_path, "seeded-c")
    assert not np.array_equal(a, c)


def test_empty_poisson_batches_still_release_the_noise_of_every_planned_step(tiny_cfg, tmp_path):
    # ~18 examples per client at an expected batch of 1: about a third of the steps draw
    # an empty batch (0.944^18 = 0.36). Skipping them would leave ~64% of the predicted
    # noise energy, far below the lower bound.
    root, lo, hi, _, _ = _spread_ratio(tiny_cfg, tmp_path, "data.max_train_samples=40", "train.batch_size=1",
                                       "train.local_steps=12")
    q = 1 / 18
    assert (1 - q) ** 18 > 0.3  # the setting really draws many empty batches
    assert lo <= root <= hi, (lo, root, hi)


def test_os_entropy_generators_differ_and_a_noise_seed_reproduces():
    secret = NoiseSource()
    assert secret.private and secret.describe()["source"] == "os_entropy"
    draws = {float(secret.torch_generator(0, 1, SAMPLING).seed()) for _ in range(5)}
    assert len(draws) == 5
    assert secret.numpy_generator(1).random() != secret.numpy_generator(1).random()
    seeded = NoiseSource(5)
    assert not seeded.private and "NOT PRIVATE" in seeded.describe()["warning"]
    assert seeded.numpy_generator(3, 1).random() == NoiseSource(5).numpy_generator(3, 1).random()
    assert seeded.numpy_generator(3, 1).random() != seeded.numpy_generator(3, 2).random()


def test_a_forged_server_history_is_refused_and_epsilon_does_not_drop(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    client = LoRAClient(build_plan_cached(cfg), 0, tmp_path)
    params = client.get_parameters({})
    eps = []
    for rnd in (1, 2):
        _, _, m = LoRAClient(build_plan_cached(cfg), 0, tmp_path).fit(params, {"server_round": rnd, "experiment_id": "e"})
        eps.append(m["epsilon"])
    own = json.loads(m["dp_history"])
    # A longer history that rewrites the client's own entries with huge noise.
    forged = [[1000.0, e[1], e[2], e[3]] for e in own] + [[1000.0, own[0][1], 1, 3]] * 4
    _, _, m3 = LoRAClient(build_plan_cached(cfg), 0, tmp_path).fit(
        params, {"server_round": 3, "experiment_id": "e", "dp_history": json.dumps(forged)})
    assert "refused" in m3["history_refused"]
    assert m3["epsilon"] > eps[-1]  # composed over its own record, not the forged one
    history = SpendLog(tmp_path, "e", 0).history()
    assert [h[3] for h in history] == [1, 2, 3] and history[0][0] == own[0][0]
    expected = epsilon_from_history([h[:3] for h in history], cfg.privacy.delta, "rdp")
    assert m3["epsilon"] == pytest.approx(expected)


def test_a_server_history_that_extends_the_clients_own_is_taken(tmp_path):
    log = SpendLog(tmp_path, "e", 3)
    log.append([(1.5, 0.1, 4, 1)])
    server = [[1.5, 0.1, 4, 1], [1.5, 0.1, 4, 2]]
    history, refused = log.adopt(server)
    assert refused is None and [h[3] for h in history] == [1, 2]
    assert [h[3] for h in SpendLog(tmp_path, "e", 3).history()] == [1, 2]  # written to disk
    # A shorter one (the server lost a round the client remembers): the client's stands.
    history, refused = log.adopt(server[:1])
    assert refused is None and len(history) == 2
    assert extends(server[:1], server) and not extends(server, server[:1])
