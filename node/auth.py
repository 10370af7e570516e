"""Who may connect: the device gate behind the broker's auth plugin.

A device connects with username = device id = client id and password = its secret. The gate
checks the id's shape, that the device is registered and not revoked, and the secret against
its Argon2id hash. Hashing runs in worker threads under a limiter (``auth_concurrency``), so
a reconnect storm queues there instead of stalling the event loop that carries telemetry.

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
)


class DeviceGate:
    def __init__(self, reader: Reader, stats: IngestStats, *, concurrency: int = 2) -> None:
        self._reader = reader
        self._stats = stats
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._pepper = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}

    def forget(self, device_id: str) -> None:
        self._verified.pop(device_id, None)

    async def check(
        self, client_id: str | None, username: str | None, password: str | None, will_topic: str | None = None
    ) -> bool:
        reason = await self._refusal(client_id, username, password)
        if reason is None and will_topic is not None and not may_publish(username or "", will_topic):
            # amqtt publishes (and may retain) a will without asking the ACL: a device's will
            # must be one of its own topics (in practice iot/{id}/status).
            reason = "bad_will_topic"
        if reason is None:
            return True
        self._stats.count_refusal(reason)
        log.info("CONNECT refused: %s (client id %r)", reason, (client_id or "")[:80])
        return False

    async def _refusal(self, client_id: str | None, username: str | None, password: str | None) -> str | None:
        if username is None or not is_valid_device_id(username):
            return "bad_identity"
        if client_id != username:
            return "client_id_mismatch"
        if not password:
            return "no_password"
        creds = await self._reader.credentials(username)
        if creds is None:
            return "unknown_device"
        if creds.revoked:
            self.forget(username)
            return "revoked"
        digest = hmac.new(self._pepper, password.encode(), hashlib.sha256).digest()
        cached = self._verified.get(username)
        if cached is not None and hmac.compare_digest(cached, digest):
            return None
        ok = await anyio.to_thread.run_sync(verify_device_secret, creds.secret_hash, password, limiter=self._limiter)
        if not ok:
            return "bad_secret"
        self._verified[username] = digest
        return None
