"""The node's limits on a real node (ADR 0011): per-device message and byte rates, packet
size, stalled connections, connection and device counts, HTTP rates per key and address."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from storage.secrets import new_api_key
from storage.sqlite import connect, insert_api_key
from tests import mqtt_raw
from tests.integration.conftest import Device, RunningNode, make_admin_key, start_node, stop_node
from tests.payloads import telemetry

pytestmark = pytest.mark.anyio

CONNACK, PUBACK = 2, 4


@asynccontextmanager
async def running(tmp_path: Path, **settings: Any) -> AsyncIterator[RunningNode]:
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, **settings)
        try:
            yield node
        finally:
            await stop_node(node)


async def metric(node: RunningNode, name: str, labels: str) -> float:
    async with node.http() as client:
        text = (await client.get("/metrics")).text
    match = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name}{{{labels}}} not in /metrics"
    return float(match[1])


async def wait_for(check: Any) -> None:
    with anyio.fail_after(20):
        while not await check():
            await anyio.sleep(0.05)


async def events(node: RunningNode, device_id: str) -> list[tuple[str, str]]:
    page = await node.get(f"/api/v1/devices/{device_id}/events")
    return [(e["event"], e["detail"]) for e in reversed(page["items"])]


async def wait_disconnected(node: RunningNode, device_id: str, reason: str) -> None:
    """Until the device's connection history records a disconnect for *reason*."""

    async def recorded() -> bool:
        return ("disconnected", reason) in await events(node, device_id)

    await wait_for(recorded)


def session(port: int, device_id: str, secret: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(mqtt_raw.connect(device_id, device_id, secret))
    assert mqtt_raw.read_packet(sock) == (CONNACK, b"\x00\x00")
    return sock


async def test_messages_over_the_device_rate_are_quarantined_and_counted(tmp_path: Path) -> None:
    async with running(tmp_path, device_max_messages_per_s=0.5, device_burst_messages=3) as node:
        secret = await node.register("fast-1")
        other = await node.register("calm-1")

        def flood() -> int:
            with session(node.mqtt_port, "fast-1", secret) as sock:
                for seq in range(6):
                    packet = mqtt_raw.publish("iot/fast-1/telemetry", telemetry("fast-1", 1, seq), packet_id=seq + 1)
                    sock.sendall(packet)
                acks = sum(mqtt_raw.read_packet(sock)[0] == PUBACK for _ in range(6))
                sock.sendall(mqtt_raw.DISCONNECT)
                return acks

        # Quarantined messages are acknowledged: their payload is kept, resending would not help.
        assert await anyio.to_thread.run_sync(flood) == 6
        assert [r["seq"] for r in await node.telemetry("fast-1")] == [0, 1, 2]
        quarantined = (await node.get("/api/v1/quarantine", device_id="fast-1"))["items"]
        assert sorted(q["reason"] for q in quarantined) == ["rate_limited"] * 3
        assert "0.5 messages/s" in quarantined[0]["detail"]
        assert await metric(node, "depot_node_device_limit_exceeded_total", 'limit="messages"') == 3
        assert await metric(node, "depot_node_quarantined_total", 'reason="rate_limited"') == 3

        # Another device has its own buckets.
        def calm() -> None:
            with session(node.mqtt_port, "calm-1", other) as sock:
                sock.sendall(mqtt_raw.publish("iot/calm-1/telemetry", telemetry("calm-1", 1, 0)))
                assert mqtt_raw.read_packet(sock)[0] == PUBACK

        await anyio.to_thread.run_sync(calm)
        assert len(await node.telemetry("calm-1")) == 1


async def test_bytes_over_the_device_rate_disconnect_and_nothing_is_lost(tmp_path: Path) -> None:
    payload_size = len(telemetry("big-1", 1, 0))
    async with running(
        tmp_path,
        device_max_bytes_per_s=payload_size * 10.0,  # a second message comes back after 0.1 s
        device_burst_bytes=payload_size + 10,
        device_limit_action="disconnect",
    ) as node:
        secret = await node.register("big-1")

        def two_at_once() -> bytes:
            with session(node.mqtt_port, "big-1", secret) as sock:
                sock.sendall(mqtt_raw.publish("iot/big-1/telemetry", telemetry("big-1", 1, 0), packet_id=1))
                assert mqtt_raw.read_packet(sock) == (PUBACK, b"\x00\x01")
                sock.sendall(mqtt_raw.publish("iot/big-1/telemetry", telemetry("big-1", 1, 1), packet_id=2))
                return sock.recv(16)  # no PUBACK: the connection is closed

        assert await anyio.to_thread.run_sync(two_at_once) == b""
        assert await metric(node, "depot_node_device_limit_exceeded_total", 'limit="bytes"') == 1

        await wait_disconnected(node, "big-1", "rate_limited")

        # The device resends after reconnecting, within its rate: stored, nothing lost.
        def resend() -> None:
            time.sleep(0.3)
            with session(node.mqtt_port, "big-1", secret) as sock:
                sock.sendall(mqtt_raw.publish("iot/big-1/telemetry", telemetry("big-1", 1, 1), packet_id=2))
                assert mqtt_raw.read_packet(sock) == (PUBACK, b"\x00\x02")

        await anyio.to_thread.run_sync(resend)
        assert [r["seq"] for r in await node.telemetry("big-1")] == [0, 1]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "amqtt-reader"])
