"""Connection-level limits of the MQTT listener, before amqtt parses anything.

amqtt 0.12.1 reads whatever a peer announces: a packet's remaining length may say 256 MiB
and amqtt allocates and waits for it, a peer that connects and sends nothing (or half a
packet) holds its socket forever, and its listener's ``max_connections`` makes the next
client *wait* for a slot instead of refusing it. :class:`ConnectionGuard` closes those gaps:

* **Capacity.** Past ``max_connections`` open sockets (authenticated or not), a new
  connection gets CONNACK return code 3 (server unavailable) and is closed at once.
* **Packet size.** :class:`PacketGuard` follows the MQTT framing of the bytes as they arrive
  from the socket (:class:`GuardedStreamReader`). A packet whose remaining length is over
  ``max_packet_bytes`` (over :data:`CONNECT_MAX_BYTES` for the first packet, the
  unauthenticated CONNECT), a malformed remaining length or a reserved packet type closes
  the connection as soon as its header has arrived, before amqtt reads the body.
* **Stalls.** A connection must send its whole CONNECT within ``packet_timeout`` of
  accepting it, and any packet once begun must arrive whole within ``packet_timeout``;
  :meth:`ConnectionGuard.sweep` closes those that do not. Waiting *between* packets is
  keep-alive's business (node.broker), not this module's.

Every close is counted by reason (``depot_node_mqtt_connections_closed_total{reason}``) and,
for an authenticated session, recorded as its disconnect reason. The guard never raises into
amqtt: a tripped connection's stream ends (EOF), which amqtt handles as a lost connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, SupportsIndex, cast

from actors.stats import GuardClose, IngestStats
from node.bridge import set_disconnect_reason

if TYPE_CHECKING:
    from amqtt.session import Session


log = logging.getLogger(__name__)

#: The first packet is the CONNECT, read before anything is authenticated. The node's own
#: CONNECTs are a few hundred bytes (64-character ids, a 43-character secret, a status will).
CONNECT_MAX_BYTES: Final = 8 * 1024
#: CONNACK, return code 3: "the network connection has been made but the MQTT service is
#: unavailable" (MQTT 3.1.1 §3.2.2.3).
CONNACK_SERVER_UNAVAILABLE: Final = b"\x20\x02\x00\x03"

_HEADER, _LENGTH, _BODY = 0, 1, 2
_RESERVED_TYPES: Final = frozenset({0, 15})
_CONNECT: Final = 1


class GuardedStreamReader(asyncio.StreamReader):
    """The socket's own ``StreamReader``, re-classed by :meth:`ConnectionGuard.open`.

    Checked where bytes arrive (``feed_data``, called by asyncio's protocol once per chunk
    from the socket), not where amqtt reads them: amqtt's reads stay the library's own, with
    no extra coroutine per read, and a packet is judged by its header before amqtt has asked
    for its body.
    """

    guard: PacketGuard

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        guard = self.guard
        if guard.tripped is None:
            guard.consume(data if isinstance(data, bytes | bytearray) else bytes(data))
        if guard.tripped is None:
            super().feed_data(data)

    def feed_eof(self) -> None:
        super().feed_eof()
        self.guard.eof = True
        self.guard.ended()

    def set_exception(self, exc: Exception) -> None:
        # A connection reset ends the stream with an error instead of an EOF.
        super().set_exception(exc)
        self.guard.eof = True
        self.guard.ended()


class PacketGuard:
    """The MQTT framing of one connection's incoming bytes, and its limits."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, owner: ConnectionGuard) -> None:
        self._reader = reader
        self._writer = writer
        self._owner = owner
        self._state = _HEADER
        self._length = 0
        self._multiplier = 1
        self._length_bytes = 0
        self._remaining = 0
        self._max_packet = owner.max_packet_bytes
        self._limit = min(CONNECT_MAX_BYTES, self._max_packet)
        #: Monotonic time the current packet (or, before the CONNECT, the connection) began
        #: to arrive; None while waiting between packets.
        self.started: float | None = time.monotonic()
        self.tripped: GuardClose | None = None
        #: Set once amqtt built the session, so a close can be recorded as its disconnect reason.
        self.session: Session | None = None
        #: Bytes arrived so far, and where the first packet (the CONNECT) ended among them.
        self.arrived = 0
        self.connect_end: int | None = None
        #: The peer closed its side: no more bytes will come.
        self.eof = False
        #: Resolved once the whole CONNECT arrived or the stream ended (see :meth:`connect_arrived`).
        self._connect_waiter: asyncio.Future[None] | None = None

    # -- framing -----------------------------------------------------------------------------

    def consume(self, data: bytes | bytearray) -> None:
        """Follow the framing through *data*, the next bytes from the socket."""
        i, end = 0, len(data)
        base = self.arrived
        self.arrived += end
        while i < end and self.tripped is None:
            if self._state == _BODY:
                step = min(self._remaining, end - i)
                self._remaining -= step
                i += step
                if not self._remaining:
                    self._packet_done(base + i)
                continue
            byte = data[i]
            i += 1
            if self._state == _HEADER:
                kind = byte >> 4
                # MQTT-3.1.0-1: the first packet is a CONNECT. amqtt would parse anything else
                # by the CONNECT's field layout and could wait forever for bytes that never come.
                if kind in _RESERVED_TYPES or (self.connect_end is None and kind != _CONNECT):
                    self.trip(GuardClose.MALFORMED)
                    return
                if self.started is None:
                    self.started = time.monotonic()
                self._state, self._length, self._multiplier, self._length_bytes = _LENGTH, 0, 1, 0
                continue
            # _LENGTH: MQTT's variable-length integer, at most four bytes (§2.2.3).
            self._length += (byte & 0x7F) * self._multiplier
            self._length_bytes += 1
            if byte & 0x80:
                if self._length_bytes == 4:  # noqa: PLR2004 - the encoding's maximum
                    self.trip(GuardClose.MALFORMED)
                    return
                self._multiplier *= 128
                continue
            if self._length > self._limit:
                self.trip(GuardClose.PACKET_TOO_LARGE)
                return
            if self._length == 0:
                self._packet_done(base + i)
            else:
                self._state, self._remaining = _BODY, self._length

    def _packet_done(self, position: int) -> None:
        self._state = _HEADER
        self.started = None
        self._limit = self._max_packet
        if self.connect_end is None:
            self.connect_end = position
            self.ended()

    async def connect_arrived(self) -> None:
        """Return once the whole CONNECT has arrived, or the stream ended (tripped or closed).

        node.broker admits a connection to its CONNECT set-up only then: a peer that sends
        its CONNECT slowly (or never) waits here, where the stall timeout applies, and holds
        no admission slot that complete CONNECTs wait for.
        """
        if self.connect_end is not None or self.tripped is not None or self.eof:
            return
        if self._connect_waiter is None or self._connect_waiter.cancelled():  # (a cancelled wait)
            self._connect_waiter = asyncio.get_running_loop().create_future()
        await self._connect_waiter

    def ended(self) -> None:
        """The CONNECT is complete or no more bytes will come: wake :meth:`connect_arrived`."""
        waiter = self._connect_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def stalled(self, now: float) -> bool:
        """A CONNECT, or a begun packet, that has not arrived whole within the timeout."""
        return self.tripped is None and self.started is not None and now - self.started > self._owner.packet_timeout

    def trip(self, reason: GuardClose) -> None:
        """Close the connection for *reason*; every later read reports end of stream."""
        if self.tripped is not None:
            return
        self.tripped = reason
        self.ended()
        # End the stream for amqtt: what arrived before stays readable, a read that waits
        # for more ends (amqtt treats that as a lost connection).
        self._reader.feed_eof()
        self._owner.count(reason)
        if self.session is not None:
            set_disconnect_reason(self.session, reason, overwrite=True)
        peer = self._writer.get_extra_info("peername")
        client_id = self.session.client_id if self.session is not None else None
        log.warning("closing MQTT connection from %s (client id %r): %s", peer, (client_id or "")[:80], reason)
        # Closing the transport ends a read that is waiting, too: the reader gets EOF.
        self._writer.close()


