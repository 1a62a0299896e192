"""End to end: the real packaged MiniLM in a real Flower simulation (Ray backend)."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel

from fedlora.data import load_task_data
from fedlora.privacy import epsilon_from_history
from fedlora.tasks import get_task

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
        # One backend actor with both cores: on a 2-core machine one process importing
        # the model stack instead of two.
        "federation.client_resources.num_cpus=2",
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
    classification = get_task(cfg.model)
    tokenizer, base = classification.load(cfg.model, 2, seed=123)
    fresh_head = base.classifier.weight.detach().clone()
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    task = load_task_data(cfg.data, cfg.seed)
    data = classification.encode(task.test, tokenizer, cfg.model)
    metrics = classification.evaluate(model, data, cfg.train.eval_batch_size, cfg.train.precision)
    loss, acc = metrics["loss"], metrics["accuracy"]
    assert acc == pytest.approx(res["final"]["accuracy"], abs=1e-9)
    assert loss == pytest.approx(res["final"]["loss"], rel=1e-4)
    # The head came from the adapter, not from the (differently seeded) fresh base.
    assert not torch.equal(model.base_model.model.classifier.modules_to_save["default"].weight, fresh_head)


def test_ledger_recomputes_the_reported_epsilon_and_plot_exists(run_dir, capsys):
    from fedlora.privacy.ledger import PrivacyLedger
    from fedlora.privacy.report import main as report_main

    res = json.loads((run_dir / "results.json").read_text())
    ledger = PrivacyLedger.from_dict(res["privacy_ledger"])
    assert len(ledger.entries) == 8  # 2 clients x 2 rounds x (DP-SGD, noisy evaluation)
    for cid, eps in res["final"]["client_epsilon"].items():
        assert ledger.epsilon(cid, res["config"]["privacy"]["accountant"]) == pytest.approx(eps, rel=1e-9)
    by_acc = res["final"]["epsilon_by_accountant"]
    assert by_acc["rdp"] == pytest.approx(res["final"]["epsilon"]) and by_acc["prv"] < by_acc["rdp"]
    assert (run_dir / "epsilon.png").stat().st_size > 1000
    assert report_main(["--run-dir", str(run_dir)]) == 0
    assert "| 0 | sample-level | 2 | 4 |" in capsys.readouterr().out


def test_clients_evaluate_through_noisy_counts_in_the_ledger(run_dir):
    """The default privacy.evaluation=dp: each round's federated accuracy comes from
    noisy counts, every release is a ledger entry of the Gaussian mechanism (q = 1, one
    step), each client's epsilon composes both kinds, and the audit log and the model
    card say so."""
    from fedlora.record.audit import verify_audit

    res = json.loads((run_dir / "results.json").read_text())
    assert res["final"]["evaluation"] == {"mode": "dp", "covered": True}
    for r in res["rounds"][1:]:
        fed = r["federated_evaluation"]
        assert fed["mode"] == "dp" and fed["loss"] is None and fed["clients"] == 2
        assert fed["accuracy"] is None or 0.0 <= fed["accuracy"] <= 1.0
    entries = res["privacy_ledger"]["entries"]
    evals = [e for e in entries if e["sample_rate"] == 1.0 and e["steps"] == 1]
    assert sorted((e["client"], e["round"]) for e in evals) == [("0", 1), ("0", 2), ("1", 1), ("1", 2)]
    sigma = {e["noise_multiplier"] for e in evals}
    assert len(sigma) == 1 and sigma.pop() > 0
    for cid, eps in res["final"]["client_epsilon"].items():
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries if e["client"] == cid]
        assert len(history) == 4 and eps == pytest.approx(epsilon_from_history(history, 1e-5))
        assert eps <= res["config"]["privacy"]["target_epsilon"]
    audit = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    lines = [a for a in audit if a["event"] == "federated_evaluation"]
    assert [a["round"] for a in lines] == [1, 2] and all(a["mode"] == "dp" for a in lines)
    last = lines[-1]["privacy"]["clients"]
    assert {c: v["epsilon_after"] for c, v in last.items()} == pytest.approx(res["final"]["client_epsilon"])
    assert verify_audit(run_dir / "audit.jsonl") == []
    assert "Gaussian-noised counts" in (run_dir / "adapter" / "README.md").read_text()


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


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(marker: str) -> str:
    """The README's python code block that contains ``marker`` (what users copy)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return next(b for b in blocks if marker in b)


