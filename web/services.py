"""What the web app needs from the rest of the node, as one object built by ``node.app``.

The web package never reaches into the broker or the actors directly: revoking a device goes
through :attr:`WebServices.on_revoked`, readiness through :attr:`WebServices.readiness`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from actors.commands import CommandActor
from actors.stats import IngestStats
from storage.reader import Reader
from storage.sqlite import SqliteStore


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
    #: Called after a device's registration changed (its supply system): its actor reloads it.
    on_device_changed: Callable[[str], Awaitable[None]] = _nothing
    #: Largest ``limit`` a list endpoint accepts.
    max_page: int = 1000
    #: Where commands are submitted (None: the API answers 503 to new commands).
    commands: CommandActor | None = None
    #: The longest ``ttl_s`` a command may ask for (setting ``command_max_ttl_s``).
    command_max_ttl_s: int = 7 * 86400
