"""Reply triage: the round's results and failures sorted into what may be aggregated.

Replies are taken in client order, so the aggregate does not depend on which client
answered first. Each reply becomes a record (its typed :class:`~fedlora.reply.FitReply`
fields plus the node id and the bytes it moved). Declining clients (budget spent) are set aside, every
update is validated (:mod:`strategies.validation`) before it may reach a rule, and
every failure is reduced to one readable line. Nothing here aggregates or logs: the
strategy decides what the batch means and what may be said about it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common import FitRes, Parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from fedlora.core.arrays import flatten, unflatten
from fedlora.core.compression import Codec
from fedlora.models.ranks import LoRALayout, pad, rank_of_arrays, truncate
from fedlora.reply import FitReply, MalformedReply
from strategies.validation import validate_update


def payload_bytes(parameters: Parameters) -> int:
    """Bytes of the serialized tensors in a message (Flower's framing not counted)."""
    return sum(len(t) for t in parameters.tensors)


def failure_reason(failure: Any, limit: int = 400) -> str:
    """A client failure in one readable line: the last line of its error, shortened."""
    if isinstance(failure, BaseException):
        text = str(failure)
    else:
        text = f"status {failure[1].status.code.name}: {failure[1].status.message}"
    lines = [ln.strip() for ln in text.replace("\\n", "\n").splitlines() if ln.strip()]
    last = lines[-1] if lines else type(failure).__name__
    return last[-limit:]


@dataclass
class ReplyBatch:
    """One round's replies, triaged.

    ``clients`` has a record per reply (accepted, rejected or declined); ``rejected``
    has the rejected replies and the failures; ``updates`` (n, d) holds the accepted
    deltas, flattened, with their ``weights`` and the client behind each row in
    ``row_cids``; ``declined_nodes`` are the nodes whose client declined.
    """

    clients: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    updates: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    row_cids: list[Any] = field(default_factory=list)
    # Each row's local steps as its reply states them (FedNova's normaliser).
    row_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # Each row's LoRA rank before its padding to the global rank (fedlora.models.ranks).
    row_ranks: list[int] = field(default_factory=list)
    declined_nodes: list[str] = field(default_factory=list)
    num_results: int = 0
    num_failures: int = 0

    @property
    def num_accepted(self) -> int:
        return len(self.row_cids)

    def expected_updates(self) -> int:
        """Replies and failures, less the clients that declined (planned, not failed)."""
        return self.num_results + self.num_failures - len(self.declined_nodes)


def stack(rows: list[np.ndarray], d: int) -> np.ndarray:
    """Flat rows into one (n, d) float32 matrix (n may be 0)."""
    updates = np.empty((len(rows), d), dtype=np.float32)
    for i, row in enumerate(rows):
        updates[i] = row
    return updates


def _client_order(cid: Any) -> tuple[int, int | str]:
    """Sort key of a client id: integers numerically, anything else after them."""
    try:
        return 0, int(cid)
    except (TypeError, ValueError):
        return 1, str(cid)


def _tensors(parameters: Parameters) -> tuple[list[np.ndarray], str | None]:
    """The reply's tensors, or why its bytes are none (np.load without pickles refuses
    object arrays, truncated or garbled headers, sizes it cannot allocate, and bytes that
    open like a zip archive). An .npz archive loads as no array: validation rejects it."""
    try:
        return parameters_to_ndarrays(parameters), None
    except Exception as err:  # noqa: BLE001 - untrusted bytes: np.load and zipfile raise many types
        return [], f"payload is not a list of numpy arrays: {type(err).__name__}: {str(err)[:120]}"


def _is_count(value: Any) -> bool:
    """A positive integer (an example count); a bool, float or text is not one."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value > 0


def _decode(arrays: list[np.ndarray], reference: list[np.ndarray], codec: Codec):
    """(tensors, None), or (the payload, why it could not be decoded)."""
    if codec.name == "none":
        return arrays, None
    try:
        flat = codec.decode(arrays, [a.size for a in reference])
    except ValueError as err:
        return arrays, f"compressed update ({codec.name}) could not be decoded: {err}"
    return unflatten(flat, reference), None


@dataclass(frozen=True)
class RoundFacts:
    """What the server knows of a round before its replies arrive, to check them by:
    the round's number, the nodes it sampled (None: not known, e.g. a bare strategy)
    and the client each node answered as before."""

    server_round: int | None = None
    sampled: frozenset[str] | None = None
    node_clients: Mapping[str, str] = field(default_factory=dict)


def _identity_problem(proxy: ClientProxy, reply: FitReply, facts: RoundFacts, seen: set[str]) -> str | None:
    """Why a well-formed reply cannot be this round's answer from this node, or None."""
    node, cid = str(proxy.cid), str(reply.partition_id)
    if facts.sampled is not None and node not in facts.sampled:
        return f"node {node} was not sampled in this round"
    if facts.server_round is not None and reply.server_round is not None and reply.server_round != facts.server_round:
        return f"the reply answers round {reply.server_round}, not round {facts.server_round} (a replayed reply)"
    before = facts.node_clients.get(node)
    if before is not None and before != cid:
        return f"node {node} answered as client {before} before and now claims to be client {cid}"
    if cid in seen:
        return f"client {cid} already replied in this round"
    return None


def _refused(proxy: ClientProxy, res: FitRes, reason: str, bytes_down: int, claimed: Any = None) -> dict[str, Any]:
    """A reply taken for nothing (not even its spend record): recorded like a failure."""
    out = {"cid": None, "node_id": proxy.cid, "accepted": False, "reason": reason,
           "bytes_up": payload_bytes(res.parameters), "bytes_down": bytes_down}
    if claimed is not None:
        out["claimed_client"] = str(claimed)
    return out


def triage(
    results: list[tuple[ClientProxy, FitRes]],
    failures: list[tuple[ClientProxy, FitRes] | BaseException],
    reference: list[np.ndarray],
    bytes_down: int,
    codec: Codec = Codec(),
    layout: LoRALayout | None = None,
    facts: RoundFacts = RoundFacts(),
) -> ReplyBatch:
    """Sort a round's replies against the global adapter ``reference``; ``codec`` decodes
    compressed updates first (a payload it cannot decode is a rejection). With ``layout``
    (ranks vary) each update carries the LoRA components its reply's ``lora_rank`` says,
    is checked against that many of the global adapter's, and is zero-padded to its rank.
    Replies are untrusted input: a malformed one, one from a node not sampled, one for
    another round or one claiming another node's client (``facts``) is rejected with
    its reason."""
    global_rank = rank_of_arrays(reference, layout) if layout is not None else 0
    batch = ReplyBatch(num_results=len(results), num_failures=len(failures))
    rows: list[np.ndarray] = []
    weights: list[int] = []
    steps: list[int] = []
    replies = []
    for proxy, res in results:
        try:
            replies.append((proxy, res, FitReply.from_metrics(res.metrics, default_partition=proxy.cid)))
        except MalformedReply as err:
            batch.rejected.append(_refused(proxy, res, f"malformed reply: {err}", bytes_down))
    # In client order, not arrival order: the float sum of the rows, and so the aggregate,
    # must not depend on which client happened to answer first.
    replies.sort(key=lambda item: _client_order(item[2].partition_id))
    seen: set[str] = set()
    for proxy, res, reply in replies:
        info = {**reply.as_record(), "node_id": proxy.cid,
                "bytes_up": payload_bytes(res.parameters), "bytes_down": bytes_down}
        problem = _identity_problem(proxy, reply, facts, seen)
        if problem is not None:
            # Not this round's answer from this node: nothing of it (its spend record included) is taken.
            batch.rejected.append(_refused(proxy, res, problem, bytes_down, claimed=reply.partition_id))
            continue
        seen.add(str(reply.partition_id))
        if reply.declined:
            batch.declined_nodes.append(proxy.cid)
            info["accepted"] = False
            batch.clients.append(info)
            continue
        rank, expected, reason = global_rank, reference, None
        if layout is not None:
            valid = isinstance(reply.lora_rank, int) and not isinstance(reply.lora_rank, bool)
            rank = reply.lora_rank if valid else -1
            if not 1 <= rank <= global_rank:
                reason = f"lora_rank must be an integer in [1, {global_rank}], got {reply.lora_rank!r}"
            else:
                expected = truncate(reference, layout, rank)
        if reason is None:
            arrays, reason = _tensors(res.parameters)
            if reason is None:
                arrays, reason = _decode(arrays, expected, codec)
            reason = reason or validate_update(arrays, expected)
        if reason is None and not _is_count(res.num_examples):
            reason = f"num_examples must be a positive integer, got {res.num_examples!r}"
        info["accepted"] = reason is None
        if reason is None:
            rows.append(flatten(arrays if layout is None else pad(arrays, layout, global_rank)))
            batch.row_ranks.append(rank)
            weights.append(res.num_examples)
            steps.append(int(reply.steps or 0))
            batch.row_cids.append(info["cid"])
        else:
            info["reason"] = reason
            batch.rejected.append(info)
        batch.clients.append(info)
    for failure in failures:
        node = None if isinstance(failure, BaseException) else failure[0].cid
        batch.rejected.append({"cid": None, "node_id": node, "accepted": False, "reason": failure_reason(failure),
                               "bytes_down": bytes_down})
    batch.updates = stack(rows, sum(a.size for a in reference))
    batch.weights = np.asarray(weights, dtype=np.float64)
    batch.row_steps = np.asarray(steps, dtype=np.float64)
    return batch
