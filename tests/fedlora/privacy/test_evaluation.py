"""Private federated evaluation (privacy.evaluation): the noisy-count mechanism, its
calibration with the training noise, and what a real client releases in each mode."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedlora.client.numpy_client import LoRAClient
from fedlora.client.state import SpendLog
from fedlora.core.errors import ConfigError
from fedlora.plan import build_plan_cached
from fedlora.privacy import epsilon_from_history, plan_sample_dp
from fedlora.privacy.evaluation import (
    COUNT_SENSITIVITY,
    NOISY_CORRECT,
    NOISY_EXAMPLES,
    evaluation_mode,
    federated_accuracy,
    noisy_counts,
    planned_evaluations,
)
from fedlora.privacy.release import DP_EVALUATION_REPLY
from fedlora.record.model_card import evaluation_text

PRIVACY_MD = Path(__file__).resolve().parents[3] / "PRIVACY.md"
TRAIN = OmegaConf.create({"batch_size": 16, "local_steps": 10, "local_epochs": 1, "probe_steps": 0})


def _privacy(**extra):
    base = {"unit": "sample", "target_epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "rdp",
            "max_noise_multiplier": 50.0, "evaluation": "dp", "evaluation_epsilon_fraction": 0.1}
    return OmegaConf.create({**base, **extra})


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_training_and_evaluation_together_meet_the_target(accountant):
    privacy = _privacy(accountant=accountant)
    alone = plan_sample_dp(400, TRAIN, privacy, rounds=5)
    both = plan_sample_dp(400, TRAIN, privacy, rounds=5, evaluations=5)
    assert alone.evaluation_entry is None and both.planned_evaluations == 5
    # Training alone gets (1 - fraction) of the target; the evaluations the least noise
    # (to 0.5%) that keeps both together within it.
    train_only = epsilon_from_history([(both.noise_multiplier, both.sample_rate, both.planned_steps)], 1e-5,
                                      accountant)
    assert 0.9 * 4.0 - 0.05 <= train_only <= 0.9 * 4.0
    assert 3.98 <= both.planned_epsilon <= 4.0
    less = [both.planned_history[0], (both.evaluation_noise_multiplier * 0.98, 1.0, 5)]
    assert epsilon_from_history(less, 1e-5, accountant) > 4.0
    # Reserving budget for evaluation costs DP-SGD some noise, not the budget.
    assert both.noise_multiplier > alone.noise_multiplier
    recomputed = epsilon_from_history(both.planned_history, 1e-5, accountant)
    assert recomputed == pytest.approx(both.planned_epsilon)


def test_an_evaluation_share_that_cannot_be_met_names_the_setting():
    with pytest.raises(ConfigError, match="privacy.evaluation_epsilon_fraction"):
        plan_sample_dp(400, TRAIN, _privacy(evaluation_epsilon_fraction=1.5), rounds=5, evaluations=5)


def test_noisy_counts_have_the_calibrated_spread():
    rng = np.random.default_rng(0)
    draws = np.array([noisy_counts(30, 50, 3.0, rng) for _ in range(20000)])
    assert draws.mean(axis=0) == pytest.approx([30, 50], abs=0.2)
    assert draws.std(axis=0) == pytest.approx([3.0 * COUNT_SENSITIVITY] * 2, rel=0.03)
    # The two counts get independent noise.
    assert abs(np.corrcoef(draws.T)[0, 1]) < 0.03


def test_federated_accuracy_is_the_clamped_ratio_of_summed_counts():
    assert federated_accuracy([(10.0, 20.0), (5.0, 10.0)]) == pytest.approx(0.5)
    assert federated_accuracy([(30.0, 20.0)]) == 1.0 and federated_accuracy([(-3.0, 20.0)]) == 0.0
    assert federated_accuracy([(3.0, -5.0)]) is None and federated_accuracy([]) is None


def test_modes_and_their_errors():
    cfg = lambda unit, mode, fraction=1.0: OmegaConf.create(  # noqa: E731
        {"privacy": {"unit": unit, "evaluation": mode}, "federation": {"rounds": 4, "fraction_evaluate": fraction}})
    assert evaluation_mode(cfg("sample", "dp")) == "dp" and planned_evaluations(cfg("sample", "dp")) == 4
    assert planned_evaluations(cfg("sample", "dp", 0.0)) == 0 and planned_evaluations(cfg("sample", "plain")) == 0
    assert evaluation_mode(cfg("client", False)) == "off"  # YAML reads an unquoted off as false
    for unit, mode in (("sample", "noisy"), ("none", "dp"), ("client", "dp")):
        with pytest.raises(ConfigError, match="privacy.evaluation"):
            evaluation_mode(cfg(unit, mode))


def documented_evaluation_modes() -> dict[str, str]:
    text = PRIVACY_MD.read_text().split("(`privacy.evaluation`)", 1)[1]
    return dict(re.findall(r"^\| `(dp|off|plain)` \| [^|]+ \| ([^|]+) \|", text, re.M))


def test_privacy_md_lists_the_dp_evaluation_reply():
    rows = documented_evaluation_modes()
    assert set(rows) == {"dp", "off", "plain"}
    assert set(re.findall(r"`([a-z_]+)`", rows["dp"])) == DP_EVALUATION_REPLY


def test_a_real_client_releases_what_its_mode_allows(tiny_cfg, tmp_path):
    config = {"server_round": 1, "experiment_id": "e"}
    off = LoRAClient(build_plan_cached(tiny_cfg("privacy=sample", "privacy.evaluation=off")), 1, tmp_path)
    loss, n, metrics = off.evaluate(off.get_parameters({}), config)
    assert n == 0 and metrics == {"partition_id": 1}

    plain = LoRAClient(build_plan_cached(tiny_cfg("privacy=sample", "privacy.evaluation=plain")), 1, tmp_path)
    loss, n, metrics = plain.evaluate(plain.get_parameters({}), config)
    assert n == len(plain.val_idx) > 0 and 0 <= metrics["accuracy"] <= 1 and loss > 0

    client = LoRAClient(build_plan_cached(tiny_cfg("privacy=sample", "privacy.evaluation=dp")), 1, tmp_path)
    plan = client.dp
    loss, n, metrics = client.evaluate(client.get_parameters({}), config)
    assert set(metrics) <= DP_EVALUATION_REPLY and {NOISY_CORRECT, NOISY_EXAMPLES} <= set(metrics)
    assert "accuracy" not in metrics and n == 1 and loss == 0.0
    # The release is in the client's own record before it leaves, and its epsilon recomputes.
    history = SpendLog(tmp_path, "e", 1).history()
    assert history == [(plan.evaluation_noise_multiplier, 1.0, 1, 1)]
    assert json.loads(metrics["dp_history"]) == [list(h) for h in history]
    assert metrics["epsilon"] == pytest.approx(epsilon_from_history([history[0][:3]], plan.delta))
    # Noisy, not the true counts (a continuous draw never lands on an integer).
    assert metrics[NOISY_EXAMPLES] != len(client.val_idx) and not float(metrics[NOISY_CORRECT]).is_integer()


def test_a_client_never_releases_past_its_budget(tiny_cfg, tmp_path):
    client = LoRAClient(build_plan_cached(tiny_cfg("privacy=sample", "privacy.evaluation=dp")), 0, tmp_path)
    plan = client.dp
    log = SpendLog(tmp_path, "e", 0)
    # A record already at the budget: the whole planned training of every round.
    log.append([(plan.noise_multiplier, plan.sample_rate, plan.planned_steps, 0)] * 2)
    loss, n, metrics = client.evaluate(client.get_parameters({}), {"server_round": 3, "experiment_id": "e"})
    assert n == 0 and metrics["declined"] is True and "budget" in metrics["reason"]
    assert NOISY_CORRECT not in metrics and len(log.history()) == 2


def test_the_model_card_says_what_evaluation_released():
    assert "does not cover" in evaluation_text({"mode": "plain"})
    assert "composed into the epsilon" in evaluation_text({"mode": "dp"})
    assert "released nothing" in evaluation_text({"mode": "off"})


def test_the_eval_entry_is_the_gaussian_mechanism_at_q_1():
    plan = plan_sample_dp(400, TRAIN, _privacy(), rounds=2, evaluations=2)
    sigma = plan.evaluation_noise_multiplier
    assert plan.evaluation_entry == (sigma, 1.0, 1)
    # RDP of the Gaussian mechanism, alpha / (2 sigma^2) per release (Mironov 2017), with
    # the conversion Opacus uses: the ledger's epsilon is no smaller than a direct bound.
    direct = min(2 * a / (2 * sigma**2) + math.log(1 / 1e-5) / (a - 1) for a in np.linspace(1.5, 256, 4000))
    assert epsilon_from_history([(sigma, 1.0, 2)], 1e-5, "rdp") <= direct + 1e-6


def test_a_dp_run_with_plain_evaluation_warns_at_start(tiny_cfg):
    from strategies.server_app import _fraction_evaluate

    said = []
    plan = build_plan_cached(tiny_cfg("privacy=sample", "privacy.evaluation=plain"))
    assert _fraction_evaluate(plan, said.append) == 1.0
    assert said[0].startswith("WARNING") and "NOT covered" in said[0]
    said.clear()
    assert _fraction_evaluate(build_plan_cached(tiny_cfg("privacy=none")), said.append) == 1.0 and not said
    assert _fraction_evaluate(build_plan_cached(tiny_cfg("privacy=sample", "privacy.evaluation=off")),
                              said.append) == 0.0
    assert "privacy.evaluation=off" in said[0]
    with pytest.raises(ConfigError, match="privacy.evaluation"):
        build_plan_cached(tiny_cfg("privacy=client", "privacy.delta=1e-3", "privacy.evaluation=dp"))
