"""The release policy (PRIVACY.md, fedlora/release.py): what a real client's reply
holds in each privacy mode, what a round publishes, what the server sends a client
after a resume, the declared training-set size, and the console filter."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, GetPropertiesRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedlora.client.numpy_client import LoRAClient
from fedlora.client.state import HISTORY_KEY
from fedlora.plan import build_plan_cached
from fedlora.privacy.release import (
    OPTIONAL_REPLY,
    REPLY_KEYS,
    ParticipationLogFilter,
    ReleasePolicy,
)
from strategies.fedlora_strategy import FedLoRAStrategy

PRIVACY_MD = Path(__file__).resolve().parents[3] / "PRIVACY.md"
MODES = [("none", False), ("none", True), ("sample", False), ("sample", True), ("client", False), ("client", True)]


def documented_reply_keys() -> dict[tuple[str, bool], set[str]]:
    """The reply keys PRIVACY.md lists: the common ones plus each mode's row."""
    text = PRIVACY_MD.read_text()
    common = text.split("Every reply:", 1)[1].split(";", 1)[0]
    base = set(re.findall(r"`([a-z_]+)`", common))
    out = {}
    for unit, secure, extra in re.findall(r"^\| (none|sample|client) \| (off|on) \| (.*) \|$", text, re.M):
        out[(unit, secure == "on")] = base | set(re.findall(r"`([a-z_]+)`", extra))
    return out


def test_privacy_md_lists_exactly_the_keys_the_policy_enforces():
    documented = documented_reply_keys()
    assert set(documented) == set(MODES)
    for mode in MODES:
        assert documented[mode] == set(REPLY_KEYS[mode]), mode


@pytest.mark.parametrize("unit,secure", MODES)
def test_a_real_client_sends_exactly_the_documented_keys(tiny_cfg, tmp_path, unit, secure):
    overrides = [f"privacy={unit}", f"secure={'secaggplus' if secure else 'none'}"]
    if unit == "client":
        overrides += ["privacy.delta=1e-3"]
    cfg = tiny_cfg(*overrides)
    client = LoRAClient(build_plan_cached(cfg), 0, tmp_path)
    delta, n, metrics = client.fit(client.get_parameters({}), {"server_round": 1, "experiment_id": "e"})
    assert set(metrics) == documented_reply_keys()[(unit, secure)]
    assert not set(metrics) & {"quantization_error", "secure_clipped"}
    if unit != "none":
        assert "train_loss" not in metrics  # computed in the clear on private data
    assert n == metrics["num_examples"] == (1 if unit == "client" else len(client.train_idx))


def test_optional_keys_are_labels_not_statistics():
    assert OPTIONAL_REPLY == {"attack", "declined", "reason", "history_refused", "lora_rank"}


def test_a_client_level_round_publishes_no_participant():
    record = {"round": 3, "accuracy": 0.7, "loss": 0.5, "epsilon": 1.2, "fit_recorded": True,
              "clients": [{"cid": 1}], "sampled": {"clients": [1], "method": "poisson"}, "failures": [],
              "num_accepted": 1, "num_rejected": 0, "bytes_up": 10, "bytes_down": 10, "aggregation_s": 0.01,
              "aggregation": {"updates": [1]},
              "client_dp": {"clipping_norm": 0.5, "noise_multiplier": 1.1, "sample_rate": 0.1, "clipped_updates": 1}}
    public, internal = ReleasePolicy("client").split_round(record)
    assert set(public) == {"round", "accuracy", "loss", "epsilon", "fit_recorded", "client_dp"}
    assert public["client_dp"] == {"clipping_norm": 0.5, "noise_multiplier": 1.1, "sample_rate": 0.1}
    assert internal["sampled"]["clients"] == [1] and internal["client_dp"] == {"clipped_updates": 1}
    assert ReleasePolicy("sample").split_round(record) == (record, {})


def test_the_declared_size_not_the_real_one_sets_q_steps_and_the_weight(tiny_cfg, tmp_path):
    """Unequal Dirichlet shards: under sample-level DP both clients report the declared
    size and plan with q = B / declared; without DP they report their real sizes."""
    skew = ["partition=dirichlet", "partition.alpha=0.3", "data.max_train_samples=120"]
    cfg = tiny_cfg(*skew)
    clients = [LoRAClient(build_plan_cached(cfg), pid, tmp_path) for pid in (0, 1)]
    real = [len(c.train_idx) for c in clients]
    assert real[0] != real[1]
    declared = 60 - round(0.1 * 60)  # mean shard of 120 rows over 2 clients, less validation
    params = clients[0].get_parameters({})
    for client in clients:
        _, n, m = client.fit(params, {"server_round": 1, "experiment_id": "sizes"})
        assert n == m["num_examples"] == declared
        assert m["sample_rate"] == pytest.approx(cfg.train.batch_size / declared)
    assert [LoRAClient(build_plan_cached(tiny_cfg(*skew, "privacy=none")), p, tmp_path).num_examples for p in (0, 1)] == real
    given = LoRAClient(build_plan_cached(tiny_cfg(*skew, "+privacy.declared_examples=40")), 0, tmp_path)
    assert given.num_examples == 40


class _Proxy(GridClientProxy):
    """A node that answers get_properties with its client id (as LoRAClient does)."""

    def __init__(self, node_id: int, pid: int) -> None:
        super().__init__(node_id, None, 0)
        self.pid = pid
        self.asked = 0

    def get_properties(self, ins, timeout, group_id):
        self.asked += 1
        return GetPropertiesRes(Status(Code.OK, ""), {"partition_id": self.pid})


def test_after_a_resume_each_client_gets_only_its_own_history_once():
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)], min_fit_clients=3, min_available_clients=3)
    strategy.pending_histories = {"0": [[1.1, 0.2, 5, 1]], "1": [[1.3, 0.4, 5, 1]], "2": [[0.9, 0.1, 5, 1]]}
    manager = SimpleClientManager()
    proxies = [_Proxy(100 + pid, pid) for pid in (0, 1, 2)]
    for proxy in proxies:
        manager.register(proxy)
    sent = strategy.configure_fit(2, ndarrays_to_parameters(strategy.global_arrays), manager)
    assert len(sent) == 3
    for proxy, ins in sent:
        assert json.loads(ins.config[HISTORY_KEY]) == strategy.pending_histories[str(proxy.pid)]
        assert not any(k for k in ins.config if k.startswith("dp_histories"))
    # Once a client replied it needs none again; node ids are asked only once.
    from flwr.common import FitRes

    for proxy in proxies:
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.zeros(3, np.float32)]), 1,
                     {"partition_id": proxy.pid})
        strategy.aggregate_fit(2, [(proxy, res)], [])
    again = strategy.configure_fit(3, ndarrays_to_parameters(strategy.global_arrays), manager)
    assert all(HISTORY_KEY not in ins.config for _, ins in again)
    assert all(p.asked == 1 for p in proxies)


@pytest.mark.parametrize("message,kept", [
    ("configure_fit: strategy sampled 7 clients (out of 10)", False),
    ("aggregate_fit: received 7 results and 1 failures", False),
    ("[Stage 0] Sending configurations to 5 clients.", False),
    ("round 3: rejected update from client 4: NaN", False),
    ("round 3: client-level DP-FedAvg released, noise std on the mean 0.061", True),
    ("[ROUND 3]", True),
])
def test_the_console_filter_drops_lines_that_count_or_name_participants(message, kept):
    record = logging.LogRecord("flwr", logging.INFO, __file__, 1, message, None, None)
    assert ParticipationLogFilter().filter(record) is kept
