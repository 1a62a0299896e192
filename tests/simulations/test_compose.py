"""docker-compose.yml, checked without a Docker engine: every service command is one of
the commands tested here, TLS and node authentication are on, mounts match the paths
the commands use, and the SuperNodes cover the partitions exactly once."""

from __future__ import annotations

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
    assert link.command == "superlink" and link.credentials == "/credentials" and not link.insecure
    assert link.host == "0.0.0.0"
    assert f"{link.port}:{link.port}" in compose["services"]["superlink"]["ports"]
    # The certificate is made for the name the SuperNodes dial.
    cred_argv = _argv(compose["services"]["credentials"])
    hosts = [cred_argv[i + 1] for i, a in enumerate(cred_argv) if a == "--host"]
    assert "superlink" in hosts


def test_supernodes_cover_each_partition_once_with_their_own_key(compose):
    services = compose["services"]
    nodes = [s for s in services if s.startswith("supernode-")]
    parsed = [_deploy_args(_argv(services[s]))[0] for s in nodes]
    link = _deploy_args(_argv(services["superlink"]))[0]
    assert sorted(p.partition_id for p in parsed) == list(range(len(nodes)))
    assert {p.num_partitions for p in parsed} == {len(nodes)}
    assert sorted(p.index for p in parsed) == list(range(len(nodes)))
    for p in parsed:
        assert p.superlink == f"superlink:{link.port}" and not p.insecure
    cred_argv = _argv(services["credentials"])
    assert int(cred_argv[cred_argv.index("--supernodes") + 1]) == len(nodes)
    register = " ".join(_argv(services["register"]))
    for i in range(len(nodes)):
        assert f"/credentials/keys/supernode-{i}.pub" in register
    assert f"--address superlink:{link.port}" in register


def test_mounts_match_the_paths_commands_use(compose):
    services = compose["services"]
    for name, service in services.items():
        argv = " ".join(_argv(service))
        mounts = _mounts(service)
        if "/credentials" in argv:
            assert mounts.get("/credentials") == "credentials", name
        if name != "credentials" and "/credentials" in mounts:
            assert any(v.endswith(":ro") for v in service["volumes"] if v.startswith("credentials:")), name
    assert _mounts(services["credentials"])["/credentials"] == "credentials"
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
    for name in (s for s in services if s.startswith("supernode-")):
        assert services[name]["depends_on"]["register"]["condition"] == "service_completed_successfully"


def test_run_overrides_compose_with_hydra(compose):
    from fedlora.deploy.launch import check_overrides

    run = _deploy_args(_argv(compose["services"]["run"]))[0]
    cfg = check_overrides(" ".join(run.overrides))
    nodes = [s for s in compose["services"] if s.startswith("supernode-")]
    assert cfg.federation.num_clients == len(nodes)
