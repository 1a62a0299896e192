"""Hydra entry points for simulation runs."""
