"""The deployment's defences, each against the hole it closes: the Control API kept off
the data holders' endpoint, a submitted run-dir confined to the SuperLink's runs root,
credentials split by role, private keys never readable by others.

The end-to-end checks with real Flower processes (a party with only ca.crt is refused at
the address the SuperNodes dial, while they train through it) are in
tests/fedlora/deploy/test_deployment.py; the compose file's role split in
tests/simulations/test_compose.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedlora.core.errors import ConfigError
from fedlora.deploy.__main__ import main as deploy_main
from fedlora.deploy.credentials import export_server, export_supernode, make_node_keys, make_tls
from fedlora.deploy.credentials import main as credentials_main
from fedlora.deploy.gateway import FLEET_ROUTES, is_fleet_request
from fedlora.deploy.launch import Credentials, check_control_host, gateway_command, superlink_command
from fedlora.deploy.runs import RUNS_ROOT_ENV, confine_run_dir, runs_root

# --- 1. The Control API is not where data holders connect -------------------------------


def _flower_routes(router) -> set[str]:
    return {route.path for route in router.routes}


def test_gateway_forwards_exactly_flowers_fleet_routes():
    """The allow-list is Flower's Fleet router, and no Control or Runtime route is in it
    (an upgrade of Flower that changes the Fleet API fails here, not in production)."""
    from flwr.supercore.routers.runtime.router import router as runtime_router
    from flwr.superlink.routers.control.router import router as control_router
    from flwr.superlink.routers.fleet.router import router as fleet_router

    assert FLEET_ROUTES == _flower_routes(fleet_router)
    assert not FLEET_ROUTES & (_flower_routes(control_router) | _flower_routes(runtime_router))
    assert is_fleet_request("POST", "/v1/fleet/pull-messages")
    for method, path, query in [
        ("POST", "/v1/control/start-run", b""), ("POST", "/v1/control/list-runs", b""),
        ("POST", "/v1/runtime/pull-task-input", b""), ("GET", "/v1/fleet/pull-messages", b""),
        ("POST", "/v1/fleet/../control/start-run", b""), ("POST", "/v1/fleet/pull-messages/", b""),
        ("POST", "/v1/fleet/get-run", b"a=1"), ("GET", "/docs", b""), ("POST", "/health", b""),
    ]:
        assert not is_fleet_request(method, path, query), (method, path, query)


def test_superlink_is_not_bound_beyond_loopback_unless_the_network_is_the_operators(tmp_path, capsys):
    make_tls(tmp_path)
    creds = Credentials(tmp_path)
    for host in ("127.0.0.1", "::1", "localhost"):
        check_control_host(host, operator_network=False)
    with pytest.raises(Exception, match="Control API.*--operator-network"):
        check_control_host("0.0.0.0", operator_network=False)
    check_control_host("0.0.0.0", operator_network=True)
    # The CLI refuses before starting anything (the credentials exist, so only --host is wrong).
    assert deploy_main(["superlink", "--credentials", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0" in err and "Control API" in err and "gateway" in err
    # The gateway serves TLS with the SuperLink's certificate and verifies the SuperLink with the CA.
    cmd = gateway_command(creds, "127.0.0.1:9093", "0.0.0.0", 9092)
    assert cmd[cmd.index("--credentials") + 1] == str(tmp_path) and "--insecure" not in cmd
    assert superlink_command(creds)[superlink_command(creds).index("--host") + 1] == "127.0.0.1"


# --- 3. run-dir confined to the SuperLink's runs root ----------------------------------


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A runs root next to a directory outside it, and FEDLORA_RUNS_ROOT set as
    `fedlora.deploy superlink --runs-root` sets it for the ServerApp."""
    root, outside = tmp_path / "runs", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    monkeypatch.setenv(RUNS_ROOT_ENV, str(root))
    monkeypatch.chdir(tmp_path)
    return root, outside


def _hostile(root: Path, outside: Path) -> list[str]:
    (root / "link").symlink_to(outside, target_is_directory=True)
    return ["../outside/x", str(outside / "x"), "/etc/fedlora-x", "link/x", "link", f"{root}/../outside/x",
            "../runs-sibling", str(root)]


def test_run_dir_outside_the_runs_root_is_refused(runs):
    from strategies.server_app import deployed_config

    root, outside = runs
    assert runs_root() == root.resolve()
    for run_dir in _hostile(root, outside):
        with pytest.raises(ConfigError, match="^run-dir: ") as err:
            deployed_config({"overrides": "", "run-dir": run_dir}, 7)
        assert "--runs-root" in str(err.value) or "runs root" in str(err.value), run_dir
    # Inside the root: a relative run-dir lies under it, the default too.
    assert confine_run_dir("exp1", root) == root.resolve() / "exp1"
    _, run_dir, _ = deployed_config({"overrides": "", "run-dir": str(root / "a" / "b")}, 7)
    assert run_dir == root.resolve() / "a" / "b"
    _, run_dir, _ = deployed_config({"overrides": "", "run-dir": ""}, 7)
    assert run_dir == root.resolve() / "flwr-run-7"


