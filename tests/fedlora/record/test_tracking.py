"""W&B tracking: a real offline run fed with round records, read back from its .wandb file."""

import json
import struct
from pathlib import Path

import numpy as np
import psutil
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from omegaconf import OmegaConf

from fedlora.core.errors import ConfigError
from fedlora.privacy import epsilon_from_history
from fedlora.record.audit import AuditTrail
from fedlora.record.results import RunRecorder
from fedlora.record.tracking import (
    attach_tracking,
    check_tracking,
    client_epsilon_rows,
    resolve_mode,
    round_metrics,
)
from strategies.fedlora_strategy import FedLoRAStrategy
from strategies.triage import payload_bytes


# -- reading an offline run back ---------------------------------------------------------
def wandb_records(path: Path):
    """The records of a .wandb file: LevelDB log framing (32 KiB blocks, 7-byte chunk
    headers) after a 7-byte W&B header, each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def history(records) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = rows.setdefault(r.history.step.num, {})
            for item in r.history.item:
                row["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return rows


def wandb_processes() -> list[str]:
    """wandb service processes started by this test process."""
    return [p.name() for p in psutil.Process().children(recursive=True) if "wandb" in " ".join(p.cmdline())]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline, with W&B's cache and staging inside tmp_path instead of the home dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


def _cfg(**tracking):
    return OmegaConf.create({
        "tracking": {"backend": "wandb", "project": "test", "mode": None, "progress": "plain",
                     "group": None, "name": None, "tags": [], "log_adapter": True, "dir": None, **tracking},
        "federation": {"num_clients": 2, "rounds": 2},
        "privacy": {"unit": "sample", "delta": 1e-5},
        "model": {"name_or_path": "tiny"},
    })


SIGMA = {0: 2.0, 1: 1.5}  # client 1 adds less noise: the larger epsilon


def _eps(cid: int, rounds: int) -> float:
    """Client ``cid``'s epsilon after ``rounds`` rounds, as the ledger computes it."""
    return epsilon_from_history([(SIGMA[cid], 0.125, 4)] * rounds, 1e-5, "rdp")


def _play(recorder: RunRecorder, accuracies=(0.5, 0.625, 0.75)):
    """Round 0 (evaluation only), then two rounds of two clients, then the adapter."""
    recorder.on_evaluate(0, 0.7, {"accuracy": accuracies[0]})
    for rnd in (1, 2):
        clients = [
            {"cid": cid, "delta": 1e-5, "sample_rate": 0.125, "noise_multiplier": SIGMA[cid], "steps": 4,
             "accepted": True, "bytes_up": 1000 + cid, "bytes_down": 1100,
             "dp_history": [(SIGMA[cid], 0.125, 4, r) for r in range(1, rnd + 1)]}
            for cid in (0, 1)
        ]
        recorder.on_fit(rnd, clients, [], 0.25)
        recorder.on_evaluate(rnd, 0.6, {"accuracy": accuracies[rnd]})
    adapter = recorder.run_dir / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return recorder.finalize(num_clients=2)


