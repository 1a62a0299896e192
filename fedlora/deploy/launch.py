"""Start and wire a Flower 1.42 deployment: SuperLink, SuperNodes, connection, registration.

Each function builds the exact ``flower-superlink`` / ``flower-supernode`` / ``flwr``
command a user could type (the CLI in :mod:`fedlora.deploy.__main__` prints it), checks
its inputs first so that a missing certificate or an unreachable SuperLink is reported
with the fix instead of a stack trace, and starts processes in their own session so a
caller can end each one, with its children, by PID.

Flower 1.42 serves the Fleet, Control and ServerAppIo APIs of a SuperLink on one
HTTPS port, and its Control API has no authentication in the open-source distribution:
the SuperLink listens on loopback (or the operator's own network) and SuperNodes dial
the Fleet-only gateway (:mod:`fedlora.deploy.gateway`). The SuperLink and every
SuperNode spawn ``flower-superexec`` (found on ``PATH``) which runs the ServerApp /
ClientApps in subprocesses, so the app's own environment (this package, torch, ...)
must be the one those binaries come from.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedlora.core.env import set_defaults
from fedlora.core.files import write_atomic
from fedlora.deploy.credentials import check_tls
from fedlora.deploy.gateway import DEFAULT_FLEET_PORT

DEFAULT_PORT = 9093


class DeployError(RuntimeError):
    """A deployment step that cannot go on; the message names the fix."""


@dataclass(frozen=True)
class Credentials:
    """The files :mod:`fedlora.deploy.credentials` writes under one directory."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "certificates" / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "certificates" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "certificates" / "server.key"

    def node_key(self, index: int) -> Path:
        return self.root / "keys" / f"supernode-{index}"

    def node_public_key(self, index: int) -> Path:
        return self.root / "keys" / f"supernode-{index}.pub"


def flower_bin(name: str) -> str:
    """A Flower executable from this Python environment (the one the apps run in)."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    raise DeployError(
        f"{name} not found next to {sys.executable}; install the project into this "
        "environment (make setup) and run from it"
    )


def flower_env(flwr_home: Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: this venv first on PATH (the SuperLink and
    SuperNodes spawn ``flower-superexec`` by name), no telemetry or update checks."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    set_defaults(env)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as Flower's ``--superlink`` takes it."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeployError(f"SuperLink address {address!r} must be host:port, e.g. 127.0.0.1:{DEFAULT_PORT}")
    return host.strip("[]"), int(port)


def check_superlink(address: str, ca_cert: Path | None, timeout: float = 5.0) -> None:
    """Dial the SuperLink once (TCP, then the TLS handshake against ``ca_cert``) so
    that a wrong address or a certificate from another CA is named before Flower
    retries forever. ``ca_cert=None`` is the insecure (plain HTTP) local-dev mode."""
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise DeployError(
            f"cannot reach a SuperLink at {address} ({err.strerror or err}); check --superlink "
            f"(host:port of the SuperLink's gateway) and that the SuperLink and its gateway are running"
        ) from None
    with sock:
        if ca_cert is None:
            _refuse_tls(sock, address)
            return
        ctx = ssl.create_default_context(cafile=str(ca_cert))
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as err:
            raise DeployError(
                f"the SuperLink at {address} presented a certificate that {ca_cert} does not "
                f"verify ({err.verify_message}); use the ca.crt generated together with the "
                f"SuperLink's server.pem, and a --superlink host listed in its certificate"
            ) from None
        except ssl.SSLError as err:
            raise DeployError(
                f"TLS handshake with {address} failed ({err.reason}); if the SuperLink runs "
                "with --insecure, use --insecure here too (local development only)"
            ) from None


def _refuse_tls(sock: socket.socket, address: str) -> None:
    """Insecure mode against a TLS SuperLink would retry forever: detect it by a
    handshake that checks nothing."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with ctx.wrap_socket(sock):
            pass
    except (ssl.SSLError, OSError):
        return
    raise DeployError(
        f"the SuperLink at {address} uses TLS; pass --credentials DIR (or --ca-cert) instead of --insecure"
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP or ``localhost``) is reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_control_host(host: str, operator_network: bool) -> None:
    """Refuse to bind the SuperLink (and with it Flower's unauthenticated Control API)
    beyond loopback unless the operator states the network is theirs alone."""
    if is_loopback(host) or operator_network:
        return
    raise DeployError(
        f"--host {host} would expose the SuperLink's Control API, which has no authentication in "
        "open-source Flower (whoever reaches it can start a run, i.e. run code on every SuperNode); "
        "keep --host 127.0.0.1 and let SuperNodes dial `python -m fedlora.deploy gateway` (Fleet API "
        "only), reach Control over SSH (ssh -L 9093:127.0.0.1:9093 <superlink host>), or pass "
        "--operator-network if HOST is on a network that no data holder reaches"
    )


