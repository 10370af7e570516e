"""A CONNECT naming a live device's client id: authenticated before any session is touched.

amqtt 0.12.1 looks the client id up before it authenticates: for a persistent session
(clean session 0) it copied the CONNECT's credentials and will onto the live session and took
it over, even when the CONNECT was then refused. ``NodeBroker`` authenticates first (secret,
certificate and will topic), so a refused CONNECT leaves the live device connected, publishing
and with its own will; an accepted one takes the session over (MQTT-3.1.4-2). Both MQTT
readers (``broker_fast_path`` true and false) are covered.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import mqtt_raw
from tests.integration.conftest import RunningNode, make_admin_key, start_node, stop_node
from tests.payloads import telemetry

pytestmark = pytest.mark.anyio

ACCEPTED, NOT_AUTHORIZED = 0, 5
CONNACK, PUBACK = 2, 4
ORIGINAL_WILL = b"offline: original"


@pytest.fixture(params=[True, False], ids=["fast-path", "amqtt-reader"])
async def node(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningNode]:
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        running = await start_node(tg, tmp_path, key, broker_fast_path=request.param)
        yield running
        await stop_node(running)


class Live:
    """A device's connection on a raw socket: persistent session, a retained status will."""

    def __init__(self, port: int, device_id: str, secret: str) -> None:
        self.device_id = device_id
        self.seq = 0
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        will = (f"iot/{device_id}/status", ORIGINAL_WILL)
        self.sock.sendall(mqtt_raw.connect(device_id, device_id, secret, clean=False, will=will))
        ptype, body = mqtt_raw.read_packet(self.sock)
        assert (ptype, body[1]) == (CONNACK, ACCEPTED)

    def publish(self) -> bool:
        """One QoS 1 telemetry message; True when it was acknowledged on this connection."""
        self.seq += 1
        packet_id = self.seq
        try:
            self.sock.sendall(
                mqtt_raw.publish(
                    f"iot/{self.device_id}/telemetry", telemetry(self.device_id, 1, self.seq), packet_id=packet_id
                )
            )
            ptype, body = mqtt_raw.read_packet(self.sock)
        except (ConnectionError, TimeoutError):
            return False
        return (ptype, int.from_bytes(body[:2], "big")) == (PUBACK, packet_id)

    def drop(self) -> None:
        """Power off: no DISCONNECT, so the node publishes the will."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.sock.close()


def attempt(port: int, connect: bytes) -> tuple[int, socket.socket]:
    """Send *connect* on a new connection; its CONNACK return code and the open socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(connect)
    ptype, body = mqtt_raw.read_packet(sock)
    assert ptype == CONNACK
    return body[1], sock


async def events(node: RunningNode, device_id: str) -> list[tuple[str, str]]:
    page: dict[str, Any] = await node.get(f"/api/v1/devices/{device_id}/events")
    return [(e["event"], e["detail"]) for e in reversed(page["items"])]


async def wait_events(node: RunningNode, device_id: str, count: int) -> list[tuple[str, str]]:
    with anyio.fail_after(20):
        while len(found := await events(node, device_id)) < count:
            await anyio.sleep(0.05)
    return found


@pytest.mark.parametrize("clean", [False, True], ids=["persistent", "clean"])
async def test_wrong_password_connect_leaves_the_live_session_alone(node: RunningNode, clean: bool) -> None:
    secret = await node.register("live-1")
    live = await anyio.to_thread.run_sync(Live, node.mqtt_port, "live-1", secret)
    assert await anyio.to_thread.run_sync(live.publish)

    hijack = mqtt_raw.connect(
        "live-1", "live-1", "not-the-secret", clean=clean, will=("iot/live-1/status", b"offline: forged")
    )
    code, sock = await anyio.to_thread.run_sync(attempt, node.mqtt_port, hijack)
    sock.close()
    assert code == NOT_AUTHORIZED

    # The live device goes on as if nothing happened: connected, acknowledged, stored.
    for _ in range(3):
        assert await anyio.to_thread.run_sync(live.publish)
    assert len(await node.telemetry("live-1")) == 4
    device = await node.get("/api/v1/devices/live-1")
    assert device["state"]["online"] is True

    # And when it drops, the will published is its own, not the refused CONNECT's.
    await anyio.to_thread.run_sync(live.drop)
    history = await wait_events(node, "live-1", 3)
    assert [e for e, _ in history] == ["connected", "will_published", "disconnected"]
    assert history[1][1] == f"iot/live-1/status (retained): {ORIGINAL_WILL.decode()}"
    async with node.http() as client:
        metrics = (await client.get("/metrics")).text
    assert 'depot_node_auth_refused_total{reason="bad_secret"} 1.0' in metrics