def test_offline_run_holds_rounds_config_epsilon_table_and_adapter(tmp_path, wandb_env):
    cfg = _cfg(group="multirun/2026-11-28/10-00-00", name="job 0: seed=1", tags=["unit-test"])
    recorder = RunRecorder(tmp_path / "run", OmegaConf.to_container(cfg), "sample", 1e-5, 2, echo=lambda _: None)
    audit = AuditTrail(tmp_path / "run", recorder.config)  # listens first, as in the ServerApp
    recorder.listeners.append(audit)
    audit.start(recorder)
    observers = attach_tracking(recorder, cfg)
    assert [type(o).__name__ for o in observers] == ["WandbTracker"]
    _play(recorder)

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    where = results["tracking"]["wandb"]
    assert where["mode"] == "offline" and where["group"] == "multirun/2026-11-28/10-00-00"
    run_dir = Path(where["dir"])
    assert run_dir.parent == tmp_path / "run" / "wandb" and run_dir.name.startswith("offline-run-")
    assert where["sync_command"] == f"wandb sync {run_dir}"

    records = list(wandb_records(next(run_dir.glob("run-*.wandb"))))
    rows = history(records)
    assert {k: rows[k]["test/accuracy"] for k in (0, 1, 2)} == {0: 0.5, 1: 0.625, 2: 0.75}
    # The federation's sample-level epsilon is the largest client's.
    assert rows[1]["privacy/epsilon_sample_level"] == pytest.approx(_eps(1, 1))
    assert rows[2]["privacy/epsilon_sample_level"] == pytest.approx(_eps(1, 2))
    assert "privacy/epsilon_sample_level" not in rows[0]
    assert rows[2]["clients/participating"] == 2 and rows[2]["clients/accepted"] == 2
    assert rows[2]["traffic/bytes_up"] == 2001 and rows[2]["traffic/bytes_down"] == 2200
    assert rows[2]["server/aggregation_s"] == 0.25

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["federation"] == {"num_clients": 2, "rounds": 2}
    assert config["privacy"]["unit"] == "sample"
    assert run.run_group == "multirun/2026-11-28/10-00-00" and run.display_name == "job 0: seed=1"
    assert list(run.tags) == ["unit-test"]

    artifacts = {r.artifact.type: r.artifact for r in records if r.WhichOneof("record_type") == "artifact"}
    assert artifacts["model"].name == f"adapter-{where['run_id']}"
    assert {m.path for m in artifacts["model"].manifest.contents} == {"adapter_config.json", "adapter_model.safetensors"}
    tables = list(run_dir.glob("files/media/table/privacy/client_epsilon_*.table.json"))
    table = json.loads(tables[0].read_text())
    assert table["columns"][:5] == ["client", "round", "epsilon", "unit", "delta"]
    assert [row[:4] for row in table["data"]] == [
        ["0", 1, pytest.approx(_eps(0, 1)), "sample-level"], ["1", 1, pytest.approx(_eps(1, 1)), "sample-level"],
        ["0", 2, pytest.approx(_eps(0, 2)), "sample-level"], ["1", 2, pytest.approx(_eps(1, 2)), "sample-level"],
    ]
    summary = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
               for r in records if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
    assert summary["final/accuracy"] == 0.75 and summary["final/epsilon_sample_level"] == pytest.approx(_eps(1, 2))
    # The audit log's head, pinned in W&B where whoever holds the run dir later cannot rewrite it.
    assert summary["audit/head_sha256"] == results["final"]["audit"]["sha256"] == audit.log.head
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)
    assert not wandb_processes()


def test_crashed_experiment_still_closes_its_run_as_failed(tmp_path, wandb_env):
    cfg = _cfg()
    recorder = RunRecorder(tmp_path / "run", OmegaConf.to_container(cfg), "sample", 1e-5, 2, echo=lambda _: None)
    (tracker,) = attach_tracking(recorder, cfg)
    recorder.on_evaluate(0, 0.7, {"accuracy": 0.5})
    tracker._at_exit()  # what atexit does when the run dies before on_finish
    path = next(Path(recorder.tracking["wandb"]["dir"]).glob("run-*.wandb"))
    assert [r.exit.exit_code for r in wandb_records(path) if r.WhichOneof("record_type") == "exit"] == [1]
    assert not wandb_processes()


def test_tracking_none_writes_no_wandb_dir(tmp_path):
    cfg = _cfg(backend="none")
    recorder = RunRecorder(tmp_path / "run", OmegaConf.to_container(cfg), "sample", 1e-5, 2, echo=lambda _: None)
    assert attach_tracking(recorder, cfg) == []
    _play(recorder)
    assert not (tmp_path / "run" / "wandb").exists()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["tracking"] == {}


def test_default_config_tracks_with_wandb_and_none_turns_it_off(tiny_cfg):
    assert tiny_cfg().tracking.backend == "wandb" and tiny_cfg().tracking.mode is None
    assert tiny_cfg("tracking=none").tracking.backend == "none"


@pytest.mark.parametrize("overrides, setting", [
    (["tracking.backend=mlflow"], "tracking.backend"),
    (["tracking.mode=sometimes"], "tracking.mode"),
    (["tracking.progress=fancy"], "tracking.progress"),
])
def test_bad_tracking_setting_is_refused(tiny_cfg, overrides, setting):
    with pytest.raises(ConfigError) as err:
        check_tracking(tiny_cfg(*overrides))
    assert err.value.setting == setting


def test_mode_is_offline_unless_wandb_is_configured(tmp_path):
    missing = tmp_path / "no-netrc"
    assert resolve_mode(None, {}, missing) == "offline"
    assert resolve_mode("disabled", {"WANDB_API_KEY": "x"}, missing) == "disabled"
    assert resolve_mode(None, {"WANDB_MODE": "offline", "WANDB_API_KEY": "x"}, missing) is None  # wandb reads it
    assert resolve_mode(None, {"WANDB_API_KEY": "x"}, missing) == "online"
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine example.org login a password b\n")
    assert resolve_mode(None, {}, netrc_file) == "offline"
    netrc_file.write_text("machine api.wandb.ai login user password secret\n")
    assert resolve_mode(None, {}, netrc_file) == "online"
    assert resolve_mode(None, {"WANDB_BASE_URL": "https://wandb.example.org"}, netrc_file) == "offline"


