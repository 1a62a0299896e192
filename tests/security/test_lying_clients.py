"""Clients that lie in their replies: weight inflation (a sign-flipped update claiming
10^9 examples) and metric poisoning (perfect evaluation numbers, a small epsilon).
With the default settings neither moves the global adapter or the reported numbers by
more than one honest client could."""

import json

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters
from flwr.server.compat.grid_client_proxy import GridClientProxy
from omegaconf import OmegaConf

from fedlora.attacks import get_attack
from fedlora.core.config import compose
from fedlora.core.errors import ConfigError
from fedlora.privacy.evaluation import NOISY_CORRECT, NOISY_EXAMPLES
from fedlora.record.results import RunRecorder
from strategies.client_reports import summarise
from strategies.fedlora_strategy import FedLoRAStrategy
from strategies.weighting import BOUNDED, REPORTED, UNIFORM, ClientWeights, client_weights

HONEST = 4
PLAN_COUNTS = {pid: 100 for pid in range(HONEST + 1)}
ATTACKER = HONEST  # client 4


def _fit(pid, value, n):
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(3, value, np.float32)]), n,
                 {"partition_id": pid, "num_examples": n})
    return GridClientProxy(pid + 1, None, 0), res


def _round(weighting, tmp_path):
    recorder = RunRecorder(tmp_path, {}, privacy_unit="none", delta=None, num_rounds=1, echo=lambda s: None)
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)], recorder=recorder, weighting=weighting)
    attack = get_attack("weight_inflation")
    cfg = OmegaConf.create({"scale": 1.0, "claimed_examples": 1e9})
    honest_delta = np.ones(3, np.float32)
    poisoned = attack.poison_delta(honest_delta, cfg, np.random.default_rng(0), None)
    claimed = attack.claimed_examples(100, cfg)
    results = [_fit(pid, 1.0, 100) for pid in range(HONEST)] + [_fit(ATTACKER, float(poisoned[0]), claimed)]
    strategy.aggregate_fit(1, results, [])
    return strategy.global_arrays[0], recorder


def test_the_attack_flips_the_update_and_claims_a_billion_examples():
    attack = get_attack("weight_inflation")
    cfg = compose(["attack=weight_inflation"]).attack
    assert attack.claimed_examples(100, cfg) == 10**9
    np.testing.assert_allclose(attack.poison_delta(np.ones(2, np.float32), cfg, np.random.default_rng(0), None),
                               [-1.0, -1.0])


def test_trusted_claims_let_one_client_own_fedavg(tmp_path):
    moved, _ = _round(ClientWeights(rule=REPORTED), tmp_path)
    assert moved[0] < -0.99  # the attacker's direction, with all the weight


def test_bounded_weights_leave_the_attacker_one_client_of_five(tmp_path):
    weighting = client_weights(OmegaConf.create({"weighting": BOUNDED}), PLAN_COUNTS)
    moved, recorder = _round(weighting, tmp_path)
    # Exactly what the attacker achieves with an honest weight: (4 * 1 - 1) / 5.
    np.testing.assert_allclose(moved, 0.6, rtol=1e-6)
    bounded = recorder.rounds[1]["weights_bounded"]
    assert bounded == [{"cid": str(ATTACKER), "claimed": 1e9, "used": 100.0}]
    recorder.write()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rounds"][0]["weights_bounded"][0]["claimed"] == 1e9


def test_uniform_weights_ignore_every_claim(tmp_path):
    moved, recorder = _round(ClientWeights(rule=UNIFORM), tmp_path)
    np.testing.assert_allclose(moved, 0.6, rtol=1e-6)
    assert "weights_bounded" not in recorder.rounds[1]


def test_configured_per_node_maxima_replace_the_plan_counts():
    weights = client_weights(OmegaConf.create({"weighting": "bounded", "max_client_examples": {"0": 50, "9": 7}}),
                             {0: 100, 1: 100})
    used, bounded = weights.apply([80, 80, 80], ["0", "1", "9"])
    assert used.tolist() == [50, 80, 7]
    assert [b["cid"] for b in bounded] == ["0", "9"]
    # A client the server knows nothing of gets the smallest weight it grants anyone.
    assert weights.apply([1e6], ["42"])[0].tolist() == [7]
    # NaN claims are bounded too.
    assert weights.apply([float("nan")], ["1"])[0].tolist() == [100]


@pytest.mark.parametrize("overrides, key", [
    (["strategy.weighting=trust_everyone"], "strategy.weighting"),
    (["strategy.max_client_examples=-5"], "strategy.max_client_examples"),
    (["+strategy.max_client_examples={3: zero}"], "strategy.max_client_examples.3"),
])
def test_bad_weighting_settings_name_the_setting(overrides, key):
    cfg = compose([o for o in overrides if not o.startswith("+")])
    if overrides[0].startswith("+"):
        cfg.strategy.max_client_examples = {3: "zero"}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        client_weights(cfg.strategy, {0: 1})


