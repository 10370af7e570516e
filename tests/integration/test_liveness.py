"""Liveness: keep-alive enforced by the node, connection history with reasons, wills."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests import mqtt_raw
from tests.integration.conftest import RunningNode, make_admin_key, start_node, stop_node

pytestmark = pytest.mark.anyio


def connect_with_will(client_id: str, secret: str, will_topic: str, *, keepalive: int) -> bytes:
    """CONNECT with a retained QoS 1 will (tests/mqtt_raw.connect has no will)."""

    def s(text: str | bytes) -> bytes:
        b = text.encode() if isinstance(text, str) else text
        return struct.pack("!H", len(b)) + b

    flags = 0x02 | 0x04 | (1 << 3) | 0x20 | 0x80 | 0x40  # clean, will, will QoS 1, retain, user, pw
    body = s("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    body += s(client_id) + s(will_topic) + s(b"offline") + s(client_id) + s(secret)
    return bytes([0x10, len(body)]) + body


async def events(node: RunningNode, device_id: str) -> list[tuple[str, str]]:
    page: dict[str, Any] = await node.get(f"/api/v1/devices/{device_id}/events")
    return [(e["event"], e["detail"]) for e in reversed(page["items"])]


async def test_silent_device_is_closed_after_one_and_a_half_keepalives(node: RunningNode) -> None:
    secret = await node.register("sleepy-1")

    def silent_session() -> float:
        with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
            sock.sendall(connect_with_will("sleepy-1", secret, "iot/sleepy-1/status", keepalive=1))
            ptype, body = mqtt_raw.read_packet(sock)
            assert (ptype, body[1]) == (2, 0)
            started = time.monotonic()
            # Say nothing (no PINGREQ), as a meter whose power or link is gone.
            assert sock.recv(16) == b""  # the node closes the connection
            return time.monotonic() - started

    silent_for = await anyio.to_thread.run_sync(silent_session)
    # 1.5 x keep-alive of 1 s, plus scheduling slack on a shared machine.
    assert 1.4 <= silent_for < 3.0

    async def offline() -> bool:
        device = await node.get("/api/v1/devices/sleepy-1")
        return device["state"]["online"] is False

    with anyio.fail_after(10):
        while not await offline():
            await anyio.sleep(0.05)
    history = await events(node, "sleepy-1")
    assert [e for e, _ in history] == ["connected", "will_published", "disconnected"]
    assert history[1][1] == "iot/sleepy-1/status (retained): offline"
    assert history[2][1] == "keepalive_expired"
    device = await node.get("/api/v1/devices/sleepy-1")
    assert device["state"]["connected_since"] is None


async def test_pings_keep_a_session_alive(node: RunningNode) -> None:
    secret = await node.register("pinger-1")

    def pinging_session() -> None:
        with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
            sock.sendall(mqtt_raw.connect("pinger-1", "pinger-1", secret, keepalive=1))
            assert mqtt_raw.read_packet(sock)[0] == 2
            for _ in range(6):  # 3 s: twice the 1.5 s limit
                time.sleep(0.5)
                sock.sendall(b"\xc0\x00")  # PINGREQ
                assert mqtt_raw.read_packet(sock)[0] == 13  # PINGRESP
            sock.sendall(mqtt_raw.DISCONNECT)

    await anyio.to_thread.run_sync(pinging_session)
    with anyio.fail_after(10):
        while len(await events(node, "pinger-1")) < 2:
            await anyio.sleep(0.05)
    assert await events(node, "pinger-1") == [
        ("connected", await _peer_of(node, "pinger-1")),
        ("disconnected", "clean"),
    ]


async def _peer_of(node: RunningNode, device_id: str) -> str:
    history = await events(node, device_id)
    return history[0][1]


async def test_abrupt_close_and_connected_since(node: RunningNode) -> None:
    secret = await node.register("cut-1")
    with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
        await anyio.to_thread.run_sync(sock.sendall, mqtt_raw.connect("cut-1", "cut-1", secret))
        assert (await anyio.to_thread.run_sync(mqtt_raw.read_packet, sock))[0] == 2
        with anyio.fail_after(10):
            while not (await node.get("/api/v1/devices/cut-1"))["state"]["online"]:
                await anyio.sleep(0.05)
        assert (await node.get("/api/v1/devices/cut-1"))["state"]["connected_since"] is not None
    # Closed without DISCONNECT.
    with anyio.fail_after(10):
        while len(await events(node, "cut-1")) < 2:
            await anyio.sleep(0.05)
    # No will was set, so none was published.
    assert (await events(node, "cut-1"))[1:] == [("disconnected", "connection_lost")]


async def test_a_will_on_another_devices_topic_is_refused(node: RunningNode) -> None:
    secret = await node.register("willful-1")
    await node.register("victim-1")

    def try_connect() -> int:
        with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
            sock.sendall(connect_with_will("willful-1", secret, "iot/victim-1/status", keepalive=30))
            ptype, body = mqtt_raw.read_packet(sock)
            assert ptype == 2
            return body[1]

    assert await anyio.to_thread.run_sync(try_connect) == 5
    async with node.http() as client:
        metrics = (await client.get("/metrics")).text
    assert 'depot_node_auth_refused_total{reason="bad_will_topic"} 1.0' in metrics


async def test_node_closes_sessions_silent_past_the_inactivity_timeout(tmp_path: Path) -> None:
    """A client with keep-alive 0 is never timed out by keep-alive; the node's own clock is."""
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, device_inactivity_timeout_s=1.0)
        secret = await node.register("mute-1")

        def silent() -> float:
            with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
                sock.sendall(mqtt_raw.connect("mute-1", "mute-1", secret, keepalive=0))
                assert mqtt_raw.read_packet(sock)[0] == 2
                started = time.monotonic()
                assert sock.recv(16) == b""
                return time.monotonic() - started

        assert 0.9 <= await anyio.to_thread.run_sync(silent) < 3.0
        with anyio.fail_after(10):
            while len(await events(node, "mute-1")) < 2:
                await anyio.sleep(0.05)
        assert (await events(node, "mute-1"))[1] == ("disconnected", "inactive")
        await stop_node(node)
