"""Supervision, shown on the real node: crashes are contained, a failing store loses nothing.

Faults are injected through node.faults.FaultHooks; everything else is real (sockets,
SQLite file, HTTP).
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from actors.messages import DeviceMessage, Publish
from node.faults import FaultHooks
from storage.errors import StorageError
from tests import mqtt_raw
from tests.integration.conftest import RunningNode, make_admin_key, start_node, stop_node
from tests.payloads import telemetry

pytestmark = pytest.mark.anyio


async def metric(node: RunningNode, name: str) -> float:
    async with node.http() as client:
        text = (await client.get("/metrics")).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match is not None, name
    return float(match.group(1))


@contextmanager
def session(node: RunningNode, device_id: str, secret: str) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", node.mqtt_port), timeout=10) as sock:
        sock.sendall(mqtt_raw.connect(device_id, device_id, secret))
        ptype, body = mqtt_raw.read_packet(sock)
        assert (ptype, body[1]) == (2, 0)
        yield sock


def publish_and_wait(sock: socket.socket, device_id: str, seq: int, *, dup: bool = False) -> bool:
    """Publish one reading; True when PUBACKed, False when the node closed the connection."""
    sock.sendall(
        mqtt_raw.publish(f"iot/{device_id}/telemetry", telemetry(device_id, 1, seq), packet_id=seq + 1, dup=dup)
    )
    try:
        ptype, body = mqtt_raw.read_packet(sock)
    except ConnectionError:
        return False
    assert ptype == 4
    assert int.from_bytes(body[:2], "big") == seq + 1
    return True


def seqs(rows: list[dict[str, int]]) -> list[int]:
    return [r["seq"] for r in rows]


async def test_crashed_device_actor_restarts_reloads_state_and_loses_nothing(tmp_path: Path) -> None:
    crashed = threading.Event()

    def crash_once_on_seq_3(device_id: str, msg: DeviceMessage) -> None:
        if device_id == "crashy" and isinstance(msg, Publish) and b'"seq": 3,' in msg.payload and not crashed.is_set():
            crashed.set()
            raise RuntimeError("injected device actor crash")

    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, faults=FaultHooks(device=crash_once_on_seq_3))
        crashy = await node.register("crashy")
        steady = await node.register("steady")

        def run() -> None:
            with session(node, "steady", steady) as other:
                with session(node, "crashy", crashy) as sock:
                    for seq in range(3):
                        assert publish_and_wait(sock, "crashy", seq)
                    # The crash fails this message: no PUBACK, the node closes the connection.
                    assert not publish_and_wait(sock, "crashy", 3)
                # The other device never noticed.
                for seq in range(5):
                    assert publish_and_wait(other, "steady", seq)
                # The meter reconnects and resends what was not acknowledged, then goes on.
                with session(node, "crashy", crashy) as sock:
                    assert publish_and_wait(sock, "crashy", 3, dup=True)
                    assert publish_and_wait(sock, "crashy", 4)
                    assert publish_and_wait(sock, "crashy", 2, dup=True)  # an old resend: a duplicate

        await anyio.to_thread.run_sync(run)
        assert seqs(await node.telemetry("crashy")) == [0, 1, 2, 3, 4]
        assert seqs(await node.telemetry("steady")) == [0, 1, 2, 3, 4]
        device = await node.get("/api/v1/devices/crashy")
        assert device["counters"]["stored"] == 5
        assert device["counters"]["duplicates"] == 1
        assert device["counters"]["missing"] == 0
        assert await metric(node, "depot_node_actor_restarts_total") == 1
        assert await metric(node, "depot_node_devices_parked") == 0
        await stop_node(node)


async def test_device_past_its_restart_limit_is_parked_not_the_node(tmp_path: Path) -> None:
    def always_crash(device_id: str, msg: DeviceMessage) -> None:
        if device_id == "doomed":
            raise RuntimeError("injected: this device's actor always crashes")

    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, faults=FaultHooks(device=always_crash))
        doomed = await node.register("doomed")
        steady = await node.register("steady")

        def keep_trying() -> None:
            # Each attempt crashes the actor (its connect event already does); past the limit
            # (5 restarts in 60 s, backoff 0.1 s doubling) the device is parked.
            for _ in range(40):
                try:
                    with session(node, "doomed", doomed) as sock:
                        publish_and_wait(sock, "doomed", 0)
                except (ConnectionError, OSError, AssertionError):
                    pass

        with anyio.fail_after(60):
            while await metric(node, "depot_node_devices_parked") < 1:
                await anyio.to_thread.run_sync(keep_trying)

        def other_device() -> None:
            with session(node, "steady", steady) as sock:
                for seq in range(10):
                    assert publish_and_wait(sock, "steady", seq)

        await anyio.to_thread.run_sync(other_device)
        assert seqs(await node.telemetry("steady")) == list(range(10))
        assert await node.telemetry("doomed") == []
        assert await metric(node, "depot_node_actor_restarts_total") == 5
        async with node.http() as client:
            assert (await client.get("/healthz")).status_code == 200

        async def parked_alert() -> list[dict[str, str]]:
            page = await node.get("/api/v1/alerts", rule="device_parked")
            return list(page["items"])

        with anyio.fail_after(10):
            while not await parked_alert():
                await anyio.sleep(0.05)
        (alert,) = await parked_alert()
        assert (alert["device_id"], alert["state"], alert["severity"]) == ("doomed", "open", "critical")
        await stop_node(node)


async def test_failing_storage_stops_acknowledging_and_loses_nothing(tmp_path: Path) -> None:
    storage_down = threading.Event()

    def commit_hook() -> None:
        if storage_down.is_set():
            raise StorageError("injected: disk unavailable")

    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, faults=FaultHooks(commit=commit_hook))
        secret = await node.register("meter-s")

        def run() -> float:
            with session(node, "meter-s", secret) as sock:
                assert publish_and_wait(sock, "meter-s", 0)
                storage_down.set()
                for seq in range(1, 6):  # pipelined, as a meter's in-flight window
                    sock.sendall(
                        mqtt_raw.publish("iot/meter-s/telemetry", telemetry("meter-s", 1, seq), packet_id=seq + 1)
                    )
                sock.settimeout(1.5)
                with pytest.raises(TimeoutError):
                    mqtt_raw.read_packet(sock)  # nothing is acknowledged while storage fails
                storage_down.clear()
                sock.settimeout(30)
                acked = sorted(int.from_bytes(mqtt_raw.read_packet(sock)[1][:2], "big") for _ in range(5))
                assert acked == [2, 3, 4, 5, 6]
                sock.sendall(mqtt_raw.DISCONNECT)
            return 0.0

        await anyio.to_thread.run_sync(run)
        assert seqs(await node.telemetry("meter-s")) == [0, 1, 2, 3, 4, 5]
        assert await metric(node, "depot_node_commit_failures_total") >= 1
        await stop_node(node)


async def test_storage_writer_crash_loses_nothing(tmp_path: Path) -> None:
    """Not a StorageError (retried in place) but a bug: the writer task dies, its supervisor
    restarts it, and the group it held is committed by the new one."""
    crashes = 0

    def commit_hook() -> None:
        nonlocal crashes
        if crashes < 2:
            crashes += 1
            raise RuntimeError("injected storage writer crash")

    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, faults=FaultHooks(commit=commit_hook))
        secret = await node.register("meter-w")

        def run() -> None:
            with session(node, "meter-w", secret) as sock:
                for seq in range(5):
                    assert publish_and_wait(sock, "meter-w", seq)
                sock.sendall(mqtt_raw.DISCONNECT)

        await anyio.to_thread.run_sync(run)
        assert crashes == 2
        assert seqs(await node.telemetry("meter-w")) == [0, 1, 2, 3, 4]
        async with node.http() as client:
            assert (await client.get("/readyz")).status_code == 200
        await stop_node(node)
