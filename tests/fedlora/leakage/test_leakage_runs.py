"""``python -m fedlora.leakage`` on real Flower simulations of the tiny model, with
canaries: without DP and with enough local training to memorise, the attacks detect
leakage; with DP at eps 1 and 8 the empirical lower bound stays below the accountant's
eps. The memorising settings are ``experiment=memorise``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

pytestmark = pytest.mark.integration

# conf/experiment/memorise.yaml: a tiny model, 200 canaries, long local training.
MEMORISE = ["experiment=memorise"]


def simulate(run_dir, *overrides):
    cmd = [sys.executable, "-m", "simulations.run", *MEMORISE, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def leakage(run_dir, *args):
    proc = subprocess.run([sys.executable, "-m", "fedlora.leakage", str(run_dir), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((run_dir / "leakage.json").read_text())


@pytest.fixture(scope="module")
def no_dp(tmp_path_factory):
    run_dir = simulate(tmp_path_factory.mktemp("nodp"), "privacy=none", "tracking=none")
    return (*leakage(run_dir), run_dir)


def test_without_dp_the_attacks_detect_memorisation(no_dp):
    out, leak, _ = no_dp
    mia = leak["membership_inference"]
    assert mia["loss_threshold"]["auc"] > 0.58 and mia["reference_calibrated"]["auc"] > 0.58
    assert mia["loss_threshold"]["members"] == mia["loss_threshold"]["non_members"] == 100
    assert mia["mean_loss_members"] < mia["mean_loss_non_members"]
    audit = leak["canary_audit"]
    assert audit["canaries"] == 200 and 70 < audit["included"] < 130
    assert audit["epsilon_lower_bound"] > 0.25 and audit["correct"] > audit["guesses"] / 2
    assert audit["epsilon_lower_bound"] <= audit["max_certifiable"]
    assert leak["accountant"]["epsilon"] is None and leak["accountant"]["privacy_unit"] == "no DP"
    # The table printed and written puts the bound beside the accountant's eps.
    assert "one-run canary audit" in out and "infinity (no DP)" in out
    assert f"{audit['epsilon_lower_bound']:.3f}" in (out.split("\n\n")[0])


@pytest.mark.parametrize("eps", [1, 8])
def test_under_dp_the_empirical_bound_stays_below_the_accountants_epsilon(tmp_path, eps):
    tracking = "tracking=wandb" if eps == 8 else "tracking=none"
    run_dir = simulate(tmp_path, "privacy=sample", f"privacy.target_epsilon={eps}", tracking)
    out, leak = leakage(run_dir)
    accountant = leak["accountant"]
    assert accountant["privacy_unit"] == "sample" and accountant["epsilon"] == pytest.approx(eps, abs=0.01)
    assert leak["canary_audit"]["epsilon_lower_bound"] <= accountant["epsilon"]
    assert (run_dir / "leakage.md").read_text().startswith("| attack |")
    if eps == 8:  # tracked runs get a W&B run of the analysis beside theirs (offline here)
        assert "job_type leakage-audit" in out
        runs = list((run_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 2  # the training run's and the analysis's


def test_bad_input_names_what_to_change(tmp_path, no_dp):
    bad = subprocess.run([sys.executable, "-m", "fedlora.leakage", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "run dir" in bad.stderr and "adapter" in bad.stderr
    # A run without canaries: membership inference only, and the note says how to audit.
    run_dir = no_dp[2]
    plain = tmp_path / "plain"
    shutil.copytree(run_dir, plain)
    cfg = OmegaConf.load(plain / "config.yaml")
    cfg.audit.canaries = 0
    OmegaConf.save(cfg, plain / "config.yaml")
    out, leak = leakage(plain, "--examples", "20")
    assert leak["canary_audit"] is None and "audit.canaries=m" in out
    assert leak["membership_inference"]["loss_threshold"]["members"] == 20


def test_causal_lm_canaries_are_secrets_with_their_exposure(tmp_path):
    """The causal-LM task on a tiny random Llama: the canaries are secrets the clients
    train on, and the analysis ranks each among other secrets (exposure in bits)."""
    cmd = [sys.executable, "-m", "simulations.run", "experiment=lm", "model=tiny_llama", "data=finefood_instruct",
           "model.frozen_prefix_dir=null", "data.max_train_samples=80", "data.max_test_samples=8",
           "federation.num_clients=2", "federation.rounds=1", "federation.client_resources.num_cpus=2",
           "privacy=none", "train.local_steps=5", "train.batch_size=8", "model.generation.examples=0",
           "audit.canaries=6", "audit.max_fraction=0.2", "tracking=none", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out, leak = leakage(tmp_path, "--examples", "8", "--exposure-candidates", "7")
    audit = leak["canary_audit"]
    assert audit["canaries"] == 6 and audit["guesses"] >= 2
    exposure = audit["exposure"]
    assert exposure["candidates"] == 7 and exposure["max_bits"] == 3.0
    for key in ("mean_included", "mean_excluded"):
        assert exposure[key] is None or 0.0 <= exposure[key] <= 3.0
    assert "secret-sharer exposure" in out
