"""The embedded amqtt 0.12.1 broker, with inbound PUBLISHes taken at the protocol handler.

amqtt queues every inbound PUBLISH in a per-session queue that ``Broker._client_message_loop``
drains one message per ``asyncio.wait`` round, and it sends the PUBACK *before* that: a client
that disconnects with messages still queued loses them although each was acknowledged. So the
node takes each PUBLISH where the acknowledgement is decided and never uses amqtt's delivery
path for device → node traffic:

* :class:`NodeProtocolHandler` overrides ``ProtocolHandler.handle_publish`` (called by
  ``_reader_loop`` in one task per packet). It checks the ACL, hands the message to the
  device's actor through the :class:`~node.bridge.Bridge`, waits for the commit, and only then
  sends PUBACK (QoS 1) or PUBREC → PUBREL → PUBCOMP (QoS 2). A message that could not be made
  durable is not acknowledged and the connection is closed, so the device resends it.
* :class:`NodeBroker` makes every session use that handler: it overrides
  ``Broker._initialize_client_session`` (which builds the handler through
  ``BrokerProtocolHandler.init_from_connect``) and re-classes the handler it returns.

Both replace amqtt internals, so this module is pinned to amqtt 0.12.1:
``tests/integration/test_amqtt_pin.py`` fails when the upstream code changes.

Node → device traffic (commands) still uses amqtt's own delivery, and so do subscriptions.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from contextvars import ContextVar
from typing import Any, Final, cast, override

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, Server
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.pingreq import PingReqPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.session import Session
from transitions.core import MachineError

from actors.messages import Outcome
from node.bridge import Bridge, OverDeviceLimit, set_disconnect_reason
from node.guard import ConnectionGuard, attach_session
from node.tls import note_transport
from storage.contract import PUBLISH_KINDS, parse_topic

log = logging.getLogger(__name__)

AMQTT_VERSION: Final = "0.12.1"
#: PUBACK fixed header: packet type 4, remaining length 2 (MQTT 3.1.1 §3.4).
_PUBACK_HEADER: Final = b"\x40\x02"
#: CONNECT set-ups running at once (see NodeBroker.stream_connected). A set-up is a few
#: hundred microseconds of event-loop work when the secret is cached, and waits on the Argon2
#: pool (``auth_concurrency``) when it is not: a few more than the pool keeps it busy, and
#: telemetry waits behind at most this many set-up steps per loop iteration, not a storm's
#: thousand.
CONNECT_CONCURRENCY: Final = 8
#: What a CONNECT brings to a stored persistent session: amqtt's list in
#: ``_initialize_client_session``, and the will's retain flag, which amqtt forgets.
_CONNECT_FIELDS: Final = (
    "will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive", "username", "password",
)  # fmt: skip


class _Connecting:
    """One connection between its accept and its message loop, in its own task's context."""

    __slots__ = ("admitted", "client_id", "listener", "verdict")

    def __init__(self, listener: str) -> None:
        self.listener = listener
        #: The CONNECT's client id, once it was read.
        self.client_id: str | None = None
        #: The authentication result, decided before amqtt looks at any existing session.
        self.verdict: bool | None = None
        #: Holds one of NodeBroker's CONNECT admission slots.
        self.admitted = False


#: amqtt runs each connection in a task of its own (asyncio's ``start_server`` callback), from
#: ``stream_connected`` through ``_initialize_client_session``, ``_authenticate`` and
#: ``_handle_client_session`` to the message loop: a context variable follows it through.
_CONNECTING: ContextVar[_Connecting | None] = ContextVar("depot_node_connecting", default=None)


