"""TLS certificates and SuperNode authentication keys for a Flower deployment.

    python -m fedlora.deploy.credentials --out deploy-credentials --host superlink --supernodes 3

writes ``certificates/ca.crt`` (the CA every SuperNode and ``flwr`` trust),
``certificates/server.pem`` + ``server.key`` (the SuperLink's certificate, signed by the
CA, valid for every ``--host``) and ``keys/supernode-<i>`` + ``.pub`` (ECDSA P-384 key
pairs in OpenSSH format, the form ``flower-supernode --auth-supernode-private-key`` and
``flwr supernode register`` read). Keys are generated with ``cryptography`` (a Flower
dependency), so no openssl or ssh-keygen is needed. These are for a test federation;
production certificates come from the organisation's own CA.

Each role gets only what it needs (``--server-dir``, ``--supernode-dirs``): the SuperLink
and its gateway the CA certificate and the server certificate and key; SuperNode ``i``
the CA certificate and its own key pair. The CA key stays in ``--out`` with the operator:
whoever holds it can mint a server certificate that every SuperNode trusts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.core.files import write_atomic

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: tuple[str, ...] | list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls(out_dir: Path, hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS, days: int = 365) -> TLSFiles:
    """A CA and a SuperLink server certificate it signs, valid for ``hosts``.

    The hosts go into the Subject Alternative Name: gRPC/HTTPS clients check the
    address they dial against it, so every name or IP that SuperNodes, ``flwr`` and
    the SuperLink's own app processes use must be listed.
    """
    if not hosts:
        raise ValueError("at least one host (DNS name or IP) is needed for the server certificate")
    out_dir = Path(out_dir)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dp-federated-lora-lab CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    certs = out_dir / "certificates"
    write_atomic(certs / "ca.key", _key_pem(ca_key), private=True)
    files = TLSFiles(
        ca_cert=write_atomic(certs / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM)),
        server_cert=write_atomic(certs / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM)),
        server_key=write_atomic(certs / "server.key", _key_pem(server_key), private=True),
    )
    return files


def make_node_keys(out_dir: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair for SuperNode authentication, in OpenSSH format.

    Returns (private key, public key). Flower accepts NIST curves only.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    keys = Path(out_dir) / "keys"
    private = write_atomic(
        keys / name,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        private=True,
    )
    public = write_atomic(
        keys / f"{name}.pub",
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" {name}\n".encode(),
    )
    return private, public


def _copy(src: Path, dst: Path, private: bool) -> Path:
    if not src.is_file():
        raise ValueError(f"{src} does not exist; generate credentials with "
                         "`python -m fedlora.deploy credentials --out <dir> --supernodes N`")
    return write_atomic(dst, src.read_bytes(), private=private)


def export_server(out_dir: Path, server_dir: Path) -> Path:
    """``server_dir`` with what the SuperLink and its gateway read, in the same layout
    (``certificates/ca.crt``, ``server.pem``, ``server.key``) and without the CA key."""
    src, dst = Path(out_dir) / "certificates", Path(server_dir) / "certificates"
    _copy(src / "ca.crt", dst / "ca.crt", private=False)
    _copy(src / "server.pem", dst / "server.pem", private=False)
    _copy(src / "server.key", dst / "server.key", private=True)
    return Path(server_dir)


def export_supernode(out_dir: Path, index: int, node_dir: Path) -> Path:
    """``node_dir`` with what SuperNode ``index`` reads (``certificates/ca.crt``,
    ``keys/supernode-<index>`` and its ``.pub``): no CA key, server key or other node's key."""
    name = f"supernode-{index}"
    _copy(Path(out_dir) / "certificates" / "ca.crt", Path(node_dir) / "certificates" / "ca.crt", private=False)
    _copy(Path(out_dir) / "keys" / name, Path(node_dir) / "keys" / name, private=True)
    _copy(Path(out_dir) / "keys" / f"{name}.pub", Path(node_dir) / "keys" / f"{name}.pub", private=False)
    return Path(node_dir)