class ConnectionGuard:
    """The listener's connection limits; one per broker."""

    def __init__(
        self, stats: IngestStats, *, max_connections: int, max_packet_bytes: int, packet_timeout: float
    ) -> None:
        self._stats = stats
        #: 0 = unlimited.
        self.max_connections = max_connections
        self.max_packet_bytes = max_packet_bytes
        self.packet_timeout = packet_timeout
        self._open: set[PacketGuard] = set()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def count(self, reason: GuardClose) -> None:
        self._stats.count_guard_close(reason)

    async def refuse_if_full(self, writer: asyncio.StreamWriter) -> bool:
        """True (and the connection answered with CONNACK 3) when the listener is full."""
        if not self.max_connections or len(self._open) < self.max_connections:
            return False
        self.count(GuardClose.CAPACITY)
        log.warning("MQTT connection refused: %d connections open, the limit", len(self._open))
        try:
            writer.write(CONNACK_SERVER_UNAVAILABLE)
            await writer.drain()
        except OSError:
            pass
        return True

    def open(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> PacketGuard:
        """Guard the connection of *reader*: from now on its bytes are checked as they arrive."""
        guard = PacketGuard(reader, writer, self)
        # StreamReader has no __slots__ and GuardedStreamReader adds only a method and an
        # attribute, so re-classing the live reader is safe. It must happen before anything is
        # read (at accept). Bytes may already be buffered then: uvloop delivers the first data
        # before the connection's callback runs. They are checked here, as if they arrived now.
        reader.__class__ = GuardedStreamReader
        cast("GuardedStreamReader", reader).guard = guard
        buffered = getattr(reader, "_buffer", None)  # asyncio keeps no public view of it
        if buffered:
            guard.consume(bytes(buffered))
        self._open.add(guard)
        return guard

    def close(self, guard: PacketGuard) -> None:
        self._open.discard(guard)

    def sweep(self, now: float | None = None) -> int:
        """Close connections stalled in their CONNECT or in a packet; how many were closed."""
        now = time.monotonic() if now is None else now
        stalled = [g for g in self._open if g.stalled(now)]
        for guard in stalled:
            guard.trip(GuardClose.PACKET_TIMEOUT)
        return len(stalled)

    async def enforce(self) -> None:
        """Sweep for stalled connections until cancelled."""
        interval = max(0.05, min(self.packet_timeout / 4, 1.0))
        while True:
            await asyncio.sleep(interval)
            self.sweep()


def attach_session(reader: object, session: Session) -> None:
    """Tell the :class:`PacketGuard` of amqtt's reader adapter which session it serves.

    Called when an accepted session starts, before amqtt reads past its CONNECT. amqtt parses
    a CONNECT's fields by their flags, not by its remaining length, so a CONNECT whose length
    disagrees with its fields would leave amqtt and the guard reading different packet
    boundaries from then on (amqtt could then wait for a body the guard never saw announced).
    Here both must have stopped at the same byte; otherwise the connection is closed.
    """
    stream = getattr(reader, "_reader", None)  # amqtt's StreamReaderAdapter keeps it there
    if not isinstance(stream, GuardedStreamReader):
        return
    guard = stream.guard
    guard.session = session
    if guard.tripped is not None:
        # The client broke a limit between its CONNACK and this (amqtt sends the CONNACK
        # before it starts the session's handler).
        set_disconnect_reason(session, guard.tripped, overwrite=True)
        return
    buffered = getattr(stream, "_buffer", None)  # asyncio keeps no public count of what was read
    if buffered is not None and guard.arrived - len(buffered) != guard.connect_end:
        guard.trip(GuardClose.MALFORMED)
