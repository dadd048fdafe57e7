"""``fedvision certs``: the key material of a deployment, in the formats Flower's SuperLink and SuperNodes read.

- ``ca.crt`` / ``ca.key``: a private certificate authority for this federation (keep ``ca.key`` offline);
- ``server.crt`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, whose subject alternative
  names cover every host the sites will dial plus ``localhost`` and ``127.0.0.1``;
- ``site-N.key`` / ``site-N.pub``: one ECDSA P-384 key pair per site for SuperNode authentication, in OpenSSH
  format (what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` load).

Private keys are written 0600 from their first byte, and every file atomically.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedvision.errors import ConfigError
from fedvision.io import atomic_write

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
# TLS keys: P-256 (every gRPC/OpenSSL build speaks it). Node keys: P-384, the curve Flower documents.
TLS_CURVE = ec.SECP256R1
NODE_CURVE = ec.SECP384R1


@dataclass(frozen=True)
class Deployment:
    """Paths of the files ``create_certificates`` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_keys: tuple[Path, ...]  # private keys, 0600: each goes to its site only
    site_public_keys: tuple[Path, ...]  # registered at the SuperLink with `flwr supernode register`


def create_certificates(out: str | Path, sites: int, hosts: Sequence[str] = (), days: int = 365,
                        name: str = "fedvision") -> Deployment:
    """Write a CA, a SuperLink certificate for ``hosts`` (+ localhost, 127.0.0.1) and ``sites`` node key pairs."""
    if sites < 0:
        raise ConfigError(f"--sites must be ≥ 0, got {sites}")
    if days < 1:
        raise ConfigError(f"--days must be ≥ 1, got {days}")
    out = Path(out)
    if (out / "ca.key").exists():
        # a second CA would silently invalidate every certificate the sites already trust
        raise ConfigError(f"{out}: already holds a CA (ca.key); choose another --out or delete it")
    names = _subject_alt_names(list(DEFAULT_HOSTS) + list(hosts))

    ca_key = ec.generate_private_key(TLS_CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA")])
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    server_key = ec.generate_private_key(TLS_CURVE())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} superlink")])
    server_cert = (_builder(server_name, ca_name, server_key.public_key(), days)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    _write(out / "ca.key", _private_pem(ca_key), secret=True)
    ca_path = _write(out / "ca.crt", ca_cert.public_bytes(pem))
    server_key_path = _write(out / "server.key", _private_pem(server_key), secret=True)
    server_path = _write(out / "server.crt", server_cert.public_bytes(pem))

    keys, pubs = [], []
    for i in range(1, sites + 1):
        key = ec.generate_private_key(NODE_CURVE())
        keys.append(_write(out / f"site-{i}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
            secret=True))
        pubs.append(_write(out / f"site-{i}.pub", key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" site-{i}\n".encode()))
    return Deployment(ca_path, out / "ca.key", server_path, server_key_path, tuple(keys), tuple(pubs))


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip() for h in hosts):
        if not host or any(c.isspace() or c in "/:@" for c in host):
            raise ConfigError(f"--host: {host!r} is not a host name or IP address")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between machines
            .not_valid_after(now + dt.timedelta(days=days)))


def _private_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, secret: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(data), permissions=0o600 if secret else 0o644)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certs", help="create the CA, SuperLink TLS certificate and site keys of a deployment",
        description="Create a certificate authority, a TLS certificate for the SuperLink (valid for --host, "
                    "localhost and 127.0.0.1) and one SuperNode authentication key pair per site. "
                    "See docs/deployment.md.")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not already hold a CA)")
    p.add_argument("--sites", type=int, default=0, help="number of site key pairs site-1 … site-K (default 0)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="a DNS name or IP address sites use to reach the SuperLink (repeatable)")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates in days (default 365)")
    p.set_defaults(handler=_certs)


def _certs(args: argparse.Namespace) -> int:
    d = create_certificates(args.out, args.sites, args.host, args.days)
    print(f"fedvision: wrote {d.ca_cert}, {d.server_cert} (+ keys) and {len(d.site_keys)} site key pair(s) "
          f"to {args.out}; give each site ca.crt and its own site-N.key, keep ca.key offline")
    return 0
