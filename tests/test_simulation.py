"""End to end: the real packaged MiniLM in a real Flower simulation (Ray backend)."""

import json
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel

from fedlora.data import load_task_data
from fedlora.models import load_base_model, load_tokenizer
from fedlora.training import evaluate, tokenize

pytestmark = pytest.mark.integration

STARTED = {}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    cmd = [
        sys.executable, "-m", "simulations.run",
        "federation.num_clients=2", "federation.rounds=2",
        "data.max_train_samples=48", "data.max_test_samples=24",
        "model.max_length=48", "train.batch_size=8", "train.local_steps=2",
        f"hydra.run.dir={out}",
    ]
    STARTED["time"] = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FINAL test accuracy" in proc.stdout
    return out


def test_results_json_is_complete(run_dir):
    res = json.loads((run_dir / "results.json").read_text())
    assert res["config"]["federation"]["num_clients"] == 2
    rounds = {r["round"]: r for r in res["rounds"]}
    assert set(rounds) == {0, 1, 2}
    eps_prev = 0.0
    for rnd in (1, 2):
        r = rounds[rnd]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0
        assert len(r["clients"]) == 2
        for c in r["clients"]:
            assert c["accepted"] is True
            per_round = 2 + res["config"]["train"]["probe_steps"]
            assert c["steps"] == per_round and c["probe_steps"] == res["config"]["train"]["probe_steps"]
            assert 0 < c["sample_rate"] <= 1 and c["noise_multiplier"] > 0
            assert c["total_steps"] == per_round * rnd
        assert r["epsilon"] > eps_prev
        eps_prev = r["epsilon"]
    final = res["final"]
    assert final["rounds_completed"] == 2
    assert final["epsilon"] == pytest.approx(eps_prev)
    assert final["epsilon"] <= res["config"]["privacy"]["target_epsilon"] + 1e-9
    assert final["delta"] == res["config"]["privacy"]["delta"]
    assert final["accuracy"] == rounds[2]["accuracy"]
    assert (run_dir / "config.yaml").is_file()


def test_adapter_reloads_with_peft_and_gives_the_reported_accuracy(run_dir):
    res = json.loads((run_dir / "results.json").read_text())
    cfg = OmegaConf.create(res["config"])
    tokenizer = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model, 2, tokenizer, seed=123)
    fresh_head = base.classifier.weight.detach().clone()
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    task = load_task_data(cfg.data, cfg.seed)
    data = tokenize(task.test, tokenizer, cfg.model.max_length)
    loss, acc = evaluate(model, data, cfg.train.eval_batch_size, cfg.train.precision)
    assert acc == pytest.approx(res["final"]["accuracy"], abs=1e-9)
    assert loss == pytest.approx(res["final"]["loss"], rel=1e-4)
    # The head came from the adapter, not from the (differently seeded) fresh base.
    assert not torch.equal(model.base_model.model.classifier.modules_to_save["default"].weight, fresh_head)


def test_ledger_recomputes_the_reported_epsilon_and_plot_exists(run_dir, capsys):
    from fedlora.privacy.ledger import PrivacyLedger
    from fedlora.privacy.report import main as report_main

    res = json.loads((run_dir / "results.json").read_text())
    ledger = PrivacyLedger.from_dict(res["privacy_ledger"])
    assert len(ledger.entries) == 4  # 2 clients x 2 rounds
    for cid, eps in res["final"]["client_epsilon"].items():
        assert ledger.epsilon(cid, res["config"]["privacy"]["accountant"]) == pytest.approx(eps, rel=1e-9)
    by_acc = res["final"]["epsilon_by_accountant"]
    assert by_acc["rdp"] == pytest.approx(res["final"]["epsilon"]) and by_acc["prv"] < by_acc["rdp"]
    assert (run_dir / "epsilon.png").stat().st_size > 1000
    assert report_main(["--run-dir", str(run_dir)]) == 0
    assert "| 0 | sample-level | 2 |" in capsys.readouterr().out


def test_no_ray_process_left_behind(run_dir):
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    # Ray services of this environment (another checkout's runs are not ours to judge).
    leftovers = [line for line in out.splitlines()
                 if ("raylet" in line or "gcs_server" in line) and sys.prefix in line]
    assert not leftovers, leftovers


def test_tracked_offline_in_wandb_and_no_wandb_process_left(run_dir):
    import psutil

    res = json.loads((run_dir / "results.json").read_text())
    where = res["tracking"]["wandb"]
    assert where["mode"] == "offline" and where["dir"].startswith(str(run_dir / "wandb" / "offline-run-"))
    assert next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")).stat().st_size > 0
    for r in res["rounds"][1:]:
        assert r["bytes_up"] > 0 and r["bytes_down"] >= r["bytes_up"] // 2
    # wandb's service process watches the process that started it (--pid); one of this
    # run's still alive after that process exited would be left behind.
    leftovers = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmd = proc.info["cmdline"] or []
        if any("wandb-core" in part for part in cmd) and "--pid" in cmd and proc.info["create_time"] >= STARTED["time"]:
            if not psutil.pid_exists(int(cmd[cmd.index("--pid") + 1])):
                leftovers.append(" ".join(cmd))
    assert not leftovers, leftovers
