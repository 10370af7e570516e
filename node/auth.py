"""Who may connect: the device gate behind the broker's auth plugin.

A device connects with username = device id = client id and password = its secret. The gate
checks the id's shape, that the device is registered, not revoked and not disabled, and the
secret against its Argon2id hash.

Over TLS, a client certificate from the device CA may stand in for the secret: the
certificate's CN or DNS subjectAltName must be the client id (and the username, if one is
sent), the device must still be registered and not revoked, and a password sent as well must
still be right. With ``require_client_cert`` a TLS session without a certificate is refused
("no_certificate"): amqtt's TLS layer only asks for one (see :mod:`node.tls`). A disabled or
revoked device's certificate is refused too; disabling, rotating and revoking all close the
device's open session, a certificate session included (rotation does not invalidate the
certificate: the device may log in with it again).

Verifications run in the gate's own pool of ``auth_concurrency`` threads, which run at a lower
CPU priority (nice +10) than the rest of the process: in a reconnect storm they queue there
and take the CPU that is left over, so the event loop that carries telemetry and the SQLite
commit thread are not starved (``bench/reconnect_storm.py``, ``docs/benchmarks.md``). They
must not share anyio's worker threads: a lowered priority would stay with the thread and slow
the next commit that ran on it.

A successful check is remembered as a keyed digest of the secret (not the secret), so a
device that reconnects does not pay for Argon2 again. Revoking, disabling or rotating a
device *forgets* it: the cached digest goes, and the device's generation moves on, so a check
that was already past the database read (waiting for Argon2 with the old hash) reads the
credentials again instead of accepting the old secret or caching it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import anyio

from actors.stats import IngestStats
from node.tls import Transport, certificate_refusal
from storage.contract import is_valid_device_id, may_publish
from storage.reader import Reader
from storage.secrets import verify_device_secret

log = logging.getLogger(__name__)

#: Checks of one CONNECT restarted by credential changes before it is refused.
_MAX_ATTEMPTS: Final = 3
#: Niceness added to the Argon2 threads: the CFS weight of nice 10 is about a tenth of nice 0,
#: so when the CPU is contended the event loop and the commit thread get ~90 % of it.
ARGON2_NICE: Final = 10


def _lower_priority() -> None:
    # Linux: PRIO_PROCESS with a thread id sets that thread's niceness only. Elsewhere, or
    # where it is not permitted, the pool runs at normal priority: slower telemetry in a
    # storm, nothing worse.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ARGON2_NICE)
    except (OSError, AttributeError):
        log.debug("cannot lower the priority of the Argon2 threads", exc_info=True)


#: Why a CONNECT was refused; the values are metric label values (a closed set).
REFUSALS: Final = (
    "bad_identity",
    "client_id_mismatch",
    "no_password",
    "unknown_device",
    "revoked",
    "disabled",
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
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="argon2", initializer=_lower_priority)
        self._pepper = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}
        #: Bumped by :meth:`forget`; a check started under an older generation starts over.
        self._generation: dict[str, int] = {}

    def close(self) -> None:
        """Stop the verification threads (after the broker stopped; running ones finish)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """Bounds the Argon2 verifications running at once (``auth_concurrency``)."""
        return self._limiter

    def forget(self, device_id: str) -> None:
        """The device's credentials changed: drop what was verified, and restart checks in flight."""
        self._verified.pop(device_id, None)
        self._generation[device_id] = self._generation.get(device_id, 0) + 1

    def generation(self, device_id: str) -> int:
        """How many times *device_id* was forgotten; a session authenticated under an older
        generation was accepted with credentials that no longer hold."""
        return self._generation.get(device_id, 0)

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
        digest = hmac.new(self._pepper, password.encode(), hashlib.sha256).digest() if password else b""
        for _ in range(_MAX_ATTEMPTS):
            generation = self.generation(username)
            creds = await self._reader.credentials(username)
            if creds is None:
                return "unknown_device"
            if creds.revoked:
                self._verified.pop(username, None)
                return "revoked"
            if creds.disabled:
                return "disabled"
            if not password:
                return None  # the certificate identified the device (checked above)
            cached = self._verified.get(username)
            if cached is not None and hmac.compare_digest(cached, digest):
                return None
            async with self._limiter:
                loop = asyncio.get_running_loop()
                ok = await loop.run_in_executor(self._pool, verify_device_secret, creds.secret_hash, password)
            if self.generation(username) != generation:
                continue  # rotated, disabled or revoked meanwhile: what was read is stale
            if not ok:
                return "bad_secret"
            self._verified[username] = digest
            return None
        # Credentials changing faster than a check completes: refuse, the device retries.
        return "bad_secret"
