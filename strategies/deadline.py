"""Round deadlines and over-selection: a round that closes without its stragglers.

Flower's compatibility fit workflow waits for every sampled client. Production systems
instead over-select and close a round at a quorum or a deadline, whichever comes first
(Bonawitz et al. 2019, "Towards Federated Learning at Scale: System Design", SysML:
select 130% of the target, close when the target has reported). :class:`RoundDeadline`
wraps the :class:`~flwr.server.Grid` the workflow trains through: a training request
returns the replies that arrived before ``quorum()`` successful ones had, and before
``timeout_s``; the nodes left out are handed to ``on_cut_off`` (the strategy records
them as failures and, where they may have trained, their planned privacy spend).

Two clocks: on a real federation (``simulated=False``) arrival is real time. In a
simulation, clients run a few at a time on one machine, so each reply carries its
client's simulated duration (:mod:`fedlora.client.heterogeneity`): every reply is
awaited, then ordered and cut by that clock, and the round's simulated duration is
kept (:attr:`RoundDeadline.last_round_s`).

Every other request (initial parameters, evaluation, node listing) passes through.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.server import Grid

from fedlora.client.heterogeneity import SIMULATION_RECORD, simulated_seconds

CutOff = Callable[[list[int], str], None]


def quorum_reason(quorum: int) -> str:
    return f"the round closed at its target of {quorum} updates (federation.over_selection)"


def deadline_reason(timeout_s: float) -> str:
    return f"no reply within federation.round_timeout_s={timeout_s:g}"


def close_round(arrivals: list[tuple[float, bool]], timeout_s: float | None,
                quorum: int | None) -> tuple[int, float, str | None]:
    """Where a round closes, given its replies as ``(arrival seconds, succeeded)`` in
    arrival order: how many replies it keeps, when it closes (seconds) and why it left
    the rest out (None: it kept them all). Pure: the same rule on both clocks."""
    ok = 0
    for i, (at, succeeded) in enumerate(arrivals):
        if timeout_s is not None and at > timeout_s:
            return i, timeout_s, deadline_reason(timeout_s)
        ok += succeeded
        if quorum is not None and ok >= quorum and i + 1 < len(arrivals):
            return i + 1, at, quorum_reason(quorum)
    return len(arrivals), max((at for at, _ in arrivals), default=0.0), None


class RoundDeadline:
    """A Grid whose training requests close at ``quorum()`` successful replies or
    ``timeout_s``, on the real clock or the simulated one."""

    def __init__(self, grid: Grid, timeout_s: float | None, quorum: Callable[[], int | None], on_cut_off: CutOff,
                 simulated: bool = False, on_closed: Callable[[float, bool], None] | None = None) -> None:
        self.grid = grid
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.quorum = quorum
        self.on_cut_off = on_cut_off
        self.simulated = simulated
        self.on_closed = on_closed or (lambda seconds, simulated: None)
        self.last_round_s: float | None = None

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        ids = list(self.grid.push_messages(messages))
        dst = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages)}
        quorum = self.quorum()
        arrived = self._simulated(ids) if self.simulated else self._real(ids, quorum)
        kept, self.last_round_s, why = close_round([(at, not m.has_error()) for at, m in arrived], self.timeout_s,
                                                   quorum)
        replies = [m for _, m in arrived[:kept]]
        answered = {m.metadata.reply_to_message_id for m in replies}
        left_out = sorted(dst[mid] for mid in ids if mid not in answered)
        if left_out and why is None:  # the real clock's deadline passed with replies still out
            why, self.last_round_s = deadline_reason(self.timeout_s or 0.0), self.timeout_s
        if left_out:
            self.on_cut_off(left_out, why)
        self.on_closed(self.last_round_s, self.simulated)
        for m in replies:
            if m.has_content():
                m.content.config_records.pop(SIMULATION_RECORD, None)
        return replies

    def _real(self, ids: list[str], quorum: int | None) -> list[tuple[float, Message]]:
        """Replies with their real arrival times, pulled until all, the quorum, or the deadline."""
        start, pending, arrived = time.monotonic(), set(ids), []
        while pending:
            got = list(self.grid.pull_messages(list(pending)))
            now = time.monotonic() - start
            arrived += [(now, m) for m in got]
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if quorum is not None and sum(not m.has_error() for _, m in arrived) >= quorum:
                break
            if self.timeout_s is not None and now >= self.timeout_s:
                break
            if pending:
                time.sleep(getattr(self.grid, "pull_interval", 0.1))
        return arrived

    def _simulated(self, ids: list[str]) -> list[tuple[float, Message]]:
        """Every reply, ordered by its simulated duration (a failure at once: 0 s)."""
        pending, arrived = set(ids), []
        while pending:
            got = list(self.grid.pull_messages(list(pending)))
            arrived += [(simulated_seconds(m) or 0.0, m) for m in got]
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(getattr(self.grid, "pull_interval", 0.1))
        return sorted(arrived, key=lambda item: item[0])
