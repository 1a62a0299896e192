import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# W&B tracking is on by default; tests never reach wandb.ai.
os.environ.setdefault("WANDB_MODE", "offline")
# The audit log's initial keys and current-key state go to a folder of this test session,
# not the user's ~/.fedlora (subprocesses inherit it).
_AUDIT_HOME = __import__("tempfile").mkdtemp(prefix="fedlora-test-audit-")
__import__("atexit").register(__import__("shutil").rmtree, _AUDIT_HOME, True)
for _name, _env in (("keys", "FEDLORA_AUDIT_KEY"), ("state", "FEDLORA_AUDIT_STATE")):
    os.makedirs(os.path.join(_AUDIT_HOME, _name), exist_ok=True)  # a folder: one key file per run
    os.environ.setdefault(_env, os.path.join(_AUDIT_HOME, _name))

import pytest  # noqa: E402

from fedlora.core.config import compose  # noqa: E402

TINY = [
    "model=tiny_bert",
    "data.max_train_samples=120",
    "data.max_test_samples=40",
    "federation.num_clients=2",
    "federation.rounds=3",
    "train.batch_size=16",
    "train.local_steps=2",
    "train.probe_steps=0",
]


@pytest.fixture
def tiny_cfg():
    """A composed config for a tiny random BERT on a few fine-food reviews."""

    def make(*overrides: str):
        return compose(TINY + list(overrides))

    return make