def test_the_default_config_bounds_weights():
    assert client_weights(compose([]).strategy, PLAN_COUNTS).rule == BOUNDED


# -- metric poisoning ---------------------------------------------------------------
def _eval(pid, loss, acc, n=50):
    return GridClientProxy(pid + 1, None, 0), EvaluateRes(Status(Code.OK, ""), loss, n,
                                                         {"accuracy": acc, "partition_id": pid})


def test_poisoned_evaluation_reports_move_the_mean_not_the_median(tmp_path):
    recorder = RunRecorder(tmp_path, {}, privacy_unit="none", delta=None, num_rounds=1, echo=lambda s: None)
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)], recorder=recorder, evaluation="plain")
    honest = [(0.62, 0.70), (0.60, 0.72), (0.65, 0.68), (0.58, 0.74)]
    attack = get_attack("metric_poisoning")
    lie = attack.report({"loss": 0.6, "accuracy": 0.7}, compose(["attack=metric_poisoning"]).attack)
    assert lie == {"loss": 0.0, "accuracy": 1.0}
    results = [_eval(pid, loss, acc) for pid, (loss, acc) in enumerate(honest)]
    results.append(_eval(ATTACKER, lie["loss"], lie["accuracy"], n=10**9))
    loss, metrics = strategy.aggregate_evaluate(1, results, [])
    honest_acc = sorted(a for _, a in honest)
    # No further than the honest reports around the median.
    assert honest_acc[1] <= metrics["accuracy"] <= honest_acc[-1]
    assert min(x for x, _ in honest) <= loss <= max(x for x, _ in honest)
    record = recorder.rounds[1]
    assert record["federated_evaluation"]["aggregation"] == "median"
    assert record["evaluation_outliers"] == [str(ATTACKER)]


def test_poisoned_noisy_counts_are_an_outlier_under_dp_evaluation(tmp_path):
    recorder = RunRecorder(tmp_path, {}, privacy_unit="sample", delta=1e-5, num_rounds=1, echo=lambda s: None)
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)], recorder=recorder, evaluation="dp")
    releases = [(70.0, 100.0), (66.0, 98.0), (75.0, 101.0), (71.0, 99.0)]
    cfg = compose(["attack=metric_poisoning"]).attack
    lie = get_attack("metric_poisoning").report({NOISY_CORRECT: 40.0, NOISY_EXAMPLES: 1e9}, cfg)
    results = []
    for pid, (c, n) in enumerate(releases + [(lie[NOISY_CORRECT], lie[NOISY_EXAMPLES])]):
        results.append((GridClientProxy(pid + 1, None, 0),
                        EvaluateRes(Status(Code.OK, ""), 0.0, 1, {NOISY_CORRECT: c, NOISY_EXAMPLES: n,
                                                                 "partition_id": pid})))
    _, metrics = strategy.aggregate_evaluate(1, results, [])
    # The pooled ratio would be ~1.0 (the liar's 10^9 "examples"); the median is an honest client's.
    assert 0.66 < metrics["accuracy"] < 0.75
    assert recorder.rounds[1]["evaluation_outliers"] == [str(ATTACKER)]


def test_a_claimed_epsilon_is_replaced_by_the_ledgers_and_flagged(tmp_path):
    recorder = RunRecorder(tmp_path, {}, privacy_unit="sample", delta=1e-5, num_rounds=2, echo=lambda s: None)
    cfg = compose(["attack=metric_poisoning"]).attack
    honest = {"cid": 0, "privacy_unit": "sample", "delta": 1e-5, "dp_history": [[1.0, 0.1, 20, 1]]}
    recorder.on_fit(1, [{**honest, "epsilon": None}], [], 0.0)
    truth = recorder.rounds[1]["clients"][0]["epsilon"]
    lying = {**honest, "dp_history": [[1.0, 0.1, 20, 1], [1.0, 0.1, 20, 2]]}
    lying.update(get_attack("metric_poisoning").report({"epsilon": truth}, cfg))
    recorder.on_fit(2, [lying], [], 0.0)
    info = recorder.rounds[2]["clients"][0]
    assert info["claimed_epsilon"] == 0.01
    assert info["epsilon"] > truth > 0.01


def test_summary_flags_non_finite_reports_and_keeps_honest_spread():
    summary = summarise({"a": 0.7, "b": 0.72, "c": float("nan"), "d": 0.69})
    assert summary.outliers == ("c",)
    assert summary.median == pytest.approx(0.7)