class NodeProtocolHandler(BrokerProtocolHandler):
    """amqtt's broker-side protocol handler, with device PUBLISHes going to the node."""

    bridge: Bridge
    #: The task closing the session after a keep-alive expiry (kept so it is not collected).
    _keepalive_close: asyncio.Task[None] | None = None
    #: Event-loop time of the last PUBLISH or PINGREQ (see NodeBroker.enforce_inactivity).
    last_activity: float = 0.0
    #: Its persistent session was resumed by a newer connection (NodeBroker._handle_disconnect).
    taken_over: bool = False

    @classmethod
    def prepare_session(cls, session: Session) -> None:
        """Called by NodeBroker for each session a CONNECT produced (node.fastpath slims it)."""

    def slim(self) -> None:
        """Called by NodeBroker once the handler is this class (node.fastpath slims it)."""

    #: True when Broker._client_message_loop is not needed (node.fastpath).
    owns_client_loop: bool = False

    async def start(self) -> None:
        if self.session is not None:
            attach_session(self.reader, self.session)  # node.guard: before amqtt reads past the CONNECT
        await super().start()
        # Only an authenticated session gets here (amqtt starts the handler after CONNACK 0).
        broker = self.bridge.broker
        if broker is not None:
            await broker.register_live(self)

    async def stop(self) -> None:
        broker = self.bridge.broker
        if broker is not None:
            broker.unregister_live(self)
        await super().stop()

    async def handle_pingreq(self, pingreq: PingReqPacket) -> None:
        self.last_activity = asyncio.get_running_loop().time()
        await super().handle_pingreq(pingreq)

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        self.last_activity = asyncio.get_running_loop().time()
        session = self.session
        topic = publish_packet.topic_name
        data = publish_packet.data
        if session is None or topic is None or data is None:
            return
        header = publish_packet.variable_header
        packet_id = header.packet_id if header is not None else None
        qos = publish_packet.qos or QOS_0
        if qos not in (QOS_0, QOS_1, QOS_2) or (qos != QOS_0 and packet_id is None):
            await self._close("malformed PUBLISH (QoS or packet id)")
            return
        identity = session.username or ""
        parsed = parse_topic(topic)
        if parsed is None or parsed.device_id != identity or parsed.kind not in PUBLISH_KINDS:
            # MQTT 3.1.1 has no negative PUBACK: acknowledge, drop, count, and optionally close.
            self.bridge.denied(identity, "publish", topic)
            if self.bridge.disconnect_on_denial:
                await self._close("ACL denial")
                return
            await self._acknowledge(qos, packet_id)
            return
        try:
            outcome = await self.bridge.ingest(parsed, topic, bytes(data), wait=qos != QOS_0)
        except OverDeviceLimit as exc:
            await self._close(f"over its rate limits ({exc})", OverDeviceLimit.reason)
            return
        if outcome is Outcome.FAILED:
            await self._close("message could not be made durable")
            return
        await self._acknowledge(qos, packet_id)

    async def _acknowledge(self, qos: int, packet_id: int | None) -> None:
        if packet_id is None or qos == QOS_0:
            return
        if qos == QOS_1:
            await self._send_puback(packet_id)
            return
        # QoS 2: the message is durable already, and (boot, seq) makes a resend harmless, so
        # PUBREC now and complete the handshake as amqtt would.
        waiter: asyncio.Future[PubrelPacket] = asyncio.get_running_loop().create_future()
        previous = self._pubrel_waiters.get(packet_id)
        if previous is not None and not previous.done():
            previous.cancel()
        self._pubrel_waiters[packet_id] = waiter
        try:
            await self._send_packet(PubrecPacket.build(packet_id))
            await waiter
        finally:
            if self._pubrel_waiters.get(packet_id) is waiter:
                del self._pubrel_waiters[packet_id]
        await self._send_packet(PubcompPacket.build(packet_id))

    async def _send_puback(self, packet_id: int) -> None:
        """Write a PUBACK straight to the stream: one PUBLISH, one 4-byte write.

        amqtt's ``_send_packet`` builds a packet object, takes a write lock, reschedules a timer
        and fires a plugin event for every packet; on the PUBLISH path that was a measurable
        share of the node's CPU (bench/ingest.py). One ``write()`` call is one contiguous
        chunk on the transport, so it cannot interleave with amqtt's own packets.
        """
        writer = self.writer
        if writer is None:
            return
        try:
            writer.write(_PUBACK_HEADER + packet_id.to_bytes(2, "big"))
            await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            await self.handle_connection_closed()

    async def _close(self, why: str, reason: str = "closed_by_node") -> None:
        client_id = self.session.client_id if self.session is not None else None
        log.warning("closing MQTT session of %r: %s", client_id, why)
        if self.session is not None:
            set_disconnect_reason(self.session, reason)
        await self.handle_connection_closed()

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        if self.session is not None:
            set_disconnect_reason(self.session, "clean" if disconnect is not None else "connection_lost")
        await super().handle_disconnect(disconnect)

    def handle_read_timeout(self) -> None:
        """Keep-alive expired: nothing arrived for 1.5 x the client's keep-alive. Close it.

        amqtt's own handler does nothing here (upstream issue #308): a powered-off meter would
        stay "connected" forever and its will would never be published. Closing through
        ``handle_connection_closed`` makes amqtt treat it as an abnormal disconnect, which
        publishes the will.
        """
        if self._keepalive_close is None or self._keepalive_close.done():
            self._keepalive_close = asyncio.get_running_loop().create_task(
                self._close("keep-alive expired", "keepalive_expired")
            )


