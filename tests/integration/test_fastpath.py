"""The broker's fast path (node/fastpath.py) on the wire: framing, PUBACK order, limits.

The rest of the suite runs with the fast path on (the default) and passes again with
``DEPOT_NODE_BROKER_FAST_PATH=false``; these tests pin what only the fast path's own reader
does: packets split anywhere across reads, many packets in one read, acknowledgements in
arrival order whatever each message's fate, and oversized or malformed framing refused.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import mqtt_raw
from tests.integration.conftest import RunningNode, make_admin_key, start_node, stop_node
from tests.payloads import telemetry

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """The fast path on both event loops `serve` can run on (setting event_loop)."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    """A node with the fast path on, whatever DEPOT_NODE_BROKER_FAST_PATH says (these tests
    pin what only its reader does; the rest of the suite runs both ways)."""
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        running = await start_node(tg, tmp_path, key, broker_fast_path=True)
        yield running
        await stop_node(running)


PUBACK, PINGRESP = 4, 13
PINGREQ = b"\xc0\x00"


@dataclass(frozen=True)
class Op:
    """One packet of a scenario: ``own`` telemetry or ``status`` (QoS 0 or 1), a ``denied``
    publish, a ``ping``. A connection remembers the topics it was allowed to publish to, so a
    scenario mixes two allowed topics with denied ones in any order."""

    kind: str
    qos: int = 1


ops = st.lists(
    st.one_of(
        st.builds(Op, st.just("own"), st.sampled_from([0, 1])),
        st.builds(Op, st.just("status"), st.sampled_from([0, 1])),
        st.builds(Op, st.just("denied"), st.sampled_from([0, 1])),
        st.builds(Op, st.just("ping")),
    ),
    min_size=1,
    max_size=40,
)


def encode(device_id: str, scenario: list[Op]) -> tuple[bytes, list[tuple[int, int]], int]:
    """The scenario's bytes, the responses it must get in order, and the rows it must store."""
    wire = bytearray()
    expected: list[tuple[int, int]] = []  # (packet type, packet id or 0)
    seq = 0
    for n, op in enumerate(scenario, start=1):
        if op.kind == "ping":
            wire += PINGREQ
            expected.append((PINGRESP, 0))
            continue
        if op.kind == "own":
            topic, payload = f"iot/{device_id}/telemetry", telemetry(device_id, 1, seq)
            seq += 1
        elif op.kind == "status":
            topic, payload = f"iot/{device_id}/status", b'{"state": "ok"}'
        else:
            topic, payload = "iot/someone-else/telemetry", telemetry("someone-else", 1, n)
        wire += mqtt_raw.publish(topic, payload, qos=op.qos, packet_id=n)
        if op.qos:
            expected.append((PUBACK, n))
    return bytes(wire), expected, seq


async def publish_denials(node: RunningNode) -> float:
    """The node's count of denied PUBLISHes (``depot_node_acl_denied_total``)."""
    async with node.http() as client:
        resp = await client.get("/metrics")
    assert resp.status_code == 200, resp.text
    for line in resp.text.splitlines():
        if line.startswith('depot_node_acl_denied_total{action="publish"}'):
            return float(line.split()[-1])
    return 0.0


def acks(responses: list[tuple[int, int]]) -> list[int]:
    return [packet_id for ptype, packet_id in responses if ptype == PUBACK]


