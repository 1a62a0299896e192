"""docker-compose.yml, checked without a Docker engine: every service command is one of
the commands tested here, TLS and node authentication are on, mounts match the paths
the commands use, the SuperNodes cover the partitions exactly once, reach the Fleet-only
gateway and never the SuperLink's Control API, and see no credential but their own."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import yaml

from fedlora.deploy.__main__ import parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _argv(service: dict) -> list[str]:
    entry = service.get("entrypoint") or []
    command = service.get("command") or []
    entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
    command = shlex.split(command) if isinstance(command, str) else list(command)
    return entry + command


def _deploy_args(argv: list[str]):
    assert argv[:3] == ["python", "-m", "fedlora.deploy"], argv
    if argv[3] == "credentials":
        from fedlora.deploy.credentials import main

        return argv[4:], main
    return parser().parse_args(argv[3:]), None


def _mounts(service: dict) -> dict[str, str]:
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def test_services_and_build(compose):
    services = compose["services"]
    assert {"credentials", "superlink", "register", "run"} <= set(services)
    nodes = sorted(s for s in services if s.startswith("supernode-"))
    assert len(nodes) >= 2
    assert all(s.get("build") == "." for s in services.values())
    assert (ROOT / "Dockerfile").is_file()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile and "pip install -e ." in dockerfile


def test_tls_and_node_auth_are_on(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    assert "--insecure" not in text
    link = _deploy_args(_argv(compose["services"]["superlink"]))[0]
    assert link.command == "superlink" and not link.insecure
    assert _mounts(compose["services"]["superlink"])[link.credentials] == "server-credentials"
    gateway = _deploy_args(_argv(compose["services"]["gateway"]))[0]
    assert gateway.command == "gateway" and not gateway.insecure
    assert gateway.superlink == f"superlink:{link.port}"
    # The certificate is made for the names the SuperNodes and the operator's flwr dial.
    cred_argv = _argv(compose["services"]["credentials"])
    hosts = [cred_argv[i + 1] for i, a in enumerate(cred_argv) if a == "--host"]
    assert {"gateway", "superlink"} <= set(hosts)


def _networks(compose: dict, name: str) -> set[str]:
    service = compose["services"][name]
    if service.get("network_mode") == "none":
        return set()
    networks = service.get("networks") or ["default"]
    return set(networks if isinstance(networks, list) else networks.keys())


def test_control_api_is_not_published_to_data_holders(compose):
    """SuperNodes share no network with the SuperLink (whose port serves the Control API)
    and dial the gateway; the only published port is the gateway's."""
    services = compose["services"]
    link = _deploy_args(_argv(services["superlink"]))[0]
    gateway = _deploy_args(_argv(services["gateway"]))[0]
    nodes = [s for s in services if s.startswith("supernode-")]
    assert not services["superlink"].get("ports"), "the SuperLink's port (Control API) is published"
    for name in nodes:
        assert not _networks(compose, name) & _networks(compose, "superlink"), name
        assert _networks(compose, name) & _networks(compose, "gateway"), name
        assert _deploy_args(_argv(services[name]))[0].superlink == f"gateway:{gateway.port}", name
        assert not services[name].get("ports"), name
    published = {n for n, s in services.items() if s.get("ports")}
    assert published == {"gateway"}
    assert services["gateway"]["ports"] == [f"{gateway.port}:{gateway.port}"]
    # The operator's flwr reaches Control on the operator's network.
    for name in ("register", "run"):
        assert _networks(compose, name) <= _networks(compose, "superlink"), name
    assert "--address superlink:" in " ".join(_argv(services["register"]))
    assert link.operator_network and link.host == "0.0.0.0"


def _volume_dir(volumes: Path, source: str) -> Path | None:
    return volumes / source if not source.startswith((".", "/")) else None


