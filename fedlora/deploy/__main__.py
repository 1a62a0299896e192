"""Command line for a Flower deployment of the experiment.

    python -m fedlora.deploy credentials --out deploy --supernodes 2      # CA, server cert, node keys
    python -m fedlora.deploy superlink --credentials deploy                # TLS + node auth, on 127.0.0.1:9093
    python -m fedlora.deploy gateway --credentials deploy --host 0.0.0.0  # Fleet API only, on :9092
    python -m fedlora.deploy connect --name lab --address 127.0.0.1:9093 --credentials deploy
    python -m fedlora.deploy register --connection lab deploy/keys/supernode-0.pub deploy/keys/supernode-1.pub
    python -m fedlora.deploy supernode --superlink 127.0.0.1:9092 --credentials deploy --index 0 \\
        --partition-id 0 --num-partitions 2 --port 9094
    python -m fedlora.deploy run --connection lab --run-dir outputs/deployed experiment=quick
    python -m fedlora.deploy up --supernodes 2     # all of the above on this machine
    python -m fedlora.deploy down

The SuperLink's port serves Flower's Control API, which has no authentication in
open-source Flower: it stays on loopback (the operator's ``flwr`` reaches it there or
over an SSH tunnel) and data holders dial the gateway, which forwards the Fleet API only.
Every subcommand prints the Flower command it runs. ``--insecure`` (no TLS, no node
authentication) exists for local development only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from fedlora.client.numpy_client import node_data_path
from fedlora.client.policy import POLICY_KEYS, NodePolicy
from fedlora.client.state import STATE_DIR_KEY
from fedlora.core.config import OVERRIDES_FILE
from fedlora.deploy import credentials as credentials_cli
from fedlora.deploy.gateway import DEFAULT_FLEET_PORT
from fedlora.deploy.launch import (
    DEFAULT_PORT,
    Credentials,
    DeployError,
    check_control_host,
    check_overrides,
    check_superlink,
    flower_bin,
    flower_env,
    gateway_command,
    parse_address,
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
from fedlora.deploy.loopback import APP_DIR
from fedlora.deploy.runs import RUNS_ROOT_ENV

STATE = "pids.json"
WILDCARD = ("0.0.0.0", "::")  # nosec B104 # names compared against --public-host, nothing binds them here


def _show(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)


def _exec(cmd: list[str], env: dict[str, str]) -> int:
    """Replace this process with the Flower one (signals and exit code go straight to it)."""
    _show(cmd)
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def _flwr_home(args: argparse.Namespace) -> Path:
    return Path(args.flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def _creds(args: argparse.Namespace) -> Credentials | None:
    if args.insecure:
        return None
    if not args.credentials:
        raise DeployError("pass --credentials DIR (from `python -m fedlora.deploy credentials`) or, for local development only, --insecure")
    return Credentials(Path(args.credentials))


def _runs_root_env(runs_root: str) -> dict[str, str]:
    """FEDLORA_RUNS_ROOT for the ServerApps the SuperLink spawns: the one directory a
    submitted ``run-dir`` may lie in (see :mod:`fedlora.deploy.runs`)."""
    root = Path(runs_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return {RUNS_ROOT_ENV: str(root)}


def cmd_superlink(args: argparse.Namespace) -> int:
    check_control_host(args.host, args.operator_network)
    cmd = superlink_command(_creds(args), args.host, args.port, Path(args.database) if args.database else None)
    env = flower_env(extra=_runs_root_env(args.runs_root))
    print(f"runs root: {env[RUNS_ROOT_ENV]} ({RUNS_ROOT_ENV}); a submitted run-dir outside it is refused")
    return _exec(cmd, env)


def cmd_gateway(args: argparse.Namespace) -> int:
    """The public endpoint SuperNodes dial: Fleet routes forwarded to the SuperLink, all else refused."""
    from fedlora.deploy.credentials import check_tls
    from fedlora.deploy.gateway import serve

    parse_address(args.superlink)
    creds = _creds(args)
    if creds is not None:
        check_tls(creds.ca_cert, creds.server_cert, creds.server_key)
    _show(gateway_command(creds, args.superlink, args.host, args.port))
    serve(args.host, args.port, args.superlink, None if creds is None else creds.ca_cert,
          None if creds is None else creds.server_cert, None if creds is None else creds.server_key)
    return 0


def _node_config(args: argparse.Namespace) -> dict[str, object]:
    config: dict[str, object] = {}
    if args.partition_id is not None:
        config["partition-id"] = args.partition_id
    if args.num_partitions is not None:
        config["num-partitions"] = args.num_partitions
    if args.data_path:
        path = Path(args.data_path).resolve()
        if not path.is_file():
            raise DeployError(f"--data-path {path} does not exist on this SuperNode's machine")
        config["data-path"] = str(path)
    if getattr(args, "state_dir", None):
        config[STATE_DIR_KEY] = str(Path(args.state_dir).resolve())
    # The data holder's own policy (fedlora.client.policy), checked on this node against every run.
    for key in POLICY_KEYS:
        value = getattr(args, key.replace("-", "_"), None)
        if value not in (None, False):
            config[key] = str(Path(value).resolve()) if key == "data-root" else value
    # A malformed policy or a data-path outside data-root stops here, not at the first run.
    NodePolicy.from_node_config(config)
    if "data-path" in config:
        config["data-path"] = node_data_path(config)
    if "partition-id" not in config:
        raise DeployError("pass --partition-id (this data holder's client id; with --num-partitions for a shard of the configured dataset, or with --data-path for local data)")
    if "data-path" not in config and "num-partitions" not in config:
        raise DeployError("pass --num-partitions (shard of the configured dataset) or --data-path (this node's own file)")
    return config


def _ca_cert(args: argparse.Namespace) -> Path | None:
    """The CA to verify the SuperLink with: --ca-cert, or the one in --credentials."""
    if args.insecure:
        return None
    if args.ca_cert:
        return Path(args.ca_cert)
    return _creds(args).ca_cert


def cmd_supernode(args: argparse.Namespace) -> int:
    ca = _ca_cert(args)
    key = Path(args.key) if args.key else None
    if key is None and ca is not None:
        if args.index is None or not args.credentials:
            raise DeployError("pass --key PATH (or --credentials DIR --index I for keys/supernode-I): "
                              "the SuperLink only admits registered SuperNodes")
        key = Credentials(Path(args.credentials)).node_key(args.index)
    cmd = supernode_command(args.superlink, _node_config(args), args.port, ca, key)
    check_superlink(args.superlink, ca)
    return _exec(cmd, flower_env())


def cmd_connect(args: argparse.Namespace) -> int:
    path = write_connection(_flwr_home(args), args.name, args.address, _ca_cert(args))
    print(f"connection {args.name!r} -> {args.address} written to {path}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    env = flower_env(_flwr_home(args))
    for key in args.public_keys:
        node_id = register_supernode(Path(key), args.connection, env)
        print(f"registered {key} as SuperNode {node_id}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    overrides = " ".join(args.overrides)
    saved = Path(args.run_dir or "") / OVERRIDES_FILE
    if args.resume and not overrides and args.run_dir and saved.is_file():
        # The ClientApps compose the run config's overrides: resume with the original ones.
        overrides = saved.read_text().strip()
    check_overrides(overrides)
    cmd = [flower_bin("flwr"), "run", str(APP_DIR), args.connection,
           "--run-config", run_config_text(overrides, args.run_dir, args.resume)]
    if not args.no_stream:
        cmd.append("--stream")
    return _exec(cmd, flower_env(_flwr_home(args)))


def cmd_up(args: argparse.Namespace) -> int:
    """A whole local federation on this machine, PIDs kept in ``<state-dir>/pids.json``:
    the SuperLink on 127.0.0.1 (the operator's flwr), the gateway on ``--public-host``
    (what the SuperNodes dial)."""
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    if (state / STATE).is_file():
        raise DeployError(f"{state / STATE} exists: a federation is up; stop it with `python -m fedlora.deploy down --state-dir {state}`")
    if args.fleet_port == args.port:
        raise DeployError(f"--fleet-port {args.fleet_port} is the SuperLink's --port; pick another")
    flwr_home = Path(args.flwr_home) if args.flwr_home else state / "flwr-home"
    env = flower_env(flwr_home)
    link_env = flower_env(flwr_home, _runs_root_env(args.runs_root))
    creds = None
    if not args.insecure:
        creds = Credentials(Path(args.credentials) if args.credentials else state / "credentials")
        missing = [creds.node_key(i) for i in range(args.supernodes) if not creds.node_key(i).is_file()]
        if not creds.ca_cert.is_file() or missing:
            hosts = ["localhost", "127.0.0.1", "::1"]
            hosts += [] if args.public_host in hosts or args.public_host in WILDCARD else [args.public_host]
            credentials_cli.main(["--out", str(creds.root), "--supernodes", str(args.supernodes), "--force",
                                  *[a for h in hosts for a in ("--host", h)]])
    address = f"127.0.0.1:{args.port}"
    # The SuperNodes here dial loopback when the gateway listens on every interface.
    public = f"{'127.0.0.1' if args.public_host in WILDCARD else args.public_host}:{args.fleet_port}"
    pids: dict[str, int] = {}
    try:
        cmd = superlink_command(creds, "127.0.0.1", args.port, state / "superlink.db")
        _show(cmd)
        link = start(cmd, state / "superlink.log", link_env, cwd=APP_DIR)
        pids["superlink"] = link.pid
        wait_listening(address, link, state / "superlink.log")
        cmd = gateway_command(creds, address, args.public_host, args.fleet_port)
        _show(cmd)
        gateway = start(cmd, state / "gateway.log", env, cwd=APP_DIR)
        pids["gateway"] = gateway.pid
        wait_listening(public, gateway, state / "gateway.log", name="gateway")
        write_connection(flwr_home, args.connection, address, None if creds is None else creds.ca_cert)
        for i in range(args.supernodes):
            if creds is not None:
                node_id = register_supernode(creds.node_public_key(i), args.connection, env)
                print(f"registered SuperNode {i} as {node_id}")
            cmd = supernode_command(
                public, {"partition-id": i, "num-partitions": args.supernodes}, args.port + 1 + i,
                None if creds is None else creds.ca_cert, None if creds is None else creds.node_key(i),
            )
            _show(cmd)
            pids[f"supernode-{i}"] = start(cmd, state / f"supernode-{i}.log", env, cwd=APP_DIR).pid
        (state / STATE).write_text(json.dumps(pids, indent=2))
        wait_for_online(args.connection, env, args.supernodes)
    except BaseException:
        for pid in pids.values():
            stop(pid)
        (state / STATE).unlink(missing_ok=True)
        raise
    print(f"up: SuperLink {address} ({'insecure' if creds is None else 'TLS + SuperNode auth'}; Control API "
          f"on loopback only), gateway {public} (Fleet API only), {args.supernodes} SuperNodes online through "
          f"it; runs root {link_env[RUNS_ROOT_ENV]}; logs and PIDs in {state}")
    print(f"run:  FLWR_HOME={flwr_home} python -m fedlora.deploy run --connection {args.connection} --run-dir outputs/deployed <overrides>")
    print(f"stop: python -m fedlora.deploy down --state-dir {state}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    path = Path(args.state_dir) / STATE
    if not path.is_file():
        print(f"nothing to stop: {path} does not exist")
        return 0
    for name, pid in json.loads(path.read_text()).items():
        stop(int(pid))
        print(f"stopped {name} (pid {pid})")
    path.unlink()
    return 0


def _security(p: argparse.ArgumentParser) -> None:
    p.add_argument("--credentials", help="directory written by `python -m fedlora.deploy credentials`")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (local development only)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fedlora.deploy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--flwr-home", help="Flower's config dir (default $FLWR_HOME or ~/.flwr)")
    sub = ap.add_subparsers(dest="command", required=True)

    sub.add_parser("credentials", help="generate a CA, the SuperLink certificate and SuperNode keys", add_help=False)

    p = sub.add_parser("superlink", help="start a SuperLink (foreground)")
    _security(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on; it also serves the unauthenticated Control API, so keep loopback "
                        "and publish `gateway` to data holders")
    p.add_argument("--operator-network", action="store_true",
                   help="allow a non-loopback --host: it is on a network no data holder reaches "
                        "(e.g. a Docker network shared with the gateway and the operator's flwr only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--database", help="SQLite file for the SuperLink's state (default: in memory)")
    p.add_argument("--runs-root", default="outputs",
                   help=f"the directory every submitted run-dir must lie in (sets {RUNS_ROOT_ENV}; default ./outputs)")
    p.set_defaults(func=cmd_superlink)

    p = sub.add_parser("gateway", help="the public TLS endpoint for SuperNodes: the Fleet API only (foreground)")
    _security(p)
    p.add_argument("--superlink", default=f"127.0.0.1:{DEFAULT_PORT}", help="the SuperLink's host:port (its --port)")
    p.add_argument("--host", default="0.0.0.0",  # nosec B104 # the public endpoint by design; Fleet API only
                   help="interface data holders reach")
    p.add_argument("--port", type=int, default=DEFAULT_FLEET_PORT)
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("supernode", help="start a SuperNode (foreground)")
    _security(p)
    p.add_argument("--superlink", required=True, help="the SuperLink's public (gateway) address host:port")
    p.add_argument("--index", type=int, help="use keys/supernode-INDEX from --credentials")
    p.add_argument("--key", help="this SuperNode's private key (OpenSSH format)")
    p.add_argument("--ca-cert", help="CA certificate (default: certificates/ca.crt in --credentials)")
    p.add_argument("--partition-id", type=int, help="this data holder's client id")
    p.add_argument("--num-partitions", type=int, help="shards of the configured dataset")
    p.add_argument("--data-path", help="this node's own CSV/JSONL/Parquet instead of a shard")
    p.add_argument("--state-dir", help="where this node keeps its own privacy-spend record, which must survive "
                   "restarts (default: $FLWR_HOME/fedlora-client-state)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT + 1, help="the SuperNode's local app API port")
    policy = p.add_argument_group("this node's policy (SECURITY.md): runs asking for less are refused on the node")
    policy.add_argument("--max-epsilon", type=float, help="the largest epsilon this node spends; also refuses no DP, "
                        "plain evaluation and a fixed noise seed")
    policy.add_argument("--privacy-unit", choices=["sample", "client"], help="the privacy unit this node requires")
    policy.add_argument("--require-secagg", action="store_true", help="send updates only masked by SecAgg+")
    policy.add_argument("--allow-remote-code", action="store_true", help="let a run set model.trust_remote_code")
    policy.add_argument("--allow-data-paths", action="store_true", help="let a run name files on this node")
    policy.add_argument("--data-root", help="--data-path must lie inside this directory")
    p.set_defaults(func=cmd_supernode)

    p = sub.add_parser("connect", help="write a SuperLink connection into $FLWR_HOME/config.toml")
    _security(p)
    p.add_argument("--name", required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--ca-cert")
    p.set_defaults(func=cmd_connect)

    p = sub.add_parser("register", help="register SuperNode public keys (SuperLink with node auth)")
    p.add_argument("--connection", required=True)
    p.add_argument("public_keys", nargs="+")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("run", help="submit the experiment with `flwr run` (Hydra overrides as arguments)")
    p.add_argument("--connection", required=True)
    p.add_argument("--run-dir", help="where the ServerApp writes results (default outputs/flwr-run-<id>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir after its checkpoint")
    p.add_argument("--no-stream", action="store_true", help="submit and return instead of streaming logs")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=quick privacy.target_epsilon=3")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("up", help="start a SuperLink, its gateway and N SuperNodes on this machine")
    p.add_argument("--supernodes", type=int, default=2)
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="the SuperLink's port (on 127.0.0.1)")
    p.add_argument("--fleet-port", type=int, default=DEFAULT_FLEET_PORT, help="the gateway's port")
    p.add_argument("--public-host", default="127.0.0.1", help="interface the gateway listens on")
    p.add_argument("--runs-root", default="outputs", help="the directory every submitted run-dir must lie in")
    p.add_argument("--state-dir", default=".deploy")
    p.add_argument("--connection", default="local-deployment")
    _security(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop what `up` started")
    p.add_argument("--state-dir", default=".deploy")
    p.set_defaults(func=cmd_down)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["credentials"]:
        return credentials_cli.main(argv[1:])
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DeployError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
