"""Deployment tooling without a federation: certificates, keys, connections, checks,
and the messages bad input gets."""

from __future__ import annotations

import socket
import ssl
import threading
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedlora.client.numpy_client import node_identity
from fedlora.core.errors import ConfigError
from fedlora.data.sources import load_node_data
from fedlora.deploy.__main__ import main as deploy_main
from fedlora.deploy.credentials import check_tls, make_node_keys, make_tls
from fedlora.deploy.launch import (
    Credentials,
    DeployError,
    check_overrides,
    check_superlink,
    node_config_text,
    run_config_text,
    superlink_command,
    supernode_command,
    write_connection,
)


def test_server_certificate_is_signed_by_the_ca_for_every_host(tmp_path):
    tls = make_tls(tmp_path, ["superlink", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert (tls.server_key.stat().st_mode & 0o777) == 0o600
    check_tls(tls.ca_cert, tls.server_cert, tls.server_key)  # consistent set: no error


def test_mismatched_or_missing_certificates_name_the_fix(tmp_path):
    first = make_tls(tmp_path / "a")
    second = make_tls(tmp_path / "b")
    with pytest.raises(ValueError, match="not issued by the CA"):
        check_tls(second.ca_cert, first.server_cert, first.server_key)
    with pytest.raises(ValueError, match="does not match server certificate"):
        check_tls(first.ca_cert, first.server_cert, second.server_key)
    with pytest.raises(ValueError, match="does not exist.*fedlora.deploy.credentials"):
        check_tls(tmp_path / "nope.crt")
    with pytest.raises(ValueError, match="does not exist"):
        superlink_command(Credentials(tmp_path / "missing"))


def test_node_keys_are_what_flower_loads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    private, public = make_node_keys(tmp_path, "supernode-0")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert key.curve.name == "secp384r1"
    assert try_load_public_key(public)  # Flower's own check for `flwr supernode register`


def test_commands_are_secure_unless_asked(tmp_path):
    make_tls(tmp_path)
    creds = Credentials(tmp_path)
    secure = superlink_command(creds, port=9100)
    assert "--insecure" not in secure and "--enable-supernode-auth" in secure
    assert secure[secure.index("--ssl-certfile") + 1] == str(creds.server_cert)
    assert "--disable-runtime-dependency-installation" in secure
    assert "--insecure" in superlink_command(None)
    private, _ = make_node_keys(tmp_path, "supernode-0")
    node = supernode_command("127.0.0.1:9100", {"partition-id": 0, "num-partitions": 2}, 9101, creds.ca_cert, private)
    assert node[node.index("--root-certificates") + 1] == str(creds.ca_cert)
    assert node[node.index("--auth-supernode-private-key") + 1] == str(private)
    assert node[node.index("--node-config") + 1] == "partition-id=0 num-partitions=2"
    with pytest.raises(DeployError, match="does not exist"):
        supernode_command("127.0.0.1:9100", {"partition-id": 0}, 9101, creds.ca_cert, tmp_path / "nokey")
    with pytest.raises(DeployError, match="host:port"):
        supernode_command("127.0.0.1", {"partition-id": 0}, 9101, None)


def test_node_config_and_run_config_parse_back_in_flower():
    from flwr.common.config import parse_config_args

    text = node_config_text({"partition-id": 1, "num-partitions": 3, "data-path": "/data/a b.csv"})
    assert parse_config_args([text]) == {"partition-id": 1, "num-partitions": 3, "data-path": "/data/a b.csv"}
    run = parse_config_args([run_config_text("experiment=quick privacy.target_epsilon=3", "/tmp/x", resume=True)])
    assert run == {"overrides": "experiment=quick privacy.target_epsilon=3", "run-dir": "/tmp/x", "resume": True}


def test_connection_is_added_next_to_others(tmp_path):
    from flwr.cli.flower_config import parse_superlink_connection

    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    write_connection(tmp_path, "lab", "10.0.0.5:9093", tmp_path / "ca.crt")
    data = tomllib.loads((tmp_path / "config.toml").read_text())
    assert data["superlink"]["default"] == "lab"
    assert data["superlink"]["local"] == {"address": ":local:"}
    conn = parse_superlink_connection(data["superlink"]["lab"], "lab")
    assert conn.address == "10.0.0.5:9093" and conn.root_certificates == str((tmp_path / "ca.crt").resolve())
    assert not conn.insecure
    write_connection(tmp_path, "dev", "127.0.0.1:9093", None, make_default=False)
    data = tomllib.loads((tmp_path / "config.toml").read_text())
    assert data["superlink"]["dev"]["insecure"] is True and data["superlink"]["default"] == "lab"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _TLSServer:
    """A TLS listener with a given certificate: enough for the handshake checks."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    def close(self) -> None:
        self.sock.close()


def test_superlink_address_and_ca_are_checked_before_flower_retries(tmp_path):
    with pytest.raises(DeployError, match="cannot reach a SuperLink at 127.0.0.1:.*check --superlink"):
        check_superlink(f"127.0.0.1:{_closed_port()}", None, timeout=2)
    good = make_tls(tmp_path / "good")
    other = make_tls(tmp_path / "other")
    server = _TLSServer(good.server_cert, good.server_key)
    try:
        address = f"127.0.0.1:{server.port}"
        check_superlink(address, good.ca_cert)  # the right CA: no error
        with pytest.raises(DeployError, match="does not verify.*ca.crt generated together"):
            check_superlink(address, other.ca_cert)
        with pytest.raises(DeployError, match="uses TLS; pass --credentials"):
            check_superlink(address, None)
    finally:
        server.close()


def test_rejected_override_names_hydra_and_the_setting():
    with pytest.raises(DeployError, match="Hydra rejected .*strategy/krumm"):
        check_overrides("strategy=krumm")
    assert check_overrides("strategy=krum federation.num_clients=7").federation.num_clients == 7


def test_deployed_server_config_errors(tmp_path, monkeypatch):
    from fedlora.deploy.runs import RUNS_ROOT_ENV
    from strategies.server_app import deployed_config

    monkeypatch.setenv(RUNS_ROOT_ENV, str(tmp_path.parent))  # the SuperLink's runs root
    with pytest.raises(ConfigError, match="Hydra rejected"):
        deployed_config({"overrides": "privacy.no_such_key=1"}, 1)
    with pytest.raises(ConfigError, match="no checkpoint.npz and config.yaml"):
        deployed_config({"overrides": "", "run-dir": str(tmp_path), "resume": True}, 1)
    cfg, run_dir, resume = deployed_config({"overrides": "federation.rounds=4", "run-dir": str(tmp_path)}, 1)
    assert cfg.federation.rounds == 4 and run_dir == tmp_path.resolve() and not resume
    # Resuming with other overrides than the run started with is refused, naming them.
    from omegaconf import OmegaConf

    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (tmp_path / "checkpoint.npz").write_bytes(b"")
    (tmp_path / "overrides.txt").write_text("federation.rounds=4\n")
    with pytest.raises(ConfigError, match="needs the overrides it started with .'federation.rounds=4'"):
        deployed_config({"overrides": "federation.rounds=5", "run-dir": str(tmp_path), "resume": True}, 1)
    saved, _, resume = deployed_config({"overrides": "federation.rounds=4", "run-dir": str(tmp_path), "resume": True}, 1)
    assert resume and saved.federation.rounds == 4


def test_node_identity_from_node_config(tmp_path):
    assert node_identity({"partition-id": 1, "num-partitions": 3}, 3) == (1, None)
    (tmp_path / "d.csv").write_text("text,label\n")
    assert node_identity({"partition-id": 2, "data-path": str(tmp_path / "d.csv")}, 5) == (2, str(tmp_path / "d.csv"))
    with pytest.raises(ConfigError, match="partition-id is missing"):
        node_identity({"num-partitions": 3}, 3)
    with pytest.raises(ConfigError, match="num-partitions=<n>.*or data-path"):
        node_identity({"partition-id": 0}, 5)
    with pytest.raises(ConfigError, match=r"must lie in \[0, num-partitions=3\)"):
        node_identity({"partition-id": 3, "num-partitions": 3}, 3)
    # A node that shards the data otherwise than the server planned would overlap others.
    with pytest.raises(ConfigError, match="federation.num_clients=5"):
        node_identity({"partition-id": 0, "num-partitions": 3}, 5)


def test_node_data_maps_labels_to_the_federation_ids(tmp_path):
    from omegaconf import OmegaConf

    path = tmp_path / "mine.csv"
    path.write_text("body,stars\ngreat food,good\nawful,bad\nfine,good\n")
    cfg = OmegaConf.create({"text_column": "body", "label_column": "stars"})
    rows = load_node_data(str(path), cfg, ["bad", "good"])
    assert rows["label"] == [1, 0, 1] and rows["text"][0] == "great food"
    path.write_text("body,stars\nx,meh\n")
    with pytest.raises(ConfigError, match="labels not seen"):
        load_node_data(str(path), cfg, ["bad", "good"])
    with pytest.raises(ConfigError, match="no such file"):
        load_node_data(str(tmp_path / "none.csv"), cfg, ["bad", "good"])


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    assert deploy_main(["superlink", "--credentials", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert deploy_main(["superlink"]) == 2
    assert "--insecure" in capsys.readouterr().err
    assert deploy_main(["run", "--connection", "x", "strategy=krumm"]) == 2
    assert "Hydra rejected" in capsys.readouterr().err
    assert deploy_main(["supernode", "--insecure", "--superlink", f"127.0.0.1:{_closed_port()}",
                        "--partition-id", "0", "--num-partitions", "2"]) == 2
    assert "cannot reach a SuperLink" in capsys.readouterr().err
    assert deploy_main(["credentials", "--out", str(tmp_path / "c"), "--supernodes", "1"]) == 0
    assert (tmp_path / "c" / "keys" / "supernode-0.pub").is_file()
    assert deploy_main(["credentials", "--out", str(tmp_path / "c")]) == 2  # never overwrites silently
    assert "--force" in capsys.readouterr().err


def test_deployed_runs_get_the_simulation_checks(tiny_cfg):
    from strategies.preflight import preflight

    # Robust rule + client-level DP is refused in deployment as in simulation...
    with pytest.raises(ConfigError, match="no sensitivity bound"):
        preflight(tiny_cfg("privacy=client", "strategy=median"), simulation=False)
    # ...while the simulation backend's CPU count does not bind deployed clients.
    cfg = tiny_cfg("federation.client_resources.num_cpus=64")
    with pytest.raises(ConfigError, match="CPUs per client"):
        preflight(cfg)
    assert preflight(cfg, simulation=False).num_clients == cfg.federation.num_clients
