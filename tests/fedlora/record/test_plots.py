"""Run plots from a synthetic recorder: valid PNGs of sensible size, the right grid states."""

import struct

from fedlora.record.plots import (
    EPSILON_PNG,
    METRICS_PNG,
    PARTICIPATION_PNG,
    STATES,
    RunPlots,
    participation_grid,
)
from fedlora.record.results import RunRecorder

PRIVACY = {"unit": "sample", "target_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp",
           "budgets": {"overrides": {"1": 2.0}, "fraction": None, "fraction_epsilon": None, "seed": 0}}


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return len(data), width, height


def _client(cid, rnd, **extra):
    # The reply carries the client's own history: it trained in every round so far.
    return {"cid": cid, "node_id": str(100 + cid), "accepted": True, "noise_multiplier": 1.0,
            "sample_rate": 0.2, "steps": 10, "delta": 1e-5, "epsilon": 1.0,
            "dp_history": [(1.0, 0.2, 10, r) for r in range(1, rnd + 1)], **extra}


def _recorder(tmp_path, privacy=PRIVACY, unit="sample"):
    config = {"privacy": privacy, "federation": {"num_clients": 4}}
    rec = RunRecorder(tmp_path, config, privacy_unit=unit, delta=1e-5, num_rounds=3, echo=lambda _: None)
    rec.attack = {"name": "sign_flip", "clients": [3]}
    rec.listeners.append(RunPlots(tmp_path))
    return rec


def _rounds(rec):
    rec.on_evaluate(0, 0.69, {"accuracy": 0.5})
    for rnd in (1, 2, 3):
        rec.on_sample(rnd, ["100", "101", "102", "103"] if rnd < 3 else ["100", "101", "103"])
        clients = [_client(0, rnd), _client(1, rnd), _client(3, rnd, attack="sign_flip")]
        if rnd < 3:
            clients.append(_client(2, rnd, accepted=False, reason="NaN") if rnd == 1 else
                           {"cid": 2, "node_id": "102", "accepted": False, "declined": True, "steps": 0})
        rec.on_aggregation(rnd, {"rule": "multi_krum", "decisions": {"selected": [0, 1]}})
        rec.on_fit(rnd, clients, [], 0.0)
        rec.on_evaluate(rnd, 0.6 - 0.05 * rnd, {"accuracy": 0.6 + 0.05 * rnd})


def test_plots_written_every_round_as_valid_pngs(tmp_path):
    rec = _recorder(tmp_path)
    rec.on_evaluate(0, 0.69, {"accuracy": 0.5})
    assert (tmp_path / METRICS_PNG).is_file()  # a run that crashes now still has a plot
    _rounds(rec)
    rec.finalize()
    for name in (METRICS_PNG, EPSILON_PNG, PARTICIPATION_PNG):
        size, width, height = _png_size(tmp_path / name)
        assert 5_000 < size < 1_000_000, (name, size)
        assert 400 <= width <= 1700 and 250 <= height <= 1700, (name, width, height)
    assert not list(tmp_path.glob(".*.tmp"))  # written to a temporary name, then renamed


def test_participation_grid_states(tmp_path):
    rec = _recorder(tmp_path)
    _rounds(rec)
    xs, grid = participation_grid([rec.rounds[r] for r in sorted(rec.rounds)], ["0", "1", "2", "3"])
    assert xs == [1, 2, 3]
    names = [[STATES[s] for s in row] for row in grid]
    assert names[0] == ["accepted"] * 3
    assert names[2] == ["rejected", "declined (budget)", "not sampled"]
    assert names[3] == ["accepted, not selected by the aggregator"] * 3  # multi-Krum kept clients 0 and 1


def test_client_level_dp_plots_one_curve_for_every_client(tmp_path):
    class Plan:  # what on_client_dp reads of a ClientDPPlan
        noise_multiplier, sample_rate, delta, clipping_norm = 1.1, 0.5, 1e-5, 0.5

    rec = _recorder(tmp_path, privacy={"unit": "client", "target_epsilon": 4.0, "delta": 1e-5}, unit="client")
    rec.on_evaluate(0, 0.69, {"accuracy": 0.5})
    for rnd in (1, 2):
        rec.on_fit(rnd, [{"cid": 0, "accepted": True}], [], 0.0)
        rec.on_client_dp(rnd, Plan, 0)
        rec.on_evaluate(rnd, 0.6, {"accuracy": 0.6})
    assert rec.ledger.clients() == ["all"]
    size, _, _ = _png_size(tmp_path / EPSILON_PNG)
    assert size > 5_000


def _large_recorder(tmp_path, num_clients, per_round, rounds=3):
    config = {"privacy": {**PRIVACY, "budgets": None}, "federation": {"num_clients": num_clients}}
    rec = RunRecorder(tmp_path, config, privacy_unit="sample", delta=1e-5, num_rounds=rounds, echo=lambda _: None)
    rec.listeners.append(RunPlots(tmp_path))
    rec.on_evaluate(0, 0.69, {"accuracy": 0.5})
    for rnd in range(1, rounds + 1):
        cids = [(rnd - 1) * per_round + i for i in range(per_round)]
        rec.on_sample(rnd, [str(100 + c) for c in cids])
        rec.on_fit(rnd, [_client(c, 1) for c in cids], [], 0.0)
        rec.on_evaluate(rnd, 0.6, {"accuracy": 0.6})
    return rec


def test_large_federation_plots_follow_participants_not_federation(tmp_path):
    from fedlora.record.plots import MAX_ROWS, participation_rows

    rec = _large_recorder(tmp_path, num_clients=10_000, per_round=10)
    rounds = [rec.rounds[r] for r in sorted(rec.rounds)]
    rows = participation_rows(rounds, 10_000)
    assert rows == [str(c) for c in range(30)]  # the 30 that took part, not 10,000
    assert participation_rows(rounds, 4)[:4] == ["0", "1", "2", "3"]  # small: everyone, never sampled included
    _, width, height = _png_size(tmp_path / PARTICIPATION_PNG)
    assert height <= 1600 and width <= 1600
    # Beyond MAX_ROWS participants both plots aggregate and stay a normal figure.
    many = tmp_path / "many"
    rec = _large_recorder(many, num_clients=10_000, per_round=MAX_ROWS // 2 + 1)
    assert len(participation_rows([rec.rounds[r] for r in sorted(rec.rounds)], 10_000)) > MAX_ROWS
    for name in (EPSILON_PNG, PARTICIPATION_PNG):
        _, width, height = _png_size(many / name)
        assert width <= 1600 and height <= 500, name
