"""Energy per period on the real node: a train's meter publishes over MQTT (paho-mqtt) across
period boundaries, reboots in the middle of a period, loses a reading that arrives late, and
the energy API answers the figures computed by hand in ``tests/energy_scenario.py``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from node.config import load_settings
from storage.errors import ConfigError
from storage.records import EnergyReading
from tests.energy_scenario import BOOT7, BOOT8, DEVICE, EXPECTED, EXPECTED_BEFORE_LATE, LATE, T0_MS
from tests.integration.conftest import Device, RunningNode, make_admin_key, start_node, stop_node
from tests.payloads import reading
from tests.unit.test_energy import approx

pytestmark = pytest.mark.anyio

ENERGY = f"/api/v1/devices/{DEVICE}/energy"
RANGE = {"from": "2026-11-23T16:00:00Z", "to": "2026-11-23T16:20:00Z"}


def payload(r: EnergyReading) -> bytes:
    ts = datetime.fromtimestamp(r.ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    m = {"voltage_v": 1500.0, "current_a": 0.0, "power_kw": 0.0}
    m |= {"energy_import_kwh": r.import_kwh, "energy_export_kwh": r.export_kwh}
    return json.dumps(reading(DEVICE, r.boot, r.seq, ts=ts, m=m)).encode()


def figures(body: dict[str, Any]) -> list[tuple[int, object, object, bool]]:
    return [
        (
            (int(datetime.fromisoformat(i["start"]).timestamp() * 1000) - T0_MS) // 60_000,
            approx(i["consumed_kwh"]),
            approx(i["regenerated_kwh"]),
            i["complete"],
        )
        for i in body["items"]
    ]


async def until_energy(node: RunningNode, expected: list[tuple[int, float, float, bool]]) -> dict[str, Any]:
    """Poll the API until the aggregator (1 s poll) has caught up; fail after 30 s with the last answer."""
    body: dict[str, Any] = {}
    with anyio.move_on_after(30):
        while True:
            body = await node.get(ENERGY, **RANGE)
            if figures(body) == expected:
                return body
            await anyio.sleep(0.1)
    assert figures(body) == expected
    return body


async def publish(dev: Device, readings: list[EnergyReading]) -> None:
    for r in readings:
        await dev.apublish(f"iot/{DEVICE}/telemetry", payload(r))


async def test_train_over_mqtt_with_reboot_gap_and_late_reading(node: RunningNode, devices: list[Device]) -> None:
    dev = Device(node.mqtt_port, DEVICE, await node.register(DEVICE))
    devices.append(dev)
    assert (await dev.aconnect()).value == 0
    await publish(dev, [*BOOT7, *BOOT8])  # the reboot at 16:07, seq 8 of boot 8 missing
    await until_energy(node, EXPECTED_BEFORE_LATE)

    await publish(dev, [LATE])
    body = await until_energy(node, EXPECTED)
    assert [i["covered_s"] for i in body["items"]] == [270.0, 240.0, 300.0, 300.0]
    hour = await node.get(ENERGY, **{"from": "2026-11-23T16:00:00Z", "to": "2026-11-23T17:00:00Z", "period": "1h"})
    (h,) = hour["items"]
    assert (h["consumed_kwh"], h["regenerated_kwh"], h["complete"]) == (approx(101), approx(32), False)

    async with node.http() as client:
        text = (await client.get("/metrics")).text
    assert f"depot_node_energy_readings_total {float(len(BOOT7) + len(BOOT8) + 1)}" in text
    # The late reading is always recomputed from the table (so are the first rows after a start).
    name = "depot_node_energy_readings_recomputed_total "
    (recomputed,) = (float(line.split()[1]) for line in text.splitlines() if line.startswith(name))
    assert 1 <= recomputed <= len(BOOT7) + len(BOOT8) + 1


async def test_energy_resumes_after_a_node_restart(tmp_path: Path, devices: list[Device]) -> None:
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key)
        secret = await node.register(DEVICE)
        dev = Device(node.mqtt_port, DEVICE, secret)
        assert (await dev.aconnect()).value == 0
        await publish(dev, BOOT7)  # the node may stop before or after aggregating these
        await dev.aclose()
        await stop_node(node)

        node = await start_node(tg, tmp_path, key)
        dev = Device(node.mqtt_port, DEVICE, secret)
        devices.append(dev)
        assert (await dev.aconnect()).value == 0
        await publish(dev, [*BOOT8, LATE])
        await until_energy(node, EXPECTED)
        await stop_node(node)


async def test_energy_disabled(tmp_path: Path, devices: list[Device]) -> None:
    key = make_admin_key(tmp_path)
    async with anyio.create_task_group() as tg:
        node = await start_node(tg, tmp_path, key, energy_enabled=False, energy_poll_s=0.05)
        dev = Device(node.mqtt_port, DEVICE, await node.register(DEVICE))
        devices.append(dev)
        assert (await dev.aconnect()).value == 0
        await publish(dev, BOOT7)
        await anyio.sleep(0.5)  # ten polls of an aggregator that is not there
        body = await node.get(ENERGY, **RANGE)
        assert all(i["consumed_kwh"] == 0 and not i["complete"] for i in body["items"])
        async with node.http() as client:
            text = (await client.get("/metrics")).text
        assert "depot_node_energy_readings_total 0.0" in text
        await stop_node(node)


@pytest.mark.parametrize(
    ("name", "value"), [("energy_max_interval_s", "10"), ("energy_poll_s", "0"), ("energy_enabled", "maybe")]
)
def test_bad_energy_settings_name_the_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(f"DEPOT_NODE_{name.upper()}", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert name in str(caught.value)