def chunks(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        yield data[a:b]


def exchange(port: int, connect: bytes, pieces: Iterator[bytes], responses: int) -> list[tuple[int, int]]:
    """Send *pieces* as separate writes (no Nagle), then read *responses* packets."""
    got: list[tuple[int, int]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(connect)
        ptype, body = mqtt_raw.read_packet(sock)
        assert (ptype, body[1]) == (2, 0), "CONNACK refused"
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.0005)  # let most pieces arrive as reads of their own
        while len(got) < responses:
            ptype, body = mqtt_raw.read_packet(sock)
            got.append((ptype, int.from_bytes(body[:2], "big") if ptype == PUBACK else 0))
        sock.sendall(mqtt_raw.DISCONNECT)
    return got


async def test_split_and_coalesced_packets_are_acked_in_arrival_order(node: RunningNode) -> None:
    """Hypothesis: any mix of own/denied QoS 0/1 PUBLISHes and PINGREQs, cut at arbitrary
    byte offsets: the PUBACKs come in arrival order, every own message is stored once, and
    every denied one is denied (and counted), however often the allowed topics came before."""
    count = 0

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(scenario=ops, cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=30))
    def scenario_holds(scenario: list[Op], cuts: list[int]) -> None:
        nonlocal count
        count += 1
        device_id = f"fp-{count}"
        secret = anyio.from_thread.run(node.register, device_id)
        wire, expected, stored = encode(device_id, scenario)
        connect = mqtt_raw.connect(device_id, device_id, secret)
        denials = anyio.from_thread.run(publish_denials, node)
        got = exchange(node.mqtt_port, connect, chunks(wire, cuts), len(expected))
        denied = sum(op.kind == "denied" for op in scenario)

        async def denials_since() -> float:
            # A denied QoS 0 PUBLISH at the end gets no answer to wait for: poll the count.
            with anyio.move_on_after(10):
                while await publish_denials(node) - denials < denied:
                    await anyio.sleep(0.02)
            return await publish_denials(node) - denials

        assert anyio.from_thread.run(denials_since) == denied
        # PUBACKs in PUBLISH order (MQTT-4.6.0-2); a PINGRESP may overtake a PUBACK that is
        # still waiting for its commit (MQTT orders acknowledgements, not other packets).
        assert acks(got) == acks(expected)
        assert sorted(got) == sorted(expected)

        async def stored_rows() -> int:
            with anyio.fail_after(10):
                while True:
                    device = await node.get(f"/api/v1/devices/{device_id}")
                    if device["counters"]["stored"] >= stored:
                        return int(device["counters"]["stored"])
                    await anyio.sleep(0.02)

        assert anyio.from_thread.run(stored_rows) == stored

    await anyio.to_thread.run_sync(scenario_holds)


def _closed_without_answer(port: int, connect: bytes, payload: bytes) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect)
        ptype, body = mqtt_raw.read_packet(sock)
        assert (ptype, body[1]) == (2, 0)
        try:
            sock.sendall(payload)
            return sock.recv(16) == b""
        except ConnectionError:
            return True


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(bytes([0x32]) + mqtt_raw._varlen(2 * 1024 * 1024), id="over-packet-limit"),
        pytest.param(b"\x32\xff\xff\xff\xff\x01", id="five-byte-length"),
        pytest.param(mqtt_raw.publish("iot/x/telemetry", b"{}", qos=1, packet_id=0), id="packet-id-0"),
        pytest.param(b"\x32\x04\x00\x09ab", id="topic-past-end"),
        pytest.param(b"\x32\x06\x00\x02\xff\xfe\x00\x01", id="topic-not-utf8"),
        pytest.param(mqtt_raw.connect("again"), id="second-connect"),
        pytest.param(b"\x00\x00", id="reserved-type"),
    ],
)
async def test_malformed_framing_closes_only_that_connection(node: RunningNode, bad: bytes) -> None:
    secret = await node.register("fp-bad")
    other = await node.register("fp-good")
    connect = mqtt_raw.connect("fp-bad", "fp-bad", secret)
    assert await anyio.to_thread.run_sync(_closed_without_answer, node.mqtt_port, connect, bad)
    # The node goes on serving everyone else.
    wire, expected, _ = encode("fp-good", [Op("own"), Op("own")])
    good = mqtt_raw.connect("fp-good", "fp-good", other)
    got = await anyio.to_thread.run_sync(exchange, node.mqtt_port, good, iter([wire]), len(expected))
    assert acks(got) == acks(expected)
    assert len(await node.telemetry("fp-good")) == 2
    assert await node.telemetry("fp-bad") == []