def test_round_metrics_name_the_privacy_unit():
    record = {"round": 3, "accuracy": 0.7, "loss": 0.5, "epsilon": 2.0, "clients": [{}, {}, {}],
              "num_accepted": 2, "num_rejected": 1, "aggregation_s": 0.1, "bytes_up": 30, "bytes_down": 33}
    assert round_metrics(record, "client")["privacy/epsilon_client_level"] == 2.0
    metrics = round_metrics(record, "none")
    assert not any(k.startswith("privacy/") for k in metrics)
    assert metrics["clients/participating"] == 3 and metrics["clients/rejected"] == 1


def test_client_level_epsilon_table_has_one_row_per_round_for_every_client(tmp_path):
    recorder = RunRecorder(tmp_path, {}, "client", 1e-3, 2, echo=lambda _: None)
    recorder.rounds = {1: {"round": 1, "clients": [{"cid": 0, "accepted": True}], "epsilon": 1.5,
                           "client_dp": {"noise_multiplier": 1.1, "sample_rate": 0.1}}}
    assert client_epsilon_rows(recorder) == [["all", 1, 1.5, "client-level", 1e-3, 1.1, 0.1, 1, True]]


# -- bytes per round, counted by the strategy ---------------------------------------------
def test_strategy_counts_the_bytes_each_way(tmp_path):
    initial = [np.zeros((8, 4), np.float32), np.zeros(16, np.float32)]
    recorder = RunRecorder(tmp_path, {}, "none", None, 1, echo=lambda _: None)
    strategy = FedLoRAStrategy(initial_arrays=initial, recorder=recorder)
    manager = SimpleClientManager()
    proxies = [GridClientProxy(node_id, None, 0) for node_id in (1, 2, 3)]
    for proxy in proxies:
        manager.register(proxy)
    instructions = strategy.configure_fit(1, None, manager)
    sent = payload_bytes(instructions[0][1].parameters)
    # The serialized tensors: the float32 payload plus a small header per tensor.
    assert sum(a.nbytes for a in initial) < sent < sum(a.nbytes for a in initial) + 2 * 256

    update = [np.ones((8, 4), np.float32), np.ones(16, np.float32)]
    replies = [(p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), 10, {"partition_id": i}))
               for i, p in enumerate(proxies[:2])]
    strategy.aggregate_fit(1, replies, [RuntimeError("client lost")])
    rec = recorder.rounds[1]
    assert rec["bytes_up"] == 2 * payload_bytes(ndarrays_to_parameters(update))
    assert rec["bytes_down"] == 3 * sent  # the lost client was sent the adapter too
    assert [c["bytes_up"] for c in rec["clients"]] == [payload_bytes(ndarrays_to_parameters(update))] * 2


def test_multirun_jobs_share_a_group_and_are_named_by_job_and_overrides():
    from hydra.types import RunMode

    from simulations.run import job_labels, with_job_labels

    def hydra_cfg(mode, num=0, overrides=""):
        return OmegaConf.create({"mode": mode, "sweep": {"dir": "multirun/2026-11-28/10-00-00"},
                                 "job": {"num": num, "override_dirname": overrides}})

    multi = job_labels(hydra_cfg(RunMode.MULTIRUN, 2, "privacy.target_epsilon=3"))
    assert multi == {"group": "multirun/2026-11-28/10-00-00", "name": "job 2: privacy.target_epsilon=3"}
    assert job_labels(hydra_cfg(RunMode.RUN, 0, "seed=1")) == {"name": "seed=1"}
    assert job_labels(hydra_cfg(RunMode.RUN)) == {}
    cfg = with_job_labels(_cfg(group="mine"), multi)
    assert cfg.tracking.group == "mine" and cfg.tracking.name == "job 2: privacy.target_epsilon=3"


def test_stopped_run_closes_its_wandb_run_as_failed_with_the_reason(tmp_path, wandb_env):
    cfg = _cfg()
    recorder = RunRecorder(tmp_path / "run", OmegaConf.to_container(cfg), "sample", 1e-5, 2, echo=lambda _: None)
    (tracker,) = attach_tracking(recorder, cfg)
    recorder.on_evaluate(0, 0.7, {"accuracy": 0.5})
    recorder.on_fit(1, [{"cid": 0, "epsilon": 0.5, "delta": 1e-5, "accepted": True}], [], 0.0)
    recorder.on_evaluate(1, 0.6, {"accuracy": 0.625})
    recorder.stop("round 2 failed: 0 valid update(s)")
    assert tracker.finished
    records = list(wandb_records(next(Path(recorder.tracking["wandb"]["dir"]).glob("run-*.wandb"))))
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [1]
    summary = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert summary["stopped/reason"].startswith("round 2 failed") and summary["stopped/after_round"] == 1
    assert not wandb_processes()
