"""End to end: register over HTTP, publish over MQTT with paho-mqtt, read back over HTTP."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable

import anyio
import pytest

from tests import mqtt_raw
from tests.integration.conftest import Device, RunningNode
from tests.payloads import telemetry

pytestmark = pytest.mark.anyio


async def wait_for(predicate: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    with anyio.fail_after(seconds):
        while not await predicate():
            await anyio.sleep(0.05)


async def test_publish_duplicate_and_gap_read_back(node: RunningNode, devices: list[Device]) -> None:
    secret = await node.register("emu-4021-m1")
    dev = Device(node.mqtt_port, "emu-4021-m1", secret)
    devices.append(dev)
    assert (await dev.aconnect()).value == 0
    topic = "iot/emu-4021-m1/telemetry"
    for seq in (0, 1, 1, 2, 5, 3):  # a duplicate of 1, a gap of 3..4, then 3 arrives late
        await dev.apublish(topic, telemetry("emu-4021-m1", 17, seq))

    rows = await node.telemetry("emu-4021-m1")
    assert [(r["boot"], r["seq"]) for r in rows] == [(17, 0), (17, 1), (17, 2), (17, 3), (17, 5)]
    assert rows[0]["ts"] == "2026-11-23T16:05:00.000Z"
    assert rows[0]["m"]["voltage_v"] == 1512.3

    device = await node.get("/api/v1/devices/emu-4021-m1")
    assert device["counters"] == {
        "received": 6,
        "stored": 5,
        "duplicates": 1,
        "missing": 1,
        "late": 1,
        "resets": 0,
        "quarantined": 0,
    }
    assert device["state"]["online"] is True
    assert device["state"]["boot"] == 17
    assert device["state"]["last_seq"] == 5


async def test_pipelined_burst_then_disconnect_is_stored_completely(node: RunningNode) -> None:
    """500 QoS 1 PUBLISHes and a DISCONNECT in one write: every message must be stored,
    although the client never waits for a PUBACK (amqtt alone loses most of them)."""
    secret = await node.register("burst-1")
    burst = mqtt_raw.connect("burst-1", "burst-1", secret)
    for seq in range(500):
        burst += mqtt_raw.publish("iot/burst-1/telemetry", telemetry("burst-1", 1, seq), packet_id=seq + 1)
    burst += mqtt_raw.DISCONNECT

    def send() -> None:
        with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
            sock.sendall(burst)
            # Wait for the server to close the connection after the DISCONNECT.
            sock.settimeout(10)
            try:
                while sock.recv(65536):
                    pass
            except (ConnectionError, TimeoutError):
                pass

    await anyio.to_thread.run_sync(send)

    async def all_stored() -> bool:
        dev = await node.get("/api/v1/devices/burst-1")
        return bool(dev["counters"]["stored"] == 500)

    await wait_for(all_stored)
    rows = await node.telemetry("burst-1")
    assert [r["seq"] for r in rows] == list(range(500))


async def test_puback_comes_after_commit(node: RunningNode) -> None:
    """Every PUBACK the client receives is for a message that the API can already read."""
    secret = await node.register("ack-1")

    def exchange() -> list[int]:
        acked = []
        with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
            sock.sendall(mqtt_raw.connect("ack-1", "ack-1", secret))
            ptype, body = mqtt_raw.read_packet(sock)
            assert ptype == 2  # CONNACK
            assert body[1] == 0  # accepted
            for seq in range(20):
                sock.sendall(mqtt_raw.publish("iot/ack-1/telemetry", telemetry("ack-1", 1, seq), packet_id=seq + 1))
            while len(acked) < 20:
                ptype, body = mqtt_raw.read_packet(sock)
                assert ptype == 4  # PUBACK
                acked.append(int.from_bytes(body[:2], "big"))
            sock.sendall(mqtt_raw.DISCONNECT)
        return acked

    acked = await anyio.to_thread.run_sync(exchange)
    assert sorted(acked) == list(range(1, 21))
    # No waiting here: acknowledged means durable, so the rows are already readable.
    rows = await node.telemetry("ack-1")
    assert len(rows) == 20


@pytest.mark.parametrize(
    ("client_id", "username", "password", "reason"),
    [
        ("meter-a", "meter-a", "wrong-secret", "bad_secret"),
        ("ghost-1", "ghost-1", "whatever", "unknown_device"),
        ("meter-b", "meter-a", None, "client_id_mismatch"),
        ("meter-a", "meter-a", None, "no_password"),
        ("Bad/Id", "Bad/Id", "x", "bad_identity"),
    ],
)
async def test_refused_connects_are_counted(
    node: RunningNode, client_id: str, username: str, password: str | None, reason: str
) -> None:
    real_secret = await node.register("meter-a")

    def try_connect() -> int:
        with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
            pw = real_secret if password is None and reason == "client_id_mismatch" else password
            sock.sendall(mqtt_raw.connect(client_id, username, pw))
            ptype, body = mqtt_raw.read_packet(sock)
            assert ptype == 2
            return body[1]

    return_code = await anyio.to_thread.run_sync(try_connect)
    assert return_code in (4, 5)
    async with node.http() as client:
        metrics = (await client.get("/metrics")).text
    assert f'depot_node_auth_refused_total{{reason="{reason}"}} 1.0' in metrics


async def test_publish_to_another_devices_topic_is_denied(node: RunningNode, devices: list[Device]) -> None:
    secret_a = await node.register("meter-a")
    await node.register("meter-b")
    dev = Device(node.mqtt_port, "meter-a", secret_a)
    devices.append(dev)
    assert (await dev.aconnect()).value == 0
    await dev.apublish("iot/meter-b/telemetry", telemetry("meter-b", 1, 0))
    await dev.apublish("iot/meter-a/nonsense", telemetry("meter-a", 1, 0))
    await dev.apublish("iot/meter-a/telemetry", telemetry("meter-a", 1, 0))
    assert await node.telemetry("meter-b") == []
    assert [r["seq"] for r in await node.telemetry("meter-a")] == [0]
    async with node.http() as client:
        metrics = (await client.get("/metrics")).text
    assert 'depot_node_acl_denied_total{action="publish"} 2.0' in metrics


async def test_malformed_payloads_are_quarantined_and_good_ones_flow(node: RunningNode, devices: list[Device]) -> None:
    secret = await node.register("meter-q")
    dev = Device(node.mqtt_port, "meter-q", secret)
    devices.append(dev)
    assert (await dev.aconnect()).value == 0
    topic = "iot/meter-q/telemetry"
    bad = [
        (b"\xff\xfe not utf-8", "not_utf8_json"),
        (b"{not json", "not_utf8_json"),
        (json.dumps({"v": 1, "device_id": "meter-q"}).encode(), "unsupported_version"),
        (telemetry("meter-q", 1, 1, device_id="meter-x"), "device_mismatch"),
        (telemetry("meter-q", 1, 2, seq=-1), "schema"),
        (telemetry("meter-q", 1, 3, ts="yesterday"), "schema"),
        (b"x" * (17 * 1024), "payload_too_large"),
    ]
    await dev.apublish(topic, telemetry("meter-q", 1, 0))
    for payload, _ in bad:
        await dev.apublish(topic, payload)
    await dev.apublish(topic, telemetry("meter-q", 1, 1))

    assert [r["seq"] for r in await node.telemetry("meter-q")] == [0, 1]
    page = await node.get("/api/v1/quarantine", device_id="meter-q")
    assert sorted(i["reason"] for i in page["items"]) == sorted(r for _, r in bad)
    device = await node.get("/api/v1/devices/meter-q")
    assert device["counters"]["quarantined"] == len(bad)
    assert device["counters"]["received"] == len(bad) + 2


async def test_qos2_and_qos0_are_stored_once(node: RunningNode, devices: list[Device]) -> None:
    secret = await node.register("meter-2")
    dev = Device(node.mqtt_port, "meter-2", secret)
    devices.append(dev)
    assert (await dev.aconnect()).value == 0
    topic = "iot/meter-2/telemetry"
    await dev.apublish(topic, telemetry("meter-2", 1, 0), qos=2)
    await dev.apublish(topic, telemetry("meter-2", 1, 1), qos=2)
    await dev.apublish(topic, telemetry("meter-2", 1, 1), qos=2)  # a resend: counted, not stored
    await dev.apublish(topic, telemetry("meter-2", 1, 2), qos=0)
    await dev.apublish("iot/meter-2/status", b"online", qos=1)

    async def all_seen() -> bool:
        device = await node.get("/api/v1/devices/meter-2")
        return bool(device["counters"]["received"] == 4)

    await wait_for(all_seen)
    assert [r["seq"] for r in await node.telemetry("meter-2")] == [0, 1, 2]
    device = await node.get("/api/v1/devices/meter-2")
    assert device["counters"]["duplicates"] == 1
    assert device["state"]["last_seen"] is not None
