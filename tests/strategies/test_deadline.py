"""Round deadlines and over-selection: where a round closes, on either clock, what the
strategy and the record make of the clients it closed without."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.compat.grid_client_proxy import GridClientProxy

from fedlora.client.heterogeneity import SIMULATED_SECONDS, SIMULATION_RECORD
from fedlora.core.profiles import Profiles
from fedlora.core.config import compose
from fedlora.privacy import epsilon_from_history
from fedlora.record.results import RunRecorder
from strategies.deadline import RoundDeadline, close_round
from strategies.fedlora_strategy import FedLoRAStrategy, RoundFailed


def test_close_round_at_the_deadline_or_the_quorum():
    arrivals = [(0.0, False), (1.0, True), (2.0, True), (3.0, True), (9.0, True)]
    assert close_round(arrivals, None, None) == (5, 9.0, None)  # waits for everyone
    kept, at, why = close_round(arrivals, 5.0, None)
    assert (kept, at) == (4, 5.0) and "round_timeout_s=5" in why
    kept, at, why = close_round(arrivals, None, 2)  # a failure does not count towards the target
    assert (kept, at) == (3, 2.0) and "target of 2" in why
    assert close_round(arrivals, 2.5, 3)[:2] == (3, 2.5)  # whichever comes first
    assert close_round(arrivals[:3], None, 2) == (3, 2.0, None)  # the quorum is the last reply: nobody left out


class _Grid:
    """A grid answering each training message after the delay its node is given, in
    simulated seconds (a reply record) or real ones."""

    pull_interval = 0.01

    def __init__(self, delays, simulated):
        self.delays, self.simulated, self.sent, self.t0 = delays, simulated, {}, None

    def push_messages(self, messages):
        import time
        self.t0 = time.monotonic()
        ids = []
        for i, m in enumerate(messages):
            ids.append(f"m{i}")
            self.sent[f"m{i}"] = m
        return ids

    def pull_messages(self, ids):
        import time
        out = []
        for mid in ids:
            node = self.sent[mid].metadata.dst_node_id
            delay = self.delays[node]
            if not self.simulated and time.monotonic() - self.t0 < delay:
                continue
            content = RecordDict({"fitres.metrics": ConfigRecord({"node": node})})
            if self.simulated:
                content.config_records[SIMULATION_RECORD] = ConfigRecord({SIMULATED_SECONDS: float(delay)})
            reply = Message(content, reply_to=self.sent[mid])
            reply.metadata.__dict__["_reply_to_message_id"] = mid  # the id a real push would have given
            out.append(reply)
        return out


@pytest.fixture
def server_task():
    """Messages are built by a ServerApp's task: Flower 1.42 takes the run id from it."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _train(nodes):
    return [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]


@pytest.mark.parametrize("simulated", [True, False])
def test_round_deadline_cuts_the_stragglers_on_either_clock(simulated, server_task):
    delays = {1: 0.0, 2: 0.05, 3: 30.0}
    cut, closed = [], []
    grid = RoundDeadline(_Grid(delays, simulated), 1.0, lambda: None, lambda nodes, why: cut.append((nodes, why)),
                         simulated=simulated, on_closed=lambda s, sim: closed.append((s, sim)))
    replies = grid.send_and_receive(_train([1, 2, 3]))
    assert sorted(int(m.content.config_records["fitres.metrics"]["node"]) for m in replies) == [1, 2]
    assert cut == [([3], "no reply within federation.round_timeout_s=1")]
    assert closed[0][1] is simulated and closed[0][0] >= (1.0 if simulated else 0.99)
    # The simulated clock's record never reaches the strategy.
    assert all(SIMULATION_RECORD not in m.content.config_records for m in replies)


