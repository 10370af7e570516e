"""What the web app needs from the rest of the node, as one object built by ``node.app``.

The web package never reaches into the broker or the actors directly: revoking a device goes
through :attr:`WebServices.on_revoked`, readiness through :attr:`WebServices.readiness`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from actors.stats import IngestStats
from storage.reader import Reader
from storage.sqlite import SqliteStore

if TYPE_CHECKING:
    from web.limits import HttpRateLimits


async def _nothing(device_id: str) -> None:
    return None


@dataclass(slots=True)
class WebServices:
    reader: Reader
    store: SqliteStore
    stats: IngestStats
    #: Component name → up? ("broker", "storage", "http"); /readyz is 200 when all are True.
    readiness: dict[str, bool] = field(default_factory=dict)
    #: Called after a device was revoked: closes its live MQTT session, forgets cached credentials.
    on_revoked: Callable[[str], Awaitable[None]] = _nothing
    #: Largest ``limit`` a list endpoint accepts.
    max_page: int = 1000
    #: Most devices registered and not revoked (0: no limit); more is a 409 problem.
    max_devices: int = 0
    #: HTTP rate limits per API key and per anonymous address (web.limits); None: none.
    rate_limits: HttpRateLimits | None = None