class NodeBroker(Broker):
    """amqtt's Broker, with :class:`NodeProtocolHandler` for every client session."""

    def __init__(
        self,
        config: dict[str, Any],
        bridge: Bridge,
        tls_context: ssl.SSLContext | None = None,
        *,
        handler_class: type[NodeProtocolHandler] = NodeProtocolHandler,
        guard: ConnectionGuard | None = None,
        connect_concurrency: int = CONNECT_CONCURRENCY,
    ) -> None:
        super().__init__(config)
        self.bridge = bridge
        #: The TLS listener's context, built by node.tls (used instead of amqtt's own).
        self.tls_context = tls_context
        #: NodeProtocolHandler (amqtt's reader) or node.fastpath.FastProtocolHandler.
        self.handler_class = handler_class
        bridge.broker = self
        #: Authenticated, open connections per client id. amqtt's own session table is not
        #: enough: a CONNECT with a taken client id replaces the table entry *before* it is
        #: authenticated, even when it is then refused, and an accepted second CONNECT with a
        #: clean session never closes the first (MQTT-3.1.4-2). Revocation, takeover and
        #: "online" use this registry instead.
        self.live: dict[str, list[NodeProtocolHandler]] = {}
        #: Connection limits before amqtt parses anything (node.guard): connection count,
        #: packet size (``max_packet_bytes``, for both readers) and stalled packets.
        self.guard = guard
        #: CONNECT set-ups running at once (see stream_connected and CONNECT_CONCURRENCY).
        self._admission = asyncio.Semaphore(connect_concurrency)

    def _leave_admission(self, connecting: _Connecting) -> None:
        if connecting.admitted:
            connecting.admitted = False
            self._admission.release()

    async def register_live(self, handler: NodeProtocolHandler) -> None:
        """A session was accepted: take over from any older connection of the same client."""
        session = handler.session
        if session is None or session.client_id is None:
            return
        older = self.live.get(session.client_id, [])
        self.live[session.client_id] = [handler]
        for old in older:
            # The same Session object means a persistent session that amqtt itself took over
            # (it closed the old handler before starting this one); closing it here would
            # mark the shared session disconnected under the new connection.
            if old is handler or old.session is None or old.session is session:
                continue
            set_disconnect_reason(old.session, "taken_over", overwrite=True)
            await self._del_all_subscriptions(old.session)
            await old.handle_connection_closed()

    def unregister_live(self, handler: NodeProtocolHandler) -> None:
        client_id = handler.session.client_id if handler.session is not None else None
        # A session always has its client id; walking every live connection is for a
        # handler without one (and would make a storm's disconnects quadratic).
        candidates = [client_id] if client_id is not None else list(self.live)
        for cid in candidates:
            handlers = self.live.get(cid)
            if handlers is not None and handler in handlers:
                handlers.remove(handler)
                if not handlers:
                    del self.live[cid]
                return

    async def _delete_session(self, client_id: str) -> None:
        # amqtt calls this for a clean-session CONNECT before authenticating it: a refused
        # CONNECT must not wipe the live session of the device it claims to be. A live
        # session is taken over (and its subscriptions dropped) in register_live instead,
        # once the new one is authenticated.
        if client_id in self.live:
            return
        await super()._delete_session(client_id)

    def _restore_session_table(self, client_id: str | None) -> None:
        """Point amqtt's table entry for *client_id* back at its live connection, where a
        connection that ended had replaced it (only this client id: a storm's thousand
        disconnects must not each walk every live connection)."""
        handlers = self.live.get(client_id or "")
        if not handlers:
            return
        handler = handlers[-1]
        entry = self._sessions.get(client_id or "")
        if handler.session is not None and (entry is None or entry[1] is not handler):
            self._sessions[client_id or ""] = (handler.session, handler)

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        connecting = _CONNECTING.get()
        if connecting is None:  # not through stream_connected: amqtt's own order
            handler, session = await super()._initialize_client_session(reader, writer, remote_address, remote_port)
        else:
            handler, session = await self._authenticated_session(reader, writer, connecting)
        if session.keep_alive > 0:
            # MQTT 3.1.1 §3.1.2.10: the server disconnects after 1.5 x the keep-alive of
            # silence. amqtt's reader waits exactly keep_alive per packet and then does
            # nothing; NodeProtocolHandler.handle_read_timeout closes the session.
            session.keep_alive = session.keep_alive * 1.5  # type: ignore[assignment] # amqtt only compares it
        # init_from_connect() built a plain BrokerProtocolHandler; it holds no state that
        # differs between the two classes, so re-classing it is safe (pinned, see module doc).
        handler.__class__ = self.handler_class
        self.handler_class.prepare_session(session)
        cast("NodeProtocolHandler", handler).slim()
        node_handler = cast("NodeProtocolHandler", handler)
        node_handler.bridge = self.bridge
        node_handler.last_activity = asyncio.get_running_loop().time()
        return handler, session

    async def _authenticated_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, connecting: _Connecting
    ) -> tuple[BrokerProtocolHandler, Session]:
        """amqtt's ``_initialize_client_session``, with the CONNECT authenticated *first*.

        amqtt 0.12.1 looks the client id up before it authenticates: for a persistent session
        (clean session 0) it copies the new CONNECT's credentials, will and keep-alive onto the
        existing session, and ``_handle_client_session`` then takes a connected one over,
        whether the CONNECT is then refused or not. A wrong password could so kick a live
        device off or rewrite its will. Here the new session is authenticated (its secret,
        its certificate and its will topic, node.auth) before anything else is looked at; a
        refused one gets its CONNACK from :meth:`_handle_client_session` and touches no
        existing session or table entry. An accepted one goes on exactly as amqtt would.
        """
        try:
            handler, incoming = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except MQTTError:
            log.info("invalid CONNECT from %s", writer.get_peer_info())
            await writer.close()
            raise
        except NoDataError as exc:
            raise AMQTTError(exc) from exc
        connecting.client_id = incoming.client_id
        verdict = await super()._authenticate(incoming, self.listeners_config[connecting.listener])
        # The gate accepts only client id = device id: an empty one (amqtt would make one up) is refused.
        connecting.verdict = verdict and bool(incoming.client_id)
        incoming.parent = 0
        if not connecting.verdict or incoming.client_id is None:
            return handler, incoming
        session = incoming
        if incoming.clean_session:
            await self._delete_session(incoming.client_id)
        elif incoming.client_id in self._sessions:
            # MQTT-3.1.2-4: resume the stored session, with this CONNECT's settings.
            session, current = self._sessions[incoming.client_id]
            if session.transitions.is_connected() and isinstance(current, NodeProtocolHandler):
                # amqtt closes that connection for this one (MQTT-3.1.4-2): see _handle_disconnect.
                current.taken_over = True
            for field in _CONNECT_FIELDS:
                setattr(session, field, getattr(incoming, field))
            session.attributes.update(incoming.attributes)  # what authentication noted (node.bridge)
            session.parent = 1
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        if not getattr(handler, "taken_over", False):
            await super()._handle_disconnect(client_session, handler, disconnect_waiter)
            return
        # The end of a connection whose persistent session a newer connection resumed: amqtt
        # would publish the session's will and mark it disconnected, under the connection
        # that now carries it (the device would show offline while it publishes).
        await self._stop_handler(handler)
        await self.bridge.disconnected(client_session, taken_over=True)

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        connecting = _CONNECTING.get()
        if connecting is not None and connecting.verdict is not None:
            return connecting.verdict  # decided in _authenticated_session, before the session lookup
        return await super()._authenticate(session, listener)

    @override
    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Server,
        listener_name: str,
    ) -> None:
        """amqtt's ``_handle_client_session``, for a CONNECT already authenticated.

        Refused: amqtt would mark the session connected (taking over a live one of the same
        client id) and enter it in its session table before sending CONNACK 5; here only the
        CONNACK goes out. Accepted: as amqtt, except for its last step before the message
        loop, which walks *every* subscription filter of the broker and, for each, every
        retained message, and sends the matches to the new session whether it subscribed or
        not: O(subscriptions x retained messages) per CONNECT, a fleet's 1,000 commands
        subscriptions by its 1,000 retained status wills for each of a storm's 1,000
        reconnects. Here it can match nothing: devices may subscribe only to their commands
        topic (node.plugins), which nothing publishes retained (node.commands), and a
        SUBSCRIBE still gets the retained messages that match it (amqtt's own
        ``_handle_subscription``).
        """
        connecting = _CONNECTING.get()
        if connecting is None or connecting.verdict is None or client_session.client_id is None:
            await super()._handle_client_session(reader, writer, client_session, handler, server, listener_name)
            return
        if not connecting.verdict:
            handler.attach(client_session, reader, writer)
            await handler.mqtt_connack_authorize(authorize=False)
            await writer.close()
            return
        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():
                    log.info("client %r is already connected: taking its session over", client_session.client_id)
                    _, current = self._sessions[client_session.client_id]
                    await current.handle_connection_closed()
                    await current.stop()
                    break
                log.info("client %r is reconnecting too quickly: it waits", client_session.client_id)
                await asyncio.sleep(1)
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(authorize=True)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id, client_session=client_session
        )
        await handler.start()
        # Messages queued for a persistent session while it was offline.
        await self._publish_session_retained_messages(client_session)
        await self._client_message_loop(client_session, handler)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """amqtt's loop waits on four futures per connection (disconnect, subscribe,
        unsubscribe, delivery), each in a task of its own, for as long as the client is
        connected. With node.fastpath the handler subscribes and unsubscribes itself and no
        inbound PUBLISH is ever queued for delivery, so only the disconnect is left to wait
        for, in this task: what amqtt then does with it is ``_handle_disconnect``, unchanged."""
        connecting = _CONNECTING.get()
        if connecting is not None:
            self._leave_admission(connecting)  # set up: the next CONNECT may go ahead
        if not getattr(handler, "owns_client_loop", False):
            await super()._client_message_loop(client_session, handler)
            return
        try:
            disconnect = await handler.wait_disconnect()
        except asyncio.CancelledError:
            return  # amqtt's loop ends quietly when cancelled (broker shutdown), and so do we
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiter.set_result(disconnect)
        await self._handle_disconnect(client_session, handler, waiter)

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        # node.guard: refuse past max_connections, and check the framing of what arrives.
        guard = self.guard
        if guard is not None and await guard.refuse_if_full(writer):
            writer.close()
            return
        checked = guard.open(reader, writer) if guard is not None else None
        note_transport(writer)  # TLS and client certificate, for the auth plugin (node/tls.py)
        connecting = _Connecting(listener_name)
        _CONNECTING.set(connecting)  # this connection's own task (and context)
        # amqtt lets socket errors of one connection escape its connection task (e.g. a client
        # that hangs up right after a refused CONNACK makes write_eof() raise), and then the
        # transport is never closed: asyncio logs "exception was never retrieved" and, worse,
        # Server.wait_closed() waits for that transport forever at shutdown. Whatever happened,
        # the connection is over when amqtt returns: close the transport (idempotent).
        try:
            # Admission: a whole CONNECT first (the guard's stall timeout covers the wait),
            # then one of the set-up slots, held until the session's message loop starts.
            if checked is not None:
                await checked.connect_arrived()
            await self._admission.acquire()
            connecting.admitted = True
            await super().stream_connected(reader, writer, listener_name)
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.debug("MQTT connection ended with a socket error: %r", exc)
        finally:
            self._leave_admission(connecting)
            writer.close()
            self._restore_session_table(connecting.client_id)
            if guard is not None and checked is not None:
                guard.close(checked)

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:  # type: ignore[override]
        # amqtt builds its own context from file names (ssl.create_default_context, which
        # has no explicit minimum version); the node's is built and checked in node/tls.py.
        if self.tls_context is None:
            msg = "a TLS listener is configured without a TLS context"
            raise ValueError(msg)
        return self.tls_context

    async def enforce_inactivity(self, silence: float) -> None:
        """Close sessions that sent no PUBLISH or PINGREQ for *silence* seconds, by the node's
        own clock. A backstop for what keep-alive cannot catch: a client that connected with
        keep-alive 0 (disabled) and went silent would otherwise hold its session forever.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.05, min(silence / 4, 5.0)))
            deadline = loop.time() - silence
            for handlers in list(self.live.values()):
                for handler in list(handlers):
                    if handler.last_activity < deadline:
                        await handler._close(f"no activity for {silence:g} s", "inactive")  # noqa: SLF001

    def connected_sessions(self) -> list[Session]:
        return [h.session for handlers in self.live.values() for h in handlers if h.session is not None]

    async def close_session(self, client_id: str, reason: str) -> bool:
        """Close every live connection of *client_id*; False when it has none."""
        handlers = list(self.live.get(client_id, []))
        for handler in handlers:
            if handler.session is not None:
                set_disconnect_reason(handler.session, reason, overwrite=True)
            await handler.handle_connection_closed()
        return bool(handlers)


#: amqtt requires a listener named "default"; the TLS one is "mqtts", or "default" when alone.
PLAIN_LISTENER: Final = "default"
TLS_LISTENER: Final = "mqtts"


def broker_config(
    bridge: Bridge,
    *,
    host: str,
    port: int,
    max_connections: int,
    tls_bind: tuple[str, int] | None = None,
    plain: bool = True,
) -> dict[str, Any]:
    """The amqtt configuration: the TCP listener(s), our two plugins, nothing else."""
    # No brackets even for IPv6: amqtt splits at the last colon, and would pass "[::1]"
    # with its brackets on to getaddrinfo.
    listeners: dict[str, dict[str, Any]] = {}
    if plain:
        listeners[PLAIN_LISTENER] = {"type": "tcp", "bind": f"{host}:{port}", "max_connections": max_connections}
    if tls_bind is not None:
        name = TLS_LISTENER if plain else PLAIN_LISTENER
        tls_host, tls_port = tls_bind
        listeners[name] = {
            "type": "tcp", "bind": f"{tls_host}:{tls_port}", "max_connections": max_connections, "ssl": True,
        }  # fmt: skip
    return {
        "listeners": listeners,
        "plugins": {
            "node.plugins.DeviceAuthPlugin": {"bridge": bridge},
            "node.plugins.DeviceAclPlugin": {"bridge": bridge},
        },
    }