async def test_accepted_persistent_connect_takes_the_session_over(node: RunningNode) -> None:
    """MQTT-3.1.4-2: the first connection is closed, the new one carries on (and its will)."""
    secret = await node.register("owner-1")
    first = await anyio.to_thread.run_sync(Live, node.mqtt_port, "owner-1", secret)
    assert await anyio.to_thread.run_sync(first.publish)
    second = await anyio.to_thread.run_sync(Live, node.mqtt_port, "owner-1", secret)
    second.seq = first.seq
    assert await anyio.to_thread.run_sync(second.publish)
    assert not await anyio.to_thread.run_sync(first.publish)  # closed by the takeover
    first.sock.close()
    assert len(await node.telemetry("owner-1")) == 2
    device = await node.get("/api/v1/devices/owner-1")
    assert device["state"]["online"] is True
    await anyio.to_thread.run_sync(second.drop)
    history = await wait_events(node, "owner-1", 4)
    assert history[-2:] == [
        ("will_published", f"iot/owner-1/status (retained): {ORIGINAL_WILL.decode()}"),
        ("disconnected", "connection_lost"),
    ]


# What a second CONNECT with the live device's client id may carry. Passwords: the right one,
# a wrong one, none at all. Wills: none, the device's own status topic (allowed), another
# device's topic (refused: bad_will_topic). Clean session both ways. 3 x 3 x 2 = 18
# combinations, each a few connections on the real node; 18 examples cover them.
PASSWORDS = st.sampled_from(["right", "wrong", "none"])
WILLS = st.sampled_from(["none", "own", "other"])


async def test_only_an_authenticated_connect_touches_the_live_session(node: RunningNode) -> None:
    """Hypothesis: a refused CONNECT (bad password or will topic) leaves the live device
    connected and publishing with its own will; an accepted one takes over."""
    count = 0
    await node.register("bystander-1")

    @settings(max_examples=18, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(clean=st.booleans(), password=PASSWORDS, will=WILLS)
    def holds(clean: bool, password: str, will: str) -> None:
        nonlocal count
        count += 1
        device_id = f"hx-{count}"
        secret = anyio.from_thread.run(node.register, device_id)
        live = Live(node.mqtt_port, device_id, secret)
        assert live.publish()
        sent_password = {"right": secret, "wrong": secret[::-1], "none": None}[password]
        will_topic = {"none": None, "own": f"iot/{device_id}/status", "other": "iot/bystander-1/status"}[will]
        connect = mqtt_raw.connect(
            device_id,
            device_id,
            sent_password,
            clean=clean,
            will=None if will_topic is None else (will_topic, b"offline: second"),
        )
        code, sock = attempt(node.mqtt_port, connect)
        try:
            if password == "right" and will != "other":
                assert code == ACCEPTED
                assert not live.publish()  # taken over
                topic = f"iot/{device_id}/telemetry"
                sock.sendall(mqtt_raw.publish(topic, telemetry(device_id, 2, 1), packet_id=7))
                assert mqtt_raw.read_packet(sock) == (PUBACK, b"\x00\x07")
                return
            assert code == NOT_AUTHORIZED
            assert live.publish()
            assert live.publish()
        finally:
            sock.close()
            live.drop()
        history = anyio.from_thread.run(wait_events, node, device_id, 3)
        assert history[1] == ("will_published", f"iot/{device_id}/status (retained): {ORIGINAL_WILL.decode()}")

    await anyio.to_thread.run_sync(holds)


async def test_connect_setups_are_admitted_a_few_at_a_time(tmp_path: Path) -> None:
    """With one set-up slot: a peer sending half a CONNECT holds no slot (others connect
    past it), and a burst of CONNECTs is answered in full, every one accepted."""
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, mqtt_connect_concurrency=1, mqtt_packet_timeout_s=30.0)
        secrets = {f"burst-{i}": await node.register(f"burst-{i}") for i in range(30)}
        stalled = socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10)
        try:
            first = mqtt_raw.connect("burst-0", "burst-0", secrets["burst-0"])
            stalled.sendall(first[: len(first) // 2])

            def burst() -> list[int]:
                socks = [socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=20) for _ in secrets]
                try:
                    for sock, (device_id, secret) in zip(socks, secrets.items(), strict=True):
                        sock.sendall(mqtt_raw.connect(device_id, device_id, secret))
                    return [mqtt_raw.read_packet(sock)[1][1] for sock in socks]
                finally:
                    for sock in socks:
                        sock.close()

            with anyio.fail_after(25):  # well inside the stalled CONNECT's 30 s timeout
                codes = await anyio.to_thread.run_sync(burst)
            assert codes == [ACCEPTED] * len(secrets)
        finally:
            stalled.close()
        await stop_node(node)
