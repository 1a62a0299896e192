import pytest

from fedlora.core.errors import ConfigError
from strategies.preflight import preflight


@pytest.mark.parametrize(
    "overrides, setting, text",
    [
        (["privacy.target_epsilon=0"], "privacy.target_epsilon", "must be > 0"),
        (["privacy.target_epsilon=-2"], "privacy.target_epsilon", "must be > 0"),
        (["privacy.delta=1.5"], "privacy.delta", "(0, 1)"),
        (["privacy.delta=0"], "privacy.delta", "(0, 1)"),
        (["privacy.target_epsilon=0.01", "federation.rounds=50"], "privacy.target_epsilon",
         "privacy.max_noise_multiplier"),
        (["federation.num_clients=1"], "federation.num_clients", "min_fit_clients"),
        (["federation.num_clients=200", "federation.min_fit_clients=1",
          "federation.min_available_clients=1", "federation.min_evaluate_clients=1"],
         "federation.num_clients", "only 120 training examples"),
        (["federation.rounds=0"], "federation.rounds", ">= 1"),
        (["federation.fraction_fit=0"], "federation.fraction_fit", "(0, 1]"),
        (["model.name_or_path=/no/such/model"], "model.name_or_path", "cannot load"),
        (["model.name_or_path=package:no_such_package"], "model.name_or_path", "not installed"),
        (["data.text_column=body"], "data.text_column", "'body' not found"),
        (["federation.client_resources.num_cpus=64"], "federation.client_resources.num_cpus", "CPUs"),
        (["privacy=client", "strategy=krum"], "strategy", "no sensitivity bound"),
        (["privacy=client", "privacy.delta=0.6"], "privacy.delta", "1/#clients"),
        (["strategy=krum", "strategy.num_malicious=1"], "strategy", "n >= 2f+3"),
        (["strategy=bulyan", "strategy.num_malicious=1", "federation.num_clients=6"], "strategy", "n >= 4f+3"),
        (["strategy=trimmed_mean", "strategy.params.beta=0.5"], "strategy", "beta"),
        (["federation.round_timeout_s=0"], "federation.round_timeout_s", "> 0 seconds"),
        (["federation.over_selection=-0.1"], "federation.over_selection", ">= 0"),
        (["federation.over_selection=0.5"], "federation.over_selection", "more than the federation's 2"),
        (["federation.over_selection=0.3", "privacy=client"], "federation.over_selection", "Poisson"),
        (["federation.over_selection=0.3", "federation.num_clients=6", "federation.fraction_fit=0.5",
          "federation.selection=power_of_choice"], "federation.over_selection", "selection=uniform"),
        (["federation.round_timeout_s=30", "secure=secaggplus"], "federation.round_timeout_s", "secure.timeout"),
        (["federation.profiles=[{speed:1,dropout:1}]"], "federation.profiles", "dropout must lie in [0, 1)"),
        (["federation.profiles=[{diurnal:{period:24,low:0.5,high:0.2}}]"], "federation.profiles", "low <= high"),
        (["federation.profiles=[{availability:0.5,diurnal:{period:24}}]"], "federation.profiles", "not both"),
        (["strategy.aggregator=no_such_rule"], "strategy.aggregator", "unknown aggregator"),
        (["strategy.norm_bound=-1"], "strategy.norm_bound", "> 0"),
        (["attack=sign_flip", "attack.clients=[5]"], "attack.clients", "do not exist"),
        (["+federation.client_ranks=[2,64]"], "federation.client_ranks", "at most 32"),
        (["lora.r=64"], "lora.r", "at most 32"),
        (["+federation.client_ranks=[2,4]", "secure=secaggplus"], "federation.client_ranks", "one length"),
        (["+federation.client_ranks=[2,4]", "lora.freeze_a=true"], "federation.client_ranks", "freeze_a=false"),
        (["+federation.client_ranks=[2,4]", "attack=alie"], "federation.client_ranks", "colluding"),
        (["+federation.client_ranks=[2,4]", "lora.aggregation=svd", "strategy=median", "strategy.num_malicious=0"],
         "lora.aggregation",
         "strategy=fedavg"),
        (["+federation.client_ranks=[2,4]", "lora.aggregation=svd", "privacy=client"], "lora.aggregation",
         "Gaussian mechanism"),
        (["lora.adaptive_energy=0.9", "strategy.server_optimizer=fedadam"], "strategy.server_optimizer",
         "refactor"),
        (["lora.self_pruning=0.05", "privacy=client"], "lora.self_pruning", "client-level"),
        (["lora.adaptive_energy=0.9", "strategy=centered_clipping"], "lora.adaptive_energy", "stateless"),
    ],
)
def test_bad_input_stops_before_the_federation(tiny_cfg, overrides, setting, text):
    with pytest.raises(ConfigError) as err:
        preflight(tiny_cfg(*overrides))
    assert err.value.setting == setting
    assert text in str(err.value)


def test_preflight_plans_every_client(tiny_cfg):
    plan = preflight(tiny_cfg("federation.num_clients=3"))
    assert plan.num_clients == 3 and sum(len(c.train_indices) for c in plan.clients) <= 120
    for client in plan.clients:
        assert client.dp.planned_epsilon <= 8.0 + 1e-9
        assert client.dp.planned_rounds == 3


def test_unknown_model_message_from_the_cli(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", "model.name_or_path=/no/such/model",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "error: model.name_or_path" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_aggregator_by_hydra_target_or_dotted_path(tiny_cfg):
    from strategies.aggregators import median
    from strategies.fedlora_strategy import FedLoRAStrategy
    from strategies.preflight import aggregator_name

    for override in ("strategy.aggregator={_target_:strategies.aggregators.median}",
                     "strategy.aggregator=strategies.aggregators.median"):
        cfg = tiny_cfg(override)
        name = aggregator_name(cfg.strategy)
        assert FedLoRAStrategy(initial_arrays=[], aggregator=name).aggregate is median
    with pytest.raises(ConfigError) as err:
        preflight(tiny_cfg("strategy.aggregator={_target_:no.such.rule}"))
    assert err.value.setting == "strategy.aggregator"
