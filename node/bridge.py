"""The bridge between the embedded broker and the actors.

The broker side (``node.broker``, ``node.plugins``) calls into a :class:`Bridge`; the bridge
turns broker events into actor messages. It owns no task of its own: :meth:`ingest` runs in
amqtt's per-packet task and awaits the device actor's mailbox and then the commit, so the
PUBACK goes out only once the message is durable, and a meter's own in-flight window is the
backpressure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final, Literal

from actors.alerts import AlertRule, AlertSignal, AlertSink
from actors.limits import DeviceLimiter, LimitKind
from actors.messages import Completion, Link, LinkEvent, Outcome, Publish
from actors.router import Router
from actors.stats import IngestStats
from node.auth import DeviceGate
from storage.contract import ParsedTopic

if TYPE_CHECKING:
    from amqtt.session import Session

    from node.broker import NodeBroker

log = logging.getLogger(__name__)

#: Attribute set on an amqtt ``Session`` to say why it ended (DISCONNECT packet, keep-alive,
#: revocation); the disconnect hook, which receives only the session, reads it.
DISCONNECT_REASON: Final = "_depot_node_disconnect_reason"

_DEVICE_ACTIONS: Final = frozenset({"publish", "subscribe"})

#: ``device_limit_action``: what happens to a PUBLISH over its device's rate limits.
LimitAction = Literal["quarantine", "disconnect"]


def set_disconnect_reason(session: Session, reason: str, *, overwrite: bool = False) -> None:
    if overwrite or getattr(session, DISCONNECT_REASON, None) is None:
        setattr(session, DISCONNECT_REASON, reason)


class Bridge:
    def __init__(
        self,
        gate: DeviceGate,
        router: Router,
        stats: IngestStats,
        *,
        disconnect_on_denial: bool,
        alerts: AlertSink | None = None,
        limiter: DeviceLimiter | None = None,
        limit_action: LimitAction = "quarantine",
    ) -> None:
        self.gate = gate
        self.router = router
        self.stats = stats
        self.disconnect_on_denial = disconnect_on_denial
        #: Where ACL denials go as ``acl_denial`` signals (never blocks; see actors.alerts).
        self.alerts = alerts
        #: Per-device messages/s and bytes/s (actors.limits); None: no limits.
        self.limiter = limiter
        self.limit_action: LimitAction = limit_action
        self.broker: NodeBroker | None = None

    async def ingest(self, parsed: ParsedTopic, topic: str, payload: bytes, *, wait: bool) -> Outcome:
        """Deliver one PUBLISH to its device actor; with *wait*, return once it is durable.

        A PUBLISH over its device's rate limits is quarantined as ``rate_limited`` (acknowledged:
        the payload is kept) or, with ``device_limit_action = "disconnect"``, not acknowledged
        and the device's connection closed (it resends after reconnecting).
        """
        over_limit = None
        if self.limiter is not None:
            exceeded = self.limiter.admit(parsed.device_id, len(payload), time.monotonic())
            if exceeded is not None:
                over_limit = self._over_limit(parsed.device_id, exceeded)
                if self.limit_action == "disconnect":
                    await self.disconnect(parsed.device_id, "rate_limited")
                    return Outcome.FAILED
        if not wait:
            publish = Publish(parsed.device_id, parsed.kind, topic, payload, time.time(), None, over_limit)
            await self.router.deliver(publish)
            return Outcome.DURABLE
        # A bare asyncio future: the cheapest thing to await once per PUBLISH (an anyio Event
        # costs several times more, measured in bench/ingest.py's profile).
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        def notify(outcome: Outcome) -> None:
            if not future.done():  # the PUBLISH task may have been cancelled (disconnect)
                future.set_result(outcome)

        done = Completion(notify)
        await self.router.deliver(Publish(parsed.device_id, parsed.kind, topic, payload, time.time(), done, over_limit))
        return await future

    def _over_limit(self, device_id: str, exceeded: LimitKind) -> str:
        self.stats.count_limit(exceeded.value)
        limits = self.limiter.limits if self.limiter is not None else None
        if exceeded is LimitKind.MESSAGES and limits is not None:
            detail = f"over the limit of {limits.messages_per_s:g} messages/s (burst {limits.messages_burst})"
        elif limits is not None:
            detail = f"over the limit of {limits.bytes_per_s:g} payload bytes/s (burst {limits.bytes_burst})"
        else:
            detail = f"over the {exceeded.value} limit"
        # A line per excess message would let a flooding device flood the log too: log the
        # 1st, 2nd, 4th, 8th, ... excess of the node (the metric has the exact count).
        n = self.stats.limit_exceeded[exceeded.value]
        if n & (n - 1) == 0:
            log.warning("device %s is %s (%s; %d times so far)", device_id, detail, self.limit_action, n)
        return detail

    async def connected(self, session: Session) -> None:
        self.stats.connections += 1
        # A persistent session object is reused by the next connection: start afresh.
        setattr(session, DISCONNECT_REASON, None)
        if session.username:
            peer = f"{session.remote_address}:{session.remote_port}"
            await self.router.deliver(Link(session.username, LinkEvent.CONNECTED, time.time(), peer))

    async def disconnected(self, session: Session) -> None:
        self.stats.connections -= 1
        if session.username and self.limiter is not None:
            self.limiter.release(session.username, time.monotonic())
        if session.username:
            reason = getattr(session, DISCONNECT_REASON, None) or "connection_lost"
            will = None
            if reason not in ("clean", "node_stopping") and session.will_flag and session.will_topic:
                # amqtt's _handle_disconnect, the only path that fires this hook, has just
                # published (and, if asked, retained) the will: keep that in the history.
                payload = bytes(session.will_message or b"")[:100].decode("utf-8", "replace")
                retained = " (retained)" if session.will_retain else ""
                will = f"{session.will_topic}{retained}: {payload}"
            # A takeover: the old connection ends after the new one was accepted. Its end goes
            # into the history but must not mark the device offline.
            live = self.broker.live.get(session.client_id or "", []) if self.broker is not None else []
            superseded = any(h.session is not session for h in live)
            link = Link(session.username, LinkEvent.DISCONNECTED, time.time(), reason, will, superseded)
            await self.router.deliver(link)

    async def node_stopping(self) -> None:
        """Record a disconnect for every connected device before the broker closes them
        (amqtt's shutdown closes sessions without its disconnect event)."""
        if self.broker is None:
            return
        for session in self.broker.connected_sessions():
            set_disconnect_reason(session, "node_stopping", overwrite=True)
            await self.disconnected(session)

    def denied(self, identity: str, action: str, topic: str) -> None:
        self.stats.count_denial(action)
        log.warning("ACL denied: %s may not %s %r", identity, action, topic[:200])
        # Only what a device asked for; "receive" is the node's own delivery being filtered.
        if self.alerts is not None and identity and action in _DEVICE_ACTIONS:
            detail = f"may not {action} {topic[:200]!r}"
            self.alerts(AlertSignal(identity, AlertRule.ACL_DENIAL, raised=True, detail=detail, at=time.time()))

    async def disconnect(self, device_id: str, reason: str = "revoked") -> bool:
        """Close *device_id*'s live session, if any (after a revocation)."""
        if self.broker is None:
            return False
        return await self.broker.close_session(device_id, reason)
