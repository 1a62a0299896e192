"""A whole deployment on one machine's loopback: a SuperLink with TLS and SuperNode
authentication, its Fleet-only gateway, registered SuperNodes as separate processes,
and ``flwr run`` against it. The same commands as :mod:`fedlora.deploy` (one place
builds them: :mod:`fedlora.deploy.launch`), for the deployment tests and the load test
(``benchmarks/load_test.py``), and to try a deployment before spreading it over hosts.

Every process is started in its own session and ended by PID, with its descendants, by
:meth:`LoopbackFederation.close`.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from fedlora.deploy.credentials import make_node_keys, make_tls
from fedlora.deploy.launch import (
    Credentials,
    flower_bin,
    flower_env,
    gateway_command,
    register_supernode,
    run_config_text,
    start,
    stop,
    superlink_command,
    supernode_command,
    wait_for_online,
    wait_listening,
    write_connection,
)
from fedlora.deploy.runs import RUNS_ROOT_ENV

APP_DIR = Path(__file__).resolve().parents[2]
CONNECTION = "lab-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackFederation:
    """A SuperLink with TLS + node auth on loopback, the gateway in front of it, and the
    SuperNodes added to it (through the gateway). ``runs_root``: where run dirs may lie."""

    def __init__(self, root: Path, runs_root: Path, connection: str = CONNECTION) -> None:
        self.root = Path(root)
        self.connection = connection
        make_tls(self.root)
        self.creds = Credentials(self.root)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.fleet_address = f"127.0.0.1:{free_port()}"
        self.env = flower_env(self.root / "flwr-home")
        # Line coverage (make test) measures the SuperLink, its ServerApps and the CLI here;
        # a SuperNode starts a fresh ClientApp process every round, whose code the unit
        # tests and the simulations measure already: measuring it here again would only
        # add its start-up time to every round.
        self.node_env = {k: v for k, v in self.env.items() if not k.startswith("COVERAGE_")}
        self.pids: dict[str, int] = {}
        self.nodes: dict[int, subprocess.Popen] = {}
        self.registered: set[int] = set()
        self.partitions: dict[int, int] = {}
        link = start(superlink_command(self.creds, port=self.port), self.root / "superlink.log",
                     {**self.env, RUNS_ROOT_ENV: str(runs_root)}, cwd=APP_DIR)
        self.pids["superlink"] = link.pid
        wait_listening(self.address, link, self.root / "superlink.log")
        gateway = start(gateway_command(self.creds, self.address, port=int(self.fleet_address.rsplit(":", 1)[1])),
                        self.root / "gateway.log", self.env, cwd=APP_DIR)
        self.pids["gateway"] = gateway.pid
        wait_listening(self.fleet_address, gateway, self.root / "gateway.log", name="gateway")
        write_connection(self.root / "flwr-home", connection, self.address, self.creds.ca_cert)

    def add_node(self, index: int, num_partitions: int, register: bool = True,
                 policy: dict | None = None) -> subprocess.Popen:
        private, public = self.creds.node_key(index), self.creds.node_public_key(index)
        if not private.is_file():
            private, public = make_node_keys(self.root, f"supernode-{index}")
        if register and index not in self.registered:
            register_supernode(public, self.connection, self.env)
            self.registered.add(index)
        cmd = supernode_command(
            self.fleet_address, {"partition-id": index, "num-partitions": num_partitions, **(policy or {})},
            free_port(), self.creds.ca_cert, private, max_wait_s=20,
        )
        proc = start(cmd, self.root / f"supernode-{index}.log", self.node_env, cwd=APP_DIR)
        self.pids[f"supernode-{index}"] = proc.pid
        self.nodes[index] = proc
        self.partitions[index] = num_partitions
        return proc

    def ensure_nodes(self, count: int, num_partitions: int, timeout_s: float = 90) -> None:
        """SuperNodes 0..count-1 running and online."""
        for i in range(count):
            node = self.nodes.get(i)
            if node is not None and node.poll() is None and self.partitions[i] != num_partitions:
                stop(node.pid)  # restarted with this federation's partitioning
            if node is None or node.poll() is not None:
                self.add_node(i, num_partitions)
        wait_for_online(self.connection, self.env, count, timeout_s=timeout_s)

    def flwr_run(self, overrides: str, run_dir: Path, resume: bool = False, log_name: str = "run") -> subprocess.Popen:
        cmd = [flower_bin("flwr"), "run", str(APP_DIR), self.connection,
               "--run-config", run_config_text(overrides, run_dir, resume), "--stream"]
        proc = start(cmd, self.root / f"{log_name}.log", self.env, cwd=APP_DIR)
        self.pids[log_name] = proc.pid
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def close(self) -> None:
        for pid in self.pids.values():
            stop(pid)