@pytest.mark.parametrize("qos", [0, 1])
async def test_disconnect_action_on_either_reader_and_qos(tmp_path: Path, *, fast_path: bool, qos: int) -> None:
    """Bridge.admit checks the device limits for both MQTT readers (node.fastpath and amqtt's):
    over them with ``device_limit_action = "disconnect"``, the message is not taken nor
    acknowledged, and the connection closes with reason ``rate_limited``, at QoS 0
    as at QoS 1."""
    async with running(
        tmp_path,
        broker_fast_path=fast_path,
        device_max_messages_per_s=0.001,  # nothing comes back during the test
        device_burst_messages=2,
        device_limit_action="disconnect",
    ) as node:
        secret = await node.register("flood-1")

        def flood() -> list[tuple[int, bytes]]:
            with session(node.mqtt_port, "flood-1", secret) as sock:
                for seq in range(3):
                    payload = telemetry("flood-1", 1, seq)
                    sock.sendall(mqtt_raw.publish("iot/flood-1/telemetry", payload, qos=qos, packet_id=seq + 1))
                got = []
                while True:  # until the node closes the connection
                    try:
                        got.append(mqtt_raw.read_packet(sock))
                    except ConnectionError:
                        return got

        got = await anyio.to_thread.run_sync(flood)
        # The third is never acknowledged. The two within the burst are stored; whether their
        # PUBACKs left before the close depends on when their commit came (a device resends
        # what was not acknowledged, and (boot, seq) makes that harmless), but never out of order.
        within = [(PUBACK, b"\x00\x01"), (PUBACK, b"\x00\x02")] if qos else []
        assert got == within[: len(got)]

        await wait_disconnected(node, "flood-1", "rate_limited")
        assert [r["seq"] for r in await node.telemetry("flood-1")] == [0, 1]
        assert await metric(node, "depot_node_device_limit_exceeded_total", 'limit="messages"') == 1


async def test_a_packet_over_the_size_limit_closes_the_connection_before_its_body(tmp_path: Path) -> None:
    async with running(tmp_path, max_payload_bytes=1024, max_batch_payload_bytes=2048, max_packet_bytes=4096) as node:
        secret = await node.register("huge-1")

        def announce_a_huge_packet() -> bytes:
            with session(node.mqtt_port, "huge-1", secret) as sock:
                # A PUBLISH announcing 200 MiB; only its first bytes are ever sent.
                sock.sendall(b"\x32" + mqtt_raw._varlen(200 * 1024 * 1024) + b"\x00\x05iot/x")
                return sock.recv(16)

        assert await anyio.to_thread.run_sync(announce_a_huge_packet) == b""
        assert await metric(node, "depot_node_mqtt_connections_closed_total", 'reason="packet_too_large"') == 1

        await wait_disconnected(node, "huge-1", "packet_too_large")

        # Between the payload and the packet limit: quarantined as payload_too_large.
        def oversize_payload() -> None:
            with session(node.mqtt_port, "huge-1", secret) as sock:
                body = b'{"v": 2, "pad": "' + b"x" * 2000 + b'"}'
                sock.sendall(mqtt_raw.publish("iot/huge-1/telemetry", body))
                assert mqtt_raw.read_packet(sock)[0] == PUBACK

        await anyio.to_thread.run_sync(oversize_payload)
        quarantined = (await node.get("/api/v1/quarantine", device_id="huge-1"))["items"]
        assert [q["reason"] for q in quarantined] == ["payload_too_large"]


