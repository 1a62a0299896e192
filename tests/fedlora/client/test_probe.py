import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from opacus.accountants import RDPAccountant

from fedlora.client.numpy_client import LoRAClient
from fedlora.client.training import train_probe
from fedlora.core.errors import ConfigError
from fedlora.plan import build_plan_cached
from strategies.preflight import preflight


def test_probe_gradient_is_the_autograd_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 3)
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    ref = torch.nn.Linear(6, 3)
    ref.load_state_dict(head.state_dict())
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    before = [p.detach().clone() for p in head.parameters()]
    cfg = OmegaConf.create({"lr": 1.0, "head_lr": None, "momentum": 0.0, "batch_size": 20})
    stats = train_probe(head, x, y, cfg, None, 1, torch.Generator().manual_seed(0))
    assert stats.steps == 1 and stats.examples_seen == 20
    for b, p, r in zip(before, head.parameters(), ref.parameters()):
        torch.testing.assert_close(b - p.detach(), r.grad, rtol=1e-5, atol=1e-6)


def test_dp_probe_moves_only_the_head_and_is_accounted(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model.pooling=mean", "train.probe_steps=5", "train.local_steps=0")
    client = LoRAClient(build_plan_cached(cfg), 0, tmp_path)
    params = client.get_parameters({})
    names = client._bundle().names
    delta, _, metrics = client.fit(params, {"server_round": 1})
    assert metrics["steps"] == metrics["probe_steps"] == 5
    moved = {n for n, d in zip(names, delta) if np.abs(d).max() > 0}
    assert moved and all("classifier" in n for n in moved), moved
    acc = RDPAccountant()
    for _ in range(5):
        acc.step(noise_multiplier=metrics["noise_multiplier"], sample_rate=metrics["sample_rate"])
    assert metrics["epsilon"] == pytest.approx(acc.get_epsilon(cfg.privacy.delta), rel=1e-9)


def test_probe_then_fine_tune_counts_both(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model.pooling=mean", "train.probe_steps=4", "train.local_steps=2")
    client = LoRAClient(build_plan_cached(cfg), 1, tmp_path)
    delta, _, metrics = client.fit(client.get_parameters({}), {"server_round": 1})
    assert metrics["steps"] == 6 and metrics["probe_steps"] == 4 and metrics["total_steps"] == 6
    names = client._bundle().names
    assert any(np.abs(d).max() > 0 for n, d in zip(names, delta) if "lora_B" in n)


def test_probe_needs_mean_pooling(tiny_cfg):
    with pytest.raises(ConfigError) as err:
        preflight(tiny_cfg("train.probe_steps=3"))
    assert err.value.setting == "train.probe_steps"
