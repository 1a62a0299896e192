"""Privacy leakage analysis of a finished run: what an attacker with the final model can
learn (membership inference) and an empirical lower bound on epsilon from canaries
inserted into one training run (``python -m fedlora.leakage <run dir>``)."""