def superlink_command(
    creds: Credentials | None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    database: Path | None = None,
    node_auth: bool = True,
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication, or ``--insecure``
    (``creds=None``, local development only: no encryption, any node may join).

    Its one port serves Fleet, Control and ServerAppIo; keep ``host`` on loopback or
    the operator's network (:func:`check_control_host`) and publish
    :func:`gateway_command` to data holders."""
    cmd = [flower_bin("flower-superlink")]
    if creds is None:
        cmd.append("--insecure")
    else:
        check_tls(creds.ca_cert, creds.server_cert, creds.server_key)
        cmd += [
            "--ssl-ca-certfile", str(creds.ca_cert),
            "--ssl-certfile", str(creds.server_cert),
            "--ssl-keyfile", str(creds.server_key),
        ]
        if node_auth:
            cmd.append("--enable-supernode-auth")
    # The apps run in this environment; Flower's default would `uv sync` the app's
    # dependencies from the registry (a multi-GB CUDA torch) for every run.
    cmd += ["--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def gateway_command(
    creds: Credentials | None,
    superlink: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_FLEET_PORT,
) -> list[str]:
    """The Fleet-only public endpoint in front of ``superlink`` (``python -m
    fedlora.deploy gateway``); ``creds=None`` is plain HTTP against an ``--insecure``
    SuperLink (local development only)."""
    parse_address(superlink)
    cmd = [sys.executable, "-m", "fedlora.deploy", "gateway", "--superlink", superlink,
           "--host", host, "--port", str(port)]
    if creds is None:
        return cmd + ["--insecure"]
    check_tls(creds.ca_cert, creds.server_cert, creds.server_key)
    return cmd + ["--credentials", str(creds.root)]


def node_config_text(node_config: Mapping[str, object]) -> str:
    """Flower's ``--node-config`` syntax: space separated ``key=value``, strings quoted."""
    parts = []
    for key, value in node_config.items():
        text = json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def supernode_command(
    superlink: str,
    node_config: Mapping[str, object],
    port: int,
    ca_cert: Path | None,
    private_key: Path | None = None,
    max_wait_s: float | None = None,
) -> list[str]:
    """``flower-supernode`` for one data holder; ``ca_cert=None`` means ``--insecure``."""
    parse_address(superlink)
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink]
    if ca_cert is None:
        cmd.append("--insecure")
    else:
        check_tls(ca_cert)
        cmd += ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        if not Path(private_key).is_file():
            raise DeployError(
                f"SuperNode key {private_key} does not exist; generate keys with "
                "`python -m fedlora.deploy credentials --supernodes N` and register the .pub"
            )
        cmd += ["--auth-supernode-private-key", str(private_key)]
    cmd += ["--node-config", node_config_text(node_config), "--port", str(port)]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(max_wait_s)]
    return cmd


def write_connection(
    flwr_home: Path, name: str, address: str, ca_cert: Path | None, make_default: bool = True
) -> Path:
    """Add (or replace) a SuperLink connection in ``$FLWR_HOME/config.toml``, the file
    ``flwr run . <connection>`` reads; other connections in it are kept."""
    parse_address(address)
    path = Path(flwr_home) / "config.toml"
    data = tomllib.loads(path.read_text()) if path.is_file() else {}
    for section in data:
        if section != "superlink":
            raise DeployError(f"{path} has a [{section}] section this tool does not edit; add the connection by hand")
    links = dict(data.get("superlink", {}))
    entry: dict[str, object] = {"address": address}
    if ca_cert is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(ca_cert).resolve())
    links[name] = entry
    if make_default or "default" not in links:
        links["default"] = name
    lines = ["[superlink]", f"default = {json.dumps(links.pop('default'))}", ""]
    for conn, fields in links.items():
        lines.append(f"[superlink.{conn}]")
        for key, value in fields.items():
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
        lines.append("")
    return write_atomic(path, "\n".join(lines).encode())


