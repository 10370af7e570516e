"""A small device CA for sites without a PKI: ``depot-node ca init``, ``server-cert``, ``issue``.

``init`` writes, under ``DATA_DIR/tls`` (mode 0700): the CA certificate and key, and a server
certificate for the MQTT TLS listener signed by it (subjectAltName localhost, 127.0.0.1, ::1
and any extra names); ``server-cert`` renews that server certificate with the same CA.
``issue`` signs a client certificate for one device (CN and DNS subjectAltName = device id,
extendedKeyUsage clientAuth) and writes ``DEVICE_ID.crt``, ``DEVICE_ID.key`` and ``ca.crt``
into a directory of the operator's choice, for the meter.

Keys are ECDSA P-256 (small, fast, supported by mosquitto, paho and embedded TLS stacks)
and are written unencrypted with mode 0600, created with that mode so they are never
readable by others, not even for an instant. Nothing here overwrites a key silently:
an existing file is a :class:`CaError`, unless the caller passes ``force``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node.tls import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, TLS_DIRNAME
from storage.contract import DEVICE_ID_PATTERN, is_valid_device_id
from storage.errors import NodeError

CA_DAYS: Final = 3650
#: Leaf certificates: 825 days, the longest that common TLS clients accept for a server.
LEAF_DAYS: Final = 825
LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "::1")


class CaError(NodeError):
    """The CA could not be created or used (exists already, missing, unreadable, bad input)."""


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600 if private else 0o644)
    except FileExistsError:
        raise CaError(f"{path} exists already; not overwriting it (use --force to replace it)") from None
    with os.fdopen(fd, "wb") as f:
        if private:
            os.fchmod(f.fileno(), 0o600)  # O_TRUNC on an existing file keeps its old mode
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates; a leaf (server or device) signs handshakes and does ECDH."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        # A little slack for meters whose clock is a few minutes behind.
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    names: Iterable[str],
    usage: x509.ObjectIdentifier,
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def init_ca(data_dir: Path, *, server_names: Iterable[str] = (), days: int = CA_DAYS, force: bool = False) -> Path:
    """Create the device CA and the server certificate under ``data_dir/tls``; return that dir."""
    tls_dir = data_dir / TLS_DIRNAME
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tls_dir.chmod(0o700)  # mkdir's mode is masked by the umask
    if not force:
        existing = [n for n in (CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT) if (tls_dir / n).exists()]
        if existing:
            msg = f"a CA exists already in {tls_dir} ({', '.join(existing)}); not overwriting it (use --force)"
            raise CaError(msg)
    ca_key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "depot-node device CA")])
    ca_cert = (
        _builder(name, name, ca_key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(tls_dir / CA_KEY, _pem_key(ca_key), private=True, force=force)
    _write(tls_dir / CA_CERT, _pem(ca_cert), private=False, force=force)
    _write_server_cert(tls_dir, ca_cert, ca_key, server_names, force=force)
    return tls_dir


def _write_server_cert(
    tls_dir: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    server_names: Iterable[str],
    *,
    force: bool,
) -> None:
    names = [*LOOPBACK_NAMES, *server_names]
    cert, key = _leaf(
        ca_cert, ca_key, common_name="depot-node", names=names, usage=ExtendedKeyUsageOID.SERVER_AUTH, days=LEAF_DAYS
    )
    _write(tls_dir / SERVER_KEY, _pem_key(key), private=True, force=force)
    _write(tls_dir / SERVER_CERT, _pem(cert), private=False, force=force)


def renew_server(data_dir: Path, *, server_names: Iterable[str] = ()) -> Path:
    """Replace the server certificate and key with new ones from the existing CA (device
    certificates stay valid); return the certificate's path. The node reads it at start."""
    ca_cert, ca_key = _load_ca(data_dir)
    tls_dir = data_dir / TLS_DIRNAME
    _write_server_cert(tls_dir, ca_cert, ca_key, server_names, force=True)
    return tls_dir / SERVER_CERT


def _load_ca(data_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    tls_dir = data_dir / TLS_DIRNAME
    try:
        cert = x509.load_pem_x509_certificate((tls_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((tls_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CaError(f"no CA in {tls_dir}: {exc.filename} is missing (run `depot-node ca init` first)") from exc
    except (OSError, ValueError) as exc:
        raise CaError(f"cannot read the CA in {tls_dir}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError(f"{tls_dir / CA_KEY} is not an ECDSA key written by `depot-node ca init`")
    return cert, key


def issue_device(
    data_dir: Path, device_id: str, out: Path, *, days: int = LEAF_DAYS, force: bool = False
) -> tuple[Path, Path, Path]:
    """Sign a client certificate for *device_id*; return the paths of its cert, key and ca.crt."""
    if not is_valid_device_id(device_id):
        msg = f"{device_id!r} is not a valid device id (it must match {DEVICE_ID_PATTERN})"
        raise CaError(msg)
    ca_cert, ca_key = _load_ca(data_dir)
    cert, key = _leaf(
        ca_cert, ca_key, common_name=device_id, names=[device_id], usage=ExtendedKeyUsageOID.CLIENT_AUTH, days=days
    )
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"{device_id}.crt", out / f"{device_id}.key", out / CA_CERT)
    if not force:
        for path in paths[:2]:
            if path.exists():
                raise CaError(f"{path} exists already; not overwriting it (use --force to replace it)")
    _write(paths[1], _pem_key(key), private=True, force=True)
    _write(paths[0], _pem(cert), private=False, force=True)
    _write(paths[2], _pem(ca_cert), private=False, force=True)
    return paths
