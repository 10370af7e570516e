"""Alerts on the real node: a sequence gap raises ``sequence_gap`` (API and metric), an
operator acknowledges it, the late readings clear it; a link that dies raises
``device_offline`` once the grace is over, and reconnecting clears it. Raw MQTT on a socket
(``tests/mqtt_raw.py``), so that the test decides exactly when the connection ends and how."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from storage.secrets import parse_api_key
from tests import mqtt_raw
from tests.integration.conftest import RunningNode, make_admin_key, start_node, stop_node
from tests.payloads import telemetry

pytestmark = pytest.mark.anyio

GRACE_S = 0.5


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RunningNode]:
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        running = await start_node(tg, tmp_path, key, alert_offline_grace_s=GRACE_S)
        yield running
        await stop_node(running)


class RawDevice:
    """One MQTT session on a plain socket; blocking calls run in a worker thread."""

    def __init__(self, port: int, device_id: str, secret: str) -> None:
        self.device_id = device_id
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(mqtt_raw.connect(device_id, device_id, secret, keepalive=30))
        ptype, body = mqtt_raw.read_packet(self.sock)
        assert (ptype, body[1]) == (2, 0), "CONNACK refused"
        self.packet_id = 0

    def publish(self, boot: int, seq: int) -> None:
        """QoS 1, and wait for the PUBACK (the reading is committed then)."""
        self.packet_id += 1
        topic = f"iot/{self.device_id}/telemetry"
        self.sock.sendall(mqtt_raw.publish(topic, telemetry(self.device_id, boot, seq), packet_id=self.packet_id))
        ptype, body = mqtt_raw.read_packet(self.sock)
        assert (ptype, int.from_bytes(body[:2])) == (4, self.packet_id)

    def close(self, *, clean: bool) -> None:
        if clean:
            self.sock.sendall(mqtt_raw.DISCONNECT)
        self.sock.close()


async def connect(node: RunningNode, device_id: str, secret: str) -> RawDevice:
    return await anyio.to_thread.run_sync(RawDevice, node.mqtt_port, device_id, secret)


async def publish(device: RawDevice, *seqs: int, boot: int = 1) -> None:
    for seq in seqs:
        await anyio.to_thread.run_sync(device.publish, boot, seq)


async def alerts(node: RunningNode, **query: Any) -> list[dict[str, Any]]:
    page: dict[str, Any] = await node.get("/api/v1/alerts", **query)
    items: list[dict[str, Any]] = page["items"]
    return items


async def wait_for(check: Callable[[], Any]) -> Any:
    """Poll *check* (async) until it returns something truthy; the alert actor works in the background."""
    with anyio.fail_after(10):
        while not (result := await check()):
            await anyio.sleep(0.05)
    return result


async def open_alerts_metric(node: RunningNode, rule: str) -> float:
    async with node.http() as client:
        text = (await client.get("/metrics")).text
    prefix = f'depot_node_alerts_open{{rule="{rule}"}} '
    (line,) = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


async def test_a_gap_raises_an_alert_that_is_acknowledged_then_cleared(node: RunningNode) -> None:
    secret = await node.register("gappy-1")
    device = await connect(node, "gappy-1", secret)
    try:
        await publish(device, 0, 1, 4)  # 2 and 3 are missing

        async def gap_alert() -> dict[str, Any] | None:
            found = await alerts(node, rule="sequence_gap", device_id="gappy-1")
            return found[0] if found else None

        alert = await wait_for(gap_alert)
        assert (alert["state"], alert["severity"], alert["count"]) == ("open", "warning", 1)
        assert alert["detail"] == "missing readings in boot 1: 2"
        assert await open_alerts_metric(node, "sequence_gap") == 1

        async with node.http() as client:
            response = await client.post(f"/api/v1/alerts/{alert['alert_id']}/ack")
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "acknowledged"
        assert response.json()["acked_by"] == parse_api_key(node.admin_key)
        assert await open_alerts_metric(node, "sequence_gap") == 1  # acknowledged is not cleared

        await publish(device, 2, 3)  # the late readings fill the gap

        async def cleared() -> dict[str, Any] | None:
            found = await alerts(node, rule="sequence_gap", device_id="gappy-1", state="cleared")
            return found[0] if found else None

        done = await wait_for(cleared)
        assert done["alert_id"] == alert["alert_id"]
        assert done["acked_by"] == parse_api_key(node.admin_key)
        assert await alerts(node, state="open") == []
        assert await open_alerts_metric(node, "sequence_gap") == 0
        async with node.http() as client:
            metrics = (await client.get("/metrics")).text
        assert 'depot_node_alerts_raised_total{rule="sequence_gap"} 1.0' in metrics
    finally:
        await anyio.to_thread.run_sync(lambda: device.close(clean=True))


async def test_a_dead_link_raises_device_offline_after_the_grace(node: RunningNode) -> None:
    secret = await node.register("cut-1")
    device = await connect(node, "cut-1", secret)
    await publish(device, 0)
    device.close(clean=False)  # no DISCONNECT: connection_lost

    offline = await wait_for(lambda: alerts(node, rule="device_offline", device_id="cut-1"))
    (alert,) = offline
    assert alert["state"] == "open"
    assert alert["detail"].startswith("disconnected (connection_lost) at ")
    assert alert["detail"].endswith(f"; not back within {GRACE_S:g} s")
    # Raised no sooner than the grace after the disconnect the node recorded.
    lost = (await node.get("/api/v1/devices/cut-1/events"))["items"][0]
    assert (lost["event"], lost["detail"]) == ("disconnected", "connection_lost")
    waited = datetime.fromisoformat(alert["raised_at"]) - datetime.fromisoformat(lost["at"])
    assert waited.total_seconds() >= GRACE_S - 0.01
    assert await open_alerts_metric(node, "device_offline") == 1

    # Back again: cleared. Then a clean goodbye raises nothing, even after the grace.
    device = await connect(node, "cut-1", secret)
    await wait_for(lambda: alerts(node, rule="device_offline", state="cleared"))
    await anyio.to_thread.run_sync(lambda: device.close(clean=True))

    async def said_goodbye() -> bool:
        events = (await node.get("/api/v1/devices/cut-1/events"))["items"]
        return bool(events) and (events[0]["event"], events[0]["detail"]) == ("disconnected", "clean")

    await wait_for(said_goodbye)
    await anyio.sleep(GRACE_S * 2)
    assert await alerts(node, state="open") == []
    assert await open_alerts_metric(node, "device_offline") == 0