def check_tls(ca_cert: Path, server_cert: Path | None = None, server_key: Path | None = None) -> None:
    """Fail early, naming the fix, when certificate files are missing or do not belong together."""
    fix = "generate them with `python -m fedlora.deploy.credentials --out <dir>` (or `make credentials`)"
    for label, path in (("CA certificate", ca_cert), ("server certificate", server_cert), ("server key", server_key)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{label} {path} does not exist; {fix}")
    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    if server_cert is None:
        return
    cert = x509.load_pem_x509_certificate(Path(server_cert).read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    for label, path, c in (("CA certificate", ca_cert, ca), ("server certificate", server_cert, cert)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise ValueError(f"{label} {path} is valid from {c.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                             f"{c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now; regenerate the credentials "
                             f"(--days sets how long they last), or {fix}")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as err:  # other issuer / key type
        raise ValueError(
            f"server certificate {server_cert} was not issued by the CA {ca_cert} ({type(err).__name__}); "
            f"use the ca.crt generated together with it, or {fix}"
        ) from None
    if server_key is not None:
        key = serialization.load_pem_private_key(Path(server_key).read_bytes(), password=None)
        if key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise ValueError(
                f"server key {server_key} does not match server certificate {server_cert}; "
                f"use the key generated with it, or {fix}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedlora.deploy.credentials",
        description="Generate a CA, a SuperLink TLS certificate and SuperNode auth keys.",
    )
    parser.add_argument("--out", type=Path, default=Path("deploy-credentials"), help="output directory")
    parser.add_argument(
        "--host", action="append", default=None,
        help="DNS name or IP the SuperLink is reached at (repeat; default localhost, 127.0.0.1, ::1)",
    )
    parser.add_argument("--supernodes", type=int, default=2, help="number of SuperNode key pairs")
    parser.add_argument("--days", type=int, default=365, help="certificate validity")
    parser.add_argument("--force", action="store_true", help="overwrite existing credentials")
    parser.add_argument(
        "--if-missing", action="store_true",
        help="keep existing credentials and exit 0 (containers that restart; keys stay registered)",
    )
    parser.add_argument(
        "--server-dir", type=Path,
        help="also write the SuperLink's and gateway's files here "
             "(CA certificate, server certificate and key; no CA key)",
    )
    parser.add_argument(
        "--supernode-dirs", type=Path,
        help="also write DIR/supernode-<i>/ for each SuperNode: the CA certificate and its own key pair only",
    )
    args = parser.parse_args(argv)
    if args.supernodes < 0:
        parser.error("--supernodes must be >= 0")
    if (args.out / "certificates" / "ca.crt").exists() and args.if_missing and not args.force:
        print(f"credentials in {args.out} kept")
        return _export(args)
    if (args.out / "certificates" / "ca.crt").exists() and not args.force:
        print(f"error: {args.out}/certificates already exists; pass --force to replace it "
              "(SuperNodes registered with the old keys must then be registered again)", file=sys.stderr)
        return 2
    hosts = tuple(args.host) if args.host else DEFAULT_HOSTS
    tls = make_tls(args.out, hosts, args.days)
    print(f"CA certificate:     {tls.ca_cert}")
    print(f"server certificate: {tls.server_cert} (valid for {', '.join(hosts)})")
    print(f"server key:         {tls.server_key}")
    for i in range(args.supernodes):
        private, public = make_node_keys(args.out, f"supernode-{i}")
        print(f"SuperNode {i} keys:   {private} {public}")
    return _export(args)


def _export(args: argparse.Namespace) -> int:
    try:
        if args.server_dir is not None:
            print(f"SuperLink/gateway:  {export_server(args.out, args.server_dir)}")
        if args.supernode_dirs is not None:
            for i in range(args.supernodes):
                node_dir = export_supernode(args.out, i, args.supernode_dirs / f"supernode-{i}")
                print(f"SuperNode {i} files:  {node_dir}")
    except ValueError as err:
        print(f"error: {err} (--supernodes {args.supernodes} needs keys/supernode-0..{args.supernodes - 1} "
              f"in {args.out}; pass --force to regenerate all)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