def test_deployed_serverapp_writes_nothing_outside_the_runs_root(runs, tmp_path):
    """The ServerApp's entry point refuses a hostile run-dir before it creates anything."""
    from flwr.app import Context, RecordDict

    from strategies.server_app import _deployed_main

    root, outside = runs
    small = ("model=tiny_bert data.max_train_samples=120 data.max_test_samples=40 federation.num_clients=2 "
             "federation.rounds=1 train.batch_size=16 train.local_steps=1 train.probe_steps=0 tracking=none")
    (root / "link").symlink_to(outside, target_is_directory=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for run_dir in ("../outside/x", str(outside / "y"), "link/z"):
        context = Context(run_id=3, node_id=0, node_config={}, state=RecordDict(),
                          run_config={"overrides": small, "run-dir": run_dir, "resume": False})
        with pytest.raises(RuntimeError, match="run-dir"):
            _deployed_main(None, context)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert list(outside.iterdir()) == []


# --- 4. Each SuperNode gets the CA certificate and its own key only -----------------------


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def test_role_directories_hold_only_what_each_role_reads(tmp_path):
    out = tmp_path / "operator"
    assert credentials_main(["--out", str(out), "--supernodes", "2", "--server-dir", str(tmp_path / "server"),
                             "--supernode-dirs", str(tmp_path / "nodes")]) == 0
    assert _files(tmp_path / "server") == {"certificates/ca.crt", "certificates/server.pem", "certificates/server.key"}
    for i in range(2):
        assert _files(tmp_path / "nodes" / f"supernode-{i}") == {
            "certificates/ca.crt", f"keys/supernode-{i}", f"keys/supernode-{i}.pub"}
        node = Credentials(tmp_path / "nodes" / f"supernode-{i}")
        assert node.node_key(i).read_bytes() == Credentials(out).node_key(i).read_bytes()
    assert "certificates/ca.key" in _files(out)
    # The server directory is what `superlink --credentials` and `gateway --credentials` read.
    superlink_command(Credentials(tmp_path / "server"))
    # A restarted credentials service keeps the keys (still registered) and lays the roles out again.
    key = (tmp_path / "nodes" / "supernode-1" / "keys" / "supernode-1").read_bytes()
    (tmp_path / "nodes" / "supernode-1" / "keys" / "supernode-1").unlink()
    assert credentials_main(["--out", str(out), "--supernodes", "2", "--if-missing",
                             "--supernode-dirs", str(tmp_path / "nodes")]) == 0
    assert (tmp_path / "nodes" / "supernode-1" / "keys" / "supernode-1").read_bytes() == key
    with pytest.raises(ValueError, match="does not exist"):
        export_supernode(out, 5, tmp_path / "nodes" / "supernode-5")
    with pytest.raises(ValueError, match="does not exist"):
        export_server(tmp_path / "nowhere", tmp_path / "s")


# --- 5. Private keys are never readable by others -----------------------------------------


def test_private_keys_are_0600_from_the_moment_they_are_written(tmp_path, monkeypatch):
    """Under umask 0, the mode of every file at the moment its bytes are written (fsync of
    the still-open temporary file) and its final mode: 0600 for every private key."""
    import fedlora.core.files as files

    seen: dict[str, int] = {}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        seen[path] = stat.S_IMODE(os.fstat(fd).st_mode)
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    old_umask = os.umask(0)
    try:
        tls = make_tls(tmp_path / "c")
        private, public = make_node_keys(tmp_path / "c", "supernode-0")
        export_server(tmp_path / "c", tmp_path / "server")
        export_supernode(tmp_path / "c", 0, tmp_path / "node")
        files.write_atomic(tmp_path / "plain.txt", b"x")
    finally:
        os.umask(old_umask)
    keys = [tmp_path / "c" / "certificates" / "ca.key", tls.server_key, private,
            tmp_path / "server" / "certificates" / "server.key", tmp_path / "node" / "keys" / "supernode-0"]
    for key in keys:
        written = [mode for path, mode in seen.items() if Path(path) == key.with_name(f"{key.name}.{os.getpid()}.tmp")]
        assert written == [0o600], (key, written)
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(public.stat().st_mode) == 0o666  # public files keep the umask's mode
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_a_file_planted_at_the_temporary_name_is_not_followed(tmp_path):
    from fedlora.core.files import write_atomic

    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    tmp = tmp_path / f"key.{os.getpid()}.tmp"
    tmp.symlink_to(target)
    write_atomic(tmp_path / "key", b"secret", private=True)
    assert target.read_bytes() == b"keep"
    assert (tmp_path / "key").read_bytes() == b"secret" and not (tmp_path / "key").is_symlink()


def _tls_server(creds_root):
    """A TLS listener on loopback presenting the server certificate under ``creds_root``;
    (address, stop)."""
    import socket
    import ssl
    import threading

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(creds_root / "certificates" / "server.pem", creds_root / "certificates" / "server.key")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    done = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop():
        done.set()
        thread.join(timeout=5)
        listener.close()

    return f"127.0.0.1:{listener.getsockname()[1]}", stop


@pytest.mark.parametrize("hosts, days, needle", [
    (["superlink.example.org"], 30, "IP address mismatch"),  # a certificate for another host
    (["127.0.0.1"], 0, "expired"),  # valid until the moment it was made
])
def test_a_superlink_certificate_for_another_host_or_expired_is_refused(tmp_path, hosts, days, needle):
    import time

    from fedlora.deploy.credentials import check_tls, make_tls
    from fedlora.deploy.launch import DeployError, check_superlink

    files = make_tls(tmp_path, hosts=hosts, days=days)
    time.sleep(0.01 if days else 1.1)
    address, stop = _tls_server(tmp_path)
    try:
        with pytest.raises(DeployError, match="does not verify") as err:
            check_superlink(address, files.ca_cert)
        assert needle in str(err.value)
    finally:
        stop()
    if not days:  # the SuperLink's own start refuses expired credentials too, naming the fix
        with pytest.raises(ValueError, match="not now; regenerate the credentials"):
            check_tls(files.ca_cert, files.server_cert, files.server_key)
