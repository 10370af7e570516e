"""The MQTT framing guard (node/guard.py) on the server side of a real socket pair: valid
streams pass whole however they arrive, and a packet that breaks a limit ends the stream
before its body.

Bytes are handed to the reader with ``feed_data``, the method asyncio's protocol calls for
every chunk from the socket, so a test decides exactly how a stream is cut into chunks."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.stats import GuardClose, IngestStats
from node.guard import CONNACK_SERVER_UNAVAILABLE, CONNECT_MAX_BYTES, ConnectionGuard, PacketGuard
from tests import mqtt_raw

MAX_PACKET = 4096


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def packet(kind: int, body: bytes) -> bytes:
    return bytes([kind << 4]) + mqtt_raw._varlen(len(body)) + body


@asynccontextmanager
async def guarded(
    stats: IngestStats, **limits: float
) -> AsyncIterator[tuple[asyncio.StreamReader, PacketGuard, ConnectionGuard]]:
    """A guarded reader of the server side of a real socket pair."""
    server_sock, client_sock = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=server_sock)
    owner = ConnectionGuard(
        stats,
        max_connections=int(limits.get("max_connections", 0)),
        max_packet_bytes=MAX_PACKET,
        packet_timeout=limits.get("packet_timeout", 10.0),
    )
    guard = owner.open(reader, writer)
    try:
        yield reader, guard, owner
    finally:
        owner.close(guard)
        writer.close()
        client_sock.close()


def arrive(reader: asyncio.StreamReader, data: bytes, cuts: list[int]) -> None:
    """Hand *data* to the reader in chunks of the given sizes (cycled), then end the stream."""
    i = 0
    while data:
        n = cuts[i % len(cuts)]
        i += 1
        reader.feed_data(data[:n])
        data = data[n:]
    reader.feed_eof()


# Packet types 1 to 14 with bodies up to the limit; the first is the CONNECT (at most 8 KiB).
bodies = st.binary(max_size=300) | st.integers(min_value=301, max_value=MAX_PACKET).map(lambda n: b"x" * n)
streams = st.tuples(
    st.binary(max_size=200).map(lambda b: packet(1, b)),
    st.lists(st.tuples(st.integers(min_value=1, max_value=14), bodies).map(lambda t: packet(*t)), max_size=8),
).map(lambda t: t[0] + b"".join(t[1]))
# How the socket cuts the stream: single bytes up to chunks that span several packets.
chunk_sizes = st.lists(st.integers(min_value=1, max_value=600), min_size=1, max_size=10)


@pytest.mark.anyio
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=streams, cuts=chunk_sizes)
async def test_valid_streams_pass_whole_however_they_arrive(data: bytes, cuts: list[int]) -> None:
    stats = IngestStats()
    async with guarded(stats) as (reader, guard, _):
        arrive(reader, data, cuts)
        assert await reader.read() == data
        assert guard.tripped is None
        assert guard.started is None  # between packets: no deadline
    assert stats.guard_closed == {}


@pytest.mark.anyio
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    before=st.lists(st.binary(max_size=100).map(lambda b: packet(3, b)), max_size=3),
    size=st.integers(min_value=MAX_PACKET + 1, max_value=128**4 - 1),  # the largest 4-byte length
    cuts=chunk_sizes,
)
async def test_a_packet_over_the_limit_ends_the_stream_before_its_body(
    before: list[bytes], size: int, cuts: list[int]
) -> None:
    head = packet(1, b"connect") + b"".join(before)
    stats = IngestStats()
    async with guarded(stats) as (reader, guard, _):
        announce = b"\x30" + mqtt_raw._varlen(size)
        arrive(reader, head + announce + b"body" * 10, cuts)
        got = await reader.read()
        assert guard.tripped is GuardClose.PACKET_TOO_LARGE
        # At most what came before it and part of its header, never a byte of its body.
        assert (head + announce).startswith(got)
    assert stats.guard_closed == {"packet_too_large": 1}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (packet(1, b"x" * (CONNECT_MAX_BYTES + 1)), GuardClose.PACKET_TOO_LARGE),  # the CONNECT's own limit
        (b"\x30\xff\xff\xff\xff\x01", GuardClose.MALFORMED),  # a fifth length byte
        (packet(1, b"c") + b"\x00\x00", GuardClose.MALFORMED),  # reserved type 0
        (packet(1, b"c") + b"\xf0\x00", GuardClose.MALFORMED),  # reserved type 15
    ],
)
async def test_malformed_and_oversized_framing_is_refused(data: bytes, reason: GuardClose) -> None:
    async with guarded(IngestStats()) as (reader, guard, _):
        arrive(reader, data, [1])
        await reader.read()
        assert guard.tripped is reason
        assert reader.at_eof()


@pytest.mark.anyio
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.integers(min_value=2, max_value=14),
    body=st.binary(max_size=200),
    connect=st.binary(max_size=100).map(lambda b: packet(1, b)),
    cuts=chunk_sizes,
)
async def test_a_first_packet_that_is_not_a_connect_is_refused(
    kind: int, body: bytes, connect: bytes, cuts: list[int]
) -> None:
    """MQTT-3.1.0-1, whatever follows it (even the CONNECT): nothing after its first byte."""
    stats = IngestStats()
    async with guarded(stats) as (reader, guard, _):
        arrive(reader, packet(kind, body) + connect, cuts)
        got = await reader.read()
        assert guard.tripped is GuardClose.MALFORMED
        assert got == b""
    assert stats.guard_closed == {"malformed": 1}


@pytest.mark.anyio
async def test_a_stalled_packet_is_swept_and_a_waiting_read_ends() -> None:
    stats = IngestStats()
    async with guarded(stats, packet_timeout=0.2) as (reader, guard, owner):
        reader.feed_data(packet(1, b"c"))
        assert owner.sweep() == 0  # the CONNECT arrived whole: between packets
        reader.feed_data(b"\x30\x10abc")
        assert owner.sweep() == 0  # begun, but not late yet
        await asyncio.sleep(0.3)
        assert owner.sweep() == 1
        assert guard.tripped is GuardClose.PACKET_TIMEOUT
        assert await reader.readexactly(3) == packet(1, b"c")
        with pytest.raises(asyncio.IncompleteReadError):
            await reader.readexactly(16)
    assert stats.guard_closed == {"packet_timeout": 1}


@pytest.mark.anyio
async def test_a_connection_that_never_sends_its_connect_is_swept() -> None:
    async with guarded(IngestStats(), packet_timeout=0.2) as (reader, guard, owner):
        waiting = asyncio.ensure_future(reader.read(1))
        await asyncio.sleep(0.3)
        assert owner.sweep() == 1
        assert await asyncio.wait_for(waiting, 5) == b""
        assert guard.tripped is GuardClose.PACKET_TIMEOUT


@pytest.mark.anyio
async def test_a_full_listener_answers_connack_3() -> None:
    stats = IngestStats()
    async with guarded(stats, max_connections=1) as (_, _guard, owner):
        server_sock, client_sock = socket.socketpair()
        _, writer = await asyncio.open_connection(sock=server_sock)
        try:
            assert await owner.refuse_if_full(writer)
            assert client_sock.recv(16) == CONNACK_SERVER_UNAVAILABLE
        finally:
            writer.close()
            client_sock.close()
        owner.max_connections = 2
        assert not await owner.refuse_if_full(writer)
    assert stats.guard_closed == {"capacity": 1}


async def _arrived(guard: PacketGuard) -> bool:
    """Whether connect_arrived() returns once the loop has run what is ready."""
    waiting = asyncio.ensure_future(guard.connect_arrived())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    done = waiting.done()
    waiting.cancel()
    return done


@pytest.mark.anyio
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(min_size=1, max_size=300), cut=st.integers(min_value=1, max_value=301))
async def test_connect_arrived_waits_for_the_whole_connect(body: bytes, cut: int) -> None:
    """node.broker admits a set-up only once the CONNECT is whole; the bytes may come cut
    anywhere (strategy: any body up to 300 bytes, cut once at any point inside it)."""
    connect = packet(1, body)
    cut = min(cut, len(connect) - 1)
    async with guarded(IngestStats()) as (reader, guard, _):
        waiting = asyncio.ensure_future(guard.connect_arrived())
        reader.feed_data(connect[:cut])
        await asyncio.sleep(0)
        assert not waiting.done()
        reader.feed_data(connect[cut:])
        await asyncio.wait_for(waiting, 5)
        assert await _arrived(guard)  # and at once for a later caller


@pytest.mark.anyio
@pytest.mark.parametrize("end", ["eof", "reset", "oversize", "swept"])
async def test_connect_arrived_returns_when_the_stream_ends_first(end: str) -> None:
    async with guarded(IngestStats(), packet_timeout=0.1) as (reader, guard, owner):
        reader.feed_data(b"\x10")  # a CONNECT begun, never finished
        assert not await _arrived(guard)
        waiting = asyncio.ensure_future(guard.connect_arrived())
        await asyncio.sleep(0)
        if end == "eof":
            reader.feed_eof()
        elif end == "reset":
            reader.set_exception(ConnectionResetError())
        elif end == "oversize":
            reader.feed_data(mqtt_raw._varlen(CONNECT_MAX_BYTES + 1))
        else:
            await asyncio.sleep(0.2)
            assert owner.sweep() == 1
        await asyncio.wait_for(waiting, 5)
        assert guard.connect_end is None