async def test_packet_limit_is_a_setting_and_payloads_below_it_are_quarantined(tmp_path: Path) -> None:
    """Between max_payload_bytes and the packet limit: quarantined (kept, reason given);
    above the packet limit: the connection is closed before the packet is buffered."""
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(
            tg,
            tmp_path,
            key,
            broker_fast_path=True,
            max_payload_bytes=1024,
            max_batch_payload_bytes=4096,
            max_packet_bytes=8192,
        )
        secret = await node.register("fp-big")
        connect = mqtt_raw.connect("fp-big", "fp-big", secret)
        big = mqtt_raw.publish("iot/fp-big/telemetry", b"x" * 4000, packet_id=1)
        got = await anyio.to_thread.run_sync(exchange, node.mqtt_port, connect, iter([big]), 1)
        assert got == [(PUBACK, 1)]
        quarantined = await node.get("/api/v1/quarantine", device_id="fp-big")
        assert [q["reason"] for q in quarantined["items"]] == ["payload_too_large"]
        huge = mqtt_raw.publish("iot/fp-big/telemetry", b"x" * 9000, packet_id=2)
        assert await anyio.to_thread.run_sync(_closed_without_answer, node.mqtt_port, connect, huge)
        await stop_node(node)


async def test_fallback_to_amqtt_reader_still_ingests(tmp_path: Path) -> None:
    """broker_fast_path = false: amqtt's own reader, the same guarantees."""
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, broker_fast_path=False)
        secret = await node.register("fp-slow")
        wire, expected, stored = encode("fp-slow", [Op("own"), Op("denied"), Op("ping"), Op("own", 0), Op("own")])
        connect = mqtt_raw.connect("fp-slow", "fp-slow", secret)
        got = await anyio.to_thread.run_sync(exchange, node.mqtt_port, connect, iter([wire]), len(expected))
        assert sorted(got) == sorted(expected)  # amqtt's reader runs each packet in its own task
        assert len(await node.telemetry("fp-slow")) == stored
        await stop_node(node)


def _subscribe(packet_id: int, topic: str, qos: int = 1) -> bytes:
    body = packet_id.to_bytes(2, "big") + len(topic).to_bytes(2, "big") + topic.encode() + bytes([qos])
    return bytes([0x82]) + mqtt_raw._varlen(len(body)) + body


def _unsubscribe(packet_id: int, topic: str) -> bytes:
    body = packet_id.to_bytes(2, "big") + len(topic).to_bytes(2, "big") + topic.encode()
    return bytes([0xA2]) + mqtt_raw._varlen(len(body)) + body


async def test_subscribe_and_unsubscribe_are_answered(node: RunningNode) -> None:
    """The fast path hands SUBSCRIBE/UNSUBSCRIBE to amqtt's own handling (in packet order),
    without the per-connection queues and loop tasks it removed: the ACL still applies."""
    secret = await node.register("fp-sub")
    wire = (
        _subscribe(1, "iot/fp-sub/commands")
        + _subscribe(2, "#")
        + _unsubscribe(3, "iot/fp-sub/commands")
        + _subscribe(4, "iot/other/commands")
    )

    def talk() -> list[tuple[int, bytes]]:
        with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
            sock.sendall(mqtt_raw.connect("fp-sub", "fp-sub", secret))
            assert mqtt_raw.read_packet(sock)[0] == 2
            sock.sendall(wire)
            got = [mqtt_raw.read_packet(sock) for _ in range(4)]
            sock.sendall(mqtt_raw.DISCONNECT)
        return got

    # Sorted: amqtt's own loop (broker_fast_path = false) may answer the UNSUBSCRIBE first.
    got = sorted(await anyio.to_thread.run_sync(talk), key=lambda p: p[1][:2])
    suback, unsuback = 9, 11
    assert [(t, b[:2]) for t, b in got] == [
        (suback, b"\x00\x01"),
        (suback, b"\x00\x02"),
        (unsuback, b"\x00\x03"),
        (suback, b"\x00\x04"),
    ]
    assert [b[2] for t, b in got if t == suback] == [1, 0x80, 0x80]  # granted QoS 1; ACL refusals
