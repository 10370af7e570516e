"""What the web app needs from the rest of the node, as one object built by ``node.app``.

The web package never reaches into the broker or the actors directly: revoking a device goes
through :attr:`WebServices.on_revoked` (rotating or disabling one through
:attr:`WebServices.on_credentials_changed`), readiness through :attr:`WebServices.readiness`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from actors.commands import CommandActor
from actors.stats import IngestStats
from storage.reader import Reader
from storage.sqlite import SqliteStore

if TYPE_CHECKING:
    from web.limits import HttpRateLimits


async def _nothing(device_id: str) -> None:
    return None


async def _nothing_for(device_id: str, reason: str) -> None:
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
    #: Called after a device's registration changed (its supply system): its actor reloads it.
    on_device_changed: Callable[[str], Awaitable[None]] = _nothing
    #: Largest ``limit`` a list endpoint accepts.
    max_page: int = 1000
    #: Called after a device's secret was rotated or the device disabled (with the disconnect
    #: reason): forgets its cached verification and closes its live MQTT session.
    on_credentials_changed: Callable[[str, str], Awaitable[None]] = _nothing_for
    #: ``/metrics`` needs a viewer key (setting ``metrics_require_key``).
    metrics_require_key: bool = False
    #: Most devices registered and not revoked (0: no limit); more is a 409 problem.
    max_devices: int = 0
    #: HTTP rate limits per API key and per anonymous address (web.limits); None: none.
    rate_limits: HttpRateLimits | None = None
    #: Where commands are submitted (None: the API answers 503 to new commands).
    commands: CommandActor | None = None
    #: The longest ``ttl_s`` a command may ask for (setting ``command_max_ttl_s``).
    command_max_ttl_s: int = 7 * 86400
