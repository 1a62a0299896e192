"""Differential-privacy calibration and accounting (pure math, no Flower)."""

from fedlora.privacy.accounting import epsilon_from_history, make_accountant
from fedlora.privacy.calibration import DPPlan, local_steps, plan_sample_dp, probe_steps

__all__ = ["DPPlan", "epsilon_from_history", "local_steps", "make_accountant", "plan_sample_dp", "probe_steps"]
