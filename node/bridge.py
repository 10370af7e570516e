"""The bridge between the embedded broker and the actors.

The broker side (``node.broker``, ``node.plugins``) calls into a :class:`Bridge`; the bridge
turns broker events into actor messages. It owns no task of its own: :meth:`ingest` runs in
amqtt's per-packet task and awaits the device actor's mailbox and then the commit, so the
PUBACK goes out only once the message is durable, and a meter's own in-flight window is the
backpressure.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from actors.messages import Completion, Link, LinkEvent, Outcome, Publish
from actors.router import Router
from actors.stats import IngestStats
from node.auth import DeviceGate
from storage.contract import ParsedTopic

if TYPE_CHECKING:
    from amqtt.session import Session

    from node.broker import NodeBroker

log = logging.getLogger(__name__)


class Bridge:
    def __init__(self, gate: DeviceGate, router: Router, stats: IngestStats, *, disconnect_on_denial: bool) -> None:
        self.gate = gate
        self.router = router
        self.stats = stats
        self.disconnect_on_denial = disconnect_on_denial
        self.broker: NodeBroker | None = None

    async def ingest(self, parsed: ParsedTopic, topic: str, payload: bytes, *, wait: bool) -> Outcome:
        """Deliver one PUBLISH to its device actor; with *wait*, return once it is durable."""
        done = Completion() if wait else None
        await self.router.deliver(Publish(parsed.device_id, parsed.kind, topic, payload, time.time(), done))
        return await done.wait() if done is not None else Outcome.DURABLE

    async def connected(self, session: Session) -> None:
        self.stats.connections += 1
        if session.username:
            await self.router.deliver(Link(session.username, LinkEvent.CONNECTED, time.time()))

    async def disconnected(self, session: Session) -> None:
        self.stats.connections -= 1
        if session.username:
            await self.router.deliver(Link(session.username, LinkEvent.DISCONNECTED, time.time()))

    def denied(self, identity: str, action: str, topic: str) -> None:
        self.stats.count_denial(action)
        log.warning("ACL denied: %s may not %s %r", identity, action, topic[:200])

    async def disconnect(self, device_id: str) -> bool:
        """Close *device_id*'s live session, if any (after a revocation)."""
        if self.broker is None:
            return False
        return await self.broker.close_session(device_id)