async def test_a_connect_whose_length_disagrees_with_its_fields_is_closed(node: RunningNode) -> None:
    secret = await node.register("odd-1")
    connect = mqtt_raw.connect("odd-1", "odd-1", secret)
    # The same CONNECT, its remaining length 2 bytes longer: the PINGREQ that follows is
    # inside the CONNECT by its length, and a packet of its own by amqtt's field parser.
    body = connect[2:]  # a short CONNECT: one length byte
    padded = b"\x10" + mqtt_raw._varlen(len(body) + 2) + body + mqtt_raw.PINGREQ

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
            sock.sendall(padded)
            assert mqtt_raw.read_packet(sock) == (CONNACK, b"\x00\x00")
            return sock.recv(16)  # no PINGRESP: closed

    assert await anyio.to_thread.run_sync(exchange) == b""
    assert await metric(node, "depot_node_mqtt_connections_closed_total", 'reason="malformed"') == 1


async def test_a_publish_before_the_connect_is_closed_at_once(node: RunningNode) -> None:
    """MQTT-3.1.0-1. A paho client publishing from another thread while it reconnects can put
    a PUBLISH ahead of its CONNECT; amqtt then read the PUBLISH as a CONNECT and waited for
    bytes that never came, so the device stayed unconnected until its keep-alive ran out."""
    secret = await node.register("early-1")
    early = mqtt_raw.publish("iot/early-1/telemetry", telemetry("early-1", 1, 0), packet_id=1)

    def exchange() -> tuple[bytes, float]:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
            sock.sendall(early + mqtt_raw.connect("early-1", "early-1", secret))
            return sock.recv(16), time.monotonic() - t0

    got, took = await anyio.to_thread.run_sync(exchange)
    assert got == b""  # closed, no CONNACK
    assert took < 5  # not after a keep-alive or packet timeout
    assert await metric(node, "depot_node_mqtt_connections_closed_total", 'reason="malformed"') == 1

    # The device's next connection, in the right order, is served, and nothing of the first was stored.
    def then_in_order() -> None:
        with session(node.mqtt_port, "early-1", secret) as sock:
            sock.sendall(mqtt_raw.publish("iot/early-1/telemetry", telemetry("early-1", 1, 1), packet_id=2))
            assert mqtt_raw.read_packet(sock) == (PUBACK, b"\x00\x02")

    await anyio.to_thread.run_sync(then_in_order)
    assert [r["seq"] for r in (await node.get("/api/v1/devices/early-1/telemetry"))["items"]] == [1]


async def test_stalled_connects_and_packets_are_closed(tmp_path: Path) -> None:
    async with running(tmp_path, mqtt_packet_timeout_s=0.5) as node:
        secret = await node.register("slow-1")

        def silent_socket() -> float:
            with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
                started = time.monotonic()
                assert sock.recv(16) == b""  # never sent a CONNECT
                return time.monotonic() - started

        def half_a_publish() -> bytes:
            with session(node.mqtt_port, "slow-1", secret) as sock:
                packet = mqtt_raw.publish("iot/slow-1/telemetry", telemetry("slow-1", 1, 0))
                sock.sendall(packet[:20])  # and then nothing
                return sock.recv(16)

        assert 0.4 <= await anyio.to_thread.run_sync(silent_socket) < 5.0
        assert await anyio.to_thread.run_sync(half_a_publish) == b""
        assert await metric(node, "depot_node_mqtt_connections_closed_total", 'reason="packet_timeout"') == 2


