"""Cost of SecAgg+: seconds per round and bytes per client, with and without it.

Toy clients return a fixed LoRA-sized delta (74,498 float32 parameters, the MiniLM
adapter + head) so the numbers are the protocol's own: Flower's real SecAggPlusWorkflow
and secaggplus_mod (through our ``secure_mod``) against the plain DefaultWorkflow, in
the same run, on the same machine. Bytes are the payload of every message a client
receives and sends in a round (tensors + config values, without transport framing),
summed over all SecAgg+ stages.

    python benchmarks/secagg.py [--clients 5 10 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np  # noqa: E402
from flwr.app import Context  # noqa: E402
from flwr.client import NumPyClient  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig  # noqa: E402
from flwr.server.workflow import DefaultWorkflow  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from fedlora.client.app import secure_mod  # noqa: E402
from fedlora.core.arrays import clip_l2  # noqa: E402
from fedlora.core.secure import SecAggSettings  # noqa: E402
from strategies.fedlora_strategy import FedLoRAStrategy  # noqa: E402
from strategies.secagg import secagg_workflow  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
D = 74_498
SHAPES = [(D,)]


def _payload(content) -> int:
    total = 0
    for record in content.array_records.values():
        total += sum(len(arr.data) for arr in record.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in items)
    return total


class _CountingGrid:
    """Delegates to Flower's Grid and tallies each node's payload, both directions."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        for m in messages:
            self.down[m.metadata.dst_node_id] = self.down.get(m.metadata.dst_node_id, 0) + _payload(m.content)
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        for r in replies:
            if r.has_content():
                self.up[r.metadata.src_node_id] = self.up.get(r.metadata.src_node_id, 0) + _payload(r.content)
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


class _TimedStrategy(FedLoRAStrategy):
    """Times each fit round from sampling to the aggregate (start-up excluded)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs, on_round_end=lambda r, s: s.round_seconds.append(time.perf_counter() - s.t0))
        self.round_seconds: list[float] = []

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.t0 = time.perf_counter()  # after waiting for the nodes to connect
        return instructions


class _Toy(NumPyClient):
    def __init__(self, pid: int):
        self.pid = pid

    def fit(self, parameters, config):
        rng = np.random.default_rng(self.pid)
        delta, _ = clip_l2([rng.normal(scale=0.01, size=D).astype(np.float32)], 50.0)
        return delta, 100, {}


def run(num_clients: int, rounds: int, secure: bool) -> dict:
    settings = SecAggSettings(num_shares=3, reconstruction_threshold=2, clipping_norm=50.0,
                              quantization_range=2**22, modulus_range=2**32, max_weight=100.0, timeout=None)
    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = _TimedStrategy(initial_arrays=[np.zeros(s, np.float32) for s in SHAPES],
                                  min_fit_clients=num_clients, min_available_clients=num_clients,
                                  fraction_evaluate=0.0)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        counting = _CountingGrid(grid)
        DefaultWorkflow(fit_workflow=secagg_workflow(settings) if secure else None)(counting, legacy)
        # The first round also pays the actors' start-up (imports, client construction).
        steady = strategy.round_seconds[1:] or strategy.round_seconds
        out["seconds_per_round"] = float(np.mean(steady))
        nodes = sorted(set(counting.down) | set(counting.up))
        out["bytes_down_per_client"] = float(np.mean([counting.down.get(n, 0) for n in nodes])) / rounds
        out["bytes_up_per_client"] = float(np.mean([counting.up.get(n, 0) for n in nodes])) / rounds

    client = ClientApp(client_fn=lambda ctx: _Toy(int(ctx.node_config["partition-id"])).to_client(),
                       mods=[secure_mod])
    run_simulation(server_app=server, client_app=client, num_supernodes=num_clients,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": 2, "logging_level": "error"}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for n in args.clients:
        plain = run(n, args.rounds, secure=False)
        sec = run(n, args.rounds, secure=True)
        rows.append({"clients": n, "plain": plain, "secaggplus": sec})
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"Toy clients, one {D:,}-parameter float32 delta each, {args.rounds} rounds (time: mean of rounds "
        "2.., the first pays the actors' start-up), 2 CPU cores (`python benchmarks/secagg.py`).",
        "",
        "| clients | s/round plain | s/round SecAgg+ | time ratio | KB up/client plain | KB up/client SecAgg+ "
        "| KB down/client plain | KB down/client SecAgg+ | bytes-up ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, s_ = r["plain"], r["secaggplus"]
        lines.append(
            f"| {r['clients']} | {p['seconds_per_round']:.2f} | {s_['seconds_per_round']:.2f} | "
            f"{s_['seconds_per_round'] / p['seconds_per_round']:.2f}x | {p['bytes_up_per_client'] / 1e3:.0f} | "
            f"{s_['bytes_up_per_client'] / 1e3:.0f} | {p['bytes_down_per_client'] / 1e3:.0f} | "
            f"{s_['bytes_down_per_client'] / 1e3:.0f} | {s_['bytes_up_per_client'] / p['bytes_up_per_client']:.2f}x |"
        )
    table = "\n".join(lines)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "secagg.json").write_text(json.dumps(rows, indent=2))
    (out / "secagg.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
