"""Who may connect: the device gate behind the broker's auth plugin.

A device connects with username = device id = client id and password = its secret. The gate
checks the id's shape, that the device is registered and not revoked, and the secret against
its Argon2id hash.

Over TLS, a client certificate from the device CA may stand in for the secret: the
certificate's CN or DNS subjectAltName must be the client id (and the username, if one is
sent), the device must still be registered and not revoked, and a password sent as well must
still be right. With ``require_client_cert`` a TLS session without a certificate is refused
("no_certificate"): amqtt's TLS layer only asks for one (see :mod:`node.tls`).

Hashing runs in worker threads under a limiter (``auth_concurrency``), so a reconnect storm
queues there instead of stalling the event loop that carries telemetry.

A successful check is remembered as a keyed digest of the secret (not the secret), so a
device that reconnects does not pay for Argon2 again; revoking a device forgets it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Final

import anyio

from actors.stats import IngestStats
from node.tls import Transport, certificate_refusal
from storage.contract import is_valid_device_id, may_publish
from storage.reader import Reader
from storage.secrets import verify_device_secret

log = logging.getLogger(__name__)

#: Why a CONNECT was refused; the values are metric label values (a closed set).
REFUSALS: Final = (
    "bad_identity",
    "client_id_mismatch",
    "no_password",
    "unknown_device",
    "revoked",
    "bad_secret",
    "bad_will_topic",
    "no_certificate",
    "certificate_mismatch",
    "certificate_not_for_clients",
)


class DeviceGate:
    def __init__(
        self, reader: Reader, stats: IngestStats, *, concurrency: int = 2, require_client_cert: bool = False
    ) -> None:
        self._reader = reader
        self._require_client_cert = require_client_cert
        self._stats = stats
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._pepper = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}

    def forget(self, device_id: str) -> None:
        self._verified.pop(device_id, None)

    async def check(
        self,
        client_id: str | None,
        username: str | None,
        password: str | None,
        will_topic: str | None = None,
        transport: Transport | None = None,
    ) -> bool:
        """True when the CONNECT may go ahead. A certificate login sends no username: the
        device id is then the client id (the caller makes it the session's username)."""
        transport = transport or Transport()
        reason = await self._refusal(client_id, username, password, transport)
        identity = username if username is not None else client_id
        if reason is None and will_topic is not None and not may_publish(identity or "", will_topic):
            # amqtt publishes (and may retain) a will without asking the ACL: a device's will
            # must be one of its own topics (in practice iot/{id}/status).
            reason = "bad_will_topic"
        if reason is None:
            return True
        self._stats.count_refusal(reason)
        log.info("CONNECT refused: %s (client id %r)", reason, (client_id or "")[:80])
        return False

    async def _refusal(
        self, client_id: str | None, username: str | None, password: str | None, transport: Transport
    ) -> str | None:
        cert = transport.certificate
        if cert is not None:
            mismatch = certificate_refusal(cert, client_id, username)
            if mismatch is not None:
                return mismatch
            username = client_id
        elif transport.tls and self._require_client_cert:
            return "no_certificate"
        if username is None or not is_valid_device_id(username):
            return "bad_identity"
        if client_id != username:
            return "client_id_mismatch"
        if not password and cert is None:
            return "no_password"
        creds = await self._reader.credentials(username)
        if creds is None:
            return "unknown_device"
        if creds.revoked:
            self.forget(username)
            return "revoked"
        if not password:
            return None  # the certificate identified the device
        digest = hmac.new(self._pepper, password.encode(), hashlib.sha256).digest()
        cached = self._verified.get(username)
        if cached is not None and hmac.compare_digest(cached, digest):
            return None
        ok = await anyio.to_thread.run_sync(verify_device_secret, creds.secret_hash, password, limiter=self._limiter)
        if not ok:
            return "bad_secret"
        self._verified[username] = digest
        return None
