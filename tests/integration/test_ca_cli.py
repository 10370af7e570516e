"""`depot-node ca init` and `ca issue` as an operator runs them, and the TLS settings at start."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.integration.test_cli import cli


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ca_init_writes_a_ca_and_a_server_certificate(tmp_path: Path) -> None:
    result = cli("ca", "init", "--data-dir", str(tmp_path), "--server-name", "node.depot.example")
    assert result.returncode == 0, result.stderr
    tls = tmp_path / "tls"
    assert mode(tls) == 0o700
    assert mode(tls / "ca.key") == 0o600
    assert mode(tls / "server.key") == 0o600
    ca, server = load(tls / "ca.crt"), load(tls / "server.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "node.depot.example"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_ca_init_does_not_overwrite_an_existing_ca(tmp_path: Path) -> None:
    assert cli("ca", "init", "--data-dir", str(tmp_path)).returncode == 0
    before = (tmp_path / "tls" / "ca.key").read_bytes()
    again = cli("ca", "init", "--data-dir", str(tmp_path))
    assert again.returncode != 0
    assert "exists already" in again.stderr
    assert "--force" in again.stderr
    assert (tmp_path / "tls" / "ca.key").read_bytes() == before
    forced = cli("ca", "init", "--data-dir", str(tmp_path), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "tls" / "ca.key").read_bytes() != before
    assert mode(tmp_path / "tls" / "ca.key") == 0o600


def test_ca_server_cert_renews_the_server_certificate_only(tmp_path: Path) -> None:
    assert cli("ca", "init", "--data-dir", str(tmp_path)).returncode == 0
    tls = tmp_path / "tls"
    ca_key, old_server = (tls / "ca.key").read_bytes(), (tls / "server.crt").read_bytes()
    result = cli("ca", "server-cert", "--data-dir", str(tmp_path), "--server-name", "depot-7.example.net")
    assert result.returncode == 0, result.stderr
    assert (tls / "ca.key").read_bytes() == ca_key
    assert (tls / "server.crt").read_bytes() != old_server
    assert mode(tls / "server.key") == 0o600
    server = load(tls / "server.crt")
    server.verify_directly_issued_by(load(tls / "ca.crt"))
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "depot-7.example.net" in san.get_values_for_type(x509.DNSName)
    missing = cli("ca", "server-cert", "--data-dir", str(tmp_path / "none"))
    assert missing.returncode != 0
    assert "depot-node ca init" in missing.stderr


def test_ca_issue_writes_a_device_certificate_that_chains_to_the_ca(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    assert cli("ca", "init", "--data-dir", str(data)).returncode == 0
    result = cli("ca", "issue", "meter-12.a_b", "--out", str(out), "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "meter-12.a_b.crt", "meter-12.a_b.key"]
    assert mode(out / "meter-12.a_b.key") == 0o600
    assert (out / "ca.crt").read_bytes() == (data / "tls" / "ca.crt").read_bytes()
    cert = load(out / "meter-12.a_b.crt")
    cert.verify_directly_issued_by(load(out / "ca.crt"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "meter-12.a_b"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["meter-12.a_b"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # The key is the certificate's.
    key = serialization.load_pem_private_key((out / "meter-12.a_b.key").read_bytes(), password=None)
    assert key.public_key() == cert.public_key()

    again = cli("ca", "issue", "meter-12.a_b", "--out", str(out), "--data-dir", str(data))
    assert again.returncode != 0
    assert "exists already" in again.stderr


def test_ca_issue_refuses_bad_device_ids(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    assert cli("ca", "init", "--data-dir", str(data)).returncode == 0
    # Upper case, topic separators and wildcards, a bad first character, too long, blank.
    for bad_id in ("Meter-1", "a/b", "+", "#", "_lead", "x" * 65, "meter 1", ""):
        result = cli("ca", "issue", bad_id, "--out", str(out), "--data-dir", str(data))
        assert result.returncode != 0, bad_id
        assert "not a valid device id" in result.stderr, bad_id
    assert not out.exists()


def test_ca_issue_without_a_ca_says_to_run_init(tmp_path: Path) -> None:
    result = cli("ca", "issue", "meter-1", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path))
    assert result.returncode != 0
    assert "depot-node ca init" in result.stderr


@pytest.mark.parametrize(
    ("args", "env_extra", "needle"),
    [
        (["--mqtts-bind", "127.0.0.1:0"], {}, "tls_cert_file"),
        (["--mqtts-bind", "127.0.0.1:0"], {"DEPOT_NODE_TLS_CA_FILE": "/nonexistent/ca.crt"}, "tls_ca_file"),
        (["--mqtts-bind", "localhost"], {}, "mqtts_bind"),
        (["--no-mqtt-plain"], {}, "mqtt_plain_enabled"),
        (["--require-client-cert"], {}, "mqtts_require_client_cert"),
    ],
)
def test_bad_tls_settings_fail_at_start_naming_the_setting(
    tmp_path: Path, args: list[str], env_extra: dict[str, str], needle: str
) -> None:
    if needle == "tls_ca_file":
        assert cli("ca", "init", "--data-dir", str(tmp_path)).returncode == 0
    env = {**os.environ, "DEPOT_NODE_DATA_DIR": str(tmp_path), **env_extra}
    result = cli("serve", "--mqtt-bind", "127.0.0.1:0", "--http-bind", "127.0.0.1:0", *args, env=env)
    assert result.returncode != 0
    assert needle in result.stderr
