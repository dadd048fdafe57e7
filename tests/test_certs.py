"""``fedvision certs``: the files Flower's SuperLink and SuperNodes load, with private keys kept private."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from fedvision.certs import create_certificates
from fedvision.cli import main
from fedvision.errors import ConfigError


def test_certificates_keys_and_permissions(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path / "c"), "--sites", "2", "--host", "link.example.org",
                 "--host", "10.1.2.3"]) == 0
    out = tmp_path / "c"
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key", "site-1.key",
                                                      "site-1.pub", "site-2.key", "site-2.pub"]
    for name in ("ca.key", "server.key", "site-1.key", "site-2.key"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name

    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "link.example.org"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                              ipaddress.ip_address("10.1.2.3")}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key((out / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()

    # What flower-supernode --auth-supernode-private-key and `flwr supernode register` accept.
    from flwr.cli.supernode.register import try_load_public_key

    for i in (1, 2):
        private = load_ssh_private_key((out / f"site-{i}.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert try_load_public_key(out / f"site-{i}.pub")
    assert (out / "site-1.key").read_bytes() != (out / "site-2.key").read_bytes()


def test_refuses_to_replace_an_existing_ca_and_bad_hosts(tmp_path):
    create_certificates(tmp_path, sites=0)
    before = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a CA"):
        create_certificates(tmp_path, sites=1)
    assert (tmp_path / "ca.crt").read_bytes() == before
    for host in ("a b", "http://x", ""):
        with pytest.raises(ConfigError, match="--host"):
            create_certificates(tmp_path / "other", sites=0, hosts=[host])
