"""Credential lifecycle on the real node: rotation and disabling bite at once, over MQTT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from actors.stats import IngestStats
from node.auth import DeviceGate
from storage.audit import Actor
from storage.reader import Reader
from storage.secrets import hash_device_secret
from storage.sqlite import SqliteStore
from tests.integration.conftest import Device, RunningNode
from tests.payloads import telemetry

pytestmark = pytest.mark.anyio


async def wait_disconnected(dev: Device) -> None:
    with anyio.fail_after(15):
        while dev.client.is_connected():
            await anyio.sleep(0.05)


async def refused(node: RunningNode, device_id: str, secret: str) -> bool:
    dev = Device(node.mqtt_port, device_id, secret)
    try:
        code = await dev.aconnect()
    except ConnectionError:
        return True  # closed before CONNACK: also a refusal
    finally:
        dev.client.loop_stop()
    return bool(code.is_failure)


async def disconnect_reasons(node: RunningNode, device_id: str) -> list[str]:
    page = await node.get(f"/api/v1/devices/{device_id}/events")
    return [e["detail"] for e in page["items"] if e["event"] == "disconnected"]


async def test_rotation_closes_the_session_and_refuses_the_old_secret(node: RunningNode, devices: list[Device]) -> None:
    old = await node.register("meter-a")
    dev = Device(node.mqtt_port, "meter-a", old)
    devices.append(dev)
    assert (await dev.aconnect()).value == 0  # the gate now caches this verification
    await dev.apublish("iot/meter-a/telemetry", telemetry("meter-a", 1, 0))

    async with node.http() as client:
        resp = await client.post("/api/v1/devices/meter-a/secret")
    assert resp.status_code == 200, resp.text
    new = resp.json()["secret"]

    await wait_disconnected(dev)
    dev.client.loop_stop()  # paho would reconnect with the old secret
    assert await refused(node, "meter-a", old)

    fresh = Device(node.mqtt_port, "meter-a", new)
    devices.append(fresh)
    assert (await fresh.aconnect()).value == 0
    await fresh.apublish("iot/meter-a/telemetry", telemetry("meter-a", 1, 1))
    assert [r["seq"] for r in await node.telemetry("meter-a")] == [0, 1]
    assert "secret_rotated" in await disconnect_reasons(node, "meter-a")
    metrics = await _metrics(node)
    assert 'depot_node_auth_refused_total{reason="bad_secret"} 1.0' in metrics


async def test_disable_closes_and_refuses_enable_lets_back(node: RunningNode, devices: list[Device]) -> None:
    secret = await node.register("meter-d")
    dev = Device(node.mqtt_port, "meter-d", secret)
    devices.append(dev)
    assert (await dev.aconnect()).value == 0
    async with node.http() as client:
        assert (await client.post("/api/v1/devices/meter-d/disable")).json()["disabled"] is True
    await wait_disconnected(dev)
    dev.client.loop_stop()
    assert await refused(node, "meter-d", secret)
    assert 'depot_node_auth_refused_total{reason="disabled"} 1.0' in await _metrics(node)
    assert (await node.get("/api/v1/devices/meter-d"))["state"]["online"] is False

    async with node.http() as client:
        assert (await client.post("/api/v1/devices/meter-d/enable")).json()["disabled"] is False
    back = Device(node.mqtt_port, "meter-d", secret)
    devices.append(back)
    assert (await back.aconnect()).value == 0
    await back.apublish("iot/meter-d/telemetry", telemetry("meter-d", 1, 0))
    assert [r["seq"] for r in await node.telemetry("meter-d")] == [0]
    assert "disabled" in await disconnect_reasons(node, "meter-d")


async def test_other_devices_keep_their_sessions(node: RunningNode, devices: list[Device]) -> None:
    secrets = {d: await node.register(d) for d in ("meter-1", "meter-2")}
    conns = {d: Device(node.mqtt_port, d, s) for d, s in secrets.items()}
    devices.extend(conns.values())
    for dev in conns.values():
        assert (await dev.aconnect()).value == 0
    async with node.http() as client:
        assert (await client.post("/api/v1/devices/meter-1/secret")).status_code == 200
    await wait_disconnected(conns["meter-1"])
    conns["meter-1"].client.loop_stop()
    assert conns["meter-2"].client.is_connected()
    await conns["meter-2"].apublish("iot/meter-2/telemetry", telemetry("meter-2", 1, 0))
    assert [r["seq"] for r in await node.telemetry("meter-2")] == [0]


async def test_protected_metrics_on_the_real_node(tmp_path: Path) -> None:
    from tests.integration.conftest import make_admin_key, start_node, stop_node

    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, metrics_require_key=True)
        async with node.http() as client:
            assert (await client.get("/metrics")).status_code == 200
            assert (await client.get("/metrics", headers={"Authorization": ""})).status_code == 401
        await stop_node(node)


async def test_a_check_in_flight_during_a_rotation_is_refused(tmp_path: Path) -> None:
    """A CONNECT that read the old hash and waits for Argon2 while the secret is rotated must
    not be accepted, nor leave the old secret cached."""
    path = tmp_path / "gate.sqlite3"
    store = SqliteStore(path, synchronous="NORMAL")
    reader = Reader(path)
    gate = DeviceGate(reader, IngestStats(), concurrency=1)
    try:
        await store.insert_device("meter-g", "dc_meter", None, hash_device_secret("old-secret"))
        results: list[bool] = []

        async def connect() -> None:
            results.append(await gate.check("meter-g", "meter-g", "old-secret"))

        # Holding the Argon2 limiter parks the check there, after its credentials read.
        async with anyio.create_task_group() as tg, gate.limiter:
            tg.start_soon(connect)
            with anyio.fail_after(10):
                while gate.limiter.statistics().tasks_waiting == 0:
                    await anyio.sleep(0.01)
            await store.rotate_device_secret("meter-g", hash_device_secret("new-secret"), by=Actor("test"))
            gate.forget("meter-g")
        assert results == [False]
        assert not await gate.check("meter-g", "meter-g", "old-secret")
        assert await gate.check("meter-g", "meter-g", "new-secret")
    finally:
        gate.close()
        reader.close()
        store.close()


async def _metrics(node: RunningNode) -> str:
    async with node.http() as client:
        resp = await client.get("/metrics")
    assert resp.status_code == 200
    return resp.text


async def test_a_session_accepted_just_before_a_change_is_closed_once_live(
    node: RunningNode, devices: list[Device], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change lands after the CONNECT's check passed but before its session is live (so
    closing the device's live sessions missed it): the bridge closes it as soon as it is."""
    secret = await node.register("meter-late")
    check = DeviceGate.check

    async def check_then_change(self: DeviceGate, client_id: str | None, username: str | None, *args: Any) -> bool:
        ok = await check(self, client_id, username, *args)
        if ok and username == "meter-late":
            self.forget(username)  # what a rotation committed at this moment does
        return ok

    monkeypatch.setattr(DeviceGate, "check", check_then_change)
    dev = Device(node.mqtt_port, "meter-late", secret)
    devices.append(dev)
    assert (await dev.aconnect()).value == 0
    await wait_disconnected(dev)
    dev.client.loop_stop()
    with anyio.fail_after(10):
        while "credentials_changed" not in await disconnect_reasons(node, "meter-late"):
            await anyio.sleep(0.05)
