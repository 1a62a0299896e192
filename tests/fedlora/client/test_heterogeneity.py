"""The simulated fleet's mod: offline clients fail before training, dropouts after it, and
every reply carries its client's round on the simulated clock, scaled by its speed."""

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from fedlora.client.heterogeneity import (
    FIT_CONFIG,
    SimulatedUnavailability,
    simulated_profiles_mod,
    simulated_seconds,
    training_round,
)
from fedlora.core.profiles import Diurnal, Profile, Profiles


@pytest.fixture(autouse=True)
def task_identity():
    """Flower 1.42 builds messages inside a task: give this process one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _message(server_round, kind=MessageType.TRAIN):
    content = RecordDict({FIT_CONFIG: ConfigRecord({"server_round": server_round})})
    return Message(content, dst_node_id=1, message_type=kind)


def _context(client):
    return Context(run_id=1, node_id=1, node_config={"partition-id": client}, state=RecordDict(), run_config={})


def _work(seconds_of_work):
    calls = []

    def call_next(msg, ctxt):
        import time
        calls.append(msg)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds_of_work:
            pass
        return Message(RecordDict({"fitres.metrics": ConfigRecord({"ok": 1})}), reply_to=msg)

    return call_next, calls


def test_a_slow_client_takes_longer_on_the_simulated_clock():
    profiles = Profiles(declared=(Profile(speed=2.0), Profile(speed=0.5)))
    mod = simulated_profiles_mod(profiles)
    call_next, _ = _work(0.02)
    fast = simulated_seconds(mod(_message(1), _context(0), call_next))
    slow = simulated_seconds(mod(_message(1), _context(1), call_next))
    # The fastest profile runs at the machine's speed; speed 0.5 is 4x slower than speed 2.
    assert 0.02 <= fast < 0.2 and slow == pytest.approx(4 * fast, rel=0.5)
    assert training_round(_message(7)) == 7


def test_offline_clients_fail_before_training_and_dropouts_after():
    offline = Profiles(declared=(Profile(diurnal=Diurnal(period=10, low=1e-9, high=1e-9)),))
    call_next, calls = _work(0.0)
    with pytest.raises(SimulatedUnavailability, match="offline in round 3"):
        simulated_profiles_mod(offline)(_message(3), _context(0), call_next)
    assert not calls  # it never trained
    dropping = Profiles(declared=(Profile(dropout=0.999999),))
    with pytest.raises(SimulatedUnavailability, match="dropped out of round 3 after training"):
        simulated_profiles_mod(dropping)(_message(3), _context(0), call_next)
    assert len(calls) == 1  # it trained (and recorded its spend) before it was lost
    # Evaluation and other messages pass untouched.
    assert simulated_profiles_mod(offline)(_message(3, MessageType.EVALUATE), _context(0), call_next) is not None