def _test_split_csv(cfg, path: Path) -> Path:
    task = load_task_data(cfg.data, cfg.seed)
    pd.DataFrame({"text": task.test["text"], "label": [task.label_names[y] for y in task.test["label"]]}).to_csv(
        path, index=False)
    return path


def test_the_readme_lines_load_the_run_and_rescore_its_accuracy(run_dir, tmp_path):
    """Exactly the README's lines (`load_run`), then the test split re-scored, and the
    `python -m fedlora.predict --file` command, both give the reported accuracy."""
    res = json.loads((run_dir / "results.json").read_text())
    cfg = OmegaConf.create(res["config"])
    scope: dict = {}
    exec(readme_block("load_run(").replace("outputs/2026-12-01/10-00-00", str(run_dir)), scope)
    classification = get_task(cfg.model)
    data = classification.encode(load_task_data(cfg.data, cfg.seed).test, scope["tokenizer"], cfg.model)
    metrics = classification.evaluate(scope["model"], data, cfg.train.eval_batch_size, cfg.train.precision)
    assert metrics["accuracy"] == pytest.approx(res["final"]["accuracy"], abs=1e-9)
    assert scope["labels"] == res["final"]["label_names"]
    csv = _test_split_csv(cfg, tmp_path / "test.csv")
    out = subprocess.run([sys.executable, "-m", "fedlora.predict", str(run_dir), "--file", str(csv),
                          "--text-column", "text", "--label-column", "label"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    # predict pads each batch to its own longest row: the same predictions, so the same accuracy.
    reported = float(out.stdout.strip().splitlines()[-1].split()[1])
    assert reported == pytest.approx(res["final"]["accuracy"], abs=1.5 / len(data))
    card = (run_dir / "adapter" / "README.md").read_text()
    assert "## Differential privacy" in card and "## How to load" in card and "load_run" in card
    assert "[More Information Needed]" not in card


def test_with_the_architectures_own_head_stock_peft_loads_the_adapter(tmp_path):
    """model.pooling=model: the README's stock transformers + PEFT lines load the run's
    adapter and re-score the test split to the reported accuracy."""
    cmd = [sys.executable, "-m", "simulations.run", "model.pooling=model", "train.probe_steps=0",
           "federation.num_clients=2", "federation.rounds=1", "data.max_train_samples=48",
           "data.max_test_samples=24", "model.max_length=48", "train.batch_size=8", "train.local_steps=2",
           "federation.client_resources.num_cpus=2", "tracking=none", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    cfg = OmegaConf.create(res["config"])
    scope: dict = {}
    exec(readme_block("PeftConfig.from_pretrained").replace("outputs/2026-12-01/10-00-00", str(tmp_path)), scope)
    classification = get_task(cfg.model)
    data = classification.encode(load_task_data(cfg.data, cfg.seed).test, scope["tokenizer"], cfg.model)
    metrics = classification.evaluate(scope["model"], data, cfg.train.eval_batch_size, cfg.train.precision)
    assert metrics["accuracy"] == pytest.approx(res["final"]["accuracy"], abs=1e-9)
    assert metrics["loss"] == pytest.approx(res["final"]["loss"], rel=1e-4)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"]  # names the base, so stock loaders find it
    assert "AutoModelForSequenceClassification" in (tmp_path / "adapter" / "README.md").read_text()
