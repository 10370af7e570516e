"""TLS for the MQTT listener: the server context, and what a client certificate says.

The node builds its own :class:`ssl.SSLContext` (TLS 1.2 minimum, the device CA as the only
trust anchor for client certificates) and hands it to amqtt in place of amqtt's own
(``NodeBroker._create_ssl_context``). Client certificates are *optional* at the TLS layer,
as in amqtt: a certificate that is presented must chain to the device CA or the handshake
fails, but a client without one completes the handshake and is refused, counted and told
why (CONNACK "not authorized") by the auth path when certificates are required
(:mod:`node.auth`). That keeps every refusal visible in ``depot_node_auth_refused_total``.

How the certificate reaches the auth decision: amqtt runs each connection in its own task,
``Broker.stream_connected``, which still holds the asyncio ``StreamWriter``. The node notes
the connection's :class:`Transport` there in a context variable (:func:`note_transport`);
amqtt schedules the auth plugins with ``asyncio.ensure_future``, which copies the task's
context, so :func:`current_transport` in the plugin sees that connection's transport and no
other.

This module never reads the database and never decides on access: it only describes.
"""

from __future__ import annotations

import asyncio
import ssl
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from storage.errors import ConfigError

#: Where ``depot-node ca init`` puts the device CA and the server certificate, under the data dir.
TLS_DIRNAME: Final = "tls"
CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"
SERVER_CERT: Final = "server.crt"
SERVER_KEY: Final = "server.key"


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """A verified client certificate, reduced to what the auth decision needs."""

    #: The subject's common names and the DNS names of its subjectAltName.
    names: frozenset[str]
    #: False when an extendedKeyUsage extension is present and does not allow clientAuth
    #: (e.g. the node's own server certificate, which the same CA signed).
    client_auth: bool
    subject: str


@dataclass(frozen=True, slots=True)
class Transport:
    """How one MQTT connection reached the node."""

    tls: bool = False
    certificate: PeerCertificate | None = None


_PLAIN: Final = Transport()
# The default is immutable (a frozen dataclass), so sharing it is safe.
_TRANSPORT: ContextVar[Transport] = ContextVar("depot_node_mqtt_transport", default=_PLAIN)


def note_transport(writer: asyncio.StreamWriter) -> None:
    """Record the transport of the connection whose task this is (see the module docstring)."""
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        _TRANSPORT.set(_PLAIN)
        return
    # With CERT_OPTIONAL a certificate is returned only if the client sent one, and only
    # after it verified against the device CA (otherwise the handshake failed already).
    der = ssl_object.getpeercert(binary_form=True)
    _TRANSPORT.set(Transport(tls=True, certificate=peer_certificate(der) if der else None))


def current_transport() -> Transport:
    return _TRANSPORT.get()


def peer_certificate(der: bytes) -> PeerCertificate:
    """Describe a certificate OpenSSL has verified. One that ``cryptography`` cannot parse
    (OpenSSL is more lenient) names nobody, so it identifies no device."""
    try:
        cert = x509.load_der_x509_certificate(der)
        names = {str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names.update(san.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            pass
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            client_auth = ExtendedKeyUsageOID.CLIENT_AUTH in eku
        except x509.ExtensionNotFound:
            client_auth = True
        return PeerCertificate(frozenset(names), client_auth, cert.subject.rfc4514_string())
    except ValueError:
        return PeerCertificate(frozenset(), client_auth=True, subject="(unparseable)")


def certificate_refusal(cert: PeerCertificate, client_id: str | None, username: str | None) -> str | None:
    """Why *cert* does not identify the client that sent this CONNECT, or None when it does.

    The client id must be one of the certificate's names (CN or a DNS subjectAltName), and a
    username, when one is sent, must be the same device id. Whether that id is a well-formed,
    registered, unrevoked device is checked by the caller, as for password logins.
    """
    if not cert.client_auth:
        return "certificate_not_for_clients"
    if client_id is None or client_id not in cert.names:
        return "certificate_mismatch"
    if username is not None and username != client_id:
        return "certificate_mismatch"
    return None


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path


def default_files(data_dir: Path) -> TlsFiles:
    """The files ``depot-node ca init`` writes under *data_dir*."""
    d = data_dir / TLS_DIRNAME
    return TlsFiles(cert=d / SERVER_CERT, key=d / SERVER_KEY, ca=d / CA_CERT)


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """The MQTT listener's context; a file that cannot be used raises ConfigError naming it.

    TLS 1.2 is the minimum (1.0 and 1.1 are deprecated, RFC 8996). Only the device CA is
    trusted for client certificates, never the system's CAs.
    """
    for setting, path in (("tls_cert_file", files.cert), ("tls_key_file", files.key), ("tls_ca_file", files.ca)):
        if not path.is_file():
            hint = " (run `depot-node ca init`, or configure the site's own files)"
            raise ConfigError(setting, f"{path} does not exist{hint}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as exc:
        msg = f"cannot use {files.cert} with key {files.key}: {exc}"
        raise ConfigError("tls_cert_file", msg) from exc
    try:
        ctx.load_verify_locations(cafile=files.ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("tls_ca_file", f"cannot load CA certificates from {files.ca}: {exc}") from exc
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
