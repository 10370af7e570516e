"""Restart, revocation, and a client nobody here wrote (mosquitto_pub)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import anyio
import pytest

from tests.integration.conftest import Device, RunningNode, make_admin_key, start_node, stop_node
from tests.payloads import telemetry

pytestmark = pytest.mark.anyio


async def test_restart_keeps_data_and_counters(tmp_path: Path) -> None:
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key)
        secret = await node.register("meter-r")
        dev = Device(node.mqtt_port, "meter-r", secret)
        assert (await dev.aconnect()).value == 0
        for seq in (0, 1, 1, 4):
            await dev.apublish("iot/meter-r/telemetry", telemetry("meter-r", 3, seq))
        await dev.aclose()
        before = await node.get("/api/v1/devices/meter-r")
        await stop_node(node)

        node = await start_node(tg, tmp_path, key)
        after = await node.get("/api/v1/devices/meter-r")
        assert after["counters"] == before["counters"]
        assert after["counters"]["missing"] == 2
        # The sequence state survived too: 1 is still a duplicate, 2 fills the gap.
        dev = Device(node.mqtt_port, "meter-r", secret)
        assert (await dev.aconnect()).value == 0
        await dev.apublish("iot/meter-r/telemetry", telemetry("meter-r", 3, 1))
        await dev.apublish("iot/meter-r/telemetry", telemetry("meter-r", 3, 2))
        await dev.aclose()
        final = await node.get("/api/v1/devices/meter-r")
        assert final["counters"]["duplicates"] == 2
        assert final["counters"]["late"] == 1
        assert final["counters"]["missing"] == 1
        assert [r["seq"] for r in await node.telemetry("meter-r")] == [0, 1, 2, 4]
        await stop_node(node)


async def test_revoked_device_is_disconnected_and_refused(node: RunningNode, devices: list[Device]) -> None:
    secret = await node.register("meter-x")
    dev = Device(node.mqtt_port, "meter-x", secret)
    devices.append(dev)
    assert (await dev.aconnect()).value == 0
    await dev.apublish("iot/meter-x/telemetry", telemetry("meter-x", 1, 0))
    async with node.http() as client:
        resp = await client.delete("/api/v1/devices/meter-x")
    assert resp.status_code == 204

    with anyio.fail_after(10):
        while dev.client.is_connected():
            await anyio.sleep(0.05)
    again = Device(node.mqtt_port, "meter-x", secret)
    code = await again.aconnect()
    again.client.loop_stop()
    assert code.is_failure


@pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed (.ci/run installs it)"
)
async def test_mosquitto_pub_telemetry_appears_in_the_api(node: RunningNode) -> None:
    secret = await node.register("emu-7")
    for seq in range(3):
        cmd = [
            "mosquitto_pub", "-h", "127.0.0.1", "-p", str(node.mqtt_port), "-V", "mqttv311",
            "-i", "emu-7", "-u", "emu-7", "-P", secret, "-q", "1",
            "-t", "iot/emu-7/telemetry", "-m", telemetry("emu-7", 2, seq).decode(),
        ]  # fmt: skip
        result = await anyio.run_process(cmd, check=False)
        assert result.returncode == 0, result.stderr
    rows = await node.telemetry("emu-7")
    assert [r["seq"] for r in rows] == [0, 1, 2]


def test_mosquitto_pub_is_installed_in_ci() -> None:
    """CI installs mosquitto-clients; make sure the test above did not silently skip there."""
    import os

    if os.environ.get("CI") and shutil.which("mosquitto_pub") is None:
        pytest.fail("CI must install mosquitto-clients (see .ci/run)")
    assert subprocess.run(["true"], check=False).returncode == 0