def test_round_deadline_passes_other_requests_through(server_task):
    class Plain:
        def send_and_receive(self, messages, *, timeout=None):
            return ["passed", timeout]

        def get_node_ids(self):
            return [1, 2]

    grid = RoundDeadline(Plain(), 1.0, lambda: None, lambda *a: None)
    evaluate = [Message(RecordDict(), dst_node_id=1, message_type=MessageType.EVALUATE)]
    assert grid.send_and_receive(evaluate, timeout=3) == ["passed", 3]
    assert grid.get_node_ids() == [1, 2]


def _reply(pid, node, rounds):
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(3, np.float32)]), 5,
                 {"partition_id": pid, "privacy_unit": "sample", "server_round": rounds[-1], "noise_multiplier": 1.0,
                  "sample_rate": 0.1, "steps": 2, "delta": 1e-5,
                  "dp_history": json.dumps([[1.0, 0.1, 2, r] for r in rounds])})
    return GridClientProxy(node, None, 0), res


def test_a_cut_off_client_counts_its_planned_round_once(tmp_path):
    recorder = RunRecorder(tmp_path, {}, privacy_unit="sample", delta=1e-5, num_rounds=3, echo=lambda s: None)
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)], recorder=recorder, min_fit_results=1,
                               planned_spend=lambda cid: (1.0, 0.1, 2))
    strategy.started_round = 1
    strategy.cut_off([7], "no reply within federation.round_timeout_s=5")
    strategy.aggregate_fit(1, [_reply(0, 5, [1])], [])
    # Its node's client is not known yet: the spend waits under the node.
    assert recorder.ledger.history("node:7") == [(1.0, 0.1, 2)]
    assert recorder.rounds[1]["cut_off"][0]["assumed_spend"] is True
    assert recorder.rounds[1]["failures"][0]["reason"].startswith("no reply within")
    # Round 2: node 7 replies as client 3 with its own record (rounds 1 and 2): round 1 is
    # not counted twice, and the ledger's epsilon is recomputable from its entries.
    strategy.started_round = 2
    strategy.aggregate_fit(2, [_reply(3, 7, [1, 2])], [])
    assert "node:7" not in recorder.ledger.clients()
    assert recorder.ledger.history("3") == [(1.0, 0.1, 2), (1.0, 0.1, 2)]
    assert recorder.ledger.epsilon("3") == pytest.approx(epsilon_from_history([(1.0, 0.1, 2)] * 2, 1e-5))


def test_a_deadline_nobody_meets_names_the_setting(tmp_path):
    recorder = RunRecorder(tmp_path, {}, privacy_unit="sample", delta=1e-5, num_rounds=3, echo=lambda s: None)
    strategy = FedLoRAStrategy(initial_arrays=[np.zeros(3, np.float32)], recorder=recorder, min_fit_results=2)
    strategy.started_round = 1
    strategy.cut_off([1, 2], "no reply within federation.round_timeout_s=0.01")
    with pytest.raises(RoundFailed, match="raise federation.round_timeout_s"):
        strategy.aggregate_fit(1, [], [])


def test_profiles_diurnal_and_dropout_are_seeded():
    cfg = compose(["federation.num_clients=4", "seed=3",
                   "federation.profiles=[{diurnal:{period:10,low:0.1,high:0.9}},{speed:0.2,dropout:0.5}]"])
    profiles = Profiles.from_config(cfg)
    day = profiles.of(0).diurnal
    assert day.at(0) == pytest.approx(0.9) and day.at(5) == pytest.approx(0.1)  # peak, then trough
    online = np.mean([[profiles.online(0, r) for r in range(k, 4000, 10)] for k in (0, 5)], axis=1)
    assert online[0] > 0.8 and online[1] < 0.2
    drops = [profiles.drops(1, r) for r in range(1, 2001)]
    assert 0.45 < np.mean(drops) < 0.55 and not any(profiles.drops(0, r) for r in range(1, 200))
    assert drops == [Profiles.from_config(cfg).drops(1, r) for r in range(1, 2001)]  # the same in every process
