import pytest
import torch
from opacus import GradSampleModule

from fedlora.client.training import DPGenerators, train_dp
from fedlora.privacy import DPPlan


@pytest.fixture
def dp_steps():
    """``steps`` Opacus DP-SGD steps of the clients' ``train_dp`` on ``data`` (Poisson rate
    ``sample_rate``, expected batch ``batch``, sigma 0.5, C 1), with seeded generators."""

    def run(model, data, train_cfg, loss, steps: int, sample_rate: float, batch: int):
        plan = DPPlan(sample_rate=sample_rate, noise_multiplier=0.5, steps_per_round=steps, expected_batch_size=batch,
                      probe_steps=0, planned_rounds=1, max_grad_norm=1.0, target_epsilon=8.0, delta=1e-5,
                      accountant="rdp")
        gsm = GradSampleModule(model)
        gens = DPGenerators(noise=torch.Generator().manual_seed(1), sampling=torch.Generator().manual_seed(2))
        try:
            return train_dp(gsm, data, train_cfg, plan, steps, gens, loss)
        finally:
            gsm._close()

    return run
