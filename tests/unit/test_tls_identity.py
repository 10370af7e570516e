"""Property tests of the certificate-identity rule (node.tls) and of what node.ca issues."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from node.ca import init_ca, issue_device
from node.tls import PeerCertificate, certificate_refusal, peer_certificate
from tests.unit.test_contract import any_text, device_ids

# Names as certificates carry them: mostly device ids (so that matches happen often), plus
# arbitrary text, as a site's own PKI may put any CN or DNS name in a certificate.
names = st.one_of(device_ids, any_text)
certs = st.builds(
    PeerCertificate,
    names=st.frozensets(names, max_size=4),
    client_auth=st.booleans(),
    subject=st.just("CN=x"),
)


@given(cert=certs, client_id=st.one_of(st.none(), names), username=st.one_of(st.none(), names))
def test_a_certificate_identifies_exactly_the_client_id_it_names(
    cert: PeerCertificate, client_id: str | None, username: str | None
) -> None:
    reason = certificate_refusal(cert, client_id, username)
    accepted = cert.client_auth and client_id in cert.names and username in (None, client_id)
    assert (reason is None) == accepted
    if not cert.client_auth:
        assert reason == "certificate_not_for_clients"


@given(cert=certs, device=device_ids)
def test_another_devices_certificate_never_passes(cert: PeerCertificate, device: str) -> None:
    # Whatever else the certificate names, a client id it does not name is refused, with or
    # without a username that claims it.
    other = PeerCertificate(cert.names - {device}, cert.client_auth, cert.subject)
    for username in (None, device):
        assert certificate_refusal(other, device, username) is not None


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("ca")
    init_ca(data, server_names=["node.depot.example"])
    return data


def _der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


# Each example signs a real certificate (~1 ms of ECDSA): 30 ids cover the alphabet well.
@settings(max_examples=30, deadline=None)
@given(device=device_ids)
def test_issued_certificates_carry_the_device_id(ca_dir: Path, device: str) -> None:
    with tempfile.TemporaryDirectory() as out:
        crt, _, ca = issue_device(ca_dir, device, Path(out))
        peer = peer_certificate(_der(crt))
        assert peer.names == {device}
        assert peer.client_auth
        assert certificate_refusal(peer, device, None) is None
        issued = x509.load_pem_x509_certificate(crt.read_bytes())
        issued.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.read_bytes()))


def test_the_server_certificate_is_not_a_client_certificate(ca_dir: Path) -> None:
    server = peer_certificate(_der(ca_dir / "tls" / "server.crt"))
    assert "localhost" in server.names
    assert "node.depot.example" in server.names
    assert not server.client_auth
    assert certificate_refusal(server, "localhost", None) == "certificate_not_for_clients"


def test_an_unparseable_certificate_identifies_nobody() -> None:
    peer = peer_certificate(b"\x30\x03\x02\x01\x00")
    assert peer.names == frozenset()
    assert certificate_refusal(peer, "meter-1", None) == "certificate_mismatch"