async def test_connections_past_the_limit_get_server_unavailable(tmp_path: Path, devices: list[Device]) -> None:
    async with running(tmp_path, max_connections=2) as node:
        secrets = {name: await node.register(name) for name in ("c-1", "c-2", "c-3")}
        devices.extend(Device(node.mqtt_port, name, secrets[name]) for name in ("c-1", "c-2"))
        assert [await d.aconnect() for d in devices] == [0, 0]

        def refused() -> bytes:
            with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
                return sock.recv(16)

        # CONNACK with return code 3 (server unavailable) at once, not a wait for a free slot.
        assert await anyio.to_thread.run_sync(refused) == b"\x20\x02\x00\x03"
        assert await metric(node, "depot_node_mqtt_connections_closed_total", 'reason="capacity"') == 1
        await devices[0].aclose()

        async def third_gets_in() -> bool:
            third = Device(node.mqtt_port, "c-3", secrets["c-3"])
            devices.append(third)
            return bool(await third.aconnect() == 0)

        await wait_for(third_gets_in)


async def test_registering_past_max_devices_is_a_conflict_problem(tmp_path: Path) -> None:
    async with running(tmp_path, max_devices=2) as node:
        await node.register("d-1")
        await node.register("d-2")
        async with node.http() as client:
            resp = await client.post("/api/v1/devices", json={"device_id": "d-3", "type": "dc_meter"})
            assert resp.status_code == 409
            assert resp.headers["content-type"] == "application/problem+json"
            problem = resp.json()
            assert problem["type"] == "tag:depot-node,2026:problem/device-limit"
            assert "maximum of 2 devices" in problem["detail"]
            # An existing id is still "exists", not "full".
            resp = await client.post("/api/v1/devices", json={"device_id": "d-1", "type": "dc_meter"})
            assert resp.json()["type"] == "tag:depot-node,2026:problem/device-exists"
            # A revoked device frees its place.
            assert (await client.delete("/api/v1/devices/d-1")).status_code == 204
        await node.register("d-3")


async def test_http_requests_are_limited_per_key_and_per_address(tmp_path: Path) -> None:
    settings = {
        "http_rate_limit_per_s": 0.2,
        "http_rate_limit_burst": 3,
        "http_anonymous_rate_limit_per_s": 0.2,
        "http_anonymous_rate_limit_burst": 2,
    }
    async with running(tmp_path, **settings) as node:
        key_id, other_key, key_hash = new_api_key()
        conn = connect(tmp_path / "depot-node.sqlite3")
        try:
            insert_api_key(conn, key_id, "viewer", key_hash)
        finally:
            conn.close()
        async with node.http() as admin, httpx.AsyncClient(base_url=node.base_url) as anonymous:
            # One bucket for the key across routes.
            assert (await admin.get("/api/v1/devices")).status_code == 200
            assert (await admin.get("/api/v1/alerts")).status_code == 200
            assert (await admin.get("/metrics")).status_code == 200
            limited = await admin.get("/api/v1/quarantine")
            assert limited.status_code == 429
            assert limited.headers["content-type"] == "application/problem+json"
            assert 1 <= int(limited.headers["Retry-After"]) <= 5
            assert limited.json()["type"] == "tag:depot-node,2026:problem/rate-limited"
            assert "this API key" in limited.json()["detail"]
            # Another key has its own bucket.
            viewer = {"Authorization": f"Bearer {other_key}"}
            assert (await anonymous.get("/api/v1/devices", headers=viewer)).status_code == 200
            # Without a valid key: limited per address, wrong keys included.
            bad = {"Authorization": "Bearer dnk_nothing_here"}
            assert (await anonymous.get("/api/v1/devices")).status_code == 401
            assert (await anonymous.get("/api/v1/devices", headers=bad)).status_code == 401
            assert (await anonymous.get("/api/v1/devices", headers=bad)).status_code == 429
            assert (await anonymous.get("/openapi.json")).status_code == 429
            # Probes are never limited.
            for _ in range(5):
                assert (await anonymous.get("/healthz")).status_code == 200
                assert (await anonymous.get("/readyz")).status_code == 200
            # The document says so.
            spec = (await admin.get("/openapi.json", headers=viewer)).json()
            assert "429" in spec["paths"]["/api/v1/devices"]["get"]["responses"]
            assert "Retry-After" in spec["paths"]["/api/v1/devices"]["get"]["responses"]["429"]["headers"]
            assert "429" not in spec["paths"]["/healthz"]["get"]["responses"]
