"""FedProx's proximal step (Li et al. 2020) and its effect on a real client's update."""

import numpy as np
import pytest
import torch

from fedlora.client.numpy_client import LoRAClient
from fedlora.client.proximal import ProximalStep
from fedlora.plan import build_plan_cached


def test_the_step_is_the_exact_proximal_operator():
    w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    prox = ProximalStep(opt, mu=0.4)  # anchor = [2, -1]
    with torch.no_grad():
        w.copy_(torch.tensor([4.0, 1.0]))
    prox()
    # argmin_v mu/2 |v - a|^2 + 1/(2 eta) |v - w|^2 = (w + eta mu a) / (1 + eta mu)
    expected = (torch.tensor([4.0, 1.0]) + 0.2 * torch.tensor([2.0, -1.0])) / 1.2
    torch.testing.assert_close(w.detach(), expected)


def _delta(tiny_cfg, tmp_path, start, *overrides):
    client = LoRAClient(build_plan_cached(tiny_cfg("privacy=none", "train.optimizer=sgd", "train.momentum=0",
                                                   *overrides)), 0, tmp_path)
    if start is None:
        return client.get_parameters({})
    delta, _, _ = client.fit([p.copy() for p in start], {"server_round": 1, "experiment_id": "e"})
    return np.concatenate([d.ravel() for d in delta])


def test_a_stronger_pull_keeps_the_client_closer_to_the_global_adapter(tiny_cfg, tmp_path):
    start = [p.copy() for p in _delta(tiny_cfg, tmp_path, None)]
    free = _delta(tiny_cfg, tmp_path, start, "train.proximal_mu=0")
    again = _delta(tiny_cfg, tmp_path, start, "train.proximal_mu=0")
    pulled = _delta(tiny_cfg, tmp_path, start, "train.proximal_mu=2.0")
    np.testing.assert_allclose(free, again, rtol=1e-5, atol=1e-7)  # mu = 0 is plain local training
    assert 0 < np.linalg.norm(pulled) < 0.9 * np.linalg.norm(free)


def test_a_negative_mu_is_refused():
    with pytest.raises(ValueError, match="train.proximal_mu"):
        ProximalStep(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), mu=-1)
