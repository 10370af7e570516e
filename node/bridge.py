"""The bridge between the embedded broker and the actors.

The broker side (``node.broker``, ``node.plugins``) calls into a :class:`Bridge`; the bridge
turns broker events into actor messages. It owns no task of its own. Every device PUBLISH
comes in through :meth:`Bridge.admit`, synchronously (the fast path's reader, or
:meth:`ingest` in amqtt's per-packet task): telemetry and status go to the device's actor,
command acks to the command actor. The PUBACK goes out only once the message's outcome is
committed, and when a mailbox is full the reader awaits :meth:`Bridge.deliver`, so a meter's
own in-flight window is the backpressure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final, Literal

from actors.alerts import AlertRule, AlertSignal, AlertSink
from actors.commands import CommandActor
from actors.limits import DeviceLimiter, LimitKind
from actors.messages import Completion, Link, LinkEvent, Outcome, Publish
from actors.router import Router
from actors.stats import IngestStats
from node.auth import DeviceGate
from storage.contract import ParsedTopic, TopicKind, parse_topic

if TYPE_CHECKING:
    from amqtt.session import Session

    from node.broker import NodeBroker

log = logging.getLogger(__name__)

#: Key in an amqtt ``Session``'s ``attributes`` (the dict amqtt keeps for plugins' data) saying
#: why it ended (DISCONNECT packet, keep-alive, revocation); the disconnect hook, which
#: receives only the session, reads it. (Not a new attribute of the session itself: that grows
#: every session's ``__dict__`` by ~1.5 KB.)
DISCONNECT_REASON: Final = "_depot_node_disconnect_reason"

#: Key in a ``Session``'s ``attributes`` set by the auth plugin: the device's credential
#: generation (:meth:`node.auth.DeviceGate.generation`) when its CONNECT was checked (in that
#: dict rather than on the session, like DISCONNECT_REASON).
AUTH_GENERATION: Final = "_depot_node_auth_generation"

_DEVICE_ACTIONS: Final = frozenset({"publish", "subscribe"})
#: How long :meth:`Bridge.connected` waits for a stale session to be registered as live.
_STALE_CLOSE_WAIT: Final = 5.0

#: ``device_limit_action``: what happens to a PUBLISH over its device's rate limits.
LimitAction = Literal["quarantine", "disconnect"]


class OverDeviceLimit(Exception):  # noqa: N818 - a condition, named as the setting names it
    """:meth:`Bridge.admit` with ``device_limit_action = "disconnect"``: the device is over its
    rate limits; the PUBLISH was not taken and must not be acknowledged, and the connection is
    closed with the disconnect reason :attr:`reason`."""

    reason: Final = "rate_limited"

    def __init__(self, device_id: str, detail: str) -> None:
        super().__init__(f"{device_id}: {detail}")


def set_disconnect_reason(session: Session, reason: str, *, overwrite: bool = False) -> None:
    if overwrite or session.attributes.get(DISCONNECT_REASON) is None:
        session.attributes[DISCONNECT_REASON] = reason


def set_auth_generation(session: Session, generation: int) -> None:
    session.attributes[AUTH_GENERATION] = generation


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
        #: Where command acks go and who hears of connects and subscriptions (node.commands).
        self.commands: CommandActor | None = None

    def admit(self, parsed: ParsedTopic, topic: str, payload: bytes, done: Completion | None) -> Publish | None:
        """The one way in for a device's PUBLISH (the ACL was checked already), from the
        broker's fast path (node.fastpath, per message, so not a coroutine) and from
        :meth:`ingest`. Hands it to the device's actor, or a command ack to the command actor;
        returns it when that mailbox is full, and the caller then awaits :meth:`deliver` (the
        backpressure). *done* resolves once the message's outcome is committed: for an ack,
        the command's new state (so its PUBACK goes out after that, as for telemetry).

        The device's rate limits (ADR 0011) are checked here, so they hold on both paths. Over
        them, with ``device_limit_action = "quarantine"`` the message goes on marked
        ``over_limit`` (the device actor quarantines it as ``rate_limited``, and it is
        acknowledged once that is durable); with ``"disconnect"`` it raises
        :class:`OverDeviceLimit`: the message was not taken, nothing will resolve *done*, and
        the caller must not acknowledge it and closes the connection (reason ``rate_limited``;
        the device resends after reconnecting).
        """
        over_limit = None
        limiter = self.limiter
        if limiter is not None and limiter.enabled:
            exceeded = limiter.admit(parsed.device_id, len(payload), time.monotonic())
            if exceeded is not None:
                over_limit = self._over_limit(parsed.device_id, exceeded)
                if self.limit_action == "disconnect":
                    raise OverDeviceLimit(parsed.device_id, over_limit)
        kind = parsed.kind
        msg = Publish(parsed.device_id, kind, topic, payload, time.time(), done, over_limit)
        if kind is TopicKind.COMMANDS_ACK and self.commands is not None and over_limit is None:
            if not self.commands.ack_nowait(msg.device_id, topic, payload, msg.received_at, done):
                return msg
            self._seen(msg)
            return None
        return None if self.router.deliver_nowait(msg) else msg

    async def deliver(self, msg: Publish) -> None:
        """Wait for room for a message that :meth:`admit` returned, and hand it over."""
        if msg.kind is TopicKind.COMMANDS_ACK and self.commands is not None and msg.over_limit is None:
            await self.commands.ack(msg.device_id, msg.topic, msg.payload, msg.received_at, msg.done)
            self._seen(msg)
            return
        await self.router.deliver(msg)

    def _seen(self, ack: Publish) -> None:
        """A command ack is not telemetry: the device actor only takes it as a sign of life
        (``last_seen``), and the PUBACK does not wait for that. Never waits: with the device's
        mailbox full, the messages queued there bring ``last_seen`` up to date anyway."""
        self.router.deliver_nowait(
            Publish(ack.device_id, TopicKind.COMMANDS_ACK, ack.topic, ack.payload, ack.received_at, None)
        )

    async def ingest(self, parsed: ParsedTopic, topic: str, payload: bytes, *, wait: bool) -> Outcome:
        """Deliver one PUBLISH through :meth:`admit`; with *wait*, return once it is durable
        (amqtt's own reader: ``NodeProtocolHandler.handle_publish``, and QoS 2). Raises
        :class:`OverDeviceLimit` as :meth:`admit` does."""
        if not wait:
            full = self.admit(parsed, topic, payload, None)
            if full is not None:
                await self.deliver(full)
            return Outcome.DURABLE
        # A bare asyncio future: the cheapest thing to await once per PUBLISH (an anyio Event
        # costs several times more, measured in bench/ingest.py's profile).
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        def notify(outcome: Outcome) -> None:
            if not future.done():  # the PUBLISH task may have been cancelled (disconnect)
                future.set_result(outcome)

        full = self.admit(parsed, topic, payload, Completion(notify))
        if full is not None:
            await self.deliver(full)
        return await future

    def subscribed(self, client_id: str, topic: str) -> None:
        """A device subscribed (amqtt's event hook, after the SUBACK): its commands may go now."""
        parsed = parse_topic(topic)
        if self.commands is not None and parsed is not None and parsed.kind is TopicKind.COMMANDS:
            self.commands.hint(parsed.device_id)

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
        session.attributes.pop(DISCONNECT_REASON, None)
        if session.username:
            peer = f"{session.remote_address}:{session.remote_port}"
            await self.router.deliver(Link(session.username, LinkEvent.CONNECTED, time.time(), peer))
            generation = session.attributes.get(AUTH_GENERATION)
            if generation is not None and generation != self.gate.generation(session.username):
                await self._close_stale(session)
                return
            if self.commands is not None:
                self.commands.hint(session.username)

    async def _close_stale(self, session: Session) -> None:
        """Close a session whose credentials changed between its check and now.

        The device's sessions were closed when the change was committed, but this one was not
        live yet (between its CONNACK and its registration): close it once it is.
        """
        log.info("closing MQTT session of %r: its credentials changed while it connected", session.client_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STALE_CLOSE_WAIT
        while self.broker is not None and loop.time() < deadline:
            for handler in list(self.broker.live.get(session.client_id or "", [])):
                if handler.session is session:
                    set_disconnect_reason(session, "credentials_changed", overwrite=True)
                    await handler.handle_connection_closed()
                    return
            if session.transitions.is_disconnected():
                return
            await asyncio.sleep(0.01)

    async def disconnected(self, session: Session, *, taken_over: bool = False) -> None:
        """A connection of *session* ended. *taken_over*: a connection of a persistent session
        that a newer one resumed (node.broker); the session itself lives on, no will went out."""
        self.stats.connections -= 1
        if session.username and self.limiter is not None:
            self.limiter.release(session.username, time.monotonic())
        if session.username:
            reason = "taken_over" if taken_over else session.attributes.get(DISCONNECT_REASON) or "connection_lost"
            will = None
            if not taken_over and reason not in ("clean", "node_stopping") and session.will_flag and session.will_topic:
                # amqtt's _handle_disconnect, the only path that fires this hook, has just
                # published (and, if asked, retained) the will: keep that in the history.
                payload = bytes(session.will_message or b"")[:100].decode("utf-8", "replace")
                retained = " (retained)" if session.will_retain else ""
                will = f"{session.will_topic}{retained}: {payload}"
            # A takeover: the old connection ends after the new one was accepted. Its end goes
            # into the history but must not mark the device offline.
            live = self.broker.live.get(session.client_id or "", []) if self.broker is not None else []
            superseded = taken_over or any(h.session is not session for h in live)
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