def test_each_supernode_sees_the_ca_certificate_and_its_own_key_only(compose, tmp_path):
    """The credentials service's own command, run in a stand-in for its container (each
    named volume a directory, linked at its mount point); then every file a SuperNode
    container mounts is listed."""
    from fedlora.deploy.credentials import main as credentials_main

    services = compose["services"]
    volumes, container = tmp_path / "volumes", tmp_path / "container"
    cred = services["credentials"]
    for target, source in _mounts(cred).items():
        directory = _volume_dir(volumes, source)
        directory.mkdir(parents=True)
        link = container / target.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(directory, target_is_directory=True)

    def host_path(arg: str) -> str:  # every absolute path inside the stand-in container
        return str(container / arg.lstrip("/")) if arg.startswith("/") else arg

    argv = [host_path(a) for a in _deploy_args(_argv(cred))[0]]
    assert credentials_main(argv) == 0
    nodes = sorted(s for s in services if s.startswith("supernode-"))
    all_node_keys = {f"supernode-{i}" for i in range(len(nodes))}
    for name in nodes:
        index = _deploy_args(_argv(services[name]))[0].index
        seen = set()
        for target, source in _mounts(services[name]).items():
            directory = _volume_dir(volumes, source)
            assert source not in ("credentials", "server-credentials"), (name, source)
            if directory is not None and directory.is_dir():
                seen |= {p.name for p in directory.rglob("*") if p.is_file()}
        assert {"ca.crt", f"supernode-{index}"} <= seen, (name, seen)
        assert not seen & {"ca.key", "server.key", "server.pem"}, (name, seen)
        assert not seen & (all_node_keys - {f"supernode-{index}"}), (name, seen)
        # No other service mounts this node's private key.
        volume = _mounts(services[name])["/credentials"]
        holders = {n for n, s in services.items() if volume in _mounts(s).values()}
        assert holders == {name, "credentials"}, (name, holders)
    # The CA key is in the operator's volume only, which no SuperLink, gateway or SuperNode mounts.
    assert (volumes / "credentials" / "certificates" / "ca.key").is_file()
    ca_key_holders = {n for n, s in services.items() if "credentials" in _mounts(s).values()}
    assert ca_key_holders == {"credentials", "register", "run"}
    server = {p.name for p in (volumes / "server-credentials").rglob("*") if p.is_file()}
    assert server == {"ca.crt", "server.pem", "server.key"}
    for path in volumes.rglob("*"):
        if path.is_file() and path.name in {"ca.key", "server.key"} | all_node_keys:
            assert os.stat(path).st_mode & 0o777 == 0o600, path


def test_supernodes_cover_each_partition_once_with_their_own_key(compose):
    services = compose["services"]
    nodes = [s for s in services if s.startswith("supernode-")]
    parsed = [_deploy_args(_argv(services[s]))[0] for s in nodes]
    link = _deploy_args(_argv(services["superlink"]))[0]
    assert sorted(p.partition_id for p in parsed) == list(range(len(nodes)))
    assert {p.num_partitions for p in parsed} == {len(nodes)}
    assert sorted(p.index for p in parsed) == list(range(len(nodes)))
    gateway = _deploy_args(_argv(services["gateway"]))[0]
    assert gateway.superlink == f"superlink:{link.port}"
    for p in parsed:
        assert p.superlink == f"gateway:{gateway.port}" and not p.insecure
    cred_argv = _argv(services["credentials"])
    assert int(cred_argv[cred_argv.index("--supernodes") + 1]) == len(nodes)
    register = " ".join(_argv(services["register"]))
    for i in range(len(nodes)):
        assert f"/credentials/keys/supernode-{i}.pub" in register
    assert f"--address superlink:{link.port}" in register


def test_mounts_match_the_paths_commands_use(compose):
    services = compose["services"]
    for name, service in services.items():
        args = _deploy_args(_argv(service))[0] if name not in ("credentials", "register") else None
        mounts = _mounts(service)
        if getattr(args, "credentials", None):
            assert args.credentials in mounts, name
        if name != "credentials":  # every credential mount but the generator's is read-only
            assert all(v.endswith(":ro") for v in service["volumes"] if "credentials" in v.split(":")[0]), name
    assert _mounts(services["credentials"])["/credentials"] == "credentials"
    assert "/credentials" in _mounts(services["register"]) and "/credentials" in _mounts(services["run"])
    # The ServerApp (inside the SuperLink) writes where `run --run-dir` points.
    run = _deploy_args(_argv(services["run"]))[0]
    assert run.run_dir.startswith("/app/outputs/")
    assert _mounts(services["superlink"])["/app/outputs"] == "./outputs"
    # The flwr CLI's connection written by `register` is the one `run` reads.
    assert _mounts(services["register"])["/flwr-home"] == _mounts(services["run"])["/flwr-home"]
    assert services["register"]["environment"]["FLWR_HOME"] == "/flwr-home"
    assert set(compose["volumes"]) >= {"credentials", "flwr-home"}


def test_each_supernode_keeps_its_spend_record_on_a_volume_of_its_own(compose):
    services = compose["services"]
    volumes = []
    for name in sorted(n for n in services if n.startswith("supernode-")):
        args, _ = _deploy_args(_argv(services[name]))
        assert args.state_dir, name
        volume = _mounts(services[name]).get(args.state_dir)
        assert volume in compose["volumes"], (name, volume)  # a named volume: survives the container
        volumes.append(volume)
    assert len(volumes) == 3 and len(set(volumes)) == 3


def test_startup_order(compose):
    services = compose["services"]
    assert services["superlink"]["depends_on"]["credentials"]["condition"] == "service_completed_successfully"
    assert services["register"]["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert services["gateway"]["depends_on"]["superlink"]["condition"] == "service_healthy"
    for name in (s for s in services if s.startswith("supernode-")):
        assert services[name]["depends_on"]["register"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["gateway"]["condition"] == "service_healthy"


def test_run_overrides_compose_with_hydra(compose):
    from fedlora.deploy.launch import check_overrides

    run = _deploy_args(_argv(compose["services"]["run"]))[0]
    cfg = check_overrides(" ".join(run.overrides))
    nodes = [s for s in compose["services"] if s.startswith("supernode-")]
    assert cfg.federation.num_clients == len(nodes)
