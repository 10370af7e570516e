"""The broker's fast path: amqtt's per-connection packet reader, replaced for TCP connections.

amqtt 0.12.1 reads every packet with ``asyncio.wait_for(MQTTFixedHeader.from_stream(...))``
(a timer and a task per packet, plus one ``await`` per header byte), decodes it into packet
objects, and then runs each packet's handler in a task of its own. On the node's hot path,
QoS 1 telemetry, that is most of the broker's CPU (bench/ingest.py; issue #7). This module
replaces exactly one amqtt internal, ``ProtocolHandler._reader_loop``, for connections whose
reader is amqtt's ``StreamReaderAdapter`` (plain TCP and TLS):

* **Buffered reader.** One ``read()`` per chunk of bytes that arrived, then every complete
  packet in the buffer is parsed from memory. The packet size limit (``max_packet_bytes``) is
  not checked here: ``node.guard`` checks every packet's header where the bytes arrive, in
  the ``StreamReader`` this reader reads, and ends the stream before an oversize body is
  buffered, for this reader and amqtt's alike.
* **One keep-alive timer per connection** instead of a ``wait_for`` per packet: a
  ``call_later`` that re-arms itself from the time of the last byte received, and calls
  ``handle_read_timeout`` (which closes the session, see ``node.broker``) after
  1.5 x keep-alive of silence.
* **Inbound QoS 0/1 PUBLISH handled inline**, without a task or an amqtt packet object: the
  ACL is checked, the message goes to the device actor's mailbox (awaiting only when the
  mailbox is full, which is the backpressure), and the PUBACK is written once the commit's
  completion fires. PUBACKs leave in the order the PUBLISHes arrived (MQTT-4.6.0-2): an
  in-order queue per connection holds the acknowledgements that are ready behind one still
  waiting for its commit, and all that are ready go out in one ``write`` per connection per
  loop iteration (a commit of a thousand messages is one write per connection, not a
  thousand).
* **PINGREQ** is answered inline. Every other packet (CONNECT, SUBSCRIBE, UNSUBSCRIBE,
  PUBACK/PUBREC/PUBREL/PUBCOMP of node → device traffic, QoS 2 PUBLISH, DISCONNECT) is
  decoded with amqtt's own packet classes and handed to the same ``handle_*`` method, in a
  task of its own, exactly as ``_reader_loop`` does.

Inbound PUBLISHes already never went through amqtt's per-session delivery queue,
``_client_message_loop`` or the broadcast loop (``node.broker``, ADR 0001): device → node
traffic has no subscribers. Plugin events for received packets are fired only where a plugin
registered for them (``PluginManager.fire_event`` returns at once otherwise).

The replaced function is pinned by its source digest in ``tests/integration/test_amqtt_pin.py``.
``broker_fast_path = false`` in the settings falls back to amqtt's own reader.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, NoReturn

from amqtt.adapters import BufferReader, StreamReaderAdapter, StreamWriterAdapter
from amqtt.errors import MQTTError, NoDataError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_0, QOS_1
from amqtt.mqtt.packet import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.protocol.broker_handler import Subscription, UnSubscription
from amqtt.mqtt.subscribe import SubscribePacket
from amqtt.mqtt.unsubscribe import UnsubscribePacket
from amqtt.session import Session
from transitions.core import MachineError

from actors.messages import Completion, Outcome, Publish
from node.bridge import OverDeviceLimit
from node.broker import NodeProtocolHandler
from storage.contract import PUBLISH_KINDS, ParsedTopic, parse_topic

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from amqtt.mqtt.packet import MQTTPacket

    type AnyPacket = MQTTPacket[Any, Any, MQTTFixedHeader]

log = logging.getLogger(__name__)

#: PINGRESP: packet type 13, remaining length 0.
_PINGRESP: Final = b"\xd0\x00"
#: How much one read may take from the socket at a time.
_READ_CHUNK: Final = 64 * 1024
#: Stop reading from a client that does not read its PUBACKs once this much is unsent.
_WRITE_HIGH_WATER: Final = 256 * 1024
#: Smallest packet: the fixed header's type byte and a one-byte remaining length.
_MIN_PACKET: Final = 2
#: The remaining length takes at most four bytes of seven bits (MQTT 3.1.1 §2.2.3).
_MAX_LENGTH_SHIFT: Final = 21
#: A PUBLISH's topic length prefix.
_TOPIC_PREFIX: Final = 2
#: Allowed topics remembered per connection: a device may publish to four (PUBLISH_KINDS).
_TOPIC_CACHE: Final = 4

_HANDLERS: Final = {
    CONNACK: "handle_connack",
    SUBSCRIBE: "handle_subscribe",
    UNSUBSCRIBE: "handle_unsubscribe",
    SUBACK: "handle_suback",
    UNSUBACK: "handle_unsuback",
    PUBACK: "handle_puback",
    PUBREC: "handle_pubrec",
    PUBREL: "handle_pubrel",
    PUBCOMP: "handle_pubcomp",
    PINGRESP: "handle_pingresp",
    PUBLISH: "handle_publish",
    DISCONNECT: "handle_disconnect",
}


def _decode_topic(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPacket("PUBLISH topic is not UTF-8 (MQTT-1.5.3-1)") from exc


class MalformedPacket(Exception):  # noqa: N818 - a protocol condition, named as MQTT names it
    """The client broke the packet framing or encoding; the connection is closed."""


class _Denied(Exception):  # noqa: N818 - control flow, not an error
    """An ACL denial with ``disconnect_on_acl_denial``: close the connection, stop reading."""


class _Ack(Completion):
    """One QoS 1 PUBLISH waiting for its PUBACK, in arrival order; it is also the message's
    completion, so the hot path allocates one object per message for both."""

    __slots__ = ("packet_id",)

    def __init__(self, packet_id: int, notify: Callable[[Outcome], object]) -> None:
        super().__init__(notify)
        self.packet_id = packet_id


class _UnusedQueue:
    """Stands in for an amqtt ``asyncio.Queue`` that the fast path never uses (each real one
    is four deques and an Event, ~3 KB per connection). It answers the emptiness checks amqtt
    makes when it clears queues, and fails loudly if anything tries to use it."""

    __slots__ = ()

    def empty(self) -> bool:
        return True

    def qsize(self) -> int:
        return 0

    def get_nowait(self) -> NoReturn:
        raise asyncio.QueueEmpty

    def _unused(self, *args: object) -> NoReturn:
        raise RuntimeError("this amqtt queue is not used with the broker fast path")

    put = put_nowait = get = _unused


UNUSED_QUEUE: Final = _UnusedQueue()


class _LazyQueue:
    """A session's ``retained_messages`` queue, made only when a message is queued for it
    (amqtt queues retained messages for a disconnected persistent session; most sessions never
    get one). The methods amqtt calls on it, forwarded to a real ``asyncio.Queue``."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Any] | None = None

    def _real(self) -> asyncio.Queue[Any]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    def empty(self) -> bool:
        return self._queue is None or self._queue.empty()

    def qsize(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    def get_nowait(self) -> Any:
        return self._real().get_nowait()

    async def get(self) -> Any:
        return await self._real().get()

    def put_nowait(self, item: Any) -> None:
        self._real().put_nowait(item)

    async def put(self, item: Any) -> None:
        await self._real().put(item)


class SessionStates:
    """A session's connection state, in place of the ``transitions.Machine`` that amqtt's
    ``Session._init_states`` builds for every session (~15 KB each, the largest single part
    of an idle connection's memory, measured with tracemalloc). The same triggers, queries and
    errors as that machine for the three states and five transitions amqtt defines, and the
    same ``on_enter`` callbacks (they stamp the connect and disconnect times)."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Session, state: str = "new") -> None:
        self._session = session
        self.state = state

    def connect(self) -> bool:
        if self.state == "connected":
            raise MachineError("Can't trigger event connect from state connected!")
        self.state = "connected"
        self._session._on_enter_connected()  # noqa: SLF001 - the machine's on_enter callback
        return True

    def disconnect(self) -> bool:
        # Allowed from every state, disconnected -> disconnected included (and then, as in
        # transitions, the state is entered again).
        self.state = "disconnected"
        self._session._on_enter_disconnected()  # noqa: SLF001
        return True

    def is_new(self) -> bool:
        return self.state == "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"


class FastProtocolHandler(NodeProtocolHandler):
    """:class:`~node.broker.NodeProtocolHandler` with the buffered reader of this module."""

    owns_client_loop = True
    #: Serialises this connection's SUBSCRIBE/UNSUBSCRIBE handling (made on first use).
    _subscribing: asyncio.Lock | None = None

    @classmethod
    def prepare_session(cls, session: Session) -> None:
        """Slim a session that a CONNECT produced (once; a persistent session comes back).

        * its ``transitions.Machine`` becomes a :class:`SessionStates`;
        * its ``delivered_message_queue`` becomes :data:`UNUSED_QUEUE`: amqtt fills it only
          from the inbound PUBLISH flows this handler replaces, and drains it only in
          ``Broker._client_message_loop``, which NodeBroker replaces for this handler;
        * its ``retained_messages`` queue becomes a :class:`_LazyQueue`.
        """
        machine = session.transitions
        if not isinstance(machine, SessionStates):
            session.transitions = SessionStates(session, machine.state)  # type: ignore[assignment]
            session.delivered_message_queue = UNUSED_QUEUE  # type: ignore[assignment]
            if session.retained_messages.empty():
                session.retained_messages = _LazyQueue()  # type: ignore[assignment]

    def slim(self) -> None:
        """Drop the handler's subscription queues: SUBSCRIBE and UNSUBSCRIBE are handled in
        their packet's own task (:meth:`handle_subscribe`), not through the broker's loop."""
        self._pending_subscriptions = UNUSED_QUEUE  # type: ignore[assignment]
        self._pending_unsubscriptions = UNUSED_QUEUE  # type: ignore[assignment]

    async def handle_subscribe(self, subscribe: SubscribePacket) -> None:
        """What ``BrokerProtocolHandler.handle_subscribe`` queues and ``_client_message_loop``
        then hands to ``Broker._handle_subscription``, done here directly, in packet order."""
        if subscribe.variable_header is None or subscribe.payload is None:
            raise MalformedPacket("SUBSCRIBE without packet id or topics")
        subscription = Subscription(subscribe.variable_header.packet_id, subscribe.payload.topics)
        await self._in_order(subscription, unsubscribe=False)

    async def handle_unsubscribe(self, unsubscribe: UnsubscribePacket) -> None:
        if unsubscribe.variable_header is None or unsubscribe.payload is None:
            raise MalformedPacket("UNSUBSCRIBE without packet id or topics")
        unsubscription = UnSubscription(unsubscribe.variable_header.packet_id, unsubscribe.payload.topics)
        await self._in_order(unsubscription, unsubscribe=True)

    async def _in_order(self, request: Subscription | UnSubscription, *, unsubscribe: bool) -> None:
        broker = self.bridge.broker
        session = self.session
        if broker is None or session is None:
            return
        if self._subscribing is None:
            self._subscribing = asyncio.Lock()
        done: asyncio.Future[Subscription | UnSubscription] = asyncio.get_running_loop().create_future()
        done.set_result(request)
        async with self._subscribing:
            if unsubscribe:
                await broker._handle_unsubscription(session, self, done)  # noqa: SLF001 - pinned
            else:
                await broker._handle_subscription(session, self, done)  # noqa: SLF001 - pinned

    _keepalive_timer: asyncio.TimerHandle | None = None
    #: The task closing the connection after a failed commit (kept so it is not collected).
    _fail_close: asyncio.Task[None] | None = None
    #: A flush of ready PUBACKs is scheduled for this loop iteration.
    _flush_due: bool = False

    async def _reader_loop(self) -> None:
        reader = self.reader
        writer = self.writer
        if not isinstance(reader, StreamReaderAdapter) or not isinstance(writer, StreamWriterAdapter):
            await super()._reader_loop()  # websockets etc.: amqtt's own reader
            return
        assert self._reader_ready is not None  # noqa: S101 - set by start() before this task
        stream: asyncio.StreamReader = reader._reader  # noqa: SLF001 - the adapter's stream, pinned
        self._stream_writer: asyncio.StreamWriter = writer._writer  # noqa: SLF001
        self._acks: collections.deque[_Ack] = collections.deque()
        #: Topic bytes → (topic, parsed) of the topics this connection was allowed to publish to.
        self._topics: dict[bytes, tuple[str, ParsedTopic]] = {}
        self._tasks: list[asyncio.Task[None]] = []  # rare packets' handlers (a list: 56 bytes idle)
        loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        timer = self._arm_keepalive(loop)
        self._reader_ready.set()
        buf = bytearray()
        try:
            while True:
                chunk = await stream.read(_READ_CHUNK)
                if not chunk:
                    break  # EOF
                self._last_rx = loop.time()
                buf += chunk
                consumed = await self._parse(buf)
                if consumed:
                    del buf[:consumed]
                if self._tasks:
                    self._tasks = [t for t in self._tasks if not t.done()]
                transport = self._stream_writer.transport
                if transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                    await self._stream_writer.drain()
        except asyncio.CancelledError:
            log.debug("reader of %r stopped", self._client_id())
        except _Denied:
            await self._close("ACL denial")
        except OverDeviceLimit as exc:
            # Bridge.admit took nothing: its PUBACK (QoS 1) stays unsent, and goes with the
            # connection.
            await self._close(f"over its rate limits ({exc})", OverDeviceLimit.reason)
        except MalformedPacket as exc:
            await self._close(f"malformed packet: {exc}", "protocol_error")
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            log.debug("connection of %r ended: %r", self._client_id(), exc)
        except Exception:
            log.exception("reader of %r failed; closing the connection", self._client_id())
        finally:
            if timer is not None:
                timer.cancel()
            self._keepalive_timer = None
        await self._reader_ended()

    async def _reader_ended(self) -> None:
        """What amqtt's ``_reader_loop`` does after its loop: cancel the packet tasks, report
        the connection closed, and stop the handler."""
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self._acks.clear()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    def _client_id(self) -> str | None:
        return self.session.client_id if self.session is not None else None

    # -- keep-alive ------------------------------------------------------------------------

    def _arm_keepalive(self, loop: asyncio.AbstractEventLoop) -> asyncio.TimerHandle | None:
        timeout = self.keepalive_timeout
        if not timeout:
            return None
        self._keepalive_timer = loop.call_at(self._last_rx + timeout, self._keepalive_due, loop, float(timeout))
        return self._keepalive_timer

    def _keepalive_due(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        due = self._last_rx + timeout
        if loop.time() < due:
            # Bytes arrived since the timer was set: re-arm from the last one.
            self._keepalive_timer = loop.call_at(due, self._keepalive_due, loop, timeout)
            return
        self.handle_read_timeout()

    # -- framing ---------------------------------------------------------------------------

    async def _parse(self, buf: bytearray) -> int:
        """Handle every complete packet at the start of *buf*; return how many bytes they took."""
        pos = 0
        size = len(buf)
        while size - pos >= _MIN_PACKET:
            first = buf[pos]
            # Remaining length: 1-4 bytes, 7 bits each, least significant first (§2.2.3).
            length = 0
            shift = 0
            i = pos + 1
            while True:
                if i >= size:
                    return pos  # the header itself is incomplete
                byte = buf[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift > _MAX_LENGTH_SHIFT:
                    # node.guard closes such a stream before it gets here; this only keeps
                    # the parser's own loop bounded.
                    raise MalformedPacket("remaining length longer than four bytes")
            end = i + length
            if end > size:
                return pos  # wait for the rest of the packet
            packet_type = first >> 4
            if packet_type == PUBLISH and ((first >> 1) & 3) in (QOS_0, QOS_1):
                full = self._publish(first, buf, i, end)
                if full is not None:
                    await self.bridge.deliver(full)  # the actor's mailbox is full: wait
            elif packet_type == PINGREQ:
                self.last_activity = self._last_rx
                self._write(_PINGRESP)
            else:
                await self._dispatch(first, bytes(buf[i:end]), length)
            pos = end
        return pos

    async def _dispatch(self, first: int, body: bytes, length: int) -> None:
        """Any other packet: decode it with amqtt's classes and hand it on as amqtt would."""
        packet_type = first >> 4
        header = MQTTFixedHeader(packet_type, first & 0x0F, length)
        if packet_type == CONNECT:
            raise MalformedPacket("a second CONNECT (MQTT-3.1.0-2)")
        name = _HANDLERS.get(packet_type)
        if name is None:
            raise MalformedPacket(f"packet type {packet_type} is not allowed from a client")
        try:
            packet: AnyPacket = await packet_class(header).from_stream(BufferReader(body), fixed_header=header)
        except (MQTTError, NoDataError, ValueError, UnicodeDecodeError) as exc:
            raise MalformedPacket(f"cannot decode packet type {packet_type}: {exc!r}") from exc
        await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=self.session)
        handle: Callable[[AnyPacket], Coroutine[Any, Any, None]] = getattr(self, name)
        self._tasks.append(asyncio.create_task(handle(packet)))

    # -- the hot path: inbound QoS 0 / QoS 1 PUBLISH -----------------------------------------

    def _publish(self, first: int, buf: bytearray, start: int, end: int) -> Publish | None:
        """Check and hand on one QoS 0/1 PUBLISH without awaiting anything.

        Returns the message when the device's mailbox is full (the caller awaits room: the
        backpressure), else None. A plain function, not a coroutine: this runs per message.
        """
        qos = (first >> 1) & 3
        if end - start < _TOPIC_PREFIX:
            raise MalformedPacket("PUBLISH without a topic")
        topic_len = (buf[start] << 8) | buf[start + 1]
        cursor = start + 2 + topic_len
        if cursor > end:
            raise MalformedPacket("PUBLISH topic runs past the packet")
        raw_topic = bytes(buf[start + 2 : cursor])
        known = self._topics.get(raw_topic)
        topic = known[0] if known is not None else _decode_topic(raw_topic)
        packet_id = 0
        if qos == QOS_1:
            if cursor + 2 > end:
                raise MalformedPacket("QoS 1 PUBLISH without a packet id")
            packet_id = (buf[cursor] << 8) | buf[cursor + 1]
            cursor += 2
            if packet_id == 0:
                raise MalformedPacket("packet id 0 (MQTT-2.3.1-1)")
        elif first & 0x08:
            raise MalformedPacket("DUP flag on a QoS 0 PUBLISH (MQTT-3.3.1-2)")
        self.last_activity = self._last_rx
        if known is None:
            known = self._allowed(raw_topic, topic, qos, packet_id)
            if known is None:
                return None
        done = None
        if qos == QOS_1:
            done = _Ack(packet_id, self._ack_ready)
            self._acks.append(done)
        return self.bridge.admit(known[1], topic, bytes(buf[cursor:end]), done)

    def _allowed(self, raw_topic: bytes, topic: str, qos: int, packet_id: int) -> tuple[str, ParsedTopic] | None:
        """The ACL check of a topic this connection has not published to yet: its parts when
        the device may publish to it (remembered, so the connection's next PUBLISHes to it skip
        decoding, parsing and this check); None when it may not (counted, and acknowledged at
        QoS 1) or the session is gone. Raises :class:`_Denied` to close the connection."""
        session = self.session
        if session is None:
            return None
        bridge = self.bridge
        identity = session.username or ""
        parsed = parse_topic(topic)
        if parsed is None or parsed.device_id != identity or parsed.kind not in PUBLISH_KINDS:
            bridge.denied(identity, "publish", topic)
            if bridge.disconnect_on_denial:
                raise _Denied
            if qos == QOS_1:
                # MQTT 3.1.1 has no negative PUBACK: acknowledged (in order), dropped, counted.
                ack = _Ack(packet_id, self._ack_ready)
                ack.outcome = Outcome.DURABLE
                self._acks.append(ack)
                self._ack_ready(Outcome.DURABLE)
            return None
        known = (topic, parsed)
        if len(self._topics) < _TOPIC_CACHE:
            self._topics[raw_topic] = known
        return known

    def _ack_ready(self, outcome: Outcome) -> None:
        """An acknowledgement became ready: a commit's completion (called from the storage
        writer's task, once per message of its group) or a denied PUBLISH. The PUBACKs are
        written once per loop iteration per connection, in one ``write``."""
        if outcome is Outcome.FAILED:
            # Not durable: never acknowledge it; the device resends after reconnecting.
            self._acks.clear()
            if self._fail_close is None:
                loop = asyncio.get_running_loop()
                self._fail_close = loop.create_task(self._close("message could not be made durable"))
            return
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._flush_due = False
        acks = self._acks
        out = bytearray()
        while acks and acks[0].outcome is Outcome.DURABLE:
            out += b"\x40\x02" + acks.popleft().packet_id.to_bytes(2, "big")
        if out:
            self._write(bytes(out))

    def _write(self, data: bytes) -> None:
        writer = self.writer
        if writer is None or getattr(writer, "is_closed", False):
            return
        transport = self._stream_writer.transport
        if transport.is_closing():
            return
        transport.write(data)
