"""Attacks: which clients are malicious, what they send, and that the client applies it."""

import tempfile

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedlora.attacks import (
    ATTACKS,
    Attack,
    alie_z,
    flip_labels,
    get_attack,
    malicious_clients,
    poison_delta,
)
from fedlora.client.numpy_client import LoRAClient
from fedlora.core.arrays import flatten
from fedlora.core.errors import ConfigError
from fedlora.plan import build_plan_cached


def _attack(**kw):
    return OmegaConf.create({"name": "sign_flip", "fraction": 0.2, "clients": None, "seed": 0, **kw})


def test_fraction_is_seeded_and_explicit_ids_win():
    a = malicious_clients(_attack(), 10)
    assert len(a) == 2 and a == malicious_clients(_attack(), 10)
    assert malicious_clients(_attack(seed=1), 100) != malicious_clients(_attack(seed=2), 100)
    assert malicious_clients(_attack(clients=[3, 1]), 10) == [1, 3]
    assert malicious_clients(OmegaConf.create({"name": "none"}), 10) == []


@pytest.mark.parametrize(
    "kw,setting",
    [({"clients": [12]}, "attack.clients"), ({"fraction": 1.0}, "attack.fraction"), ({"name": "nope"}, "attack")],
)
def test_bad_attack_settings(kw, setting):
    with pytest.raises(ConfigError) as err:
        malicious_clients(_attack(**kw), 10)
    assert err.value.setting == setting


def test_model_poisoning_transforms():
    rng = np.random.default_rng(0)
    d = rng.normal(size=100).astype(np.float32)
    np.testing.assert_allclose(poison_delta("sign_flip", d, {"scale": 2.0}, rng), -2 * d)
    np.testing.assert_allclose(poison_delta("scaling", d, {"factor": 10.0}, rng), 10 * d)
    g = poison_delta("gaussian", d, {"std": 3.0}, rng)
    assert g.shape == d.shape and 2.0 < g.std() < 4.0
    honest = rng.normal(loc=1.0, size=(5, 100)).astype(np.float32)
    np.testing.assert_allclose(poison_delta("ipm", d, {"epsilon": 0.5}, rng, honest), -0.5 * honest.mean(0), rtol=1e-5)
    alie = poison_delta("alie", d, {"z": 1.0}, rng, honest)
    np.testing.assert_allclose(alie, honest.mean(0) - honest.std(0), rtol=1e-5)
    with pytest.raises(ValueError, match="honest"):
        poison_delta("alie", d, {"z": 1.0}, rng)


def test_alie_z_follows_the_paper():
    # Baruch et al. 2019, n=50, m=12: s = 26 - 12 = 14, z = Phi^-1(36/50) ~ 0.58
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-3)
    assert alie_z(10, 2) > 0


def test_flip_labels():
    np.testing.assert_array_equal(flip_labels(np.array([0, 1, 2, 4]), 5), [4, 3, 2, 0])


_START = {}


def _fit(cfg, pid, rnd=1):
    """One client's round from the same global adapter every time (the per-process
    model is shared and trained in place, so the start is read only once)."""
    client = LoRAClient(build_plan_cached(cfg), pid, tempfile.gettempdir())  # no DP here: no spend record
    params = _START.setdefault("params", client.get_parameters({}))
    delta, n, metrics = client.fit(params, {"server_round": rnd})
    return flatten(delta), metrics


def test_malicious_client_sends_the_flipped_honest_delta(tiny_cfg):
    honest, m = _fit(tiny_cfg("privacy=none"), 0)
    flipped, m_bad = _fit(tiny_cfg("privacy=none", "attack=sign_flip", "attack.clients=[0]"), 0)
    assert "attack" not in m and m_bad["attack"] == "sign_flip"
    assert np.abs(honest).max() > 0
    np.testing.assert_allclose(flipped, -honest, rtol=1e-4, atol=1e-6)
    # The honest client of the same experiment is untouched.
    other, m_other = _fit(tiny_cfg("privacy=none", "attack=sign_flip", "attack.clients=[0]"), 1)
    assert "attack" not in m_other


def test_alie_colluders_send_the_same_crafted_update(tiny_cfg):
    cfg = tiny_cfg("privacy=none", "attack=alie", "attack.clients=[0,1]", "attack.z=1.0")
    a, _ = _fit(cfg, 0)
    b, _ = _fit(cfg, 1)
    honest0, _ = _fit(tiny_cfg("privacy=none"), 0)
    honest1, _ = _fit(tiny_cfg("privacy=none"), 1)
    stack = np.stack([honest0, honest1])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a, stack.mean(0) - stack.std(0), rtol=1e-3, atol=1e-5)


def test_label_flip_changes_the_training_data_only_for_malicious_clients(tiny_cfg, tmp_path):
    cfg = tiny_cfg("privacy=none", "attack=label_flip", "attack.clients=[1]")
    bad = LoRAClient(build_plan_cached(cfg), 1, tmp_path)
    good = LoRAClient(build_plan_cached(tiny_cfg("privacy=none")), 1, tmp_path)
    bundle = bad._bundle()
    y_bad = bad._data(bundle, "train").tensors[2]
    y_good = good._data(bundle, "train").tensors[2]
    assert len(y_bad) == len(y_good)
    np.testing.assert_array_equal(y_bad.numpy(), 1 - y_good.numpy())
    # Validation data (used to report accuracy) is never flipped.
    np.testing.assert_array_equal(bad._data(bundle, "val").tensors[2], good._data(bundle, "val").tensors[2])


HALVE = Attack("halve", poison_delta=lambda delta, params, rng, honest=None: (0.5 * delta).astype(np.float32))


def halve_fn(delta, params, rng, honest=None):
    return (0.5 * delta).astype(np.float32)


def test_a_users_attack_plugs_in_by_dotted_path_like_an_aggregator():
    for path in (f"{__name__}.HALVE", f"{__name__}.halve_fn"):
        attack = get_attack(path)
        assert attack.poisons_model and not attack.poisons_data and not attack.colluding
        d = np.arange(4, dtype=np.float32)
        np.testing.assert_allclose(attack.poison_delta(d, {}, np.random.default_rng(0)), 0.5 * d)
    assert malicious_clients(_attack(name=f"{__name__}.HALVE", clients=[2]), 4) == [2]
    with pytest.raises(ConfigError) as err:
        get_attack(f"{__name__}.missing")
    assert err.value.setting == "attack.name"
    assert {"sign_flip", "scaling", "gaussian", "alie", "ipm", "label_flip"} <= set(ATTACKS)
    assert get_attack("label_flip").poisons_data and get_attack("alie").colluding
