import numpy as np
import pytest
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant

from fedlora.client.numpy_client import LoRAClient
from fedlora.data.sources import load_task_data_cached
from fedlora.models.lora import get_arrays
from fedlora.plan import build_plan_cached
from fedlora.tasks.runtime import get_bundle


def test_client_accountant_persists_across_rounds(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    task = load_task_data_cached(cfg.data, cfg.seed)
    bundle = get_bundle(cfg, task.num_labels)
    global_arrays = get_arrays(bundle.model, bundle.names)
    reference = RDPAccountant()
    epsilons = []
    for rnd in (1, 2, 3):
        # A fresh client object each round, as Flower builds one per message: only its
        # spend record on disk carries the accountant.
        client = LoRAClient(build_plan_cached(cfg), 0, tmp_path)
        delta, n, metrics = client.fit(global_arrays, {"server_round": rnd, "experiment_id": "e1"})
        assert n == len(client.train_idx)
        assert metrics["steps"] == cfg.train.local_steps
        for _ in range(metrics["steps"]):
            reference.step(noise_multiplier=metrics["noise_multiplier"], sample_rate=metrics["sample_rate"])
        assert metrics["epsilon"] == pytest.approx(reference.get_epsilon(cfg.privacy.delta), rel=1e-9)
        assert metrics["total_steps"] == rnd * cfg.train.local_steps
        epsilons.append(metrics["epsilon"])
        assert [d.shape for d in delta] == [g.shape for g in global_arrays]
        b_moved = [np.abs(d).max() > 0 for d, name in zip(delta, bundle.names) if "lora_B" in name]
        assert all(b_moved), "LoRA B did not move under DP-SGD"
    assert epsilons[0] < epsilons[1] < epsilons[2] <= cfg.privacy.target_epsilon + 1e-9


def test_client_without_dp_reports_no_epsilon(tiny_cfg, tmp_path):
    cfg = tiny_cfg("privacy=none")
    client = LoRAClient(build_plan_cached(cfg), 1, tmp_path)
    params = client.get_parameters({})
    delta, n, metrics = client.fit(params, {"server_round": 1})
    assert "epsilon" not in metrics
    assert metrics["privacy_unit"] == "none"
    assert any(np.abs(d).max() > 0 for d in delta)
    loss, n_val, m = client.evaluate(params, {})
    assert n_val == len(client.val_idx) > 0
    assert 0.0 <= m["accuracy"] <= 1.0 and np.isfinite(loss)


def test_clients_hold_disjoint_shards(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    a = LoRAClient(build_plan_cached(cfg), 0, tmp_path)
    b = LoRAClient(build_plan_cached(cfg), 1, tmp_path)
    rows = [set(a.train_idx), set(a.val_idx), set(b.train_idx), set(b.val_idx)]
    assert sum(len(r) for r in rows) == cfg.data.max_train_samples
    assert len(set().union(*rows)) == cfg.data.max_train_samples


def test_client_trains_on_its_own_data_path(tiny_cfg, tmp_path):
    """A SuperNode started with --node-config "partition-id=1 data-path=<file>" trains on
    that file, its labels mapped to the configured task's classes."""
    from fedlora.client.numpy_client import make_client_fn

    cfg = tiny_cfg("privacy=none")
    task = load_task_data_cached(cfg.data, cfg.seed)
    rows = task.test.select(range(30))  # stands in for a data holder's own file
    path = tmp_path / "mine.csv"
    names = task.label_names
    # The configured columns (finefood: review, score) and its class names.
    path.write_text(f"{cfg.data.text_column},{cfg.data.label_column}\n" + "".join(
        f"\"{t.replace(chr(34), '')}\",{names[y]}\n" for t, y in zip(rows["text"], rows["label"])))
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "data-path": str(path),
                                                    "state-dir": str(tmp_path / "state")},
                  state=RecordDict(), run_config={})
    client = make_client_fn(build_plan_cached(cfg))(ctx).numpy_client
    assert len(client.train_idx) + len(client.val_idx) == 30
    assert client.task.train["label"] == rows["label"]
    bundle = get_bundle(cfg, task.num_labels)
    delta, n, metrics = client.fit(get_arrays(bundle.model, bundle.names), {"server_round": 1})
    assert n == len(client.train_idx) and metrics["partition_id"] == 1