def _flwr_json(args: list[str], env: Mapping[str, str], timeout: float = 60.0) -> dict:
    proc = subprocess.run(
        [flower_bin("flwr"), *args, "--format", "json"], capture_output=True, text=True, env=dict(env), timeout=timeout
    )
    start = proc.stdout.find("{")
    try:
        payload = json.loads(proc.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        payload = {}
    if proc.returncode != 0 or not payload.get("success", False):
        detail = payload.get("error-message") or (proc.stdout + proc.stderr).strip()[-600:]
        raise DeployError(f"`flwr {' '.join(args)}` failed: {detail}")
    return payload


def register_supernode(public_key: Path, connection: str, env: Mapping[str, str]) -> str:
    """Register a SuperNode's public key with a SuperLink run with
    ``--enable-supernode-auth`` (``flwr supernode register``); returns its node id."""
    if not Path(public_key).is_file():
        raise DeployError(f"public key {public_key} does not exist; generate it with `python -m fedlora.deploy credentials`")
    return str(_flwr_json(["supernode", "register", str(public_key), connection], env)["node-id"])


def list_supernodes(connection: str, env: Mapping[str, str]) -> list[dict]:
    return list(_flwr_json(["supernode", "list", connection], env).get("nodes", []))


def wait_for_online(connection: str, env: Mapping[str, str], count: int, timeout_s: float = 120.0) -> list[dict]:
    """Block until ``count`` SuperNodes are online (their heartbeats reached the SuperLink)."""
    deadline = time.monotonic() + timeout_s
    online: list[dict] = []
    while time.monotonic() < deadline:
        online = [n for n in list_supernodes(connection, env) if n.get("status") == "online"]
        if len(online) >= count:
            return online
        time.sleep(1.0)
    raise DeployError(f"only {len(online)} of {count} SuperNodes came online within {timeout_s:.0f}s; see their logs")


def run_config_text(overrides: str, run_dir: Path | str | None = None, resume: bool = False) -> str:
    """The ``--run-config`` for our app: the Hydra overrides travel as one string, so the
    same ``conf/`` tree and presets drive deployment and simulation."""
    parts = [f"overrides={json.dumps(overrides)}"]
    if run_dir:
        parts.append(f"run-dir={json.dumps(str(Path(run_dir).resolve()))}")
    if resume:
        parts.append("resume=true")
    return " ".join(parts)


def check_overrides(overrides: str):
    """Compose the experiment here first: Hydra's error for a bad override is shown at
    once, not from inside the ServerApp on the SuperLink."""
    from fedlora.core.config import compose_overrides
    from fedlora.core.errors import ConfigError

    try:
        return compose_overrides(overrides)
    except ConfigError as err:
        raise DeployError(
            f"{err}; the overrides use the same syntax and conf/ groups as "
            "`python -m simulations.run` (try them there with --cfg job)"
        ) from None


def start(cmd: list[str], log_path: Path, env: Mapping[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """Start a long-running Flower process in its own session (its PID is its process
    group, so ``stop`` ends it together with the SuperExec and app processes it spawns)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd, start_new_session=True
        )


def _descendants(pid: int) -> list[int]:
    try:
        import psutil
    except ImportError:  # the process group alone then
        return []
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def stop(pid: int, grace_s: float = 10.0) -> None:
    """End a process started by :func:`start`, its process group and its descendants
    (Flower starts SuperExec in a session of its own)."""
    children = _descendants(pid)
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for child in children:
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    alive = [pid, *children]
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _exists(p)]
        time.sleep(0.2)
    for p in alive:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _exists(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap our own child if it has exited
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_listening(address: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 60.0,
                   name: str = "SuperLink") -> None:
    """Wait until a just-started SuperLink (or gateway) accepts connections, or report why it died."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:] if log_path.is_file() else ""
            raise DeployError(f"the {name} exited with code {proc.returncode}; its log {log_path} ends:\n{tail}")
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"the {name} did not listen on {address} within {timeout_s:.0f}s; see {log_path}")
